//! Compatible queued jobs run as one UNet batch, and every image is the same
//! as when its job runs alone (per-image seeds; rows never mix) up to float
//! rounding: gemm kernels round differently once the batch grows past 2 rows
//! (UNet outputs ~7e-7 apart at 4 rows vs 2; 2 vs 1 is exact; images up to
//! 2.5e-5 apart with the AVX-512 kernels), far below one 8-bit level (3.9e-3).

mod common;

use std::sync::Arc;

use candle_core::Tensor;
use sdserve::engine::{Engine, EngineConfig, EngineState, JobOutput, JobStatus, Ticket};
use sdserve::request::{GenerateParams, GenerateRequest};

fn engine(max_batch_images: usize) -> Engine {
    engine_for("tiny-sd1", max_batch_images)
}

fn engine_for(model: &'static str, max_batch_images: usize) -> Engine {
    Engine::start(
        move || {
            sdserve::diffusion::pipelines::StableDiffusion::load(
                &common::model_dir(model),
                &Default::default(),
            )
        },
        EngineConfig {
            max_batch_images,
            warmup: false,
            ..Default::default()
        },
    )
}

async fn ready(e: &Engine) -> Arc<sdserve::diffusion::pipelines::ModelInfo> {
    match e.ready().await {
        EngineState::Ready(info) => info,
        other => panic!("{other:?}"),
    }
}

fn request(
    info: &sdserve::diffusion::pipelines::ModelInfo,
    prompt: &str,
    seed: u64,
    num_images: usize,
    steps: usize,
    scheduler: &str,
) -> GenerateRequest {
    GenerateParams {
        prompt: Some(prompt.into()),
        negative_prompt: Some(format!("not {prompt}")),
        width: Some(64),
        height: Some(48),
        steps: Some(steps),
        scheduler: Some(scheduler.into()),
        seed: Some(seed),
        num_images: Some(num_images),
        ..Default::default()
    }
    .validate(info, &Default::default(), None)
    .unwrap()
}

async fn done(mut t: Ticket) -> Arc<JobOutput> {
    match t.wait().await {
        JobStatus::Done(out) => out,
        other => panic!("{other:?}"),
    }
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    common::max_abs_diff(a, b)
}

#[test]
fn queued_compatible_jobs_share_a_batch_and_images_do_not_change() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        for scheduler in ["euler_a", "dpmpp_2m"] {
            let batched = engine(4);
            let alone = engine(1);
            let info = ready(&batched).await;
            ready(&alone).await;
            // A blocker with other steps keeps the next jobs queued together.
            let blocker = batched
                .submit(request(&info, "wait", 1, 1, 40, scheduler))
                .unwrap();
            let jobs = [("a fox", 10, 1), ("a boat", 20, 2), ("a tree", 30, 1)];
            let tickets: Vec<Ticket> = jobs
                .iter()
                .map(|&(p, seed, n)| {
                    batched
                        .submit(request(&info, p, seed, n, 6, scheduler))
                        .unwrap()
                })
                .collect();
            // Over the image limit (4 already): waits for the next batch.
            let extra = batched
                .submit(request(&info, "a cat", 40, 1, 6, scheduler))
                .unwrap();
            done(blocker).await;
            let mut outs = Vec::new();
            for t in tickets {
                outs.push(done(t).await);
            }
            let extra = done(extra).await;
            // One batch: they share the batch's timings; the extra job ran later.
            let t0 = &outs[0].timings;
            for o in &outs {
                assert_eq!(o.timings.denoise.to_bits(), t0.denoise.to_bits());
            }
            assert_ne!(extra.timings.denoise.to_bits(), t0.denoise.to_bits());

            for ((p, seed, n), out) in jobs.iter().zip(&outs) {
                assert_eq!(out.images.dims()[0], *n);
                assert_eq!(
                    out.seeds,
                    (0..*n as u64).map(|i| seed + i).collect::<Vec<_>>()
                );
                let solo = done(
                    alone
                        .submit(request(&info, p, *seed, *n, 6, scheduler))
                        .unwrap(),
                )
                .await;
                let d = max_diff(&out.images, &solo.images);
                assert!(d <= 1e-4, "{scheduler} {p}: batched vs alone differ by {d}");
            }
        }
    });
}

#[test]
fn incompatible_jobs_are_not_batched() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let e = engine(8);
        let info = ready(&e).await;
        let blocker = e.submit(request(&info, "wait", 1, 1, 40, "ddim")).unwrap();
        let a = e.submit(request(&info, "a", 2, 1, 5, "ddim")).unwrap();
        let b = e.submit(request(&info, "b", 3, 1, 6, "ddim")).unwrap();
        let c = e.submit(request(&info, "c", 4, 1, 5, "euler")).unwrap();
        done(blocker).await;
        let (a, b, c) = (done(a).await, done(b).await, done(c).await);
        assert_ne!(a.timings.denoise.to_bits(), b.timings.denoise.to_bits());
        assert_ne!(a.timings.denoise.to_bits(), c.timings.denoise.to_bits());
    });
}

#[test]
fn a_cancelled_job_leaves_its_batch_running() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let e = engine(4);
        let info = ready(&e).await;
        let blocker = e.submit(request(&info, "wait", 1, 1, 40, "ddim")).unwrap();
        let keep = e.submit(request(&info, "keep", 2, 1, 300, "ddim")).unwrap();
        let mut drop_me = e.submit(request(&info, "drop", 3, 1, 300, "ddim")).unwrap();
        done(blocker).await;
        // Both are running together now; cancel one.
        while !matches!(*drop_me.status.borrow_and_update(), JobStatus::Running { step, .. } if step >= 2) {
            drop_me.status.changed().await.unwrap();
        }
        drop_me.cancel();
        assert!(matches!(drop_me.wait().await, JobStatus::Cancelled));
        let kept = done(keep).await;
        assert_eq!(kept.images.dims()[0], 1);
    });
}

/// A change to a request's parameters.
type Edit<'a> = &'a dyn Fn(&mut GenerateParams);

/// SDXL jobs batch through the queue as SD ones do, each row keeping its own
/// pooled embedding and time ids: a job with no negative prompt (zero
/// embeddings), one with a second prompt and one with size conditioning run
/// as one batch and give the images they give alone.
#[test]
fn sdxl_jobs_share_a_batch_with_their_own_conditioning() {
    use sdserve::request::MicroConditioning;
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let batched = engine_for("tiny-sdxl", 4);
        let alone = engine_for("tiny-sdxl", 1);
        let info = ready(&batched).await;
        ready(&alone).await;
        let xl = |prompt: &str, seed, steps, edit: &dyn Fn(&mut GenerateParams)| {
            let mut p = GenerateParams {
                prompt: Some(prompt.into()),
                width: Some(64),
                height: Some(48),
                steps: Some(steps),
                scheduler: Some("euler".into()),
                seed: Some(seed),
                ..Default::default()
            };
            edit(&mut p);
            p.validate(&info, &Default::default(), None).unwrap()
        };
        let none = |_: &mut GenerateParams| {};
        let edits: [(&str, u64, Edit); 3] = [
            ("a fox", 10, &none),
            ("a boat", 20, &|p| {
                p.prompt_2 = Some("an oil painting".into());
                p.negative_prompt = Some("fog".into());
            }),
            ("a tree", 30, &|p| {
                p.micro = MicroConditioning {
                    original_size: Some([96, 128]),
                    crops_coords_top_left: Some([8, 0]),
                    ..Default::default()
                };
            }),
        ];
        let blocker = batched.submit(xl("wait", 1, 30, &none)).unwrap();
        let tickets: Vec<Ticket> = edits
            .iter()
            .map(|(p, seed, edit)| batched.submit(xl(p, *seed, 4, *edit)).unwrap())
            .collect();
        done(blocker).await;
        let mut outs = Vec::new();
        for t in tickets {
            outs.push(done(t).await);
        }
        let t0 = outs[0].timings.denoise.to_bits();
        assert!(
            outs.iter().all(|o| o.timings.denoise.to_bits() == t0),
            "one batch"
        );
        for ((p, seed, edit), out) in edits.iter().zip(&outs) {
            let solo = done(alone.submit(xl(p, *seed, 4, *edit)).unwrap()).await;
            let d = max_diff(&out.images, &solo.images);
            assert!(d <= 1e-4, "{p}: batched vs alone differ by {d}");
        }
    });
}
