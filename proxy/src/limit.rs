//! A bound on things open at once (connections, streams): a slot each, held
//! until it ends. Reaching the bound is warned of once, and again only after
//! the load has fallen below nine tenths of it (not for every slot that frees
//! while the proxy stays at the bound).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub struct Limit {
    slots: Arc<Semaphore>,
    max: usize,
    warned: AtomicBool,
}

impl Limit {
    pub fn new(max: usize) -> Self {
        Limit {
            slots: Arc::new(Semaphore::new(max)),
            max,
            warned: AtomicBool::new(false),
        }
    }

    pub fn max(&self) -> usize {
        self.max
    }

    /// A slot, if one is free. If none is, `warn` is called, unless the
    /// bound has been warned of and the load has not fallen since.
    pub fn take(&self, warn: impl FnOnce()) -> Option<OwnedSemaphorePermit> {
        match self.slots.clone().try_acquire_owned() {
            Ok(slot) => {
                // (Free before this take: one more than now.)
                if self.warned.load(Ordering::Relaxed)
                    && self.slots.available_permits() + 1 > self.max / 10
                {
                    self.warned.store(false, Ordering::Relaxed);
                }
                Some(slot)
            }
            Err(_) => {
                if !self.warned.swap(true, Ordering::Relaxed) {
                    warn();
                }
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// At the bound, slots that free and are taken again one by one do not
    /// warn again; once the load has fallen below nine tenths, reaching the
    /// bound again does.
    #[test]
    fn the_bound_is_warned_of_once_until_the_load_falls() {
        let limit = Limit::new(20);
        let warned = std::cell::Cell::new(0);
        let warn = || warned.set(warned.get() + 1);
        let mut held: Vec<_> = (0..20).map(|_| limit.take(warn).unwrap()).collect();
        assert!(limit.take(warn).is_none());
        assert_eq!(warned.get(), 1);
        for _ in 0..5 {
            held.pop();
            held.push(limit.take(warn).unwrap());
            assert!(limit.take(warn).is_none());
        }
        assert_eq!(warned.get(), 1, "warned again for every slot that freed");
        held.truncate(16);
        held.push(limit.take(warn).unwrap());
        while let Some(slot) = limit.take(warn) {
            held.push(slot);
        }
        assert_eq!(held.len(), 20);
        assert_eq!(warned.get(), 2, "not warned again once the load had fallen");
    }

    /// A bound of one (or any under ten) is warned of again once its load
    /// has fallen to nothing: a take from an empty limit re-arms it.
    #[test]
    fn a_small_bound_is_warned_of_again_after_it_emptied() {
        let limit = Limit::new(1);
        let warned = std::cell::Cell::new(0);
        let warn = || warned.set(warned.get() + 1);
        for round in 1..=3 {
            let held = limit.take(warn).unwrap();
            assert!(limit.take(warn).is_none());
            assert!(limit.take(warn).is_none());
            assert_eq!(warned.get(), round, "round {round}");
            drop(held);
        }
    }
}
