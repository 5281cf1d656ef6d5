//! The engine thread: loads the model, warms it up, then runs queued jobs one at
//! a time until the queue is closed.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use tokio::sync::watch;

use super::cost::{CostModel, JobShape};
use super::queue::JobQueue;
use super::{EngineState, Job, JobOutput, JobStatus, RunningBatch, Shared, lock};
use crate::diffusion::pipelines::{Generated, Pipeline};
use crate::diffusion::schedulers::SchedulerKind;
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::output::ImageMetadata;
use crate::request::{GenerateParams, Inputs, Limits, SourceImage};

pub(crate) struct Worker {
    pub queue: Arc<JobQueue>,
    pub state: watch::Sender<EngineState>,
    pub shared: Arc<Shared>,
    pub metrics: Arc<Metrics>,
    pub warmup: bool,
    pub max_batch_images: usize,
}

impl Worker {
    pub fn run<F, P>(self, load: F)
    where
        F: FnOnce() -> Result<P>,
        P: Pipeline,
    {
        let model = match load() {
            Ok(m) => m,
            Err(e) => {
                tracing::error!("model failed to load: {e}");
                let _ = self.state.send(EngineState::Failed(e.to_string()));
                return;
            }
        };
        tracing::info!(source = %model.info().source, "model loaded");
        if self.warmup
            && let Err(e) = self.warm_up(&model)
        {
            tracing::error!("warm-up generation failed: {e}");
            let _ = self.state.send(EngineState::Failed(format!(
                "warm-up generation failed: {e}"
            )));
            return;
        }
        let _ = self
            .state
            .send(EngineState::Ready(Arc::new(model.info().clone())));
        while let Some(job) = self.queue.pop_blocking() {
            let mut batch = vec![job];
            if self.max_batch_images > 1 {
                let more = self.queue.take_compatible(&batch[0], self.max_batch_images);
                batch.extend(more);
            }
            self.metrics.queue_depth.set(self.queue.len() as i64);
            self.run_batch(&model, batch);
        }
        tracing::info!("engine stopped");
    }

    /// One step of one small image (a quarter of the default area) end to end:
    /// the first measurement of the step rate. A model that runs only on a
    /// picture refines a gray one (an SDXL refiner), or repaints its middle
    /// (an inpainting model), at strength 1 so that the one step runs.
    fn warm_up(&self, model: &dyn Pipeline) -> Result<()> {
        let info = model.info();
        let f = info.vae_scale_factor;
        let side = (info.default_size / 2).div_ceil(f).max(1) * f;
        let needs_picture = info.inpainting || info.refiner;
        let params = GenerateParams {
            prompt: Some("warm-up".into()),
            width: Some(side),
            height: Some(side),
            steps: Some(1),
            seed: Some(0),
            strength: needs_picture.then_some(1.0),
            ..Default::default()
        };
        let s = side as u32;
        let gray = || image::RgbImage::from_pixel(s, s, image::Rgb([128; 3]));
        let mask = || {
            image::RgbImage::from_fn(s, s, |x, y| {
                let inside = (s / 4..s * 3 / 4).contains(&x) && (s / 4..s * 3 / 4).contains(&y);
                image::Rgb([if inside { 255 } else { 0 }; 3])
            })
        };
        let inputs = Inputs {
            latents: None,
            init_image: needs_picture.then(|| (SourceImage { rgb: gray() }, "init_image".into())),
            mask_image: info
                .inpainting
                .then(|| (SourceImage { rgb: mask() }, "mask_image".into())),
        };
        let request = params.validate_with(info, &Limits::default(), inputs)?;
        let t = Instant::now();
        let out = model
            .generate_batch(&[&request], &mut |_| true)?
            .pop()
            .ok_or_else(|| Error::Internal("no result for the warm-up request".into()))?;
        self.record_cost(&JobShape::of(&request), &out);
        tracing::info!(
            seconds = t.elapsed().as_secs_f64(),
            "warm-up generation ({side}x{side}, 1 step) done"
        );
        Ok(())
    }

    fn record_cost(&self, shape: &JobShape, out: &Generated) {
        let t = &out.timings;
        let measured =
            CostModel::measured(shape, t.steps, t.denoise, t.text_encoder + t.vae_decode);
        let mut cost = lock(&self.shared.cost);
        *cost = Some(CostModel::update(*cost, measured));
    }

    fn stop_requested(&self) -> bool {
        lock(&self.shared.stop_running_after).is_some_and(|deadline| Instant::now() >= deadline)
    }

    /// Runs `jobs` (compatible, see [`crate::request::GenerateRequest::batches_with`])
    /// as one UNet batch. A job cancelled mid-way is told at once and its rows
    /// finish unseen; the batch stops early only when every job is cancelled.
    fn run_batch(&self, model: &dyn Pipeline, jobs: Vec<Job>) {
        let (jobs, cancelled): (Vec<Job>, Vec<Job>) = jobs
            .into_iter()
            .partition(|j| !j.cancel.load(Ordering::SeqCst));
        for job in cancelled {
            tracing::info!(job = job.id, "job cancelled before it started");
            let _ = job.status.send(JobStatus::Cancelled);
            self.metrics.job_finished("cancelled");
        }
        if jobs.is_empty() {
            return;
        }
        let ids: Vec<u64> = jobs.iter().map(|j| j.id).collect();
        let mut shape = jobs[0].shape;
        shape.num_images = jobs.iter().map(|j| j.request.num_images).sum();
        self.metrics.batch_images.observe(shape.num_images as f64);
        let mut queue_seconds = Vec::with_capacity(jobs.len());
        for job in &jobs {
            let waited = job.submitted.elapsed().as_secs_f64();
            self.metrics.queue_wait_seconds.observe(waited);
            tracing::info!(job = job.id, queue_seconds = waited, batch = ?ids, "job started");
            queue_seconds.push(waited);
            let _ = job.status.send(JobStatus::Running {
                step: 0,
                total: job.request.steps,
            });
        }
        *lock(&self.shared.running) = Some(RunningBatch {
            ids: ids.clone(),
            shape,
            steps_done: 0,
        });
        // Jobs told `Cancelled` mid-batch.
        let mut dropped = vec![false; jobs.len()];
        // Gated jobs start once their caller has stored that they start.
        for (job, dropped) in jobs.iter().zip(dropped.iter_mut()) {
            if let Some(gate) = &job.gate
                && let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    gate.recv_timeout(super::GATE_TIMEOUT)
            {
                tracing::warn!(
                    job = job.id,
                    "the job's caller did not open its start gate in time; starting anyway"
                );
            }
            if job.cancel.load(Ordering::SeqCst) {
                tracing::info!(job = job.id, "job cancelled as it started");
                let _ = job.status.send(JobStatus::Cancelled);
                self.metrics.job_finished("cancelled");
                *dropped = true;
            }
        }
        if dropped.iter().all(|d| *d) {
            *lock(&self.shared.running) = None;
            return;
        }
        let started = Instant::now();
        let mut last_step = Instant::now();
        let mut interrupted = false;
        let requests: Vec<_> = jobs.iter().map(|j| &j.request).collect();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            model.generate_batch(&requests, &mut |p| {
                // Step 1's interval also holds the text encoder: not a step time.
                if p.step > 1 {
                    let step_s = last_step.elapsed().as_secs_f64();
                    self.metrics.step_seconds.observe(step_s);
                }
                last_step = Instant::now();
                if let Some(r) = lock(&self.shared.running).as_mut() {
                    r.steps_done = p.step;
                }
                for (job, dropped) in jobs.iter().zip(dropped.iter_mut()) {
                    if *dropped {
                        continue;
                    }
                    if job.cancel.load(Ordering::SeqCst) {
                        tracing::info!(job = job.id, "job cancelled while running");
                        let _ = job.status.send(JobStatus::Cancelled);
                        self.metrics.job_finished("cancelled");
                        *dropped = true;
                        continue;
                    }
                    let _ = job.status.send(JobStatus::Running {
                        step: p.step,
                        total: p.total,
                    });
                }
                interrupted = self.stop_requested();
                !interrupted && dropped.iter().any(|d| !d)
            })
        }));
        *lock(&self.shared.running) = None;
        let results: Vec<(JobStatus, &'static str)> = match result {
            Ok(Ok(outs)) => {
                self.record_cost(&shape, &outs[0]);
                self.metrics
                    .generation_seconds
                    .observe(started.elapsed().as_secs_f64());
                // It ran, so the model's default resolved when it was built.
                let scheduler = model
                    .info()
                    .scheduler_config
                    .resolve(jobs[0].request.scheduler)
                    .unwrap_or(SchedulerKind::Default);
                let model_name = &model.info().name;
                outs.into_iter()
                    .zip(&queue_seconds)
                    .zip(&jobs)
                    .map(|((out, &queue_seconds), job)| {
                        self.metrics.images.inc_by(out.seeds.len() as u64);
                        let metadata = out
                            .seeds
                            .iter()
                            .map(|&seed| {
                                ImageMetadata::new(&job.request, scheduler, seed, model_name)
                            })
                            .collect();
                        let output = JobOutput {
                            images: out.images,
                            seeds: out.seeds,
                            metadata,
                            scheduler: scheduler.name().to_string(),
                            timings: out.timings,
                            queue_seconds,
                        };
                        (JobStatus::Done(Arc::new(output)), "completed")
                    })
                    .collect()
            }
            Ok(Err(Error::Cancelled)) if interrupted => {
                tracing::info!(batch = ?ids, "interrupted by shutdown");
                vec![(JobStatus::Interrupted, "interrupted"); jobs.len()]
            }
            Ok(Err(Error::Cancelled)) => vec![(JobStatus::Cancelled, "cancelled"); jobs.len()],
            Ok(Err(e)) => {
                tracing::warn!(batch = ?ids, "generation failed: {e}");
                vec![(JobStatus::Failed(e.to_string()), "failed"); jobs.len()]
            }
            Err(_) => {
                tracing::error!(batch = ?ids, "generation panicked");
                let msg = "internal error during generation".to_string();
                vec![(JobStatus::Failed(msg), "failed"); jobs.len()]
            }
        };
        for ((job, (status, outcome)), dropped) in jobs.iter().zip(results).zip(dropped) {
            if dropped {
                continue;
            }
            self.metrics.job_finished(outcome);
            let _ = job.status.send(status);
        }
    }
}
