//! The public job API's engine room (the Lambdas + S3 of the setup sdserve
//! replaces): accepts jobs, persists a record at every state change, stores the
//! images, answers status for live, finished, and other replicas' jobs, and
//! re-queues unfinished jobs after a restart.

mod error;
mod follow;
pub mod record;
mod recovery;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::diffusion::pipelines::SamplingDefaults;
use crate::engine::{Engine, EngineState, JobStatus, SubmitError, Ticket};
use crate::error::{Error, Result};
use crate::output::{encode_png, to_rgb8};
use crate::request::{GenerateRequest, Limits, SourceImage};
use crate::storage::Storage;
pub use error::JobError;
pub use record::{
    EditInputs, ImageSource, JobRecord, JobRequest, JobState, JobTimings, MAX_ATTEMPTS,
};

/// Longest pause between two tries of a storage write that must happen.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How often a running job's record is rewritten ("still running").
const HEARTBEAT: Duration = Duration::from_secs(5);
/// How long a starting server watches a job that looks like a poison job
/// (running when its server stopped [`MAX_ATTEMPTS`] times) before it decides:
/// a job still running on another server beats meanwhile.
const SUSPECT_WATCH: Duration = Duration::from_millis(12_500);

/// A job as the API shows it: the record plus live progress.
#[derive(Debug, Clone)]
pub struct JobView {
    pub record: JobRecord,
    /// Jobs ahead while queued here.
    pub queue_position: Option<usize>,
    pub step: usize,
    pub total_steps: usize,
    /// The engine's id while the job is in this server's engine.
    engine_id: Option<u64>,
}

impl JobView {
    fn new(record: JobRecord) -> Self {
        let total_steps = record.request.steps.unwrap_or(0);
        let step = if record.status == JobState::Completed {
            total_steps
        } else {
            0
        };
        Self {
            record,
            queue_position: None,
            step,
            total_steps,
            engine_id: None,
        }
    }

    pub fn progress(&self) -> f64 {
        match self.record.status {
            JobState::Completed => 1.0,
            _ if self.total_steps == 0 => 0.0,
            _ => (self.step as f64 / self.total_steps as f64).min(1.0),
        }
    }
}

/// The body of `GET /image/{id}` (and of the final SSE event).
#[derive(Debug, Clone, Serialize)]
pub struct StatusBody {
    pub image_id: String,
    pub status: JobState,
    pub image_url: Option<String>,
    pub image_urls: Vec<String>,
    /// An edit's input picture and mask, as stored with the job (`null` for
    /// text to image).
    pub init_image_url: Option<String>,
    pub mask_image_url: Option<String>,
    pub created_at: chrono::DateTime<Utc>,
    pub started_at: Option<chrono::DateTime<Utc>>,
    pub generated_at: Option<chrono::DateTime<Utc>>,
    pub progress: f64,
    pub step: usize,
    pub total_steps: usize,
    pub queue_position: Option<usize>,
    pub estimated_time: Option<f64>,
    pub error: Option<String>,
    pub request: JobRequest,
    pub seeds: Vec<u64>,
    pub timings: Option<JobTimings>,
}

/// Service settings.
#[derive(Debug, Clone)]
pub struct JobsConfig {
    /// Prefix of image URLs served by this server (`""`: relative `/files/...`).
    pub public_url: String,
    /// Lifetime of presigned S3 URLs.
    pub presign_expiry: Duration,
}

impl Default for JobsConfig {
    fn default() -> Self {
        Self {
            public_url: String::new(),
            presign_expiry: Duration::from_secs(3600),
        }
    }
}

struct Entry {
    view: watch::Sender<JobView>,
    ticket: Mutex<Option<Arc<Ticket>>>,
}

/// Cheap to clone; every clone is the same service.
#[derive(Clone)]
pub struct Jobs {
    inner: Arc<Inner>,
}

struct Inner {
    engine: Engine,
    storage: Storage,
    limits: Limits,
    config: JobsConfig,
    entries: Mutex<HashMap<String, Arc<Entry>>>,
    tracker: TaskTracker,
    shutting_down: AtomicBool,
    /// Cancelled at shutdown: ends event streams.
    closing: CancellationToken,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Job ids are UUIDs; anything else is no job (and never a storage path).
fn valid_id(id: &str) -> bool {
    uuid::Uuid::parse_str(id).is_ok()
}

impl Jobs {
    pub fn new(engine: Engine, storage: Storage, limits: Limits, config: JobsConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                engine,
                storage,
                limits,
                config,
                entries: Mutex::default(),
                tracker: TaskTracker::new(),
                shutting_down: AtomicBool::new(false),
                closing: CancellationToken::new(),
            }),
        }
    }

    pub fn engine(&self) -> &Engine {
        &self.inner.engine
    }

    pub fn storage(&self) -> &Storage {
        &self.inner.storage
    }

    /// True once shutdown has begun: no new jobs, `/ping` answers 503.
    pub fn is_shutting_down(&self) -> bool {
        self.inner.shutting_down.load(Ordering::SeqCst)
    }

    /// A token cancelled when the server starts shutting down.
    pub fn closing(&self) -> CancellationToken {
        self.inner.closing.clone()
    }

    fn insert(&self, view: JobView) -> Arc<Entry> {
        let entry = Arc::new(Entry {
            view: watch::channel(view.clone()).0,
            ticket: Mutex::new(None),
        });
        lock(&self.inner.entries).insert(view.record.image_id.clone(), entry.clone());
        entry
    }

    async fn write(&self, record: &JobRecord) -> Result<()> {
        let json = serde_json::to_vec_pretty(record)
            .map_err(|e| Error::storage(JobRecord::key(&record.image_id), e))?;
        self.inner
            .storage
            .put(&JobRecord::key(&record.image_id), json)
            .await
    }

    /// Validates and queues a job, writes its record, and starts following it.
    pub async fn submit(&self, request: JobRequest) -> Result<JobView, JobError> {
        if self.inner.shutting_down.load(Ordering::SeqCst) {
            return Err(JobError::NotReady("the server is shutting down".into()));
        }
        let info = self.inner.engine.ready_info().map_err(JobError::NotReady)?;
        let image_id = uuid::Uuid::new_v4().to_string();
        let init = self
            .fetch_image(request.init_image.as_ref(), "init_image")
            .await?;
        let mask = self
            .fetch_image(request.mask_image.as_ref(), "mask_image")
            .await?;
        // The inputs are kept beside the record, which names them, not in it.
        let mut inputs = Vec::new();
        for (img, field) in [(&init, "init_image"), (&mask, "mask_image")] {
            if let Some(img) = img {
                let png = encode_png(&img.rgb, None).map_err(JobError::invalid)?;
                inputs.push((field, JobRecord::input_key(&image_id, field), png));
            }
        }
        let validated: GenerateRequest = request
            .validate_with_images(&info, &self.inner.limits, EditInputs { init, mask })
            .map_err(JobError::invalid)?;
        let resolved = JobRequest {
            style: Some(
                request
                    .style
                    .clone()
                    .unwrap_or_else(|| crate::styles::DEFAULT_STYLE.into()),
            ),
            resolution: Some(format!("{}x{}", validated.width, validated.height)),
            steps: Some(validated.steps),
            guidance: Some(validated.guidance),
            seed: Some(validated.seed),
            scheduler: Some(validated.scheduler.name().to_string()),
            num_images: Some(validated.num_images),
            strength: validated.init.as_ref().map(|i| i.strength),
            init_image: None,
            mask_image: None,
            ..request
        };
        let ticket = self
            .inner
            .engine
            .submit_gated(validated)
            .map_err(|e| match e {
                SubmitError::Full { .. } => JobError::QueueFull {
                    retry_after: self.inner.engine.retry_after_seconds(),
                    message: format!("{e}; retry later"),
                },
                SubmitError::ShuttingDown => JobError::NotReady(e.to_string()),
            })?;
        for (_, key, png) in &inputs {
            if let Err(e) = self.inner.storage.put(key, png.clone()).await {
                ticket.cancel();
                tracing::warn!("storing a job's input image failed: {e}");
                return Err(JobError::storage_unavailable());
            }
        }
        let input_key = |field: &str| {
            inputs
                .iter()
                .find(|(f, _, _)| *f == field)
                .map(|(_, key, _)| key.clone())
        };
        let record = JobRecord {
            image_id,
            status: JobState::Queued,
            created_at: Utc::now(),
            started_at: None,
            generated_at: None,
            request: resolved,
            images: vec![],
            seeds: vec![],
            error: None,
            timings: None,
            attempts: 0,
            heartbeat_at: None,
            init_image: input_key("init_image"),
            mask_image: input_key("mask_image"),
        };
        if let Err(e) = self.write(&record).await {
            // Not stored, so not accepted: nothing may run that nobody can find.
            ticket.cancel();
            tracing::warn!("storing a new job failed: {e}");
            return Err(JobError::storage_unavailable());
        }
        Ok(self.watch(record, ticket, false))
    }

    /// An edit's input picture (`field`): decoded from the request, or read
    /// from an earlier job's stored result. Errors name `field`.
    async fn fetch_image(
        &self,
        src: Option<&ImageSource>,
        field: &str,
    ) -> Result<Option<SourceImage>, JobError> {
        let max = self.inner.limits.max_pixels;
        let bad = |msg: String| JobError::invalid(Error::invalid(field, msg));
        let (image_id, index) = match src {
            None => return Ok(None),
            Some(ImageSource::Encoded(text)) => {
                return SourceImage::from_base64(text, field, max)
                    .map(Some)
                    .map_err(JobError::invalid);
            }
            Some(ImageSource::Result { image_id, index }) => (image_id, *index),
        };
        let record = if valid_id(image_id) {
            self.stored_record(image_id).await
        } else {
            None
        };
        let Some(record) = record else {
            return Err(bad(format!("no image with id {image_id:?}")));
        };
        let Some(key) = record.images.get(index) else {
            return Err(bad(format!(
                "image {image_id} has {} result(s); index {index} is not one",
                record.images.len()
            )));
        };
        let bytes = self.inner.storage.get(key).await.map_err(|e| {
            tracing::warn!(image_id, "reading an edit's input image failed: {e}");
            JobError::storage_unavailable()
        })?;
        let bytes = bytes.ok_or_else(|| bad(format!("image {image_id} {index} is gone")))?;
        SourceImage::decode(&bytes, field, max)
            .map(Some)
            .map_err(JobError::invalid)
    }

    /// Registers a queued job and spawns the task that follows it through the
    /// engine, writing its record and images.
    /// `recovered`: re-queued from storage at start-up, so another server
    /// sharing the storage may have run it meanwhile (see [`Jobs::follow`]).
    fn watch(&self, record: JobRecord, ticket: Ticket, recovered: bool) -> JobView {
        let ticket = Arc::new(ticket);
        let mut view = JobView::new(record);
        view.engine_id = Some(ticket.id);
        // Known now, not only once the follow task first runs: a watcher arriving
        // before that (a busy runtime) must not see a queued job without a place.
        if let JobStatus::Queued { position } = *ticket.status.borrow() {
            view.queue_position = Some(position);
        }
        let entry = self.insert(view.clone());
        *lock(&entry.ticket) = Some(ticket.clone());
        let this = self.clone();
        self.inner
            .tracker
            .spawn(async move { this.follow(entry, ticket, recovered).await });
        view
    }

    /// The live view of job `id`: this server's, else the stored record
    /// (a job another replica or an earlier run accepted).
    pub async fn get(&self, id: &str) -> Result<Option<watch::Receiver<JobView>>, JobError> {
        if !valid_id(id) {
            return Ok(None);
        }
        if let Some(entry) = lock(&self.inner.entries).get(id) {
            return Ok(Some(entry.view.subscribe()));
        }
        let Some(bytes) = self
            .inner
            .storage
            .get(&JobRecord::key(id))
            .await
            .map_err(|e| {
                tracing::warn!(image_id = id, "reading a job record failed: {e}");
                JobError::storage_unavailable()
            })?
        else {
            return Ok(None);
        };
        let record: JobRecord = serde_json::from_slice(&bytes).map_err(|e| {
            tracing::error!(image_id = id, "a stored job record is unreadable: {e}");
            JobError::Internal(format!("the stored record of job {id} is unreadable"))
        })?;
        Ok(Some(watch::channel(JobView::new(record)).1))
    }

    /// Cancels job `id` if it is queued or running here. `Ok(None)`: no such job.
    pub async fn cancel(&self, id: &str) -> Result<Option<JobView>, JobError> {
        let Some(mut rx) = self.get(id).await? else {
            return Ok(None);
        };
        let view = rx.borrow().clone();
        if view.record.status.is_final() {
            return Err(JobError::Conflict(format!(
                "job {id} already finished ({})",
                serde_json::to_value(view.record.status).unwrap_or_default()
            )));
        }
        let ticket = lock(&self.inner.entries)
            .get(id)
            .and_then(|e| lock(&e.ticket).clone());
        let Some(ticket) = ticket else {
            return Err(JobError::Conflict(format!(
                "job {id} is not running on this server; cancel it where it runs"
            )));
        };
        ticket.cancel();
        // A queued job is cancelled at once; a running one after its current step.
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            rx.wait_for(|v| v.record.status.is_final()),
        )
        .await;
        let view = rx.borrow().clone();
        Ok(Some(view))
    }

    /// The most recent completed jobs, newest first.
    pub fn recent(&self, limit: usize) -> Vec<JobView> {
        let mut done: Vec<JobView> = lock(&self.inner.entries)
            .values()
            .map(|e| e.view.borrow().clone())
            .filter(|v| v.record.status == JobState::Completed)
            .collect();
        done.sort_by_key(|v| std::cmp::Reverse(v.record.generated_at));
        done.truncate(limit);
        done
    }

    /// The API body for a view: image URLs (presigned for S3) and time estimate.
    pub async fn status_body(&self, view: &JobView) -> Result<StatusBody, JobError> {
        let r = &view.record;
        let mut urls = Vec::with_capacity(r.images.len());
        for (i, key) in r.images.iter().enumerate() {
            urls.push(self.file_url(key, &r.image_id, &format!("{i}.png")).await?);
        }
        let mut input_urls = [None, None];
        for (url, key) in input_urls.iter_mut().zip([&r.init_image, &r.mask_image]) {
            if let Some(key) = key {
                let name = key.rsplit('/').next().unwrap_or("init.png");
                *url = Some(self.file_url(key, &r.image_id, name).await?);
            }
        }
        let [init_image_url, mask_image_url] = input_urls;
        Ok(StatusBody {
            image_id: r.image_id.clone(),
            status: r.status,
            image_url: urls.first().cloned(),
            image_urls: urls,
            init_image_url,
            mask_image_url,
            created_at: r.created_at,
            started_at: r.started_at,
            generated_at: r.generated_at,
            progress: view.progress(),
            step: view.step,
            total_steps: view.total_steps,
            queue_position: view.queue_position,
            estimated_time: Some(self.estimate(view)),
            error: r.error.clone(),
            request: r.request.clone(),
            seeds: r.seeds.clone(),
            timings: r.timings,
        })
    }

    /// Where a client gets stored file `key` of job `id`: a presigned URL on
    /// S3, else this server's `/files/{id}/{name}`.
    async fn file_url(&self, key: &str, id: &str, name: &str) -> Result<String, JobError> {
        let signed = self
            .inner
            .storage
            .signed_url(key, self.inner.config.presign_expiry)
            .await
            .map_err(|e| {
                tracing::warn!("signing an image URL failed: {e}");
                JobError::storage_unavailable()
            })?;
        Ok(signed.unwrap_or_else(|| format!("{}/files/{id}/{name}", self.inner.config.public_url)))
    }

    /// The stored input `field` (`init_image`, `mask_image`) of edit job `id`.
    pub async fn input(&self, id: &str, field: &str) -> Result<Option<Vec<u8>>, JobError> {
        if !valid_id(id) {
            return Ok(None);
        }
        self.inner
            .storage
            .get(&JobRecord::input_key(id, field))
            .await
            .map_err(|e| {
                tracing::warn!(image_id = id, "reading an input failed: {e}");
                JobError::storage_unavailable()
            })
    }

    /// The stored bytes of image `index` of job `id`.
    pub async fn image(&self, id: &str, index: usize) -> Result<Option<Vec<u8>>, JobError> {
        if !valid_id(id) {
            return Ok(None);
        }
        self.inner
            .storage
            .get(&JobRecord::image_key(id, index))
            .await
            .map_err(|e| {
                tracing::warn!(image_id = id, "reading an image failed: {e}");
                JobError::storage_unavailable()
            })
    }

    /// Seconds until the job is likely done, rounded to 0.1 s: 0 once final or
    /// out of the engine (finished there, being stored); a queued job another
    /// server holds gets its own run time at the measured rates.
    fn estimate(&self, view: &JobView) -> f64 {
        if view.record.status.is_final() {
            return 0.0;
        }
        let engine = &self.inner.engine;
        let seconds = match view.engine_id {
            Some(id) => engine.estimate_seconds(id).unwrap_or(0.0),
            None => view
                .record
                .request
                .to_params()
                .ok()
                .and_then(|p| Some((p.width?, p.height?, p)))
                .map_or(0.0, |(w, h, p)| {
                    let info = engine.ready_info().ok();
                    let defaults = info.as_ref().map_or(SamplingDefaults::SD, |m| m.defaults);
                    let guidance = p.guidance.unwrap_or(defaults.guidance);
                    let shape = crate::engine::JobShape {
                        steps: p.steps.unwrap_or(defaults.steps),
                        num_images: p.num_images.unwrap_or(1),
                        megapixels: (w as f64) * (h as f64) / 1e6,
                        guided: info.map_or(guidance > 1.0, |m| m.runs_cfg(guidance)),
                    };
                    let cost = engine
                        .cost_model()
                        .unwrap_or(crate::engine::CostModel::PRIOR);
                    cost.remaining(&shape, view.step)
                }),
        };
        (seconds * 10.0).round() / 10.0
    }

    /// Stops taking jobs, lets the running one finish for up to `grace`, and
    /// waits until every record write is done. Unfinished jobs stay stored as
    /// queued or processing and run after the next start.
    pub async fn shutdown(&self, grace: Duration) {
        self.inner.shutting_down.store(true, Ordering::SeqCst);
        self.inner.closing.cancel();
        self.inner.engine.shutdown(grace).await;
        self.inner.tracker.close();
        self.inner.tracker.wait().await;
    }
}
