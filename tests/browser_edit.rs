//! The page's editor end to end in headless Chromium (see `tests/browser.rs`):
//! on a phone-sized window, upload a picture, paint a mask with touch, extend
//! it to the right and inpaint; on a desktop one, edit a gallery image with
//! image to image at a chosen strength. Each checks what the server stored
//! (the picture and mask the page sent) and that the result shows beside its
//! source.

mod common;

use common::browser::{Browser, skipped};
use common::server::{Server, accepted, client, get_png, tiny, wait_final};
use serde_json::{Value, json};

fn job(s: &Server, id: &str) -> Value {
    client()
        .get(s.url(&format!("/image/{id}")))
        .send()
        .unwrap()
        .json()
        .unwrap()
}

/// Waits for a loaded result image and returns its job's id.
fn result_id(b: &Browser, not: &str) -> String {
    let src = b.wait_for(
        &format!(
            "const i = document.querySelector('#result img.result-image'); \
             return i && i.complete && i.naturalWidth > 0 && i.getAttribute('src') !== '{not}' \
                    ? i.getAttribute('src') : null"
        ),
        "the result image",
    );
    src.as_str()
        .unwrap()
        .split('/')
        .nth(2)
        .expect("/files/{id}/0.png")
        .to_string()
}

fn source_shown(b: &Browser) -> Value {
    b.wait_for(
        "const i = document.querySelector('#result figure.source-item img.source-image'); \
         return i && i.complete && i.naturalWidth > 0 ? [i.naturalWidth, i.naturalHeight] : null",
        "the source beside the result",
    )
}

#[test]
fn on_a_phone_upload_paint_a_mask_extend_and_inpaint() {
    if skipped() {
        return;
    }
    let s = Server::start(&["--model", &tiny()], &[]);
    let b = Browser::start();
    b.window_size(390, 844);
    b.goto(&s.url("/"));
    b.wait_for(
        "return document.querySelectorAll('#resolution option').length > 0",
        "the resolutions",
    );
    let input = common::fixtures().join("edit/input-96.png");
    b.upload("#upload", &input);
    b.wait_for(
        "const c = document.querySelector('#edit-picture'); \
         return !document.querySelector('#editor').hidden && c.width === 96",
        "the picture in the editor",
    );
    assert_eq!(
        b.js("return document.querySelector('#resolution').value"),
        "",
        "an edit keeps the picture's size"
    );
    // The canvas fills the phone's width; nothing scrolls sideways.
    let fit = b.js(
        "const r = document.querySelector('#edit-mask').getBoundingClientRect(); \
         return [r.width > 200, r.right <= window.innerWidth, \
                 document.documentElement.scrollWidth <= window.innerWidth]",
    );
    assert_eq!(fit, json!([true, true, true]));
    assert!(
        b.js("return document.querySelector('#edit-mode').textContent")
            .as_str()
            .unwrap()
            .contains("Image to image")
    );

    // A touch stroke across the middle.
    b.drag(
        "#edit-mask",
        "touch",
        &[(-40, 0), (-10, 5), (20, 0), (40, -5)],
    );
    b.wait_for(
        "return document.querySelector('#edit-mode').textContent.includes('Inpainting')",
        "the painted mask",
    );
    assert_eq!(
        b.js("return document.querySelector('#strength-value').textContent"),
        "1.00 (default)"
    );
    b.click("#editor .extend[data-extend='right']");
    assert_eq!(
        b.js("return document.querySelector('#edit-dims').textContent"),
        "160 × 96"
    );

    b.type_into("#prompt", "a lighthouse at dusk");
    b.js("document.querySelector('#steps').value = '3'");
    b.click("#generate");
    let id = result_id(&b, "");
    assert_eq!(source_shown(&b), json!([160, 96]));
    let done = job(&s, &id);
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["request"]["strength"], 1.0, "inpainting's default");
    let result = get_png(&s, done["image_url"].as_str().unwrap());
    assert_eq!(result.dimensions(), (160, 96));

    // What the page sent: the picture, extended by its stretched right edge...
    let init = get_png(&s, done["init_image_url"].as_str().unwrap());
    let original = image::open(&input).unwrap().to_rgb8();
    assert_eq!(init.dimensions(), (160, 96));
    for (x, y) in [(0, 0), (30, 70), (95, 40)] {
        assert_eq!(init.get_pixel(x, y), original.get_pixel(x, y), "({x}, {y})");
    }
    assert_eq!(init.get_pixel(150, 40), original.get_pixel(95, 40));
    // ...and the mask: white along the stroke and over the new strip, black elsewhere.
    let mask = get_png(&s, done["mask_image_url"].as_str().unwrap());
    assert_eq!(mask.dimensions(), (160, 96));
    let white = |x, y| mask.get_pixel(x, y).0 == [255; 3];
    let black = |x, y| mask.get_pixel(x, y).0 == [0; 3];
    assert!(white(48, 48) && white(130, 5) && white(159, 95));
    assert!(black(2, 2) && black(48, 92) && black(90, 2));
    assert!(mask.pixels().all(|p| p.0 == [0; 3] || p.0 == [255; 3]));
}

#[test]
fn edit_a_gallery_image_with_image_to_image() {
    if skipped() {
        return;
    }
    let s = Server::start(&["--model", &tiny()], &[]);
    let first = accepted(&s, json!({"text": "a red boat", "steps": 2, "seed": 1}));
    let first_done = wait_final(&s, &first);
    assert_eq!(first_done["status"], "completed");
    let b = Browser::start();
    b.goto(&s.url("/"));
    b.wait_for(
        "return document.querySelectorAll('#gallery img.gallery-image').length > 0",
        "the gallery",
    );
    b.click("#gallery button.thumb");
    b.wait_for(
        "return document.querySelector('#viewer').open",
        "the viewer",
    );
    b.click("#viewer-edit");
    b.wait_for(
        "return !document.querySelector('#editor').hidden && \
                document.querySelector('#edit-picture').width > 0 && \
                !document.querySelector('#viewer').open",
        "the gallery image in the editor",
    );
    // A mask painted and cleared again leaves image to image.
    b.drag("#edit-mask", "mouse", &[(-20, -20), (20, 20)]);
    b.wait_for(
        "return document.querySelector('#edit-mode').textContent.includes('Inpainting')",
        "the painted mask",
    );
    b.click("#mask-clear");
    assert!(
        b.js("return document.querySelector('#edit-mode').textContent")
            .as_str()
            .unwrap()
            .contains("Image to image")
    );
    b.js(
        "const r = document.querySelector('#strength'); r.value = '0.5'; \
         r.dispatchEvent(new Event('input', {bubbles: true}))",
    );
    assert_eq!(
        b.js("return document.querySelector('#strength-value').textContent"),
        "0.50"
    );
    b.type_into("#prompt", "a red boat at night");
    b.js("document.querySelector('#steps').value = '4'");
    b.click("#generate");
    let id = result_id(&b, "");
    assert_ne!(id, first);
    source_shown(&b);
    let done = job(&s, &id);
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["request"]["strength"], 0.5, "{done}");
    assert_eq!(done["mask_image_url"], Value::Null);
    let init = get_png(&s, done["init_image_url"].as_str().unwrap());
    let earlier = get_png(&s, first_done["image_url"].as_str().unwrap());
    assert!(init == earlier, "the edit starts from the gallery image");
    let result = get_png(&s, done["image_url"].as_str().unwrap());
    assert!(result != earlier, "the edit changed nothing");
}
