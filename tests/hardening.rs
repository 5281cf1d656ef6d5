//! One request must never take the service down: each defect a probe of the
//! running server found (issue 12), over real HTTP on the tiny model — sizes
//! that overflowed, stored jobs that crash-looped every start, scheduler
//! options checked only when the job ran, error bodies that were not JSON,
//! internal paths shown to callers, half-sent requests, a draining server
//! that still said it was ready, ambiguous or cross-site-postable bodies.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::server::{Server, accepted, client, job_status, tiny, wait_final, wait_status};
use serde_json::{Value, json};

fn post(s: &Server, path: &str, body: Value) -> reqwest::blocking::Response {
    client().post(s.url(path)).json(&body).send().unwrap()
}

fn assert_bad(r: reqwest::blocking::Response, code: u16, field: Option<&str>) -> Value {
    assert_eq!(r.status().as_u16(), code, "{:?}", r.headers());
    let ct = r.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ct.starts_with("application/json"), "{ct}");
    let v: Value = r.json().expect("a JSON error body");
    assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{v}");
    if let Some(f) = field {
        assert_eq!(v["field"], f, "{v}");
    }
    v
}

fn ping(s: &Server) -> u16 {
    client()
        .get(s.url("/ping"))
        .send()
        .unwrap()
        .status()
        .as_u16()
}

#[test]
fn sizes_that_overflowed_are_refused_and_the_server_stays_up() {
    let s = Server::start(&["--model", &tiny(), "--max-request-mib", "64"], &[]);
    let huge = 4_294_967_296u64;
    // Once a wrapped product: width * height = 2^64 = 0 in release builds.
    let r = post(
        &s,
        "/invocations",
        json!({"prompt": "a", "width": huge, "height": huge}),
    );
    assert_bad(r, 400, Some("width"));
    let r = post(
        &s,
        "/generate",
        json!({"text": "a", "resolution": format!("{huge}x{huge}"), "steps": 1}),
    );
    assert_bad(r, 400, Some("resolution"));
    // Each side is capped, whatever the area.
    let r = post(
        &s,
        "/invocations",
        json!({"prompt": "a", "width": 8192, "height": 8}),
    );
    let v = assert_bad(r, 400, Some("width"));
    assert!(v["error"].as_str().unwrap().contains("2048"), "{v}");
    // What one request may allocate is bounded: within the area limit, but
    // eight guided 1024-px images need more than 64 MiB of working memory.
    let r = post(
        &s,
        "/generate",
        json!({"text": "a", "resolution": "1024x1024", "num_images": 8}),
    );
    let v = assert_bad(r, 400, Some("num_images"));
    assert!(v["error"].as_str().unwrap().contains("MiB"), "{v}");
    let r = post(
        &s,
        "/invocations",
        json!({"prompt": "a", "width": 1024, "height": 1024}),
    );
    assert_bad(r, 400, Some("width"));
    // ... while a small request runs, and the server answered throughout.
    let r = post(
        &s,
        "/invocations",
        json!({"prompt": "a", "width": 64, "height": 64, "num_inference_steps": 1}),
    );
    assert_eq!(r.status(), 200);
    assert_eq!(ping(&s), 200);
}

/// Writes a job record into a storage folder as a crashed server left it.
fn plant(storage: &std::path::Path, id: &str, status: &str, attempts: u32, request: Value) {
    let record = json!({
        "image_id": id,
        "status": status,
        "created_at": "2026-12-01T10:00:00Z",
        "started_at": if status == "processing" { json!("2026-12-01T10:00:01Z") } else { Value::Null },
        "heartbeat_at": if status == "processing" { json!("2026-12-01T10:00:01Z") } else { Value::Null },
        "request": request,
        "attempts": attempts,
    });
    std::fs::create_dir_all(storage.join("jobs")).unwrap();
    std::fs::write(
        storage.join(format!("jobs/{id}.json")),
        serde_json::to_vec(&record).unwrap(),
    )
    .unwrap();
}

#[test]
fn poisoned_stored_jobs_are_failed_with_a_reason_instead_of_run() {
    let data = tempfile::tempdir().unwrap();
    let overflow = "00000000-0000-4000-8000-000000000001";
    let twice = "00000000-0000-4000-8000-000000000002";
    let once = "00000000-0000-4000-8000-000000000003";
    // Accepted before the fix: a size that overflowed, stored as queued.
    plant(
        data.path(),
        overflow,
        "processing",
        1,
        json!({"text": "a", "resolution": "4294967296x4294967296", "steps": 1, "seed": 1}),
    );
    // Running when its server died, twice.
    plant(
        data.path(),
        twice,
        "processing",
        2,
        json!({"text": "b", "resolution": "64x64", "steps": 2, "seed": 2}),
    );
    // Running when its server died once: it runs again.
    plant(
        data.path(),
        once,
        "processing",
        1,
        json!({"text": "c", "resolution": "64x64", "steps": 2, "seed": 3}),
    );
    let storage = data.path().to_str().unwrap().to_string();
    let s = Server::start(&["--model", &tiny(), "--storage", &storage], &[]);

    let v = wait_final(&s, overflow);
    assert_eq!(v["status"], "failed", "{v}");
    let error = v["error"].as_str().unwrap();
    assert!(
        error.contains("cannot run after restart") && error.contains("resolution"),
        "{error}"
    );
    assert_eq!(wait_final(&s, once)["status"], "completed");
    let v = wait_final(&s, twice);
    assert_eq!(v["status"], "failed", "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("stopped 2 times"),
        "{v}"
    );
    assert_eq!(ping(&s), 200);
    // The verdicts are stored: a restart does not run them either.
    drop(s);
    let stored: Value = serde_json::from_slice(
        &std::fs::read(data.path().join(format!("jobs/{twice}.json"))).unwrap(),
    )
    .unwrap();
    assert_eq!(stored["status"], "failed");
}

#[test]
fn a_job_running_at_two_crashes_is_failed_not_retried_forever() {
    let data = tempfile::tempdir().unwrap();
    let storage = data.path().to_str().unwrap().to_string();
    let args = ["--model", &tiny(), "--storage", &storage];
    let long = json!({"text": "a", "steps": 500, "scheduler": "ddim", "resolution": "128x128"});
    let s = Server::start(&args, &[]);
    let id = accepted(&s, long);
    wait_status(&s, &id, "processing");
    s.kill();
    // Restarted, the job runs again (attempt 2), and the server dies again.
    let s = Server::start(&args, &[]);
    wait_status(&s, &id, "processing");
    s.kill();
    // The third start fails it instead of dying with it a third time; a
    // job queued behind it meanwhile still runs.
    let s = Server::start(&args, &[]);
    let other = accepted(&s, json!({"text": "b", "steps": 2}));
    let v = wait_final(&s, &id);
    assert_eq!(v["status"], "failed", "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("stopped 2 times"),
        "{v}"
    );
    assert_eq!(wait_final(&s, &other)["status"], "completed");
}

#[test]
fn a_suspect_job_still_running_on_another_server_is_not_failed() {
    // Stored as a crashed server left it once: B runs it again (its second
    // attempt), long enough for C, starting meanwhile, to watch it the whole
    // time it watches suspects. B's heartbeats must reach the record even
    // though every step changes the job's status.
    let data = tempfile::tempdir().unwrap();
    let id = "00000000-0000-4000-8000-000000000004";
    plant(
        data.path(),
        id,
        "processing",
        1,
        json!({"text": "a", "resolution": "1024x1024", "steps": 500, "scheduler": "ddim", "seed": 4}),
    );
    let storage = data.path().to_str().unwrap().to_string();
    let args = ["--model", &tiny(), "--storage", &storage];
    let b = Server::start(&args, &[]);
    wait_status(&b, id, "processing");
    let c = Server::start(&args, &[]);
    c.wait_for_log("a job that looked stuck is running on another server", id);
    assert!(!c.log().contains("server stopped"), "{}", c.log());
    let v = job_status(&c, id);
    assert_ne!(v["status"], "failed", "{v}");
    assert_eq!(job_status(&b, id)["status"], "processing");
}

#[test]
fn a_job_another_server_finishes_is_not_overwritten_by_this_ones_heartbeat() {
    let data = tempfile::tempdir().unwrap();
    let id = "00000000-0000-4000-8000-000000000005";
    plant(
        data.path(),
        id,
        "queued",
        0,
        json!({"text": "a", "resolution": "1024x1024", "steps": 500, "scheduler": "ddim", "seed": 5}),
    );
    let storage = data.path().to_str().unwrap().to_string();
    let s = Server::start(&["--model", &tiny(), "--storage", &storage], &[]);
    wait_status(&s, id, "processing");
    // Another server (sharing the storage) finishes it meanwhile.
    let key = data.path().join(format!("jobs/{id}.json"));
    let mut done: Value = serde_json::from_slice(&std::fs::read(&key).unwrap()).unwrap();
    done["status"] = json!("completed");
    done["generated_at"] = json!("2026-12-01T10:05:00Z");
    // The next heartbeat sees it: this run stops, and the result stays. (A
    // heartbeat already between its read and its write can still overwrite
    // it, a window of a few milliseconds: written again if so.)
    let stopped = |s: &Server| {
        s.log()
            .lines()
            .any(|l| l.contains("finished by another server while running here"))
    };
    for _ in 0..3 {
        std::fs::write(&key, serde_json::to_vec(&done).unwrap()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(15);
        while !stopped(&s) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if stopped(&s) {
            break;
        }
    }
    assert!(stopped(&s), "{}", s.log());
    let v = wait_final(&s, id);
    assert_eq!(v["status"], "completed", "{v}");
    assert_eq!(v["generated_at"], "2026-12-01T10:05:00Z");
    let stored: Value = serde_json::from_slice(&std::fs::read(&key).unwrap()).unwrap();
    assert_eq!(stored["status"], "completed");
    assert_eq!(stored["generated_at"], "2026-12-01T10:05:00Z");
}

#[test]
fn scheduler_options_are_checked_when_the_job_is_submitted() {
    let s = Server::start(&["--model", &tiny()], &[]);
    let cases = [
        (json!({"timestep_spacing": "weird"}), "timestep_spacing"),
        (json!({"beta_schedule": "nope"}), "beta_schedule"),
        (json!({"steps_offset": 100000}), "steps_offset"),
        (json!({"use_karras_sigmas": "yes"}), "use_karras_sigmas"),
        (json!({"beta_end": -5}), "beta_end"),
        (json!({"solver_order": 9}), "solver_order"),
        // diffusers takes these; no scheduler here implements them.
        (
            json!({"algorithm_type": "sde-dpmsolver++"}),
            "algorithm_type",
        ),
        (
            json!({"interpolation_type": "log_linear"}),
            "interpolation_type",
        ),
    ];
    for (options, key) in &cases {
        let field = format!("scheduler_options.{key}");
        let r = post(
            &s,
            "/generate",
            json!({"text": "a", "steps": 2, "scheduler_options": options}),
        );
        assert_bad(r, 400, Some(&field));
        let r = post(
            &s,
            "/invocations",
            json!({"prompt": "a", "num_inference_steps": 2, "scheduler_options": options}),
        );
        assert_bad(r, 400, Some(&field));
    }
    // In range, but with this model's schedule the first timestep is past the
    // 1000 training steps: refused now, not when the job runs, naming the
    // option that does it.
    let r = post(
        &s,
        "/generate",
        json!({"text": "a", "steps": 2, "scheduler": "ddim",
               "scheduler_options": {"steps_offset": 999, "timestep_spacing": "leading"}}),
    );
    let v = assert_bad(r, 400, Some("scheduler_options.steps_offset"));
    assert!(v["error"].as_str().unwrap().contains("1000"), "{v}");
    // A value some schedulers take and the chosen one does not (PNDM has no
    // `sample` prediction): named too.
    let r = post(
        &s,
        "/generate",
        json!({"text": "a", "steps": 2, "scheduler": "pndm",
               "scheduler_options": {"prediction_type": "sample"}}),
    );
    assert_bad(r, 400, Some("scheduler_options.prediction_type"));
    // Good options still run.
    let id = accepted(
        &s,
        json!({"text": "a", "steps": 2, "scheduler": "euler",
               "scheduler_options": {"timestep_spacing": "trailing", "use_karras_sigmas": true}}),
    );
    assert_eq!(wait_final(&s, &id)["status"], "completed");
}

#[test]
fn every_error_is_the_one_json_shape() {
    let data = tempfile::tempdir().unwrap();
    let storage = data.path().to_str().unwrap().to_string();
    let s = Server::start(&["--model", &tiny(), "--storage", &storage], &[]);
    // Over the body limit (axum's own rejection).
    let big = "x".repeat(7 * 1024 * 1024);
    let r = client()
        .post(s.url("/generate"))
        .header("content-type", "application/json")
        .body(big)
        .send()
        .unwrap();
    assert_bad(r, 413, None);
    // A query axum can't parse, a path that isn't UTF-8, a method the route lacks.
    let r = client()
        .get(s.url("/images?limit=1&limit=2"))
        .send()
        .unwrap();
    assert_bad(r, 400, None);
    let r = client().get(s.url("/image/%ff%fe")).send().unwrap();
    let code = r.status().as_u16();
    assert!(code == 400 || code == 404, "{code}");
    assert_bad(r, code, None);
    let r = client().put(s.url("/generate")).send().unwrap();
    assert_eq!(r.headers()["allow"], "POST");
    let v = assert_bad(r, 405, None);
    assert!(v["error"].as_str().unwrap().contains("PUT"), "{v}");
    let r = client().get(s.url("/no/such/route")).send().unwrap();
    assert_bad(r, 404, None);
    // A corrupt stored record: a server error, in JSON, naming no path.
    let id = "00000000-0000-4000-8000-00000000000c";
    std::fs::create_dir_all(data.path().join("jobs")).unwrap();
    std::fs::write(data.path().join(format!("jobs/{id}.json")), b"{not json").unwrap();
    let r = client().get(s.url(&format!("/image/{id}"))).send().unwrap();
    let v = assert_bad(r, 500, None);
    assert!(!v.to_string().contains(&storage), "{v}");
}

#[test]
fn callers_see_a_model_name_not_where_files_live() {
    let s = Server::start(&["--model", &tiny()], &[]);
    let dir = tiny();
    for path in ["/ping", "/info"] {
        let body = client().get(s.url(path)).send().unwrap().text().unwrap();
        assert!(!body.contains(&dir), "{path}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["model"], "tiny-sd1", "{path}: {v}");
    }
}

#[test]
fn half_sent_requests_do_not_hold_connections_open() {
    let s = Server::start(&["--model", &tiny()], &[]);
    let addr = s.base.trim_start_matches("http://").to_string();
    let mut conn = std::net::TcpStream::connect(&addr).unwrap();
    conn.write_all(b"GET /ping HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    // The server gives up on the headers and closes (possibly after a 408).
    loop {
        match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("still open after {:?}: {e}", started.elapsed()),
        }
    }
    assert!(started.elapsed() < Duration::from_secs(25));
    assert_eq!(ping(&s), 200);
}

#[test]
fn ping_says_503_while_the_server_drains() {
    // A grace the job may or may not finish in (it is interrupted then): the
    // server exits within grace + drain either way, however loaded the CPU.
    let s = Server::start(&["--model", &tiny(), "--shutdown-grace", "15"], &[]);
    let id = accepted(
        &s,
        json!({"text": "a", "steps": 500, "scheduler": "ddim", "resolution": "128x128"}),
    );
    wait_status(&s, &id, "processing");
    s.sigterm();
    // While the running job has its grace, the load balancer is told to stop
    // sending work.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match client().get(s.url("/ping")).send() {
            Ok(r) if r.status() == 503 => {
                let v: Value = r.json().unwrap();
                assert!(
                    v["error"].as_str().unwrap().contains("shutting down"),
                    "{v}"
                );
                break;
            }
            Ok(r) => assert_eq!(r.status(), 200),
            Err(e) => panic!("no answer while draining: {e}"),
        }
        assert!(Instant::now() < deadline, "/ping never said 503");
        std::thread::sleep(Duration::from_millis(20));
    }
    let r = post(&s, "/generate", json!({"text": "b", "steps": 1}));
    assert_eq!(r.status(), 503);
    assert!(s.wait_exit(Duration::from_secs(60)).success());
}

#[test]
fn bodies_must_be_unambiguous_json_on_the_job_api() {
    let s = Server::start(&["--model", &tiny()], &[]);
    let r = post(&s, "/generate", json!({"text": "a", "prompt": "b"}));
    assert_bad(r, 400, Some("prompt"));
    let raw = |ct: Option<&str>, body: &str| {
        let mut rb = client().post(s.url("/generate")).body(body.to_string());
        if let Some(ct) = ct {
            rb = rb.header("content-type", ct);
        }
        rb.send().unwrap()
    };
    // A garbled media type is not JSON; text/plain and bodiless posts (what a
    // page on any other site may send without a CORS preflight) are refused.
    assert_bad(raw(Some(";;;==="), r#"{"text": "a"}"#), 415, None);
    assert_bad(raw(Some("text/plain"), "a lighthouse"), 415, None);
    assert_bad(raw(None, ""), 415, None);
    assert_bad(
        raw(Some("application/x-www-form-urlencoded"), "text=a"),
        415,
        None,
    );
    // /invocations keeps what SageMaker callers send.
    let r = client()
        .post(s.url("/invocations"))
        .header("content-type", "text/plain")
        .header("accept", "image/png")
        .body("a lighthouse")
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = client()
        .post(s.url("/invocations"))
        .header("content-type", ";;;===")
        .body(r#"{"prompt": "a"}"#)
        .send()
        .unwrap();
    assert_bad(r, 415, None);
}

#[test]
fn the_page_cannot_be_framed_or_sniffed() {
    let s = Server::start(&["--model", &tiny()], &[]);
    let r = client().get(s.url("/")).send().unwrap();
    let h = r.headers();
    assert_eq!(h["x-content-type-options"], "nosniff");
    assert_eq!(h["x-frame-options"], "DENY");
    let csp = h["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    assert!(csp.contains("object-src 'none'"), "{csp}");
    for path in ["/ping", "/info", "/no/such/route"] {
        let r = client().get(s.url(path)).send().unwrap();
        assert_eq!(r.headers()["x-content-type-options"], "nosniff", "{path}");
    }
}

#[test]
fn estimates_are_always_numbers_and_queued_cancels_are_counted() {
    // No warm-up: nothing measured when the first job arrives.
    let s = Server::start(&["--model", &tiny(), "--no-warmup"], &[]);
    let r = post(
        &s,
        "/generate",
        json!({"text": "a", "steps": 500, "scheduler": "ddim", "resolution": "128x128"}),
    );
    assert_eq!(r.status(), 202);
    let v: Value = r.json().unwrap();
    assert!(
        v["estimated_time"].as_f64().is_some_and(|t| t >= 0.0),
        "{v}"
    );
    let long = v["image_id"].as_str().unwrap().to_string();
    let queued = accepted(&s, json!({"text": "b", "steps": 2}));
    let v = job_status(&s, &queued);
    assert!(v["estimated_time"].as_f64().is_some_and(|t| t > 0.0), "{v}");
    let r = client()
        .delete(s.url(&format!("/image/{queued}")))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let done = wait_final(&s, &long);
    assert_eq!(done["estimated_time"], 0.0, "{done}");
    let metrics = client()
        .get(s.url("/metrics"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(
        metrics.contains("sdserve_jobs_total{outcome=\"cancelled\"} 1"),
        "{metrics}"
    );
}

#[test]
fn defaults_fit_the_limits_and_a_style_does_not_count_against_the_text() {
    // The tiny model's default is 96x96 and the default 30 steps: both over
    // these limits, so a request that leaves them out gets what fits.
    let s = Server::start(
        &["--model", &tiny(), "--max-side", "64", "--max-steps", "3"],
        &[],
    );
    let info: Value = client().get(s.url("/info")).send().unwrap().json().unwrap();
    assert_eq!(info["default_resolution"], "64x64", "{info}");
    assert_eq!(info["default_steps"], 3, "{info}");
    let id = accepted(&s, json!({"text": "a"}));
    let done = wait_final(&s, &id);
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["request"]["resolution"], "64x64");
    assert_eq!(done["request"]["steps"], 3);
    let r = client()
        .post(s.url("/invocations"))
        .header("content-type", "text/plain")
        .body("a bare prompt")
        .send()
        .unwrap();
    assert_eq!(r.status(), 200, "{:?}", r.text());

    // The prompt limit bounds what the caller typed; the style's template is
    // not counted (4000 characters in a styled prompt was refused before).
    let long = "x".repeat(4000);
    let id = accepted(&s, json!({"text": long, "style": "realistic", "steps": 1}));
    assert_eq!(wait_final(&s, &id)["status"], "completed");
    let r = post(
        &s,
        "/generate",
        json!({"text": "x".repeat(4001), "steps": 1}),
    );
    assert_bad(r, 400, Some("text"));
    let r = post(
        &s,
        "/generate",
        json!({"text": "a", "negative_prompt": "x".repeat(4001), "style": "anime"}),
    );
    assert_bad(r, 400, Some("negative_prompt"));
}
