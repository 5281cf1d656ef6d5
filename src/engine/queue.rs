//! The engine's bounded job queue: many submitters, one worker.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Condvar, Mutex};

use std::sync::Arc;

use super::cost::JobShape;
use super::{Job, JobStatus};
use crate::metrics::Metrics;

/// Why a job was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("the queue is full ({capacity} jobs waiting)")]
    Full { capacity: usize },
    #[error("the server is shutting down")]
    ShuttingDown,
}

struct Inner {
    jobs: VecDeque<Job>,
    closed: bool,
}

pub(crate) struct JobQueue {
    inner: Mutex<Inner>,
    available: Condvar,
    capacity: usize,
    metrics: Arc<Metrics>,
}

impl JobQueue {
    pub fn new(capacity: usize, metrics: Arc<Metrics>) -> Self {
        Self {
            inner: Mutex::new(Inner {
                jobs: VecDeque::new(),
                closed: false,
            }),
            available: Condvar::new(),
            capacity: capacity.max(1),
            metrics,
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn len(&self) -> usize {
        self.lock().jobs.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the deque inconsistent.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `job` at the back; `bounded` jobs are refused when the queue is
    /// full (jobs recovered from storage were accepted earlier and are not).
    pub fn push(&self, job: Job, bounded: bool) -> Result<(), SubmitError> {
        let mut inner = self.lock();
        if inner.closed {
            return Err(SubmitError::ShuttingDown);
        }
        // Jobs cancelled while waiting do not hold a slot.
        prune_cancelled(&mut inner.jobs, &self.metrics);
        if bounded && inner.jobs.len() >= self.capacity {
            return Err(SubmitError::Full {
                capacity: self.capacity,
            });
        }
        let _ = job.status.send(JobStatus::Queued {
            position: inner.jobs.len(),
        });
        inner.jobs.push_back(job);
        drop(inner);
        self.available.notify_one();
        Ok(())
    }

    /// Blocks until a job is available and takes it (jobs behind it are told
    /// their new position); `None` once the queue is closed.
    pub fn pop_blocking(&self) -> Option<Job> {
        let mut inner = self.lock();
        loop {
            if inner.closed {
                return None;
            }
            prune_cancelled(&mut inner.jobs, &self.metrics);
            if let Some(job) = inner.jobs.pop_front() {
                renumber(&inner.jobs);
                return Some(job);
            }
            inner = self
                .available
                .wait(inner)
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Takes queued jobs that can share a UNet batch with `first`, in queue
    /// order, while the batch stays within `max_images` images in all.
    pub fn take_compatible(&self, first: &Job, max_images: usize) -> Vec<Job> {
        let mut inner = self.lock();
        prune_cancelled(&mut inner.jobs, &self.metrics);
        let mut images = first.request.num_images;
        let mut taken = Vec::new();
        let mut i = 0;
        while i < inner.jobs.len() && images < max_images {
            let j = &inner.jobs[i];
            if first.request.batches_with(&j.request) && images + j.request.num_images <= max_images
            {
                images += j.request.num_images;
                taken.extend(inner.jobs.remove(i));
            } else {
                i += 1;
            }
        }
        if !taken.is_empty() {
            renumber(&inner.jobs);
        }
        taken
    }

    /// Refuses new jobs, wakes the worker, and tells every waiting job it was
    /// interrupted (its caller keeps it for the next start).
    pub fn close(&self) {
        let mut inner = self.lock();
        inner.closed = true;
        for job in inner.jobs.drain(..) {
            let _ = job.status.send(JobStatus::Interrupted);
        }
        drop(inner);
        self.available.notify_all();
    }

    /// Drops cancelled jobs now (instead of at the next push or pop), so their
    /// callers hear at once.
    pub fn prune(&self) {
        prune_cancelled(&mut self.lock().jobs, &self.metrics);
    }

    /// The shapes of the jobs ahead of job `id` and its own, if it is queued.
    pub fn ahead_of(&self, id: u64) -> Option<(Vec<JobShape>, JobShape)> {
        let inner = self.lock();
        let pos = inner.jobs.iter().position(|j| j.id == id)?;
        let ahead = inner
            .jobs
            .iter()
            .take(pos)
            .filter(|j| !j.cancel.load(Ordering::SeqCst))
            .map(|j| j.shape)
            .collect();
        Some((ahead, inner.jobs[pos].shape))
    }
}

fn renumber(jobs: &VecDeque<Job>) {
    for (i, j) in jobs.iter().enumerate() {
        let _ = j.status.send(JobStatus::Queued { position: i });
    }
}

/// Drops cancelled jobs (telling their callers) and renumbers the rest.
fn prune_cancelled(jobs: &mut VecDeque<Job>, metrics: &Metrics) {
    if !jobs.iter().any(|j| j.cancel.load(Ordering::SeqCst)) {
        return;
    }
    jobs.retain(|j| {
        let cancelled = j.cancel.load(Ordering::SeqCst);
        if cancelled {
            tracing::info!(job = j.id, "job cancelled while queued");
            let _ = j.status.send(JobStatus::Cancelled);
            metrics.job_finished("cancelled");
        }
        !cancelled
    });
    renumber(jobs);
}
