//! The web page end to end in headless Chromium (Debian's `chromium` and
//! `chromium-driver`), driven over the W3C WebDriver protocol: type a prompt,
//! click Generate, watch the real tiny model's image appear; a submission the
//! server refuses (400) then shows its error and keeps that image. Without
//! chromedriver the test fails (CI installs it); set
//! `SDSERVE_SKIP_BROWSER_TESTS=1` to skip it explicitly, which it reports.

mod common;

use common::browser::{Browser, skipped};
use common::server::{Server, client, tiny};
use serde_json::{Value, json};

#[test]
fn type_a_prompt_click_generate_and_see_the_image() {
    if skipped() {
        return;
    }
    let s = Server::start(&["--model", &tiny()], &[]);
    let b = Browser::start();
    b.goto(&s.url("/"));
    // The selects are filled from /styles and /info.
    b.wait_for(
        "return document.querySelectorAll('#style option').length > 3 && \
                document.querySelectorAll('#resolution option').length > 0",
        "styles and resolutions",
    );
    b.js("document.querySelector('#style').value = 'oil-painting'");
    b.type_into("#prompt", "a lighthouse at dusk");
    b.click("#generate");
    let src = b.wait_for(
        "const i = document.querySelector('#result img.result-image'); \
         return i && i.complete && i.naturalWidth > 0 ? i.getAttribute('src') : null",
        "the result image",
    );
    let src = src.as_str().unwrap().to_string();
    assert_eq!(
        b.js("return document.querySelector('#status').textContent.trim()"),
        "Done"
    );
    // The page shows the job's stored image: its prompt is the styled one.
    let id = src.split('/').nth(2).expect("/files/{id}/0.png");
    let job: Value = client()
        .get(s.url(&format!("/image/{id}")))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(job["status"], "completed");
    assert_eq!(job["request"]["text"], "a lighthouse at dusk");
    assert_eq!(job["request"]["style"], "oil-painting");
    assert_eq!(job["image_url"], src.as_str());
    let width = b.js("return document.querySelector('#result img.result-image').naturalWidth");
    assert_eq!(width, json!(96));
    let download = b.js("return document.querySelector('#result a.download').getAttribute('href')");
    assert_eq!(download, json!(src));
    // The gallery picks it up.
    b.wait_for(
        &format!(
            "return [...document.querySelectorAll('#gallery img.gallery-image')]\
             .some(i => i.getAttribute('src') === '{src}')"
        ),
        "the image in the gallery",
    );

    // A server-side validation error (400 naming `steps`) is shown and the field
    // highlighted, while the previous image stays on the page: the server refused
    // the job, so the last result is still the latest one.
    b.js("document.querySelector('#steps').value = '100000'");
    b.click("#generate");
    let error = b.wait_for(
        "const e = document.querySelector('#error'); \
         return e && !e.hidden && e.textContent.trim() ? e.textContent : null",
        "the error message",
    );
    assert!(
        error.as_str().unwrap().to_lowercase().contains("steps"),
        "{error}"
    );
    assert_eq!(
        b.js("return document.querySelector('#steps').getAttribute('aria-invalid')"),
        "true"
    );
    assert_eq!(
        b.js("return document.querySelector('#status').textContent.trim()"),
        "Error"
    );
    assert_result_shown(&b, &src);

    // An error found before sending (no prompt) keeps it too.
    b.js("document.querySelector('#prompt').value = ''");
    b.click("#generate");
    b.wait_for(
        "return document.querySelector('#prompt').getAttribute('aria-invalid') === 'true'",
        "the prompt highlighted",
    );
    assert_result_shown(&b, &src);

    // Corrected, the next job is accepted: the error and the highlight go, and
    // its image replaces the previous one.
    b.js("document.querySelector('#steps').value = ''");
    b.type_into("#prompt", "a lighthouse at dawn");
    b.click("#generate");
    let next = b.wait_for(
        &format!(
            "const i = document.querySelectorAll('#result img.result-image'); \
             return i.length === 1 && i[0].complete && i[0].naturalWidth > 0 && \
                    i[0].getAttribute('src') !== '{src}' ? i[0].getAttribute('src') : null"
        ),
        "the next result image",
    );
    assert!(next.as_str().unwrap().starts_with("/files/"), "{next}");
    assert_eq!(
        b.js("return document.querySelector('#status').textContent.trim()"),
        "Done"
    );
    assert_eq!(b.js("return document.querySelector('#error').hidden"), true);
    assert_eq!(
        b.js("return document.querySelectorAll('#gen-form [aria-invalid=\"true\"]').length"),
        0
    );
}

/// The page still shows exactly one result, the image at `src`, loaded and
/// visible, with its download link.
fn assert_result_shown(b: &Browser, src: &str) {
    let shown = b.js(
        "const i = document.querySelectorAll('#result img.result-image'); \
         const a = document.querySelector('#result a.download'); \
         return {count: i.length, \
                 src: i.length ? i[0].getAttribute('src') : null, \
                 width: i.length ? i[0].naturalWidth : null, \
                 visible: i.length ? i[0].getBoundingClientRect().height > 0 : false, \
                 download: a ? a.getAttribute('href') : null}",
    );
    assert_eq!(
        shown,
        json!({"count": 1, "src": src, "width": 96, "visible": true, "download": src}),
        "the previous result must stay on the page"
    );
}

/// The seed's own request on the model it was written for: an SDXL folder at
/// its native 1024 × 1024 (tiny-sdxl with the real base model's
/// `sample_size` 128, so every default is the real one). The page offers
/// SDXL's trained sizes with 1024 × 1024 selected and the model's defaults as
/// placeholders, and shows the 1024-px image.
#[test]
fn an_sdxl_model_at_its_native_size_through_the_page() {
    if skipped() {
        return;
    }
    let model = common::copy_model("tiny-sdxl");
    for (file, size) in [("unet/config.json", 128), ("vae/config.json", 1024)] {
        let path = model.path().join(file);
        let mut cfg: Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        cfg["sample_size"] = json!(size);
        std::fs::write(&path, cfg.to_string()).unwrap();
    }
    let path = model.path().display().to_string();
    let s = Server::start(&["--model", &path, "--no-warmup"], &[]);
    let b = Browser::start();
    b.goto(&s.url("/"));
    b.wait_for(
        "return document.querySelectorAll('#resolution option').length >= 9",
        "SDXL's trained sizes",
    );
    let offered =
        b.js("return [...document.querySelectorAll('#resolution option')].map(o => o.value)");
    for size in [
        "1024x1024",
        "1152x896",
        "896x1152",
        "1216x832",
        "1344x768",
        "1536x640",
    ] {
        assert!(
            offered.as_array().unwrap().contains(&json!(size)),
            "{size}: {offered}"
        );
    }
    assert_eq!(
        b.js("return document.querySelector('#resolution').value"),
        "1024x1024"
    );
    assert_eq!(
        b.js("return document.querySelector('#steps').placeholder"),
        "30"
    );
    assert_eq!(
        b.js("return document.querySelector('#guidance').placeholder"),
        "5"
    );

    b.js("document.querySelector('#steps').value = '2'");
    b.type_into("#prompt", "a lighthouse at dusk");
    b.click("#generate");
    let src = b.wait_for(
        "const i = document.querySelector('#result img.result-image'); \
         return i && i.complete && i.naturalWidth > 0 ? i.getAttribute('src') : null",
        "the result image",
    );
    assert_eq!(
        b.js(
            "const i = document.querySelector('#result img.result-image'); \
              return [i.naturalWidth, i.naturalHeight]"
        ),
        json!([1024, 1024])
    );
    let id = src
        .as_str()
        .unwrap()
        .split('/')
        .nth(2)
        .expect("/files/{id}/0.png");
    let job: Value = client()
        .get(s.url(&format!("/image/{id}")))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(job["status"], "completed");
    assert_eq!(job["request"]["resolution"], "1024x1024");
    assert_eq!(job["request"]["guidance"], 5.0, "{job}");
}
