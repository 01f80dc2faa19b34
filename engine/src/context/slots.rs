//! Sequence slots: a fair queue of free slots, and the lease that frees one. A freed slot keeps
//! its cache for the next prompt that starts the same way (prefix reuse, `prefill`), so a lease
//! taken for a prompt goes to the free slot whose last prompt shares the longest start with it.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use super::Command;

/// One slot as the pool sees it.
#[derive(Debug, Clone, Default)]
struct SlotState {
    busy: bool,
    /// The prompt the slot was last leased for: what its cache may still start with.
    prompt: Vec<i32>,
}

/// The sequence slots of a context: a fair semaphore counts free slots, a table says which.
pub(super) struct SlotPool {
    free: Arc<Semaphore>,
    slots: std::sync::Mutex<Vec<SlotState>>,
}

/// How many leading tokens `a` and `b` share.
pub(super) fn common_prefix(a: &[i32], b: &[i32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl SlotPool {
    /// `n` slots, all free.
    pub(super) fn new(n: usize) -> SlotPool {
        SlotPool {
            free: Arc::new(Semaphore::new(n)),
            slots: std::sync::Mutex::new(vec![SlotState::default(); n]),
        }
    }

    /// Waits for a free slot for `prompt` (empty: a slot whose cache will be replaced whole);
    /// waiters are served first come, first served. The lease's drop sends its `Release` over `tx`.
    pub(super) async fn acquire(
        self: &Arc<Self>,
        tx: &mpsc::UnboundedSender<Command>,
        prompt: &[i32],
    ) -> SlotLease {
        // The semaphore is never closed, so acquiring only waits.
        let permit = Arc::clone(&self.free).acquire_owned().await.ok();
        self.lease(permit, tx, prompt)
    }

    /// Takes a free slot now, or `None` when all are in use.
    pub(super) fn try_acquire(
        self: &Arc<Self>,
        tx: &mpsc::UnboundedSender<Command>,
    ) -> Option<SlotLease> {
        let permit = Arc::clone(&self.free).try_acquire_owned().ok()?;
        Some(self.lease(Some(permit), tx, &[]))
    }

    fn lease(
        self: &Arc<Self>,
        permit: Option<OwnedSemaphorePermit>,
        tx: &mpsc::UnboundedSender<Command>,
        prompt: &[i32],
    ) -> SlotLease {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        // The free slot whose last prompt shares the longest start with this one; among equals,
        // the one with the shortest cache, so longer ones stay for prompts that can use them. A
        // permit guarantees a free entry; the fallback only keeps this total.
        let slot = slots
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.busy)
            .max_by_key(|(i, s)| {
                let shared = common_prefix(&s.prompt, prompt);
                (
                    shared,
                    std::cmp::Reverse(s.prompt.len()),
                    std::cmp::Reverse(*i),
                )
            })
            .map_or(0, |(i, _)| i);
        if let Some(s) = slots.get_mut(slot) {
            s.busy = true;
            s.prompt = prompt.to_vec();
        }
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

/// One sequence slot of a context, held by one request; freed on drop (its cache stays for prefix
/// reuse where the context allows it, and is cleared otherwise).
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
        let _ = self.tx.send(Command::Release { seq: self.seq });
        let mut slots = self.pool.slots.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = slots.get_mut(self.seq as usize) {
            s.busy = false;
        }
        // The permit is released after this, once the slot is marked free.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_prompt_goes_to_the_free_slot_that_shares_its_start() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let pool = Arc::new(SlotPool::new(3));
        let a = pool.acquire(&tx, &[1, 2, 3, 4]).await;
        let b = pool.acquire(&tx, &[9, 9, 9]).await;
        let (sa, sb) = (a.seq(), b.seq());
        drop(a);
        drop(b);
        // Both freed slots kept their prompts: each prompt finds its own again.
        assert_eq!(pool.acquire(&tx, &[9, 9, 1]).await.seq(), sb);
        assert_eq!(pool.acquire(&tx, &[1, 2, 3, 5]).await.seq(), sa);
        // A slot for a whole cache (an import) takes the one that holds nothing.
        let c = pool.acquire(&tx, &[]).await;
        assert_ne!(c.seq(), sa);
        assert_ne!(c.seq(), sb);
        // Each drop asked the worker to release its slot.
        assert!(matches!(rx.try_recv(), Ok(Command::Release { .. })));
    }

    #[test]
    fn common_prefix_counts_shared_leading_tokens() {
        assert_eq!(common_prefix(&[1, 2, 3], &[1, 2, 4]), 2);
        assert_eq!(common_prefix(&[], &[1]), 0);
        assert_eq!(common_prefix(&[1, 2], &[1, 2, 3]), 2);
    }
}
