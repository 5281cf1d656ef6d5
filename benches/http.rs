//! HTTP overhead on the tiny model, with the server in this process on loopback
//! (the same router `sdserve serve` runs) and a blocking reqwest client:
//! - `/ping` latency with the engine idle, and busy with back-to-back jobs;
//! - `/invocations` against the same request run by a direct `generate` call
//!   (plus the PNG encoding every front door does): the difference is the queue
//!   hop, JSON, PNG/base64 and HTTP cost.
//!
//! `cargo bench --bench http`; see benches/README.md.

mod common;
#[path = "../tests/common/in_process.rs"]
mod in_process;

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use reqwest::blocking::Client;
use sdserve::output::{encode_png, to_rgb8};
use serde_json::{Value, json};

/// Starts the server on a free loopback port; returns its base URL once `/ping` is 200.
fn serve() -> String {
    let dir = common::tiny_model_dir();
    let base = in_process::serve_in_process(move || {
        sdserve::diffusion::pipelines::StableDiffusion::load(&dir, &Default::default())
    });
    let client = Client::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(r) = client.get(format!("{base}/ping")).send()
            && r.status() == 200
        {
            return base;
        }
        assert!(std::time::Instant::now() < deadline, "server never ready");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn body(size: usize, steps: usize) -> Value {
    json!({
        "prompt": common::PROMPT,
        "negative_prompt": common::NEGATIVE,
        "width": size,
        "height": size,
        "num_inference_steps": steps,
        "guidance_scale": 7.5,
        "seed": 42,
        "scheduler": "dpmpp_2m",
    })
}

fn http(c: &mut Criterion) {
    let base = serve();
    let client = Client::builder()
        .timeout(Duration::from_secs(600))
        .build()
        .unwrap();
    let ping = format!("{base}/ping");
    let invocations = format!("{base}/invocations");

    let mut g = c.benchmark_group("http/ping");
    common::quick(&mut g);
    g.bench_function("idle", |b| {
        b.iter(|| {
            let r = client.get(&ping).send().unwrap();
            assert_eq!(r.status(), 200);
            r.bytes().unwrap()
        })
    });
    // Keep the engine busy with back-to-back 256-px jobs while pinging.
    let stop = Arc::new(AtomicBool::new(false));
    let busy = {
        let stop = stop.clone();
        let client = client.clone();
        let url = invocations.clone();
        std::thread::spawn(move || {
            let mut jobs = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let r = client.post(&url).json(&body(256, 30)).send().unwrap();
                assert_eq!(r.status(), 200, "{}", r.text().unwrap_or_default());
                jobs += 1;
            }
            jobs
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    g.bench_function("busy", |b| {
        b.iter(|| {
            let r = client.get(&ping).send().unwrap();
            assert_eq!(r.status(), 200);
            r.bytes().unwrap()
        })
    });
    stop.store(true, Ordering::Relaxed);
    let jobs = busy.join().unwrap();
    eprintln!("(engine ran {jobs} busy job(s) during http/ping/busy)");
    g.finish();

    // The same tiny request through /invocations and directly.
    let model = common::load(&common::tiny_model_dir());
    let (size, steps) = (96, 4);
    let req = common::request(&model, size, steps, 7.5, "dpmpp_2m");
    let mut g = c.benchmark_group(format!("http/invocations_{size}px_{steps}steps"));
    common::quick(&mut g);
    g.bench_function("direct_generate", |b| {
        b.iter(|| model.generate(black_box(&req), &mut |_| true).unwrap())
    });
    g.bench_function("direct_generate+png", |b| {
        b.iter(|| {
            let out = model.generate(black_box(&req), &mut |_| true).unwrap();
            encode_png(&to_rgb8(&out.images).unwrap()[0], None).unwrap()
        })
    });
    let json_body = body(size, steps);
    g.bench_function("invocations_json", |b| {
        b.iter(|| {
            let r = client.post(&invocations).json(&json_body).send().unwrap();
            assert_eq!(r.status(), 200);
            r.bytes().unwrap()
        })
    });
    g.bench_function("invocations_png", |b| {
        b.iter(|| {
            let r = client
                .post(&invocations)
                .header("Accept", "image/png")
                .json(&json_body)
                .send()
                .unwrap();
            assert_eq!(r.status(), 200);
            r.bytes().unwrap()
        })
    });
    g.finish();
}

criterion_group!(benches, http);
criterion_main!(benches);
