//! Per-stage and end-to-end benches of one loaded model at several sizes; used by
//! the `tiny` and `fullsize` targets.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion};
use sdserve::diffusion::pipelines::StableDiffusion;

use super::{NEGATIVE, PROMPT, latents, quick, request, slow};

/// Which stages to run and how.
pub struct Plan<'a> {
    /// Group name prefix, e.g. `tiny` or `sd15`.
    pub label: &'a str,
    pub sizes: &'a [usize],
    /// Criterion's minimum sampling (stages of seconds) instead of the quick settings.
    pub slow: bool,
    /// Steps of the end-to-end `generate` bench; 0 skips it.
    pub generate_steps: usize,
    pub text: bool,
}

/// tokenize + text encoder, UNet step with/without CFG, VAE decode, generate.
pub fn run(c: &mut Criterion, model: &StableDiffusion, plan: &Plan) {
    let configure = |g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>| {
        if plan.slow { slow(g) } else { quick(g) }
    };

    if plan.text {
        let mut g = c.benchmark_group(format!("{}/text", plan.label));
        quick(&mut g);
        g.bench_function("tokenize_2", |b| {
            b.iter(|| model.tokenize(black_box(&[NEGATIVE, PROMPT])).unwrap())
        });
        // What generate runs for one guided image: [uncond, cond] embeddings.
        g.bench_function("encode_cfg", |b| {
            b.iter(|| {
                model
                    .prompt_embeddings(black_box(PROMPT), NEGATIVE, 1, true)
                    .unwrap()
            })
        });
        g.finish();
    }

    let emb_cfg = model.prompt_embeddings(PROMPT, NEGATIVE, 1, true).unwrap();
    let emb_one = model.prompt_embeddings(PROMPT, NEGATIVE, 1, false).unwrap();

    let mut g = c.benchmark_group(format!("{}/unet_step", plan.label));
    configure(&mut g);
    for &size in plan.sizes {
        // Guided: one UNet call on 2 rows (uncond + cond), as denoise does.
        let x2 = latents(2, size);
        g.bench_with_input(BenchmarkId::new("cfg", size), &size, |b, _| {
            b.iter(|| model.predict(black_box(&x2), 500.0, &emb_cfg).unwrap())
        });
        let x1 = latents(1, size);
        g.bench_with_input(BenchmarkId::new("no_cfg", size), &size, |b, _| {
            b.iter(|| model.predict(black_box(&x1), 500.0, &emb_one).unwrap())
        });
    }
    g.finish();

    let mut g = c.benchmark_group(format!("{}/vae_decode", plan.label));
    configure(&mut g);
    for &size in plan.sizes {
        let z = latents(1, size);
        g.bench_with_input(BenchmarkId::from_parameter(size), &size, |b, _| {
            b.iter(|| model.decode(black_box(&z)).unwrap())
        });
    }
    g.finish();

    if plan.generate_steps > 0 {
        let mut g = c.benchmark_group(format!(
            "{}/generate_{}steps_cfg",
            plan.label, plan.generate_steps
        ));
        configure(&mut g);
        for &size in plan.sizes {
            let req = request(model, size, plan.generate_steps, 7.5, "dpmpp_2m");
            g.bench_with_input(BenchmarkId::from_parameter(size), &size, |b, _| {
                b.iter(|| model.generate(black_box(&req), &mut |_| true).unwrap())
            });
        }
        g.finish();
    }
}
