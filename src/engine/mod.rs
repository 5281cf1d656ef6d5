//! The generation engine: one OS thread owns the model; every front door submits
//! validated requests to its bounded queue and follows the job through a
//! per-job status channel.
//!
//! Shaped after text-generation-inference's router (typed request, bounded queue
//! owned by one worker, per-request reply channel, requests whose caller went
//! away skipped) and mistral.rs (model on its own thread, a ready handshake).

mod cost;
mod queue;
mod worker;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::diffusion::pipelines::{ModelInfo, Pipeline, Timings};
use crate::error::Result;
use crate::metrics::Metrics;
use crate::request::GenerateRequest;

pub use cost::{CostModel, JobShape};
pub use queue::SubmitError;

/// Where the engine is in its life.
#[derive(Debug, Clone)]
pub enum EngineState {
    /// The worker thread is loading the model (and running its warm-up).
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
    /// `step` of `total` denoising steps are done (0 as the job starts).
    Running {
        step: usize,
        total: usize,
    },
    Done(Arc<JobOutput>),
    Failed(String),
    /// Cancelled by its caller.
    Cancelled,
    /// The server shut down before the job finished; its caller may keep it and
    /// run it again.
    Interrupted,
}

impl JobStatus {
    pub fn is_final(&self) -> bool {
        !matches!(self, JobStatus::Queued { .. } | JobStatus::Running { .. })
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
    /// Each image's metadata (what made it), in `seeds` order.
    pub metadata: Vec<crate::output::ImageMetadata>,
    pub timings: Timings,
    /// Seconds the job waited in the queue.
    pub queue_seconds: f64,
}

/// Engine settings.
#[derive(Clone)]
pub struct EngineConfig {
    /// Jobs that may wait at once; submitting more fails with [`SubmitError::Full`].
    pub queue_capacity: usize,
    /// Run one short generation after loading, before reporting ready: it
    /// measures step times for estimates and warms up kernels and allocators.
    pub warmup: bool,
    /// Most images one UNet batch may hold: compatible queued jobs (same size,
    /// steps, scheduler, guidance) run together up to this; 1 disables batching.
    pub max_batch_images: usize,
    pub metrics: Arc<Metrics>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            queue_capacity: 32,
            warmup: true,
            max_batch_images: 4,
            metrics: Arc::default(),
        }
    }
}

/// One submitted job, as held by the engine.
pub(crate) struct Job {
    pub id: u64,
    pub request: GenerateRequest,
    pub shape: JobShape,
    pub status: watch::Sender<JobStatus>,
    pub cancel: Arc<AtomicBool>,
    pub submitted: Instant,
    /// Set for gated jobs ([`Engine::submit_gated`]): after telling the job it
    /// runs, the worker waits (up to [`GATE_TIMEOUT`]) until its caller opens it.
    pub gate: Option<std::sync::mpsc::Receiver<()>>,
}

/// Longest a gated job's start waits for its caller.
pub const GATE_TIMEOUT: Duration = Duration::from_secs(30);

/// The caller's side of a job: its status channel and a way to cancel it.
pub struct Ticket {
    pub id: u64,
    pub status: watch::Receiver<JobStatus>,
    cancel: Arc<AtomicBool>,
    queue: Arc<queue::JobQueue>,
    gate: Option<Mutex<std::sync::mpsc::Sender<()>>>,
}

impl Ticket {
    /// Lets a gated job that was told `Running { step: 0 }` start (a no-op
    /// for ungated jobs, and after the first call).
    pub fn open_gate(&self) {
        if let Some(gate) = &self.gate {
            let _ = lock(gate).send(());
        }
    }

    /// Asks the engine to drop the job: removed at once if still queued,
    /// stopped after the current step if running.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
        self.queue.prune();
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

/// What the worker shares with the handle.
#[derive(Default)]
pub(crate) struct Shared {
    /// Measured rates, once a job (or the warm-up) has run.
    pub cost: Mutex<Option<CostModel>>,
    /// The running batch.
    pub running: Mutex<Option<RunningBatch>>,
    /// Set by [`Engine::shutdown`]: the running job is interrupted after this instant.
    pub stop_running_after: Mutex<Option<Instant>>,
}

/// The jobs the worker is running as one batch.
#[derive(Debug, Clone)]
pub(crate) struct RunningBatch {
    pub ids: Vec<u64>,
    /// All the batch's images together.
    pub shape: JobShape,
    pub steps_done: usize,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Handle to the engine; cheap to clone.
#[derive(Clone)]
pub struct Engine {
    queue: Arc<queue::JobQueue>,
    state: watch::Receiver<EngineState>,
    next_id: Arc<AtomicU64>,
    shared: Arc<Shared>,
    /// Becomes true when the worker thread has exited.
    stopped: watch::Receiver<bool>,
    metrics: Arc<Metrics>,
}

impl Engine {
    /// Starts the worker thread, which calls `load` and then serves jobs. Returns
    /// at once: [`Engine::state`] says when the model is ready.
    pub fn start<F, P>(load: F, config: EngineConfig) -> Self
    where
        F: FnOnce() -> Result<P> + Send + 'static,
        P: Pipeline + 'static,
    {
        let queue = Arc::new(queue::JobQueue::new(
            config.queue_capacity,
            config.metrics.clone(),
        ));
        let (state_tx, state) = watch::channel(EngineState::Loading);
        let (stopped_tx, stopped) = watch::channel(false);
        let shared = Arc::new(Shared::default());
        let worker = worker::Worker {
            queue: queue.clone(),
            state: state_tx,
            shared: shared.clone(),
            metrics: config.metrics.clone(),
            warmup: config.warmup,
            max_batch_images: config.max_batch_images.max(1),
        };
        std::thread::Builder::new()
            .name("sdserve-engine".into())
            .spawn(move || {
                worker.run(load);
                let _ = stopped_tx.send(true);
            })
            .expect("spawning the engine thread");
        Self {
            queue,
            state,
            next_id: Arc::new(AtomicU64::new(1)),
            shared,
            stopped,
            metrics: config.metrics,
        }
    }

    pub fn state(&self) -> EngineState {
        self.state.borrow().clone()
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The model's info when it is loaded; else why not (loading, or the load
    /// failure with no filesystem path in it: callers see this).
    pub fn ready_info(&self) -> Result<Arc<ModelInfo>, String> {
        match self.state() {
            EngineState::Ready(info) => Ok(info),
            EngineState::Loading => Err("the model is still loading".into()),
            EngineState::Failed(e) => Err(format!(
                "the model failed to load: {}",
                crate::error::without_paths(&e)
            )),
        }
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
    pub fn submit(&self, request: GenerateRequest) -> std::result::Result<Ticket, SubmitError> {
        self.push(request, true, false)
    }

    /// Like [`Engine::submit`], but the job starts only once its caller has
    /// seen `Running { step: 0 }` and called [`Ticket::open_gate`] (or after
    /// [`GATE_TIMEOUT`]): the job API stores "attempt started" first, so a job
    /// that kills the process is known as such at the next start.
    pub fn submit_gated(
        &self,
        request: GenerateRequest,
    ) -> std::result::Result<Ticket, SubmitError> {
        self.push(request, true, true)
    }

    /// Queues a gated request accepted before a restart: the queue bound
    /// applies to new requests only.
    pub fn resubmit(&self, request: GenerateRequest) -> std::result::Result<Ticket, SubmitError> {
        self.push(request, false, true)
    }

    fn push(
        &self,
        request: GenerateRequest,
        bounded: bool,
        gated: bool,
    ) -> std::result::Result<Ticket, SubmitError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = watch::channel(JobStatus::Queued { position: 0 });
        let cancel = Arc::new(AtomicBool::new(false));
        let (gate_tx, gate_rx) = match gated {
            true => {
                let (t, r) = std::sync::mpsc::channel();
                (Some(Mutex::new(t)), Some(r))
            }
            false => (None, None),
        };
        let job = Job {
            id,
            shape: JobShape::of(&request),
            request,
            status: tx,
            cancel: cancel.clone(),
            submitted: Instant::now(),
            gate: gate_rx,
        };
        self.queue.push(job, bounded)?;
        self.metrics.queue_depth.set(self.queue.len() as i64);
        Ok(Ticket {
            id,
            status: rx,
            cancel,
            queue: self.queue.clone(),
            gate: gate_tx,
        })
    }

    /// Jobs waiting (not counting the one running).
    pub fn queue_len(&self) -> usize {
        self.queue.len()
    }

    pub fn queue_capacity(&self) -> usize {
        self.queue.capacity()
    }

    /// The measured rates, once the warm-up or a job has run.
    pub fn cost_model(&self) -> Option<CostModel> {
        *lock(&self.shared.cost)
    }

    /// Seconds until job `id` is likely done: what is left of the running job,
    /// the jobs ahead of it, and its own steps, at the measured rates (at
    /// [`CostModel::PRIOR`] before anything was measured). `None` when the job
    /// is no longer in the engine (it has finished).
    pub fn estimate_seconds(&self, id: u64) -> Option<f64> {
        let cost = self.cost_model().unwrap_or(CostModel::PRIOR);
        let running = lock(&self.shared.running).clone();
        let running_left = running
            .as_ref()
            .map_or(0.0, |r| cost.remaining(&r.shape, r.steps_done));
        if running.as_ref().is_some_and(|r| r.ids.contains(&id)) {
            return Some(running_left);
        }
        let (ahead, own) = self.queue.ahead_of(id)?;
        let queued: f64 = ahead.iter().map(|s| cost.remaining(s, 0)).sum();
        Some(running_left + queued + cost.remaining(&own, 0))
    }

    /// Seconds until a queue slot is likely free (the running batch's remaining
    /// time at the measured rates; 5 s before anything was measured), between
    /// 1 s and 1 h.
    pub fn retry_after_seconds(&self) -> u64 {
        let running = lock(&self.shared.running).clone();
        match (self.cost_model(), running) {
            (Some(cost), Some(r)) => cost
                .remaining(&r.shape, r.steps_done)
                .ceil()
                .clamp(1.0, 3600.0) as u64,
            (Some(_), None) => 1,
            (None, _) => 5,
        }
    }

    /// Stops the engine: new jobs are refused, queued ones are told
    /// [`JobStatus::Interrupted`], and the running job may finish for up to
    /// `grace` before it is interrupted too. Resolves when the worker has stopped
    /// (or at once if it never started serving).
    pub async fn shutdown(&self, grace: Duration) {
        *lock(&self.shared.stop_running_after) = Some(Instant::now() + grace);
        self.queue.close();
        let mut stopped = self.stopped.clone();
        if matches!(self.state(), EngineState::Loading) {
            // A worker still loading stops when it looks at the queue; don't wait for the load.
            return;
        }
        let _ = stopped.wait_for(|s| *s).await;
    }
}
