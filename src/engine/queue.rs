//! The engine's bounded job queue: many submitters, one worker.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Condvar, Mutex};

use super::{Job, JobStatus};

/// The queue was full; nothing was queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the queue is full ({capacity} jobs waiting)")]
pub struct QueueFull {
    pub capacity: usize,
}

pub(crate) struct JobQueue {
    jobs: Mutex<VecDeque<Job>>,
    available: Condvar,
    capacity: usize,
}

impl JobQueue {
    pub fn new(capacity: usize) -> Self {
        Self {
            jobs: Mutex::new(VecDeque::new()),
            available: Condvar::new(),
            capacity: capacity.max(1),
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Job>> {
        // A panic while holding the lock cannot leave the deque inconsistent.
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn push(&self, job: Job) -> Result<(), QueueFull> {
        let mut jobs = self.lock();
        // Jobs cancelled while waiting do not hold a slot.
        prune_cancelled(&mut jobs);
        if jobs.len() >= self.capacity {
            return Err(QueueFull {
                capacity: self.capacity,
            });
        }
        let _ = job.status.send(JobStatus::Queued {
            position: jobs.len(),
        });
        jobs.push_back(job);
        drop(jobs);
        self.available.notify_one();
        Ok(())
    }

    /// Blocks until a job is available and takes it; jobs behind it are told
    /// their new position.
    pub fn pop_blocking(&self) -> Job {
        let mut jobs = self.lock();
        loop {
            prune_cancelled(&mut jobs);
            if let Some(job) = jobs.pop_front() {
                for (i, j) in jobs.iter().enumerate() {
                    let _ = j.status.send(JobStatus::Queued { position: i });
                }
                return job;
            }
            jobs = self.available.wait(jobs).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// Drops cancelled jobs (telling their callers) and renumbers the rest.
fn prune_cancelled(jobs: &mut VecDeque<Job>) {
    if !jobs.iter().any(|j| j.cancel.load(Ordering::SeqCst)) {
        return;
    }
    jobs.retain(|j| {
        let cancelled = j.cancel.load(Ordering::SeqCst);
        if cancelled {
            tracing::info!(job = j.id, "job cancelled while queued");
            let _ = j.status.send(JobStatus::Cancelled);
        }
        !cancelled
    });
    for (i, j) in jobs.iter().enumerate() {
        let _ = j.status.send(JobStatus::Queued { position: i });
    }
}
