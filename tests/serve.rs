//! `sdserve serve` over real HTTP on loopback, with the real pipeline on the
//! tiny fixture model: the SageMaker container contract.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::in_process::serve_in_process;
use common::server::{Server, client, tiny};
use reqwest::blocking::Client;
use serde_json::{Value, json};

fn invoke(s: &Server, body: Value) -> reqwest::blocking::Response {
    client()
        .post(s.url("/invocations"))
        .json(&body)
        .send()
        .unwrap()
}

fn decode_images(v: &Value) -> Vec<image::RgbImage> {
    v["generated_images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b.as_str().unwrap())
                .unwrap();
            image::load_from_memory(&bytes).unwrap().to_rgb8()
        })
        .collect()
}

/// Largest per-channel difference between two same-sized images, in 8-bit levels.
fn level_diff(a: &image::RgbImage, b: &image::RgbImage) -> u8 {
    assert_eq!(a.dimensions(), b.dimensions());
    a.as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap()
}

#[test]
fn sagemaker_contract_end_to_end() {
    let s = Server::start(&["--model", &tiny()], &[]);
    let ping = client().get(s.url("/ping")).send().unwrap();
    assert_eq!(ping.status(), 200);

    // JSON in, JSON out: base64 PNGs with their seeds and parameters.
    let body = json!({"prompt": "a cat", "negative_prompt": "dog", "num_inference_steps": 3,
                      "guidance_scale": 5.0, "seed": 11, "num_images_per_prompt": 2,
                      "width": 96, "height": 64, "scheduler": "euler_a"});
    let r = invoke(&s, body.clone());
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/json");
    let v: Value = r.json().unwrap();
    assert_eq!(v["seeds"], json!([11, 12]));
    assert_eq!(v["parameters"]["scheduler"], "euler_a");
    let images = decode_images(&v);
    assert_eq!(images.len(), 2);
    assert_eq!(images[0].dimensions(), (96, 64));
    assert_ne!(images[0], images[1]);

    // Same request, same images; and the CLI computes the same image for seed 12.
    let again = decode_images(&invoke(&s, body).json().unwrap());
    assert!(images == again, "same request, same images");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("cli.png");
    let cli = Command::new(env!("CARGO_BIN_EXE_sdserve"))
        .args([
            "generate",
            "--model",
            &tiny(),
            "--prompt",
            "a cat",
            "--negative-prompt",
            "dog",
            "--steps",
            "3",
            "--guidance",
            "5",
            "--seed",
            "12",
            "--width",
            "96",
            "--height",
            "64",
            "--scheduler",
            "euler_a",
            "--output",
        ])
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        cli.status.success(),
        "{}",
        String::from_utf8_lossy(&cli.stderr)
    );
    // Batch size changes the matmul blocking, so allow one 8-bit level of rounding.
    let cli_img = image::open(&out).unwrap().to_rgb8();
    let worst = cli_img
        .as_raw()
        .iter()
        .zip(images[1].as_raw())
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap();
    assert!(worst <= 1, "HTTP and CLI differ by {worst} levels");

    // Accept picks raw image bytes; text/plain is a bare prompt.
    for (accept, magic) in [
        ("image/png", &b"\x89PNG"[..]),
        ("image/jpeg", &b"\xff\xd8"[..]),
        ("image/webp", &b"RIFF"[..]),
    ] {
        let r = client()
            .post(s.url("/invocations"))
            .header("Content-Type", "text/plain")
            .header("Accept", accept)
            .body("a lighthouse")
            .send()
            .unwrap();
        assert_eq!(r.status(), 200, "{accept}");
        assert_eq!(r.headers()["content-type"], accept);
        let bytes = r.bytes().unwrap();
        assert!(bytes.starts_with(magic), "{accept}");
        let img = image::load_from_memory(&bytes).unwrap();
        assert_eq!((img.width(), img.height()), (96, 96));
    }

    // Custom attributes set fields per request; unknown attributes are ignored.
    let with_attr = client()
        .post(s.url("/invocations"))
        .header(
            "X-Amzn-SageMaker-Custom-Attributes",
            "seed=11;accept_eula=true;num_inference_steps=3",
        )
        .json(
            &json!({"prompt": "a cat", "negative_prompt": "dog", "guidance_scale": 5.0,
                      "width": 96, "height": 64, "scheduler": "euler_a"}),
        )
        .send()
        .unwrap();
    assert_eq!(with_attr.status(), 200);
    let single = &decode_images(&with_attr.json().unwrap())[0];
    // The same fields in the body give the same image (both batches of one: a batch
    // of two rounds differently, and the random tiny model amplifies that to a few
    // 8-bit levels, so image 0 of the first request is not the reference).
    let body = json!({"prompt": "a cat", "negative_prompt": "dog", "guidance_scale": 5.0,
                      "width": 96, "height": 64, "scheduler": "euler_a", "seed": 11,
                      "num_inference_steps": 3});
    let in_body = &decode_images(&invoke(&s, body).json().unwrap())[0];
    assert!(single == in_body, "custom attributes applied");
    let d = level_diff(single, &images[0]);
    assert!(
        d <= 8,
        "seed 11 alone vs in a batch of two: {d} levels apart"
    );

    // SIGTERM: clean exit.
    let status = s.terminate();
    assert!(status.success(), "exit status {status:?}");
}

/// `serve --dtype bf16` (CPU mixed precision) answers with the images `generate --dtype
/// bf16` makes, which are not the f32 ones.
#[test]
fn bf16_serve_matches_bf16_generate() {
    let s = Server::start(&["--model", &tiny(), "--dtype", "bf16"], &[]);
    let body = json!({"prompt": "a cat", "num_inference_steps": 3, "seed": 5,
                      "width": 64, "height": 64});
    let r = invoke(&s, body);
    assert_eq!(r.status(), 200);
    let served = decode_images(&r.json().unwrap()).remove(0);
    let tmp = tempfile::tempdir().unwrap();
    let cli = |dtype: &str| {
        let out = tmp.path().join(format!("{dtype}.png"));
        let o = Command::new(env!("CARGO_BIN_EXE_sdserve"))
            .args([
                "generate",
                "--model",
                &tiny(),
                "--prompt",
                "a cat",
                "--steps",
                "3",
            ])
            .args([
                "--seed", "5", "--width", "64", "--height", "64", "--dtype", dtype,
            ])
            .arg("--output")
            .arg(&out)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        image::open(&out).unwrap().to_rgb8()
    };
    assert!(served == cli("bf16"), "serve and generate differ in bf16");
    assert!(
        level_diff(&served, &cli("f32")) > 0,
        "bf16 gave the f32 image"
    );
}

fn assert_bad(r: reqwest::blocking::Response, status: u16, field: Option<&str>) {
    assert_eq!(r.status().as_u16(), status);
    let v: Value = r.json().unwrap();
    assert!(v["error"].is_string(), "{v}");
    if let Some(f) = field {
        assert_eq!(v["field"], f, "{v}");
        assert!(v["error"].as_str().unwrap().contains(f), "{v}");
    }
}

#[test]
fn bad_requests_get_4xx_json_naming_the_field() {
    let s = Server::start(&["--model", &tiny()], &[]);
    assert_bad(
        invoke(&s, json!({"prompt": "x", "width": 65})),
        400,
        Some("width"),
    );
    assert_bad(
        invoke(&s, json!({"prompt": "x", "num_inference_steps": 0})),
        400,
        Some("num_inference_steps"),
    );
    assert_bad(
        invoke(&s, json!({"prompt": "x", "guidance_scale": -1})),
        400,
        Some("guidance_scale"),
    );
    assert_bad(
        invoke(&s, json!({"prompt": "x", "num_images_per_prompt": 99})),
        400,
        Some("num_images_per_prompt"),
    );
    assert_bad(
        invoke(&s, json!({"prompt": "x", "seed": -1})),
        400,
        Some("seed"),
    );
    assert_bad(
        invoke(&s, json!({"prompt": "x", "scheduler": "heun"})),
        400,
        Some("scheduler"),
    );
    assert_bad(
        invoke(&s, json!({"prompt": "x", "widht": 64})),
        400,
        Some("widht"),
    );
    assert_bad(
        invoke(&s, json!({"negative_prompt": "x"})),
        400,
        Some("prompt"),
    );
    assert_bad(
        invoke(&s, json!({"prompt": "x", "eta": 0.5})),
        400,
        Some("eta"),
    );
    assert_bad(
        invoke(&s, json!(["not", "an", "object"])),
        400,
        Some("body"),
    );
    let raw = |ct: &str, accept: &str, body: &str| {
        client()
            .post(s.url("/invocations"))
            .header("Content-Type", ct)
            .header("Accept", accept)
            .body(body.to_string())
            .send()
            .unwrap()
    };
    assert_bad(
        raw("application/json", "application/json", "{not json"),
        400,
        Some("body"),
    );
    assert_bad(
        raw(
            "application/x-www-form-urlencoded",
            "application/json",
            "a=b",
        ),
        415,
        None,
    );
    assert_bad(raw("text/plain", "text/html", "x"), 406, None);
    assert_bad(
        raw(
            "application/json",
            "image/png",
            r#"{"prompt": "x", "num_images_per_prompt": 2, "num_inference_steps": 1}"#,
        ),
        400,
        Some("num_images_per_prompt"),
    );
    let big = "x".repeat(7 * 1024 * 1024);
    let r = raw("text/plain", "application/json", &big);
    assert_eq!(r.status().as_u16(), 413);
    // Still serving after all that.
    assert_eq!(
        invoke(&s, json!({"prompt": "x", "num_inference_steps": 1})).status(),
        200
    );
}

#[test]
fn full_queue_is_refused_with_retry_after_and_ping_stays_fast() {
    let s = Arc::new(Server::start(
        &["--model", &tiny(), "--queue-capacity", "1"],
        &[],
    ));
    let slow = json!({"prompt": "x", "num_inference_steps": 150, "scheduler": "ddim"});
    // One job runs, one waits in the single queue slot...
    let spawn = |body: Value| {
        let s = s.clone();
        std::thread::spawn(move || invoke(&s, body).status().as_u16())
    };
    let running = spawn(slow.clone());
    s.wait_for_log("job=1", "started");
    let queued = spawn(slow.clone());
    std::thread::sleep(Duration::from_millis(300));
    // ...so a third is refused at once, with Retry-After.
    let r = invoke(&s, json!({"prompt": "x", "num_inference_steps": 1}));
    assert_eq!(r.status().as_u16(), 503);
    assert!(r.headers().contains_key("retry-after"));
    // /ping answers while the model is busy (SageMaker allows 2 s).
    let ping = Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap()
        .get(s.url("/ping"))
        .send()
        .unwrap();
    assert_eq!(ping.status(), 200);
    assert_eq!(running.join().unwrap(), 200);
    assert_eq!(queued.join().unwrap(), 200);
}

#[test]
fn a_caller_that_hangs_up_cancels_its_job() {
    let s = Server::start(&["--model", &tiny()], &[]);
    let impatient = Client::builder()
        .timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let r = impatient
        .post(s.url("/invocations"))
        .json(&json!({"prompt": "x", "num_inference_steps": 400}))
        .send();
    assert!(r.is_err(), "the client gave up");
    s.wait_for_log("job=1", "cancelled");
    assert_eq!(
        invoke(&s, json!({"prompt": "x", "num_inference_steps": 1})).status(),
        200
    );
}

#[test]
fn serve_with_no_flags_uses_the_sagemaker_model_dir_and_port() {
    // What SageMaker runs: `<image> serve`, model in /opt/ml/model, port from the env.
    let port = common::free_port().to_string();
    let dir = tiny();
    // The default storage, ./data, lands in this scratch working directory.
    let cwd = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_sdserve"))
        .arg("serve")
        .current_dir(cwd.path())
        .env_remove("SDSERVE_MODEL")
        .env_remove("SDSERVE_STORAGE")
        .env("SDSERVE_SAGEMAKER_MODEL_DIR", &dir)
        .env("SAGEMAKER_BIND_TO_PORT", &port)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}/ping");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut ok = false;
    while Instant::now() < deadline {
        if reqwest::blocking::get(&url).is_ok_and(|r| r.status() == 200) {
            ok = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(ok, "no /ping 200 on port {port}");
    assert!(Path::new(&dir).join("model_index.json").is_file());
}

#[test]
fn missing_model_is_a_clear_startup_error() {
    let o = Command::new(env!("CARGO_BIN_EXE_sdserve"))
        .arg("serve")
        .env_remove("SDSERVE_MODEL")
        .env("SDSERVE_SAGEMAKER_MODEL_DIR", "/nonexistent/opt/ml/model")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("--model") && err.contains("/nonexistent/opt/ml/model"),
        "{err}"
    );
}

#[test]
fn ping_is_503_until_the_model_is_loaded_and_names_a_load_failure() {
    let (go, wait) = std::sync::mpsc::channel::<()>();
    let base = serve_in_process(move || {
        wait.recv().unwrap();
        sdserve::diffusion::pipelines::StableDiffusion::load(
            &common::model_dir("tiny-sd1"),
            &Default::default(),
        )
    });
    let r = client().get(format!("{base}/ping")).send().unwrap();
    assert_eq!(r.status(), 503);
    let r = client()
        .post(format!("{base}/invocations"))
        .json(&json!({"prompt": "x"}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 503);
    assert!(
        r.json::<Value>().unwrap()["error"]
            .as_str()
            .unwrap()
            .contains("loading")
    );
    go.send(()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while client()
        .get(format!("{base}/ping"))
        .send()
        .unwrap()
        .status()
        != 200
    {
        assert!(Instant::now() < deadline, "never ready");
        std::thread::sleep(Duration::from_millis(20));
    }

    let broken = serve_in_process(|| {
        sdserve::diffusion::pipelines::StableDiffusion::load(
            Path::new("/nonexistent/model"),
            &Default::default(),
        )
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = client().get(format!("{broken}/ping")).send().unwrap();
        assert_eq!(r.status(), 503);
        let msg = r.json::<Value>().unwrap()["error"]
            .as_str()
            .unwrap()
            .to_string();
        if msg.contains("failed to load") {
            assert!(msg.contains("/nonexistent/model"), "{msg}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "load failure never reported: {msg}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn estimates_and_retry_after_come_from_measured_step_times() {
    let load = || {
        sdserve::diffusion::pipelines::StableDiffusion::load(
            &common::model_dir("tiny-sd1"),
            &Default::default(),
        )
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    // Without the warm-up nothing is measured until a job finishes.
    let cold = sdserve::engine::Engine::start(
        load,
        sdserve::engine::EngineConfig {
            warmup: false,
            ..Default::default()
        },
    );
    let engine = sdserve::engine::Engine::start(load, Default::default());
    rt.block_on(async {
        let info = match engine.ready().await {
            sdserve::engine::EngineState::Ready(i) => i,
            other => panic!("{other:?}"),
        };
        assert!(matches!(
            cold.ready().await,
            sdserve::engine::EngineState::Ready(_)
        ));
        assert_eq!(cold.cost_model(), None);
        assert_eq!(cold.retry_after_seconds(), 5, "nothing measured yet");
        // The warm-up measured both rates.
        let warm = engine
            .cost_model()
            .expect("the warm-up measures step times");
        assert!(warm.step_rate > 0.0 && warm.image_rate > 0.0, "{warm:?}");

        let request = |steps: usize| {
            sdserve::request::GenerateParams {
                prompt: Some("x".into()),
                steps: Some(steps),
                scheduler: Some("ddim".into()),
                ..Default::default()
            }
            .validate(&info, &Default::default(), None)
            .unwrap()
        };
        let mut long = engine.submit(request(300)).unwrap();
        let short = engine.submit(request(2)).unwrap();
        // Wait until the long job is running, then check the estimates: the
        // short job waits for the rest of the long one, then runs its own steps.
        while !matches!(
            *long.status.borrow_and_update(),
            sdserve::engine::JobStatus::Running { step, .. } if step >= 1
        ) {
            long.status.changed().await.unwrap();
        }
        let cost = engine.cost_model().unwrap();
        let long_left = engine.estimate_seconds(long.id).unwrap();
        let short_total = engine.estimate_seconds(short.id).unwrap();
        let shape = |steps| sdserve::engine::JobShape::of(&request(steps));
        let short_own = cost.remaining(&shape(2), 0);
        assert!(long_left > 0.0 && long_left <= cost.remaining(&shape(300), 0));
        assert!(
            (short_total - (long_left + short_own)).abs() < 0.05 * short_total + 1e-3,
            "short {short_total} vs long left {long_left} + own {short_own}"
        );
        // A slot frees when the running job ends.
        let retry = engine.retry_after_seconds();
        assert!(
            retry >= 1 && retry as f64 >= long_left.floor(),
            "{retry} vs {long_left}"
        );
        long.cancel();
        assert!(matches!(
            long.wait().await,
            sdserve::engine::JobStatus::Cancelled
        ));
    });
}

#[test]
fn a_taken_port_is_a_startup_error_not_a_usage_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let o = Command::new(env!("CARGO_BIN_EXE_sdserve"))
        .args([
            "serve",
            "--model",
            &tiny(),
            "--host",
            "127.0.0.1",
            "--port",
            &port,
        ])
        .env("SDSERVE_SAGEMAKER_MODEL_DIR", "/nonexistent")
        .env_remove("SAGEMAKER_BIND_TO_PORT")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    // Exit 1 (it failed), not 2 (the flags were fine).
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("cannot listen on 127.0.0.1:") && err.contains("--port"),
        "{err}"
    );
    drop(taken);
}
