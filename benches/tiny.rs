//! Benches on the tiny random-weight fixture model (tests/fixtures/tiny-sd1) and
//! the model-independent stages: scheduler step and PNG encoding.
//! `cargo bench --bench tiny`; see benches/README.md.

mod common;

use std::hint::black_box;

use candle_core::{Device, Tensor};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use sdserve::diffusion::latents::SeededNoise;
use sdserve::diffusion::schedulers::SchedulerKind;
use sdserve::output::{ImageMetadata, encode_png, to_rgb8};

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

/// Attention alone on SD 1.5's shapes at 512 px: the fused
/// kernel `sdserve::kernels::attention::attention` against the candle path it
/// replaced on the CPU (split heads, `chunked_attention` with the 8 MiB score
/// budget, merge heads), same inputs.
fn attention(c: &mut Criterion) {
    use sdserve::kernels::attention::{CPU_SCORE_BLOCK_BYTES, attention, chunked_attention};
    let mut g = c.benchmark_group("attention");
    common::slow(&mut g);
    let fixed = |dims: (usize, usize, usize), salt: f32| {
        let n = dims.0 * dims.1 * dims.2;
        let data: Vec<f32> = (0..n)
            .map(|i| (i as f32 * 0.7137 + salt).sin() * 1.7)
            .collect();
        Tensor::from_vec(data, dims, &Device::Cpu).unwrap()
    };
    // (name, batch, query tokens, key tokens, channels, heads): the UNet's
    // self-attention at 64x64 and 32x32 latents and cross-attention on the 77 text
    // tokens at 64x64 (CFG batch of 2, 8 heads), and the VAE's mid-block attention
    // at 512 px (one image, one head of 512).
    for (name, batch, n, m, c, heads) in [
        ("self_4096x320", 2, 4096, 4096, 320, 8),
        ("self_1024x640", 2, 1024, 1024, 640, 8),
        ("cross_4096x320", 2, 4096, 77, 320, 8),
        ("vae_4096x512", 1, 4096, 4096, 512, 1),
    ] {
        let q = fixed((batch, n, c), 0.1);
        let k = fixed((batch, m, c), 0.2);
        let v = fixed((batch, m, c), 0.3);
        let scale = 1.0 / ((c / heads) as f64).sqrt();
        g.bench_function(BenchmarkId::new("fused", name), |b| {
            b.iter(|| attention(black_box(&q), &k, &v, heads, scale, false, false).unwrap())
        });
        g.bench_function(BenchmarkId::new("fused_bf16", name), |b| {
            b.iter(|| attention(black_box(&q), &k, &v, heads, scale, false, true).unwrap())
        });
        let split = |t: &Tensor| {
            let (b, n, c) = t.dims3().unwrap();
            t.reshape((b, n, heads, c / heads))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        g.bench_function(BenchmarkId::new("chunked", name), |b| {
            b.iter(|| {
                let out = chunked_attention(
                    &(split(black_box(&q)) * scale).unwrap(),
                    &split(&k),
                    &split(&v),
                    CPU_SCORE_BLOCK_BYTES,
                )
                .unwrap();
                out.transpose(1, 2).unwrap().reshape((batch, n, c)).unwrap()
            })
        });
    }
    g.finish();
}

/// bf16 matmuls (the CPU's mixed precision) against f32 at the UNet's shapes at 512 px;
/// throughput is in FLOP (2·m·n·k per multiply).
fn matmul(c: &mut Criterion) {
    use criterion::Throughput;
    use sdserve::kernels::bf16::{Kernel, Options, PackedA, PackedB, gemm};
    let mut g = c.benchmark_group("matmul");
    common::slow(&mut g);
    let fixed = |n: usize, salt: f32| -> Vec<f32> {
        (0..n).map(|i| (i as f32 * 0.7137 + salt).sin()).collect()
    };
    // (name, m, n, k): a 3x3 conv at 64x64 latents (320 channels; m = out channels,
    // n = pixels), one at 16x16 (1280), one tile of pixels (what the bf16 conv
    // multiplies at once) of the VAE decoder's 3x3 convs at 512 and 256 px, and
    // token-major linears of the CFG batch: attention projection and the GEGLU input
    // at 64x64; SDXL's at 512 px (its transformer blocks at 32x32 with 640 channels
    // and at 16x16 with 1280, 10 deep: the GEGLU input and the feed-forward output).
    for (name, m, n, k) in [
        ("conv3x3_320_64x64", 320, 4096, 2880),
        ("conv3x3_1280_16x16", 1280, 256, 11520),
        ("vae_conv3x3_128_512x512_tile", 128, 3648, 1152),
        ("vae_conv3x3_256_256x256_tile", 256, 1824, 2304),
        ("linear_8192x320x320", 8192, 320, 320),
        ("linear_8192x2560x320", 8192, 2560, 320),
        ("sdxl_linear_2048x5120x640", 2048, 5120, 640),
        ("sdxl_linear_512x10240x1280", 512, 10240, 1280),
        ("sdxl_linear_512x1280x5120", 512, 1280, 5120),
    ] {
        g.throughput(Throughput::Elements((2 * m * n * k) as u64));
        let a = fixed(m * k, 0.1);
        let b = fixed(k * n, 0.2);
        let pa = PackedA::from_rows(&a, m, k, k);
        let pb = PackedB::from_rows(&b, k, n, n);
        let mut out = vec![0f32; m * n];
        // Every kernel this CPU runs except the portable reference (far slower).
        for kernel in Kernel::ALL
            .into_iter()
            .filter(|&k| k.usable() && k != Kernel::Portable)
        {
            let opts = Options {
                kernel,
                ..Options::default()
            };
            g.bench_function(
                BenchmarkId::new(format!("bf16_{}", kernel.name()), name),
                |bch| bch.iter(|| gemm(black_box(&pa), &pb, &mut out, n, opts)),
            );
        }
        g.bench_function(BenchmarkId::new("bf16_pack_a", name), |bch| {
            bch.iter(|| PackedA::from_rows(black_box(&a), m, k, k))
        });
        g.bench_function(BenchmarkId::new("bf16_pack_b", name), |bch| {
            bch.iter(|| PackedB::from_rows(black_box(&b), k, n, n))
        });
        let threads = rayon::current_num_threads();
        g.bench_function(BenchmarkId::new("f32_gemm", name), |bch| {
            bch.iter(|| unsafe {
                gemm::gemm(
                    m,
                    n,
                    k,
                    out.as_mut_ptr(),
                    1,
                    n as isize,
                    false,
                    black_box(a.as_ptr()),
                    1,
                    k as isize,
                    b.as_ptr(),
                    1,
                    n as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::Rayon(threads),
                )
            })
        });
    }
    // Whole layers, f32 and mixed precision (bf16 weights): 3x3 convs of the CFG batch.
    for (name, c_in, c_out, hw) in [
        ("conv3x3_320_64x64", 320, 320, 64),
        ("conv3x3_1280_16x16", 1280, 1280, 16),
    ] {
        use candle_core::DType;
        use candle_nn::{Conv2dConfig, Module, VarBuilder};
        let x = Tensor::from_vec(
            fixed(2 * c_in * hw * hw, 0.3),
            (2, c_in, hw, hw),
            &Device::Cpu,
        )
        .unwrap();
        let mut tensors = std::collections::HashMap::new();
        let w = fixed(c_out * c_in * 9, 0.4);
        let w = Tensor::from_vec(w, (c_out, c_in, 3, 3), &Device::Cpu).unwrap();
        tensors.insert("weight".to_string(), (w / 30.0).unwrap());
        tensors.insert(
            "bias".to_string(),
            Tensor::zeros(c_out, DType::F32, &Device::Cpu).unwrap(),
        );
        let cfg = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        g.throughput(Throughput::Elements(
            (2 * 2 * c_out * c_in * 9 * hw * hw) as u64,
        ));
        for dtype in [DType::F32, DType::BF16] {
            let vb = VarBuilder::from_tensors(tensors.clone(), dtype, &Device::Cpu);
            let conv = sdserve::diffusion::layers::conv::conv2d(c_in, c_out, 3, cfg, vb).unwrap();
            let label = format!("layer_{}", if dtype == DType::F32 { "f32" } else { "bf16" });
            g.bench_function(BenchmarkId::new(label, name), |bch| {
                bch.iter(|| conv.forward(black_box(&x)).unwrap())
            });
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
            negative_prompt: Some(common::NEGATIVE.into()),
            prompt_2: None,
            negative_prompt_2: None,
            micro: Default::default(),
            steps: 30,
            guidance: 7.5,
            scheduler: "dpmpp_2m".into(),
            scheduler_options: Default::default(),
            seed: 42,
            width: size,
            height: size,
            strength: None,
            masked: false,
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

criterion_group!(
    benches,
    model_stages,
    scheduler_step,
    attention,
    matmul,
    png_encode
);
criterion_main!(benches);
