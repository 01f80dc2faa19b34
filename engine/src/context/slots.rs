//! Sequence slots: a fair queue of free slots, and the lease that frees one (and clears its KV).

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

use super::Command;

/// The sequence slots of a context: a fair semaphore counts free slots, a bitmap says which.
pub(super) struct SlotPool {
    free: Arc<Semaphore>,
    busy: std::sync::Mutex<Vec<bool>>,
}

impl SlotPool {
    /// `n` slots, all free.
    pub(super) fn new(n: usize) -> SlotPool {
        SlotPool {
            free: Arc::new(Semaphore::new(n)),
            busy: std::sync::Mutex::new(vec![false; n]),
        }
    }

    /// Waits for a free slot; waiters are served first come, first served. The lease's drop sends
    /// its `Clear` over `tx`.
    pub(super) async fn acquire(
        self: &Arc<Self>,
        tx: &mpsc::UnboundedSender<Command>,
    ) -> SlotLease {
        // The semaphore is never closed, so acquiring only waits.
        let permit = Arc::clone(&self.free).acquire_owned().await.ok();
        self.lease(permit, tx)
    }

    /// Takes a free slot now, or `None` when all are in use.
    pub(super) fn try_acquire(
        self: &Arc<Self>,
        tx: &mpsc::UnboundedSender<Command>,
    ) -> Option<SlotLease> {
        let permit = Arc::clone(&self.free).try_acquire_owned().ok()?;
        Some(self.lease(Some(permit), tx))
    }

    fn lease(
        self: &Arc<Self>,
        permit: Option<OwnedSemaphorePermit>,
        tx: &mpsc::UnboundedSender<Command>,
    ) -> SlotLease {
        let mut busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        // A permit guarantees a free entry; the fallback only keeps this total.
        let slot = busy.iter().position(|b| !b).unwrap_or(0);
        busy[slot] = true;
        SlotLease {
            seq: slot as i32,
            pool: Arc::clone(self),
            tx: tx.clone(),
            _permit: permit,
        }
    }

    /// Slots not leased right now.
    pub(super) fn available(&self) -> usize {
        self.free.available_permits()
    }
}

/// One sequence slot of a context, held by one request; freed (and its KV cleared) on drop.
pub struct SlotLease {
    seq: i32,
    pool: Arc<SlotPool>,
    tx: mpsc::UnboundedSender<Command>,
    _permit: Option<OwnedSemaphorePermit>,
}

impl std::fmt::Debug for SlotLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SlotLease").field("seq", &self.seq).finish()
    }
}

impl SlotLease {
    /// The llama.cpp sequence id of the slot.
    pub fn seq(&self) -> i32 {
        self.seq
    }
}

impl Drop for SlotLease {
    fn drop(&mut self) {
        // Queued behind whatever the slot's request still has in flight, so it runs after that.
        let (reply, _) = oneshot::channel();
        let _ = self.tx.send(Command::Clear {
            seq: self.seq,
            reply,
        });
        let mut busy = self.pool.busy.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = busy.get_mut(self.seq as usize) {
            *b = false;
        }
        // The permit is released after this, once the slot is marked free.
    }
}
