//! [`TriggerQueue`]: at most one pending trigger, so triggers coalesce.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, mpsc};

use super::Trigger;

/// At most one pending trigger; later pushes merge into it.
///
/// The deployment loop calls [`TriggerQueue::next`], deploys, and calls it again. Everything
/// pushed while it deploys collapses into the one pending trigger, so a burst of any size
/// costs at most one extra deployment. Cloning shares the queue.
#[derive(Debug, Clone, Default)]
pub struct TriggerQueue {
    inner: Arc<QueueInner>,
}

#[derive(Debug, Default)]
struct QueueInner {
    pending: Mutex<Option<Trigger>>,
    wake: Notify,
    pushed: AtomicU64,
}

impl TriggerQueue {
    /// An empty queue.
    pub fn new() -> Self {
        Self::default()
    }

    /// Queues `trigger`, merging it into the pending one if there is one.
    pub fn push(&self, trigger: Trigger) {
        {
            let mut pending = self.lock();
            match pending.as_mut() {
                Some(existing) => existing.merge(trigger),
                None => *pending = Some(trigger),
            }
        }
        self.inner.pushed.fetch_add(1, Ordering::Relaxed);
        self.inner.wake.notify_one();
    }

    /// Waits for and takes the pending trigger.
    pub async fn next(&self) -> Trigger {
        loop {
            let woken = self.inner.wake.notified();
            if let Some(trigger) = self.try_next() {
                return trigger;
            }
            woken.await;
        }
    }

    /// Takes the pending trigger, if any, without waiting.
    pub fn try_next(&self) -> Option<Trigger> {
        self.lock().take()
    }

    /// Whether a trigger is pending.
    pub fn is_pending(&self) -> bool {
        self.lock().is_some()
    }

    /// How many triggers were pushed since the queue was made (merged ones included).
    pub fn pushed(&self) -> u64 {
        self.inner.pushed.load(Ordering::Relaxed)
    }

    /// Pushes everything received on `rx` until its senders are gone.
    pub async fn forward(self, mut rx: mpsc::Receiver<Trigger>) {
        while let Some(trigger) = rx.recv().await {
            self.push(trigger);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Trigger>> {
        // The lock is never held across a panic point that leaves the slot inconsistent.
        self.inner.pending.lock().unwrap_or_else(|p| p.into_inner())
    }
}
