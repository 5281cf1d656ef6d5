//! Following one job through the engine: its record stored at every state
//! change, heartbeats while it runs, and its images and final record stored
//! with retries until storage takes them.

use super::*;

impl Jobs {
    /// Runs `op` until it succeeds, waiting 1, 2, 4 ... 30 s between tries;
    /// gives up with the last error once the server is shutting down.
    pub(super) async fn retrying<T, F, Fut>(&self, what: &str, mut op: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let mut wait = Duration::from_secs(1);
        loop {
            match op().await {
                Ok(v) => return Ok(v),
                Err(e) => {
                    tracing::warn!("{what} failed, retrying in {wait:?}: {e}");
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = self.inner.closing.cancelled() => return Err(e),
                    }
                    wait = (wait * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Follows the job through the engine, persisting each state change. Every
    /// server re-queues every unfinished stored job at start (so none is lost
    /// when its server died), so one job may run on two servers: a recovered
    /// job's stored record is read again as it starts, every job's before each
    /// heartbeat and as it ends, and one another server already finished is
    /// dropped (its run here cancelled) instead of overwritten.
    pub(super) async fn follow(&self, entry: Arc<Entry>, ticket: Arc<Ticket>, recovered: bool) {
        let mut status = ticket.status.clone();
        let id = entry.view.borrow().record.image_id.clone();
        let mut heartbeat =
            tokio::time::interval_at(tokio::time::Instant::now() + HEARTBEAT, HEARTBEAT);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let current = status.borrow_and_update().clone();
            match current {
                JobStatus::Queued { position } => {
                    entry
                        .view
                        .send_modify(|v| v.queue_position = Some(position));
                }
                JobStatus::Running { step, total } => {
                    let started = entry.view.borrow().record.status == JobState::Queued;
                    if started
                        && recovered
                        && let Some(done) = self.finished_elsewhere(&id).await
                    {
                        ticket.cancel();
                        ticket.open_gate();
                        entry.view.send_modify(|v| {
                            v.record = done;
                            v.engine_id = None;
                        });
                        tracing::info!(
                            image_id = id,
                            "already finished by another server; dropped"
                        );
                        break;
                    }
                    if started {
                        // Stored before the engine starts (it waits at the
                        // gate), so a run that kills the process is counted.
                        let mut record = entry.view.borrow().record.clone();
                        record.status = JobState::Processing;
                        record.started_at = Some(Utc::now());
                        record.heartbeat_at = record.started_at;
                        record.attempts += 1;
                        self.persist(&record).await;
                        entry.view.send_modify(|v| v.record = record);
                        ticket.open_gate();
                    }
                    entry.view.send_modify(|v| {
                        v.queue_position = None;
                        v.step = step;
                        v.total_steps = total;
                    });
                }
                JobStatus::Interrupted => {
                    // Stored as queued: the next start re-runs it, and a run
                    // stopped on purpose is not one that killed its server.
                    let mut record = entry.view.borrow().record.clone();
                    if record.status == JobState::Processing {
                        record.status = JobState::Queued;
                        record.attempts = record.attempts.saturating_sub(1);
                        self.persist(&record).await;
                    }
                    tracing::info!(
                        image_id = id,
                        "job interrupted by shutdown; it will run after a restart"
                    );
                    break;
                }
                final_status => {
                    // A result in hand beats another server's verdict that the
                    // job failed (a suspect watch that missed this server's
                    // heartbeats); only another server's images beat it.
                    // Checked for every job, not only recovered ones: another
                    // server may have recovered this one while it ran here.
                    let completed_here = matches!(final_status, JobStatus::Done(_));
                    let record = self
                        .finished_elsewhere(&id)
                        .await
                        .filter(|done| !completed_here || done.status == JobState::Completed);
                    let record = match record {
                        Some(done) => {
                            tracing::info!(
                                image_id = id,
                                "already finished by another server; this run's result discarded"
                            );
                            done
                        }
                        None => {
                            let record = entry.view.borrow().record.clone();
                            match self.finish(record, final_status).await {
                                Some(record) => record,
                                // Shutting down before storage came back: the
                                // stored record (queued or processing) makes the
                                // next start run it again.
                                None => break,
                            }
                        }
                    };
                    entry.view.send_modify(|v| {
                        v.record = record;
                        v.queue_position = None;
                        v.engine_id = None;
                        if v.record.status == JobState::Completed {
                            v.step = v.total_steps;
                        }
                    });
                    break;
                }
            }
            // Wait for the next change; while the job runs, rewrite its record
            // now and then so a server starting meanwhile sees it is alive.
            // (One interval for the whole run: steps change the status more
            // often than the heartbeat period.)
            let alive = loop {
                let running = entry.view.borrow().record.status == JobState::Processing;
                tokio::select! {
                    r = status.changed() => break r.is_ok(),
                    _ = heartbeat.tick(), if running => self.beat(&entry, &ticket).await,
                }
            };
            if !alive {
                // The engine dropped the job without a final word (it stopped):
                // leave the record as stored for the next start.
                break;
            }
        }
        *lock(&entry.ticket) = None;
    }

    /// Stores that the running job is alive (see [`HEARTBEAT`]), unless
    /// another server has finished it meanwhile: a heartbeat must not turn its
    /// stored result back into `processing`. This run is then cancelled, and
    /// its end keeps the other server's result.
    pub(super) async fn beat(&self, entry: &Entry, ticket: &Ticket) {
        let id = entry.view.borrow().record.image_id.clone();
        if self.finished_elsewhere(&id).await.is_some() {
            tracing::info!(
                image_id = id,
                "finished by another server while running here; stopping this run"
            );
            ticket.cancel();
            return;
        }
        let mut record = entry.view.borrow().record.clone();
        record.heartbeat_at = Some(Utc::now());
        self.persist(&record).await;
        entry
            .view
            .send_modify(|v| v.record.heartbeat_at = record.heartbeat_at);
    }

    /// The stored record of job `id` as storage has it now; `None` when it
    /// can't be read (missing, unreadable, storage down): best effort.
    pub(super) async fn stored_record(&self, id: &str) -> Option<JobRecord> {
        let bytes = self.inner.storage.get(&JobRecord::key(id)).await.ok()??;
        serde_json::from_slice(&bytes).ok()
    }

    /// The stored record of job `id` if it is final (another server finished it).
    pub(super) async fn finished_elsewhere(&self, id: &str) -> Option<JobRecord> {
        self.stored_record(id)
            .await
            .filter(|stored| stored.status.is_final())
    }

    /// Stores the outcome (images first, then the record) and returns the
    /// record. Storage that fails is tried again with backoff: the API keeps
    /// showing the job as processing, as its stored record says, until both
    /// are stored. `None`: the server is shutting down before they could be.
    pub(super) async fn finish(
        &self,
        mut record: JobRecord,
        status: JobStatus,
    ) -> Option<JobRecord> {
        match status {
            JobStatus::Done(out) => {
                let pngs = match self.encode_images(&out).await {
                    Ok(pngs) => pngs,
                    Err(e) => {
                        tracing::error!(
                            image_id = record.image_id,
                            "encoding the images failed: {e}"
                        );
                        record.status = JobState::Failed;
                        record.error = Some("encoding the images failed".into());
                        return self.write_final(record).await;
                    }
                };
                let mut keys = Vec::with_capacity(pngs.len());
                for (i, png) in pngs.into_iter().enumerate() {
                    let key = JobRecord::image_key(&record.image_id, i);
                    let storage = &self.inner.storage;
                    self.retrying("storing an image", || storage.put(&key, png.clone()))
                        .await
                        .ok()?;
                    keys.push(key);
                }
                record.status = JobState::Completed;
                record.generated_at = Some(Utc::now());
                record.images = keys;
                record.seeds = out.seeds.clone();
                record.timings = Some(JobTimings {
                    queue: out.queue_seconds,
                    text_encoder: out.timings.text_encoder,
                    denoise: out.timings.denoise,
                    vae_decode: out.timings.vae_decode,
                });
            }
            JobStatus::Failed(e) => {
                record.status = JobState::Failed;
                record.error = Some(e);
            }
            _ => record.status = JobState::Cancelled,
        }
        self.write_final(record).await
    }

    /// Writes a final record, retrying until it is stored.
    pub(super) async fn write_final(&self, record: JobRecord) -> Option<JobRecord> {
        self.retrying("writing a job record", || self.write(&record))
            .await
            .ok()?;
        Some(record)
    }

    /// Writes a record whose state is not final (a later write follows):
    /// failures are logged, not retried.
    pub(super) async fn persist(&self, record: &JobRecord) {
        if let Err(e) = self.write(record).await {
            tracing::error!(
                image_id = record.image_id,
                "writing the job record failed: {e}"
            );
        }
    }

    /// The job's images as PNGs carrying their parameters (the metadata the
    /// engine made with them).
    pub(super) async fn encode_images(
        &self,
        out: &crate::engine::JobOutput,
    ) -> Result<Vec<Vec<u8>>> {
        let images = out.images.clone();
        let metadata = out.metadata.clone();
        tokio::task::spawn_blocking(move || -> Result<Vec<Vec<u8>>> {
            let rgb = to_rgb8(&images)?;
            rgb.iter()
                .zip(&metadata)
                .map(|(img, meta)| encode_png(img, Some(meta)))
                .collect()
        })
        .await
        .map_err(|e| Error::Candle(candle_core::Error::Msg(format!("PNG encoding task: {e}"))))?
    }
}
