//! Log lines that anyone can cause (a refused handshake on a pod's 15008 needs no credentials)
//! are written at most once per key per window, with the number suppressed since; the exact
//! count is a metric's job. Without this, a flood of junk connections pushes every real line
//! out of the log. Pure: the caller passes the time.
use std::{
    collections::HashMap,
    hash::Hash,
    sync::{Mutex, PoisonError},
    time::{Duration, Instant},
};

/// One line per key per `window`; at most `capacity` keys tracked (beyond that, all other keys
/// share one slot, so memory stays bounded whatever the flood).
pub struct Throttle<K> {
    window: Duration,
    capacity: usize,
    slots: Mutex<HashMap<Option<K>, Slot>>,
}

struct Slot {
    /// When the last line for this key was written.
    since: Instant,
    /// Lines suppressed since then.
    suppressed: u64,
}

impl<K: Hash + Eq> Throttle<K> {
    pub fn new(window: Duration, capacity: usize) -> Self {
        Self {
            window,
            capacity,
            slots: Mutex::new(HashMap::new()),
        }
    }

    /// Whether a line for `key` may be written at `now`: `Some(n)` with the number of lines
    /// suppressed since the last one, `None` to suppress this one.
    pub fn admit(&self, key: K, now: Instant) -> Option<u64> {
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        let window = self.window;
        let mut key = Some(key);
        if !slots.contains_key(&key) && slots.len() >= self.capacity {
            // Full: forget keys whose window is over; if none is, share the overflow slot.
            slots.retain(|_, slot| now.duration_since(slot.since) < window);
            if slots.len() >= self.capacity {
                key = None;
            }
        }
        match slots.get_mut(&key) {
            Some(slot) if now.duration_since(slot.since) < window => {
                slot.suppressed += 1;
                None
            }
            Some(slot) => {
                let suppressed = slot.suppressed;
                *slot = Slot {
                    since: now,
                    suppressed: 0,
                };
                Some(suppressed)
            }
            None => {
                slots.insert(
                    key,
                    Slot {
                        since: now,
                        suppressed: 0,
                    },
                );
                Some(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_key_per_window_with_the_count_suppressed() {
        let throttle = Throttle::new(Duration::from_secs(10), 100);
        let t0 = Instant::now();
        assert_eq!(throttle.admit("a", t0), Some(0));
        for i in 1..2000 {
            assert_eq!(throttle.admit("a", t0 + Duration::from_millis(i)), None);
        }
        assert_eq!(
            throttle.admit("b", t0),
            Some(0),
            "another key has its own line"
        );
        assert_eq!(
            throttle.admit("a", t0 + Duration::from_secs(10)),
            Some(1999),
            "the next window's line says how many were suppressed"
        );
        assert_eq!(throttle.admit("a", t0 + Duration::from_secs(11)), None);
    }

    #[test]
    fn memory_stays_bounded_whatever_the_number_of_keys() {
        let throttle = Throttle::new(Duration::from_secs(10), 4);
        let t0 = Instant::now();
        let admitted = (0..10_000u32)
            .filter(|k| throttle.admit(*k, t0).is_some())
            .count();
        // Four keys of their own, then one line for all the others.
        assert_eq!(admitted, 5);
        assert!(throttle.slots.lock().unwrap().len() <= 5);
        // Once the window is over, new keys get slots again.
        assert_eq!(
            throttle.admit(99_999, t0 + Duration::from_secs(10)),
            Some(0)
        );
    }
}
