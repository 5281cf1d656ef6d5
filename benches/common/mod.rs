//! Helpers shared by the bench targets: model paths, requests, latents and the
//! criterion settings for slow stages. See benches/README.md.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use candle_core::{Device, Tensor};
use criterion::{BenchmarkGroup, SamplingMode, measurement::WallTime};
use sdserve::diffusion::pipelines::{LoadOptions, StableDiffusion};
use sdserve::request::{GenerateParams, GenerateRequest, Limits};

pub mod stages;

pub const PROMPT: &str = "a watercolor fox in the snow, highly detailed";
pub const NEGATIVE: &str = "blurry, low quality";

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn tiny_model_dir() -> PathBuf {
    repo().join("tests/fixtures/tiny-sd1")
}

/// The full-size model: `$SDSERVE_BENCH_MODEL`, else `models/sd15-random`.
pub fn fullsize_model_dir() -> PathBuf {
    std::env::var_os("SDSERVE_BENCH_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("models/sd15-random"))
}

/// `SDSERVE_BENCH_FULL=1` turns on the slow full-size benches (512 px, whole `generate`).
pub fn full_enabled() -> bool {
    std::env::var("SDSERVE_BENCH_FULL").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// Loads `dir` on the CPU, in f32, or in bf16 mixed precision with
/// `SDSERVE_BENCH_DTYPE=bf16`.
pub fn load(dir: &Path) -> StableDiffusion {
    // As the binary does (src/alloc.rs).
    sdserve::alloc::tune();
    let dtype = match std::env::var("SDSERVE_BENCH_DTYPE").as_deref() {
        Ok("bf16") => Some(candle_core::DType::BF16),
        Ok("f32") | Err(_) => None,
        Ok(other) => panic!("SDSERVE_BENCH_DTYPE={other}: use f32 or bf16"),
    };
    let opts = LoadOptions {
        dtype,
        ..LoadOptions::default()
    };
    StableDiffusion::load(dir, &opts).unwrap_or_else(|e| panic!("loading {}: {e}", dir.display()))
}

/// A validated request as every front door builds it.
pub fn request(
    model: &StableDiffusion,
    size: usize,
    steps: usize,
    guidance: f64,
    scheduler: &str,
) -> GenerateRequest {
    GenerateParams {
        prompt: Some(PROMPT.into()),
        negative_prompt: Some(NEGATIVE.into()),
        width: Some(size),
        height: Some(size),
        steps: Some(steps),
        guidance: Some(guidance),
        scheduler: Some(scheduler.into()),
        seed: Some(42),
        num_images: Some(1),
        ..Default::default()
    }
    .validate(model.info(), &Limits::default(), None)
    .expect("valid bench request")
}

/// Deterministic unit-variance-ish latents `[n, 4, size/8, size/8]` (no RNG crate needed).
pub fn latents(n: usize, size: usize) -> Tensor {
    let side = size / 8;
    let len = n * 4 * side * side;
    let data: Vec<f32> = (0..len).map(|i| (i as f32 * 0.7137).sin() * 1.7).collect();
    Tensor::from_vec(data, (n, 4, side, side), &Device::Cpu).unwrap()
}

/// Criterion's minimum for stages that take seconds: 10 samples of one
/// iteration each after a single warm-up iteration (11 runs in all).
pub fn slow(group: &mut BenchmarkGroup<'_, WallTime>) {
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(1))
        .measurement_time(Duration::from_millis(1));
}

/// For stages of a few milliseconds to a few hundred.
pub fn quick(group: &mut BenchmarkGroup<'_, WallTime>) {
    group
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
}

/// The number of threads candle computes with (`RAYON_NUM_THREADS`, else all cores).
pub fn threads() -> usize {
    candle_core::utils::get_num_threads()
}
