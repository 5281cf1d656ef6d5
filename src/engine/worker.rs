//! The engine thread: loads the model, then runs queued jobs one at a time.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::watch;

use super::queue::JobQueue;
use super::{EngineState, JobOutput, JobStatus};
use crate::diffusion::pipeline::StableDiffusion;
use crate::diffusion::schedulers::SchedulerKind;
use crate::error::{Error, Result};

pub(crate) fn run<F>(
    load: F,
    queue: Arc<JobQueue>,
    state: watch::Sender<EngineState>,
    job_seconds: Arc<AtomicU64>,
) where
    F: FnOnce() -> Result<StableDiffusion>,
{
    let model = match load() {
        Ok(m) => m,
        Err(e) => {
            tracing::error!("model failed to load: {e}");
            let _ = state.send(EngineState::Failed(e.to_string()));
            return;
        }
    };
    tracing::info!(source = %model.info().source, "model loaded");
    let _ = state.send(EngineState::Ready(Arc::new(model.info().clone())));
    loop {
        let job = queue.pop_blocking();
        if job.cancel.load(Ordering::SeqCst) {
            tracing::info!(job = job.id, "job cancelled before it started");
            let _ = job.status.send(JobStatus::Cancelled);
            continue;
        }
        let queue_seconds = job.submitted.elapsed().as_secs_f64();
        tracing::info!(job = job.id, queue_seconds, "job started");
        let status = job.status.clone();
        let cancel = job.cancel.clone();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            model.generate(&job.request, &mut |p| {
                let _ = status.send(JobStatus::Running {
                    step: p.step,
                    total: p.total,
                });
                !cancel.load(Ordering::SeqCst)
            })
        }));
        let final_status = match result {
            Ok(Ok(out)) => {
                let t = &out.timings;
                let took = t.text_encoder + t.denoise + t.vae_decode;
                let prev = f64::from_bits(job_seconds.load(Ordering::Relaxed));
                let avg = if prev > 0.0 {
                    0.8 * prev + 0.2 * took
                } else {
                    took
                };
                job_seconds.store(avg.to_bits(), Ordering::Relaxed);
                let scheduler = match job.request.scheduler {
                    SchedulerKind::Default => model
                        .scheduler_config()
                        .default_kind()
                        .map(|k| k.name().to_string())
                        .unwrap_or_else(|_| "default".into()),
                    k => k.name().to_string(),
                };
                JobStatus::Done(Arc::new(JobOutput {
                    images: out.images,
                    seeds: out.seeds,
                    scheduler,
                    timings: out.timings,
                    queue_seconds,
                }))
            }
            Ok(Err(Error::Cancelled)) => {
                tracing::info!(job = job.id, "job cancelled while running");
                JobStatus::Cancelled
            }
            Ok(Err(e)) => {
                tracing::warn!(job = job.id, "generation failed: {e}");
                JobStatus::Failed(e.to_string())
            }
            Err(_) => {
                tracing::error!(job = job.id, "generation panicked");
                JobStatus::Failed("internal error during generation".into())
            }
        };
        let _ = job.status.send(final_status);
    }
}
