//! Benches on the tiny random-weight fixture model (tests/fixtures/tiny-sd1) and
//! the model-independent stages: scheduler step and PNG encoding.
//! `cargo bench --bench tiny`; see benches/README.md.

mod common;

use std::hint::black_box;

use candle_core::{Device, Tensor};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use sdserve::diffusion::image::{ImageMetadata, encode_png, to_rgb8};
use sdserve::diffusion::latents::SeededNoise;
use sdserve::diffusion::schedulers::SchedulerKind;

use common::stages::{self, Plan};

fn model_stages(c: &mut Criterion) {
    eprintln!("tiny benches: candle threads = {}", common::threads());
    let model = common::load(&common::tiny_model_dir());
    stages::run(
        c,
        &model,
        &Plan {
            label: "tiny",
            sizes: &[96, 256],
            slow: false,
            generate_steps: 4,
            text: true,
        },
    );
}

fn scheduler_step(c: &mut Criterion) {
    let model = common::load(&common::tiny_model_dir());
    let mut g = c.benchmark_group("scheduler_step");
    common::quick(&mut g);
    // 64x64 latents are 512 px; 12x12 the tiny model's 96 px.
    for (kind, name) in [
        (SchedulerKind::DpmPp2M, "dpmpp_2m"),
        (SchedulerKind::EulerAncestral, "euler_a"),
    ] {
        for side in [12usize, 64] {
            let sample = common::latents(1, side * 8);
            let pred = (common::latents(1, side * 8) * 0.5).unwrap();
            // Step 1 of 30: DPM++ 2M takes its second-order update from there on.
            g.bench_with_input(
                BenchmarkId::new(name, format!("{side}x{side}")),
                &side,
                |b, _| {
                    b.iter_batched(
                        || {
                            let mut s = model.scheduler(kind, &Default::default(), 30).unwrap();
                            let mut noise = SeededNoise::new(&[1]);
                            let x = s.step(&pred, 0, &sample, &mut noise).unwrap();
                            (s, noise, x)
                        },
                        |(mut s, mut noise, x)| {
                            s.step(black_box(&pred), 1, &x, &mut noise).unwrap()
                        },
                        criterion::BatchSize::SmallInput,
                    )
                },
            );
        }
    }
    g.finish();
}

fn png_encode(c: &mut Criterion) {
    let mut g = c.benchmark_group("png_encode");
    common::quick(&mut g);
    for size in [96usize, 256, 512] {
        let n = 3 * size * size;
        let data: Vec<f32> = (0..n)
            .map(|i| ((i as f32 * 0.37).sin() + 1.0) * 0.5)
            .collect();
        let images = Tensor::from_vec(data, (1, 3, size, size), &Device::Cpu).unwrap();
        let meta = ImageMetadata {
            prompt: common::PROMPT.into(),
            negative_prompt: common::NEGATIVE.into(),
            steps: 30,
            guidance: 7.5,
            scheduler: "dpmpp_2m".into(),
            scheduler_options: Default::default(),
            seed: 42,
            width: size,
            height: size,
            model: "bench".into(),
            generator: "sdserve bench".into(),
        };
        // What every front door does with generate's output: quantise, then encode.
        g.bench_with_input(BenchmarkId::new("to_rgb8+encode", size), &size, |b, _| {
            b.iter(|| {
                let rgb = to_rgb8(black_box(&images)).unwrap();
                encode_png(&rgb[0], Some(&meta)).unwrap()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, model_stages, scheduler_step, png_encode);
criterion_main!(benches);
