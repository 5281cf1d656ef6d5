//! The public job API over real HTTP against the real pipeline on the tiny
//! model: POST /generate, GET/DELETE /image/{id}, events, files, gallery,
//! styles, info, metrics, OpenAPI, CORS, queue limits, shutdown and
//! restart recovery.

mod common;

use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};

use common::server::{Server, accepted, client, job_status, tiny, wait_final, wait_status};
use serde_json::{Value, json};

fn post(s: &Server, body: Value) -> reqwest::blocking::Response {
    client()
        .post(s.url("/generate"))
        .json(&body)
        .send()
        .unwrap()
}

fn png(bytes: &[u8]) -> image::RgbImage {
    image::load_from_memory_with_format(bytes, image::ImageFormat::Png)
        .expect("a PNG")
        .to_rgb8()
}

fn get_bytes(s: &Server, url: &str) -> Vec<u8> {
    let r = client().get(s.url(url)).send().unwrap();
    assert_eq!(r.status(), 200, "{url}");
    r.bytes().unwrap().to_vec()
}

#[test]
fn generate_then_status_file_and_gallery() {
    let s = Server::start(&["--model", &tiny()], &[]);
    let r = post(
        &s,
        json!({"text": "a red fox", "style": "anime", "resolution": "64x48", "steps": 3, "seed": 7}),
    );
    assert_eq!(r.status(), 202);
    let location = r.headers()["location"].to_str().unwrap().to_string();
    let v: Value = r.json().unwrap();
    let id = v["image_id"].as_str().unwrap().to_string();
    assert!(uuid_like(&id), "{id}");
    assert_eq!(location, format!("/image/{id}"));
    assert!(["queued", "processing"].contains(&v["status"].as_str().unwrap()));
    // The warm-up measured step times, so there is an estimate from the start.
    assert!(v["estimated_time"].as_f64().unwrap() >= 0.0, "{v}");
    assert_eq!(v["events_url"], format!("/image/{id}/events"));

    let done = wait_final(&s, &id);
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["progress"], 1.0);
    assert_eq!(done["image_url"], format!("/files/{id}/0.png"));
    assert_eq!(
        done["init_image_url"],
        Value::Null,
        "text to image has no input"
    );
    assert!(done["generated_at"].as_str().unwrap().contains('T'));
    assert!(done["error"].is_null());
    assert_eq!(done["request"]["seed"], 7);
    assert_eq!(done["request"]["style"], "anime");
    assert_eq!(done["request"]["resolution"], "64x48");
    assert_eq!(done["seeds"], json!([7]));

    let bytes = get_bytes(&s, done["image_url"].as_str().unwrap());
    let img = png(&bytes);
    assert_eq!((img.width(), img.height()), (64, 48));
    // The style shaped the prompt: the same pipeline through /invocations with
    // the styled prompt gives the same pixels.
    let style = sdserve::styles::find("anime").unwrap();
    let (prompt, negative) = style.apply("a red fox", None);
    let r = client()
        .post(s.url("/invocations"))
        .header("accept", "image/png")
        .json(
            &json!({"prompt": prompt, "negative_prompt": negative, "width": 64, "height": 48,
                      "num_inference_steps": 3, "seed": 7}),
        )
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        png(&r.bytes().unwrap()) == img,
        "job image differs from /invocations"
    );

    let recent: Value = client()
        .get(s.url("/images?limit=5"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(recent["images"][0]["image_id"], id.as_str());
}

fn uuid_like(s: &str) -> bool {
    s.len() == 36 && s.chars().filter(|&c| c == '-').count() == 4
}

#[test]
fn several_images_and_the_prompt_alias() {
    let s = Server::start(&["--model", &tiny()], &[]);
    let id = accepted(
        &s,
        json!({"text": "boats", "num_images": 2, "steps": 2, "seed": 3}),
    );
    let done = wait_final(&s, &id);
    assert_eq!(done["status"], "completed");
    assert_eq!(done["seeds"], json!([3, 4]));
    let urls = done["image_urls"].as_array().unwrap();
    assert_eq!(urls.len(), 2);
    let a = get_bytes(&s, urls[0].as_str().unwrap());
    let b = get_bytes(&s, urls[1].as_str().unwrap());
    assert_ne!(a, b, "different seeds give different images");

    // SageMaker-minded callers may say `prompt`.
    let id = accepted(&s, json!({"prompt": "a lighthouse", "steps": 1}));
    let done = wait_final(&s, &id);
    assert_eq!(done["request"]["text"], "a lighthouse");
}

fn assert_bad(r: reqwest::blocking::Response, code: u16, field: Option<&str>) {
    assert_eq!(r.status().as_u16(), code);
    let v: Value = r.json().expect("a JSON error body");
    assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{v}");
    if let Some(f) = field {
        assert_eq!(v["field"], f, "{v}");
    }
}

#[test]
fn bad_requests_get_4xx_json_naming_the_field() {
    let s = Server::start(&["--model", &tiny(), "--max-pixels", "65536"], &[]);
    let cases = [
        (json!({"style": "anime"}), "text"),
        (json!({"text": "  "}), "text"),
        (json!({"text": "x", "resolution": "64by64"}), "resolution"),
        (json!({"text": "x", "resolution": "65x64"}), "resolution"),
        (json!({"text": "x", "resolution": "512x512"}), "resolution"),
        (json!({"text": "x", "style": "cubism"}), "style"),
        (json!({"text": "x", "steps": "many"}), "steps"),
        (json!({"text": "x", "steps": 0}), "steps"),
        (json!({"text": "x", "guidance": -1}), "guidance"),
        (json!({"text": "x", "scheduler": "magic"}), "scheduler"),
        (json!({"text": "x", "num_images": 99}), "num_images"),
        (json!({"text": "x", "seed": -5}), "seed"),
        (json!({"text": "x", "colour": "red"}), "colour"),
        (
            json!({"text": "x", "scheduler_options": {"no_such_option": 1}}),
            "scheduler_options",
        ),
        (json!(["x"]), "body"),
    ];
    for (body, field) in cases {
        assert_bad(post(&s, body.clone()), 400, Some(field));
    }
    let r = client()
        .post(s.url("/generate"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .unwrap();
    assert_bad(r, 400, Some("body"));
    let r = client()
        .post(s.url("/generate"))
        .header("content-type", "application/xml")
        .body("<x/>")
        .send()
        .unwrap();
    assert_bad(r, 415, None);
    let r = client()
        .post(s.url("/generate"))
        .json(&json!({"text": "x".repeat(5000)}))
        .send()
        .unwrap();
    assert_bad(r, 400, Some("text"));
    let r = client()
        .post(s.url("/generate"))
        .header("content-type", "application/json")
        .body(vec![b' '; 7 * 1024 * 1024])
        .send()
        .unwrap();
    assert_eq!(r.status(), 413);

    for path in [
        "/image/not-a-uuid",
        "/image/00000000-0000-4000-8000-000000000000",
        "/image/00000000-0000-4000-8000-000000000000/events",
        "/files/00000000-0000-4000-8000-000000000000/0.png",
        "/files/../../etc/passwd",
        "/no/such/route",
    ] {
        assert_bad(client().get(s.url(path)).send().unwrap(), 404, None);
    }
    let r = client()
        .delete(s.url("/image/00000000-0000-4000-8000-000000000000"))
        .send()
        .unwrap();
    assert_bad(r, 404, None);
    assert_bad(
        client().get(s.url("/images?limit=0")).send().unwrap(),
        400,
        Some("limit"),
    );
    assert_bad(
        client().get(s.url("/images?limit=ten")).send().unwrap(),
        400,
        Some("limit"),
    );
}

/// Reads a Server-Sent Events stream to its end: (event, data) pairs.
fn read_events(r: reqwest::blocking::Response) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    let (mut event, mut data) = (String::new(), String::new());
    for line in BufReader::new(r).lines() {
        let line = line.unwrap();
        if let Some(e) = line.strip_prefix("event:") {
            event = e.trim().to_string();
        } else if let Some(d) = line.strip_prefix("data:") {
            data.push_str(d.trim());
        } else if line.is_empty() && !event.is_empty() {
            out.push((
                std::mem::take(&mut event),
                serde_json::from_str(&std::mem::take(&mut data)).unwrap(),
            ));
        }
    }
    out
}

#[test]
fn events_stream_queue_position_progress_and_the_result() {
    let s = Server::start(&["--model", &tiny()], &[]);
    let blocker = accepted(&s, json!({"text": "x", "steps": 300, "scheduler": "ddim"}));
    let id = accepted(&s, json!({"text": "y", "steps": 6, "scheduler": "ddim"}));
    let r = client()
        .get(s.url(&format!("/image/{id}/events")))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let events = read_events(r);
    let names: Vec<&str> = events.iter().map(|(e, _)| e.as_str()).collect();
    assert_eq!(names.first(), Some(&"queued"), "{names:?}");
    assert_eq!(events[0].1["queue_position"], 0);
    assert!(events[0].1["estimated_time"].as_f64().unwrap() > 0.0);
    assert_eq!(names.last(), Some(&"completed"), "{names:?}");
    let steps: Vec<u64> = events
        .iter()
        .filter(|(e, _)| e == "progress")
        .map(|(_, d)| d["step"].as_u64().unwrap())
        .collect();
    assert!(
        !steps.is_empty() && steps.windows(2).all(|w| w[0] < w[1]),
        "{steps:?}"
    );
    assert_eq!(*steps.last().unwrap(), 6);
    let result = &events.last().unwrap().1;
    assert_eq!(result["image_url"], format!("/files/{id}/0.png"));
    assert_eq!(job_status(&s, &blocker)["status"], "completed");

    // A finished job's stream says so once and ends.
    let again = read_events(
        client()
            .get(s.url(&format!("/image/{id}/events")))
            .send()
            .unwrap(),
    );
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].0, "completed");
}

#[test]
fn delete_cancels_queued_and_running_jobs() {
    let s = Server::start(&["--model", &tiny()], &[]);
    let running = accepted(&s, json!({"text": "x", "steps": 400, "scheduler": "ddim"}));
    let queued = accepted(&s, json!({"text": "y", "steps": 2}));
    wait_status(&s, &running, "processing");

    let r = client()
        .delete(s.url(&format!("/image/{queued}")))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().unwrap()["status"], "cancelled");

    let r = client()
        .delete(s.url(&format!("/image/{running}")))
        .send()
        .unwrap();
    assert!([200, 202].contains(&r.status().as_u16()));
    assert_eq!(wait_final(&s, &running)["status"], "cancelled");
    s.wait_for_log("cancelled while running", "job=1");

    let r = client()
        .delete(s.url(&format!("/image/{running}")))
        .send()
        .unwrap();
    assert_bad(r, 409, None);
    // The engine is free again.
    let id = accepted(&s, json!({"text": "z", "steps": 2}));
    assert_eq!(wait_final(&s, &id)["status"], "completed");
}

#[test]
fn a_full_queue_is_429_with_retry_after() {
    let s = Server::start(&["--model", &tiny(), "--queue-capacity", "1"], &[]);
    let running = accepted(&s, json!({"text": "x", "steps": 300, "scheduler": "ddim"}));
    wait_status(&s, &running, "processing");
    let queued = accepted(&s, json!({"text": "y", "steps": 2}));
    let r = post(&s, json!({"text": "z", "steps": 2}));
    assert_eq!(r.status(), 429);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry >= 1);
    assert_bad(r, 429, None);
    // The 429 lost nothing: both accepted jobs finish.
    assert_eq!(wait_final(&s, &running)["status"], "completed");
    assert_eq!(wait_final(&s, &queued)["status"], "completed");
}

#[test]
fn styles_info_metrics_and_openapi() {
    let s = Server::start(&["--model", &tiny()], &[]);
    let styles: Value = client()
        .get(s.url("/styles"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let names: Vec<&str> = styles["styles"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    for want in [
        "none",
        "realistic",
        "anime",
        "digital-art",
        "oil-painting",
        "pixel-art",
    ] {
        assert!(names.contains(&want), "{names:?}");
    }
    let info: Value = client().get(s.url("/info")).send().unwrap().json().unwrap();
    assert_eq!(info["default_resolution"], "96x96");
    assert!(info["resolutions"].as_array().unwrap().len() >= 3);
    assert_eq!(info["default_scheduler"], "pndm");

    let id = accepted(&s, json!({"text": "x", "steps": 3, "scheduler": "ddim"}));
    wait_final(&s, &id);
    let r = client().get(s.url("/metrics")).send().unwrap();
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text")
    );
    let text = r.text().unwrap();
    for want in [
        r#"sdserve_http_requests_total{route="/generate",method="POST",status="202"} 1"#,
        r#"sdserve_http_requests_total{route="/image/{image_id}",method="GET",status="200"}"#,
        r#"sdserve_jobs_total{outcome="completed"} 1"#,
        "sdserve_queue_depth 0",
        "sdserve_queue_wait_seconds_count 1",
        "sdserve_generation_seconds_count 1",
        "sdserve_step_seconds_count 2",
        "sdserve_images_generated_total 1",
    ] {
        assert!(text.contains(want), "missing {want:?} in\n{text}");
    }

    // Every documented path and method is served (not the router's 404/405).
    let spec: Value = client()
        .get(s.url("/openapi.json"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(spec["openapi"], "3.1.0");
    let paths = spec["paths"].as_object().unwrap();
    for (path, ops) in paths {
        let url = path.replace("{image_id}", &id).replace("{file}", "0.png");
        for method in ops.as_object().unwrap().keys() {
            let m = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let r = client().request(m, s.url(&url)).send().unwrap();
            let code = r.status().as_u16();
            let body = r.text().unwrap_or_default();
            assert!(
                code != 405 && !body.contains("no route for"),
                "{method} {path}: {code} {body}"
            );
        }
    }
    // ...and every route the server has is documented.
    for route in [
        "/ping",
        "/invocations",
        "/generate",
        "/image/{image_id}",
        "/image/{image_id}/events",
        "/images",
        "/files/{image_id}/{file}",
        "/styles",
        "/info",
        "/",
        "/config.js",
        "/metrics",
        "/openapi.json",
    ] {
        assert!(paths.contains_key(route), "{route} undocumented");
    }
}

#[test]
fn cors_only_for_configured_origins() {
    let preflight = |s: &Server| {
        client()
            .request(reqwest::Method::OPTIONS, s.url("/generate"))
            .header("origin", "https://pages.example.com")
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "content-type")
            .send()
            .unwrap()
    };
    let open = Server::start(
        &[
            "--model",
            &tiny(),
            "--cors-origin",
            "https://pages.example.com,https://other.example",
        ],
        &[],
    );
    let r = preflight(&open);
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://pages.example.com"
    );
    let r = client()
        .get(open.url("/styles"))
        .header("origin", "https://evil.example")
        .send()
        .unwrap();
    assert!(!r.headers().contains_key("access-control-allow-origin"));

    let closed = Server::start(&["--model", &tiny()], &[]);
    assert!(
        !preflight(&closed)
            .headers()
            .contains_key("access-control-allow-origin")
    );
}

#[test]
fn the_page_and_its_config_are_served() {
    let s = Server::start(&["--model", &tiny()], &[]);
    let r = client().get(s.url("/")).send().unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let html = r.text().unwrap();
    for id in [
        "id=\"prompt\"",
        "id=\"generate\"",
        "id=\"gallery\"",
        "config.js",
    ] {
        assert!(html.contains(id), "page lacks {id}");
    }
    let r = client().get(s.url("/config.js")).send().unwrap();
    assert_eq!(r.status(), 200);
    assert!(!r.text().unwrap().contains("SDSERVE_API_BASE ="));
}

#[test]
fn a_killed_server_runs_every_accepted_job_after_restart() {
    let data = tempfile::tempdir().unwrap();
    let storage = data.path().to_str().unwrap().to_string();
    let args = ["--model", &tiny(), "--storage", &storage];
    let s = Server::start(&args, &[]);
    let first = accepted(
        &s,
        json!({"text": "a", "steps": 400, "scheduler": "ddim", "seed": 1}),
    );
    let rest: Vec<String> = (0..3)
        .map(|i| {
            accepted(
                &s,
                json!({"text": format!("b{i}"), "steps": 2, "seed": 10 + i}),
            )
        })
        .collect();
    wait_status(&s, &first, "processing");
    s.kill();

    let s = Server::start(&args, &[]);
    s.wait_for_log("re-queued 4 unfinished job(s)", "");
    for id in std::iter::once(&first).chain(&rest) {
        let done = wait_final(&s, id);
        assert_eq!(done["status"], "completed", "{done}");
        get_bytes(&s, done["image_url"].as_str().unwrap());
    }
    // Oldest first (the three short ones may share a batch), with the seeds
    // they were accepted with.
    assert_eq!(job_status(&s, &rest[2])["seeds"], json!([12]));
    let started = |id: &str| {
        job_status(&s, id)["started_at"]
            .as_str()
            .unwrap()
            .to_string()
    };
    for id in &rest {
        assert!(started(&first) < started(id));
    }
}

#[test]
fn sigterm_keeps_queued_jobs_for_the_next_start() {
    let data = tempfile::tempdir().unwrap();
    let storage = data.path().to_str().unwrap().to_string();
    let args = [
        "--model",
        &tiny(),
        "--storage",
        &storage,
        "--shutdown-grace",
        "0",
    ];
    let s = Server::start(&args, &[]);
    let running = accepted(&s, json!({"text": "a", "steps": 400, "scheduler": "ddim"}));
    let queued = accepted(&s, json!({"text": "b", "steps": 2}));
    wait_status(&s, &running, "processing");
    let exit = s.terminate();
    assert!(exit.success(), "{exit:?}");

    let s = Server::start(&args, &[]);
    assert_eq!(wait_final(&s, &running)["status"], "completed");
    assert_eq!(wait_final(&s, &queued)["status"], "completed");
}

#[test]
fn a_second_server_on_the_same_storage_answers_for_finished_jobs() {
    let data = tempfile::tempdir().unwrap();
    let storage = data.path().to_str().unwrap().to_string();
    let a = Server::start(&["--model", &tiny(), "--storage", &storage], &[]);
    // A replica started before the job existed reads it from storage.
    let b = Server::start(&["--model", &tiny(), "--storage", &storage], &[]);
    let id = accepted(&a, json!({"text": "x", "steps": 2}));
    let done = wait_final(&a, &id);
    let png_a = get_bytes(&a, done["image_url"].as_str().unwrap());
    drop(a);
    let seen = job_status(&b, &id);
    assert_eq!(seen["status"], "completed");
    assert_eq!(get_bytes(&b, seen["image_url"].as_str().unwrap()), png_a);
}

#[test]
fn servers_recovering_the_same_storage_do_not_redo_finished_jobs() {
    let data = tempfile::tempdir().unwrap();
    let storage = data.path().to_str().unwrap().to_string();
    let args = ["--model", &tiny(), "--storage", &storage];
    let a = Server::start(&args, &[]);
    let long = accepted(&a, json!({"text": "a", "steps": 400, "scheduler": "ddim"}));
    let short = accepted(&a, json!({"text": "b", "steps": 2}));
    wait_status(&a, &long, "processing");
    a.kill();

    let b = Server::start(&args, &[]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while job_status(&b, &long)["step"].as_u64().unwrap_or(0) < 150 {
        assert!(Instant::now() < deadline, "B never ran the long job");
        std::thread::sleep(Duration::from_millis(10));
    }
    // Both B and C re-queue both jobs (so nothing is lost whichever survives).
    // C queues the short one at once, but the long one (stored as processing
    // by its second server, B) only after watching it for a while: B rewrites
    // it, so C re-queues it instead of failing it. So C runs the short one
    // while B is still busy with the long one, and B drops the short one when
    // it gets to it; B, well ahead, finishes the long one before C does, and C
    // keeps B's result (seen as it looks again after watching, as it starts,
    // or as its own run ends; its own result is then discarded).
    let c = Server::start(&args, &[]);
    let by_c = wait_final(&c, &short);
    assert_eq!(by_c["status"], "completed", "{by_c}");
    b.wait_for_log("already finished by another server", &short);
    let seen = wait_final(&b, &short);
    assert_eq!(seen["status"], "completed");
    assert_eq!(seen["image_url"], format!("/files/{short}/0.png"));
    assert_eq!(seen["generated_at"], by_c["generated_at"]);

    let by_b = wait_final(&b, &long);
    assert_eq!(by_b["status"], "completed", "{by_b}");
    let seen = wait_final(&c, &long);
    assert_eq!(seen["status"], "completed");
    assert_eq!(seen["generated_at"], by_b["generated_at"]);
    assert!(!c.log().contains("server stopped"), "{}", c.log());
}
