//! Deadlines of any length, fired in time order.
//!
//! A FIFO is only a deadline queue when every entry has the same length:
//! with a 20 s Connect deadline queued before a 5 s handshake deadline, a
//! FIFO that stops at the first entry not yet due delays the short one by
//! 15 s. This is a min-heap on (when, insertion order) instead, so any mix
//! of lengths fires on time and equal deadlines fire in the order they were
//! set. Sans-IO: the caller passes `now`.

#![forbid(unsafe_code)]

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Instant;

pub struct Deadlines<T> {
    heap: BinaryHeap<Reverse<(Instant, u64, Entry<T>)>>,
    seq: u64,
}

/// Wraps the payload so that it takes no part in the ordering.
struct Entry<T>(T);

impl<T> PartialEq for Entry<T> {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}
impl<T> Eq for Entry<T> {}
impl<T> PartialOrd for Entry<T> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl<T> Ord for Entry<T> {
    fn cmp(&self, _: &Self) -> std::cmp::Ordering {
        std::cmp::Ordering::Equal
    }
}

impl<T> Default for Deadlines<T> {
    fn default() -> Self {
        Deadlines {
            heap: BinaryHeap::new(),
            seq: 0,
        }
    }
}

impl<T> Deadlines<T> {
    /// Sets a deadline at `at` for `item`.
    pub fn push(&mut self, at: Instant, item: T) {
        self.seq += 1;
        self.heap.push(Reverse((at, self.seq, Entry(item))));
    }

    /// Removes and returns the earliest deadline that is due at `now`.
    pub fn pop_due(&mut self, now: Instant) -> Option<T> {
        match self.heap.peek() {
            Some(Reverse((at, _, _))) if *at <= now => {
                self.heap.pop().map(|Reverse((_, _, Entry(item)))| item)
            }
            _ => None,
        }
    }

    /// Gives the heap's memory back once it is empty after a storm of
    /// connections grew it.
    pub fn shrink_if_empty(&mut self) {
        if self.heap.is_empty() && self.heap.capacity() > 64 {
            self.heap = BinaryHeap::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn due(d: &mut Deadlines<&'static str>, now: Instant) -> Vec<&'static str> {
        std::iter::from_fn(|| d.pop_due(now)).collect()
    }

    /// The input: a 20 s Connect deadline set 0.5 s before a 5 s
    /// handshake deadline must not hold the handshake one back.
    #[test]
    fn a_long_deadline_set_first_does_not_delay_a_short_one() {
        let t0 = Instant::now();
        let mut d = Deadlines::default();
        d.push(t0 + ms(20_000), "connect A");
        d.push(t0 + ms(500) + ms(5_000), "handshake B");
        assert!(due(&mut d, t0 + ms(5_499)).is_empty());
        assert_eq!(due(&mut d, t0 + ms(5_500)), ["handshake B"]);
        assert!(due(&mut d, t0 + ms(19_999)).is_empty());
        assert_eq!(due(&mut d, t0 + ms(20_000)), ["connect A"]);
        assert!(d.heap.is_empty());
    }

    #[test]
    fn due_deadlines_fire_in_time_order_and_ties_in_insertion_order() {
        let t0 = Instant::now();
        let mut d = Deadlines::default();
        for (at, name) in [(30, "c"), (10, "a1"), (20, "b"), (10, "a2"), (40, "d")] {
            d.push(t0 + ms(at), name);
        }
        assert_eq!(due(&mut d, t0 + ms(30)), ["a1", "a2", "b", "c"]);
        assert_eq!(d.heap.len(), 1);
        assert_eq!(due(&mut d, t0 + ms(1_000)), ["d"]);
    }

    #[test]
    fn memory_is_given_back_once_empty() {
        let t0 = Instant::now();
        let mut d = Deadlines::default();
        for i in 0..1000 {
            d.push(t0 + ms(i), "x");
        }
        d.shrink_if_empty();
        assert!(d.heap.capacity() >= 1000, "not empty: kept");
        assert_eq!(due(&mut d, t0 + ms(1000)).len(), 1000);
        d.shrink_if_empty();
        assert_eq!(d.heap.capacity(), 0);
    }
}
