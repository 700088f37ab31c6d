//! A token bucket, with time passed in so tests need no sleeps.

#![forbid(unsafe_code)]

use std::time::Instant;

/// Refills at `rate` tokens per second up to `burst`; each event takes one.
#[derive(Clone, Copy, Debug)]
pub struct TokenBucket {
    tokens: f32,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(burst: u32, now: Instant) -> Self {
        TokenBucket {
            tokens: burst as f32,
            last: now,
        }
    }

    /// Takes a token if one is available.
    pub fn take(&mut self, now: Instant, rate: u32, burst: u32) -> bool {
        self.refill(now, rate, burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Seconds until a token will be available (at least 1, for
    /// `Retry-After`).
    pub fn retry_after_secs(&self, rate: u32) -> u32 {
        let missing = (1.0 - self.tokens).max(0.0);
        ((missing / rate.max(1) as f32).ceil() as u32).max(1)
    }

    /// Whether the bucket has refilled completely (so forgetting it loses
    /// nothing).
    pub fn is_full(&mut self, now: Instant, rate: u32, burst: u32) -> bool {
        self.refill(now, rate, burst);
        self.tokens >= burst as f32
    }

    fn refill(&mut self, now: Instant, rate: u32, burst: u32) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f32();
        self.last = now;
        self.tokens = (self.tokens + elapsed * rate as f32).min(burst as f32);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn allows_the_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(3, t0);
        assert!((0..3).all(|_| b.take(t0, 10, 3)));
        assert!(!b.take(t0, 10, 3));
        assert_eq!(b.retry_after_secs(10), 1);
        // 10 per second: one token after 100 ms.
        let t1 = t0 + Duration::from_millis(100);
        assert!(b.take(t1, 10, 3));
        assert!(!b.take(t1, 10, 3));
        assert!(!b.is_full(t1, 10, 3));
        assert!(b.is_full(t1 + Duration::from_secs(1), 10, 3));
    }
}
