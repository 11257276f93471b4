//! A channel of capacity one where the newest item wins: a slow consumer (inference)
//! always gets the latest frame, never a backlog, and the camera is never blocked.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// What [`LatestSlot::take`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Take<T> {
    Item(T),
    /// Nothing arrived within the timeout.
    Empty,
    /// The producer closed the slot and nothing is left.
    Closed,
}

#[derive(Debug)]
pub struct LatestSlot<T> {
    state: Mutex<State<T>>,
    ready: Condvar,
    dropped: AtomicU64,
}

#[derive(Debug)]
struct State<T> {
    item: Option<T>,
    closed: bool,
}

impl<T> Default for LatestSlot<T> {
    fn default() -> Self {
        Self {
            state: Mutex::new(State {
                item: None,
                closed: false,
            }),
            ready: Condvar::new(),
            dropped: AtomicU64::new(0),
        }
    }
}

impl<T> LatestSlot<T> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Stores `item`, replacing (and counting as dropped) one nobody took yet.
    pub fn put(&self, item: T) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.item.replace(item).is_some() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        drop(s);
        self.ready.notify_one();
    }

    /// Stores `item` once the previous one has been taken (lossless replay), giving up
    /// when `stop` says so. Returns false if it gave up or the slot was closed.
    pub fn put_when_empty(&self, item: T, stop: &dyn Fn() -> bool) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        while s.item.is_some() {
            if stop() || s.closed {
                return false;
            }
            s = self
                .ready
                .wait_timeout(s, Duration::from_millis(50))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        s.item = Some(item);
        drop(s);
        self.ready.notify_all();
        true
    }

    /// Waits up to `timeout` for an item.
    pub fn take(&self, timeout: Duration) -> Take<T> {
        let deadline = Instant::now() + timeout;
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(item) = s.item.take() {
                drop(s);
                // A lossless producer may be waiting for the slot to empty.
                self.ready.notify_all();
                return Take::Item(item);
            }
            if s.closed {
                return Take::Closed;
            }
            let now = Instant::now();
            if now >= deadline {
                return Take::Empty;
            }
            s = self
                .ready
                .wait_timeout(s, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// No more items will come; a waiting consumer wakes up once the last one is taken.
    pub fn close(&self) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).closed = true;
        self.ready.notify_all();
    }

    /// Items replaced before anyone took them.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn the_newest_item_wins_and_replaced_ones_are_counted() {
        let slot = LatestSlot::new();
        slot.put(1);
        slot.put(2);
        slot.put(3);
        assert_eq!(slot.take(Duration::ZERO), Take::Item(3));
        assert_eq!(slot.dropped(), 2);
        assert_eq!(slot.take(Duration::from_millis(1)), Take::Empty);
    }

    #[test]
    fn a_waiting_consumer_is_woken_by_a_put_from_another_thread() {
        let slot = Arc::new(LatestSlot::new());
        let s = slot.clone();
        let t = std::thread::spawn(move || s.take(Duration::from_secs(10)));
        std::thread::sleep(Duration::from_millis(20));
        slot.put("frame");
        assert_eq!(t.join().unwrap(), Take::Item("frame"));
    }

    #[test]
    fn a_lossless_producer_waits_for_the_consumer_instead_of_dropping() {
        let slot = Arc::new(LatestSlot::new());
        let s = slot.clone();
        let producer = std::thread::spawn(move || {
            for i in 0..50 {
                assert!(s.put_when_empty(i, &|| false));
            }
            s.close();
        });
        let mut got = vec![];
        while let Take::Item(i) = slot.take(Duration::from_secs(5)) {
            got.push(i);
        }
        producer.join().unwrap();
        assert_eq!(got, (0..50).collect::<Vec<_>>());
        assert_eq!(slot.dropped(), 0);
    }

    #[test]
    fn close_hands_over_the_last_item_then_reports_closed() {
        let slot = LatestSlot::new();
        slot.put(7);
        slot.close();
        assert_eq!(slot.take(Duration::from_secs(1)), Take::Item(7));
        assert_eq!(slot.take(Duration::from_secs(1)), Take::Closed);
    }
}
