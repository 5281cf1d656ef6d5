//! The engine thread: loads the model, warms it up, then runs queued jobs one at
//! a time until the queue is closed.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use tokio::sync::watch;

use super::cost::{CostModel, JobShape};
use super::queue::JobQueue;
use super::{EngineState, Job, JobOutput, JobStatus, Shared, lock};
use crate::diffusion::pipeline::{Generated, StableDiffusion};
use crate::diffusion::schedulers::SchedulerKind;
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::request::{GenerateParams, Limits};

pub(crate) struct Worker {
    pub queue: Arc<JobQueue>,
    pub state: watch::Sender<EngineState>,
    pub shared: Arc<Shared>,
    pub metrics: Arc<Metrics>,
    pub warmup: bool,
}

impl Worker {
    pub fn run<F>(self, load: F)
    where
        F: FnOnce() -> Result<StableDiffusion>,
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
            self.metrics.queue_depth.set(self.queue.len() as i64);
            self.run_job(&model, job);
        }
        tracing::info!("engine stopped");
    }

    /// One step of one small image (a quarter of the default area) end to end:
    /// the first measurement of the step rate.
    fn warm_up(&self, model: &StableDiffusion) -> Result<()> {
        let info = model.info();
        let f = info.vae_scale_factor;
        let side = (info.default_size / 2).div_ceil(f).max(1) * f;
        let request = GenerateParams {
            prompt: Some("warm-up".into()),
            width: Some(side),
            height: Some(side),
            steps: Some(1),
            seed: Some(0),
            ..Default::default()
        }
        .validate(info, &Limits::default(), None)?;
        let t = Instant::now();
        let out = model.generate(&request, &mut |_| true)?;
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

    fn run_job(&self, model: &StableDiffusion, job: Job) {
        if job.cancel.load(Ordering::SeqCst) {
            tracing::info!(job = job.id, "job cancelled before it started");
            let _ = job.status.send(JobStatus::Cancelled);
            self.metrics.job_finished("cancelled");
            return;
        }
        let queue_seconds = job.submitted.elapsed().as_secs_f64();
        self.metrics.queue_wait_seconds.observe(queue_seconds);
        tracing::info!(job = job.id, queue_seconds, "job started");
        *lock(&self.shared.running) = Some((job.id, job.shape, 0));
        let _ = job.status.send(JobStatus::Running {
            step: 0,
            total: job.request.steps,
        });
        let started = Instant::now();
        let mut last_step = Instant::now();
        let mut interrupted = false;
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            model.generate(&job.request, &mut |p| {
                // Step 1's interval also holds the text encoder: not a step time.
                if p.step > 1 {
                    let step_s = last_step.elapsed().as_secs_f64();
                    self.metrics.step_seconds.observe(step_s);
                }
                last_step = Instant::now();
                if let Some(r) = lock(&self.shared.running).as_mut() {
                    r.2 = p.step;
                }
                let _ = job.status.send(JobStatus::Running {
                    step: p.step,
                    total: p.total,
                });
                interrupted = self.stop_requested();
                !job.cancel.load(Ordering::SeqCst) && !interrupted
            })
        }));
        *lock(&self.shared.running) = None;
        let (status, outcome) = match result {
            Ok(Ok(out)) => {
                self.record_cost(&job.shape, &out);
                self.metrics
                    .generation_seconds
                    .observe(started.elapsed().as_secs_f64());
                self.metrics.images.inc_by(out.seeds.len() as u64);
                let scheduler = match job.request.scheduler {
                    SchedulerKind::Default => model
                        .scheduler_config()
                        .default_kind()
                        .map(|k| k.name().to_string())
                        .unwrap_or_else(|_| "default".into()),
                    k => k.name().to_string(),
                };
                let output = JobOutput {
                    images: out.images,
                    seeds: out.seeds,
                    scheduler,
                    timings: out.timings,
                    queue_seconds,
                };
                (JobStatus::Done(Arc::new(output)), "completed")
            }
            Ok(Err(Error::Cancelled)) if interrupted => {
                tracing::info!(job = job.id, "job interrupted by shutdown");
                (JobStatus::Interrupted, "interrupted")
            }
            Ok(Err(Error::Cancelled)) => {
                tracing::info!(job = job.id, "job cancelled while running");
                (JobStatus::Cancelled, "cancelled")
            }
            Ok(Err(e)) => {
                tracing::warn!(job = job.id, "generation failed: {e}");
                (JobStatus::Failed(e.to_string()), "failed")
            }
            Err(_) => {
                tracing::error!(job = job.id, "generation panicked");
                let msg = "internal error during generation".to_string();
                (JobStatus::Failed(msg), "failed")
            }
        };
        self.metrics.job_finished(outcome);
        let _ = job.status.send(status);
    }
}
