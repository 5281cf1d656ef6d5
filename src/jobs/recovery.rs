//! Startup recovery: every unfinished stored job is queued again, except
//! those that no longer validate or that were running each time a server
//! died (poison jobs), which are failed with the reason.

use super::*;

impl Jobs {
    /// Loads every stored record, then (once the model is ready) re-queues the
    /// ones that had not finished, oldest first. Returns how many were re-queued.
    /// Storage that can't be reached is tried again (with backoff) until it
    /// answers or the server shuts down. A stored job that no longer validates,
    /// or was running when its server stopped [`MAX_ATTEMPTS`] times, is
    /// marked failed with the reason instead of run.
    pub async fn recover(&self) -> Result<usize> {
        let mut unfinished = Vec::new();
        let storage = &self.inner.storage;
        let keys = self
            .retrying("listing the stored jobs", || storage.list("jobs"))
            .await?;
        for key in keys {
            let Some(bytes) = self
                .retrying("reading a stored job", || storage.get(&key))
                .await?
            else {
                continue;
            };
            let record: JobRecord = match serde_json::from_slice(&bytes) {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(key, "skipping an unreadable job record: {e}");
                    continue;
                }
            };
            if !record.status.is_final() {
                unfinished.push(record.clone());
            }
            self.insert(JobView::new(record));
        }
        unfinished.sort_by_key(|r| r.created_at);
        if unfinished.is_empty() {
            return Ok(0);
        }
        let mut count = 0;
        let info = match self.inner.engine.ready().await {
            EngineState::Ready(info) => info,
            _ => return Ok(0),
        };
        let (suspects, others): (Vec<_>, Vec<_>) = unfinished
            .into_iter()
            .partition(|r| r.status == JobState::Processing && r.attempts >= MAX_ATTEMPTS);
        for record in others {
            count += usize::from(self.requeue(&info, record).await);
        }
        if suspects.is_empty() {
            return Ok(count);
        }
        // Running on a live server, or killed every server that ran it? A live
        // one rewrites the record meanwhile.
        tokio::select! {
            _ = tokio::time::sleep(SUSPECT_WATCH) => {}
            _ = self.inner.closing.cancelled() => return Ok(count),
        }
        for mut record in suspects {
            let id = record.image_id.clone();
            if let Some(now) = self.stored_record(&id).await {
                if now.status.is_final() {
                    self.insert(JobView::new(now));
                    continue;
                }
                if now.heartbeat_at != record.heartbeat_at || now.attempts != record.attempts {
                    tracing::info!(
                        image_id = id,
                        "a job that looked stuck is running on another server"
                    );
                    count += usize::from(self.requeue(&info, now).await);
                    continue;
                }
            }
            tracing::error!(
                image_id = id,
                attempts = record.attempts,
                "a job was running each time its server stopped; failing it instead of running it again"
            );
            record.status = JobState::Failed;
            record.error = Some(format!(
                "the server stopped {} times while running this job, so it is not run again",
                record.attempts
            ));
            self.persist(&record).await;
            self.insert(JobView::new(record));
        }
        Ok(count)
    }

    /// Validates a recovered job and queues it again (true), or stores it as
    /// failed with the reason when it can't run.
    pub(super) async fn requeue(
        &self,
        info: &crate::diffusion::pipelines::ModelInfo,
        mut record: JobRecord,
    ) -> bool {
        let id = record.image_id.clone();
        let validated = match self.stored_inputs(&record).await {
            Ok(images) => record
                .request
                .validate_with_images(info, &self.inner.limits, images),
            Err(e) => Err(e),
        };
        let result = match validated {
            Ok(req) => self.inner.engine.resubmit(req).map_err(|e| e.to_string()),
            // Named as the job API names it, as a submit's 400 would.
            Err(e) => Err(format!(
                "cannot run after restart: {}",
                JobError::invalid(e)
            )),
        };
        match result {
            Ok(ticket) => {
                tracing::info!(image_id = id, "re-queued an unfinished job");
                record.status = JobState::Queued;
                self.watch(record, ticket, true);
                true
            }
            Err(e) => {
                tracing::warn!(image_id = id, "a stored job cannot run: {e}");
                record.status = JobState::Failed;
                record.error = Some(e);
                self.persist(&record).await;
                self.insert(JobView::new(record));
                false
            }
        }
    }

    /// A recovered edit's input picture and mask, from storage (none for text
    /// to image).
    async fn stored_inputs(&self, record: &JobRecord) -> Result<EditInputs> {
        Ok(EditInputs {
            init: self.stored_input(&record.init_image, "init_image").await?,
            mask: self.stored_input(&record.mask_image, "mask_image").await?,
        })
    }

    async fn stored_input(&self, key: &Option<String>, field: &str) -> Result<Option<SourceImage>> {
        let Some(key) = key else {
            return Ok(None);
        };
        let bytes = self
            .inner
            .storage
            .get(key)
            .await?
            .ok_or_else(|| Error::invalid(field, format!("the stored input {key} is gone")))?;
        SourceImage::decode(&bytes, field, usize::MAX).map(Some)
    }
}
