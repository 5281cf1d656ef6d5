//! The generation engine: one OS thread owns the model; every front door submits
//! validated requests to its bounded queue and follows the job through a
//! per-job status channel.
//!
//! Shaped after text-generation-inference's router (typed request, bounded queue
//! owned by one worker, per-request reply channel, requests whose caller went
//! away skipped) and mistral.rs (model on its own thread, a ready handshake).

mod queue;
mod worker;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use tokio::sync::watch;

use crate::diffusion::pipeline::{ModelInfo, StableDiffusion, Timings};
use crate::error::Result;
use crate::request::GenerateRequest;

pub use queue::QueueFull;

/// Where the engine is in its life.
#[derive(Debug, Clone)]
pub enum EngineState {
    /// The worker thread is loading the model.
    Loading,
    /// Serving requests for this model.
    Ready(Arc<ModelInfo>),
    /// Loading failed or the worker died; the message says why.
    Failed(String),
}

/// A job's progress, as its status channel reports it.
#[derive(Debug, Clone)]
pub enum JobStatus {
    /// Waiting; `position` jobs are ahead of it (0 = next).
    Queued {
        position: usize,
    },
    /// Denoising step `step` of `total` finished.
    Running {
        step: usize,
        total: usize,
    },
    Done(Arc<JobOutput>),
    Failed(String),
    Cancelled,
}

impl JobStatus {
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            JobStatus::Done(_) | JobStatus::Failed(_) | JobStatus::Cancelled
        )
    }
}

/// A finished job's images and how long it took.
#[derive(Debug)]
pub struct JobOutput {
    /// `[n, 3, H, W]` f32 in [0, 1] on the CPU.
    pub images: candle_core::Tensor,
    pub seeds: Vec<u64>,
    /// The scheduler actually run (the model default resolved).
    pub scheduler: String,
    pub timings: Timings,
    /// Seconds the job waited in the queue.
    pub queue_seconds: f64,
}

/// Engine settings.
#[derive(Debug, Clone, Copy)]
pub struct EngineConfig {
    /// Jobs that may wait at once; submitting more fails with [`QueueFull`].
    pub queue_capacity: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self { queue_capacity: 32 }
    }
}

/// One submitted job, as held by the engine.
pub(crate) struct Job {
    pub id: u64,
    pub request: GenerateRequest,
    pub status: watch::Sender<JobStatus>,
    pub cancel: Arc<AtomicBool>,
    pub submitted: Instant,
}

/// The caller's side of a job: its status channel and a way to cancel it.
#[derive(Debug)]
pub struct Ticket {
    pub id: u64,
    pub status: watch::Receiver<JobStatus>,
    cancel: Arc<AtomicBool>,
}

impl Ticket {
    /// Asks the engine to drop the job: skipped if still queued, stopped after the
    /// current step if running.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
    }

    /// A guard that cancels the job when dropped unless [`CancelOnDrop::disarm`]
    /// was called: synchronous handlers hold one so a caller that disconnects
    /// frees the queue slot.
    pub fn cancel_on_drop(&self) -> CancelOnDrop {
        CancelOnDrop(Some(self.cancel.clone()))
    }

    /// Waits for the job's final status.
    pub async fn wait(&mut self) -> JobStatus {
        loop {
            let current = self.status.borrow_and_update().clone();
            if current.is_final() {
                return current;
            }
            if self.status.changed().await.is_err() {
                // The worker dropped the sender without a final status: it died.
                let last = self.status.borrow().clone();
                return if last.is_final() {
                    last
                } else {
                    JobStatus::Failed("the engine stopped".into())
                };
            }
        }
    }
}

/// Cancels its job when dropped (see [`Ticket::cancel_on_drop`]).
#[derive(Debug)]
pub struct CancelOnDrop(Option<Arc<AtomicBool>>);

impl CancelOnDrop {
    pub fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(flag) = self.0.take() {
            flag.store(true, Ordering::SeqCst);
        }
    }
}

/// Handle to the engine; cheap to clone.
#[derive(Clone)]
pub struct Engine {
    queue: Arc<queue::JobQueue>,
    state: watch::Receiver<EngineState>,
    next_id: Arc<std::sync::atomic::AtomicU64>,
    /// Moving average of a job's run time in seconds (f64 bits; 0 = none yet).
    job_seconds: Arc<std::sync::atomic::AtomicU64>,
}

impl Engine {
    /// Starts the worker thread, which calls `load` and then serves jobs. Returns
    /// at once: [`Engine::state`] says when the model is ready.
    pub fn start<F>(load: F, config: EngineConfig) -> Self
    where
        F: FnOnce() -> Result<StableDiffusion> + Send + 'static,
    {
        let queue = Arc::new(queue::JobQueue::new(config.queue_capacity));
        let (state_tx, state) = watch::channel(EngineState::Loading);
        let worker_queue = queue.clone();
        let job_seconds = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let worker_seconds = job_seconds.clone();
        std::thread::Builder::new()
            .name("sdserve-engine".into())
            .spawn(move || worker::run(load, worker_queue, state_tx, worker_seconds))
            .expect("spawning the engine thread");
        Self {
            queue,
            state,
            next_id: Arc::new(std::sync::atomic::AtomicU64::new(1)),
            job_seconds,
        }
    }

    pub fn state(&self) -> EngineState {
        self.state.borrow().clone()
    }

    /// Waits until the model is loaded (or failed to load).
    pub async fn ready(&self) -> EngineState {
        let mut rx = self.state.clone();
        loop {
            let s = rx.borrow_and_update().clone();
            if !matches!(s, EngineState::Loading) {
                return s;
            }
            if rx.changed().await.is_err() {
                return self.state();
            }
        }
    }

    /// Queues a validated request. Fails at once when the queue is full.
    pub fn submit(&self, request: GenerateRequest) -> std::result::Result<Ticket, QueueFull> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = watch::channel(JobStatus::Queued { position: 0 });
        let cancel = Arc::new(AtomicBool::new(false));
        let job = Job {
            id,
            request,
            status: tx,
            cancel: cancel.clone(),
            submitted: Instant::now(),
        };
        self.queue.push(job)?;
        Ok(Ticket {
            id,
            status: rx,
            cancel,
        })
    }

    /// Jobs waiting (not counting the one running).
    pub fn queue_len(&self) -> usize {
        self.queue.len()
    }

    pub fn queue_capacity(&self) -> usize {
        self.queue.capacity()
    }

    /// Average seconds a job has taken to run, once one has finished.
    pub fn average_job_seconds(&self) -> Option<f64> {
        let s = f64::from_bits(self.job_seconds.load(Ordering::Relaxed));
        (s > 0.0).then_some(s)
    }

    /// Seconds until a slot is likely free: the measured average job time times
    /// the jobs ahead (5 s before any job has finished), between 1 s and 1 h.
    pub fn retry_after_seconds(&self) -> u64 {
        match self.average_job_seconds() {
            Some(avg) => (avg * (self.queue_len() + 1) as f64)
                .ceil()
                .clamp(1.0, 3600.0) as u64,
            None => 5,
        }
    }
}
