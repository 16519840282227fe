//! The bandwidth cap: a token bucket shared by all memory streams of one migration.
//!
//! The bucket itself is pure (time is an argument); [`Pacer`] is the shell that reads
//! the clock and sleeps.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Bytes a stream may send, refilled at `rate` bytes per second up to `burst`.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Duration,
}

impl TokenBucket {
    /// A full bucket at time `now` (any monotonic origin).
    pub fn new(rate_bytes_per_s: u64, burst_bytes: u64, now: Duration) -> TokenBucket {
        let burst = burst_bytes.max(1) as f64;
        TokenBucket {
            rate: rate_bytes_per_s.max(1) as f64,
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// Takes `bytes` at `now`; returns how long the caller must wait before sending them.
    /// Debt is allowed, so a batch larger than the burst still goes through, just later.
    pub fn take(&mut self, bytes: u64, now: Duration) -> Duration {
        let elapsed = now.saturating_sub(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.tokens -= bytes as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

/// A [`TokenBucket`] on the real clock, shared between threads.
pub struct Pacer {
    origin: Instant,
    bucket: Mutex<TokenBucket>,
}

impl Pacer {
    pub fn new(rate_bytes_per_s: u64) -> Pacer {
        // A burst of 1/50 s keeps queues short on a shaped link without starving batches.
        let burst = (rate_bytes_per_s / 50).max(512 << 10);
        Pacer {
            origin: Instant::now(),
            bucket: Mutex::new(TokenBucket::new(rate_bytes_per_s, burst, Duration::ZERO)),
        }
    }

    /// Blocks until `bytes` may be sent.
    pub fn wait(&self, bytes: u64) {
        let wait = self
            .bucket
            .lock()
            .expect("pacer lock poisoned")
            .take(bytes, self.origin.elapsed());
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn full_bucket_lets_a_burst_through_then_paces() {
        let mut b = TokenBucket::new(1000, 500, Duration::ZERO);
        assert_eq!(b.take(500, Duration::ZERO), Duration::ZERO);
        assert_eq!(b.take(250, Duration::ZERO), Duration::from_millis(250));
        // After 250 ms the debt is paid off, another 100 bytes cost 100 ms.
        assert_eq!(
            b.take(100, Duration::from_millis(250)),
            Duration::from_millis(100)
        );
    }

    proptest! {
        /// Whatever the batch sizes, sending at the waits the bucket asks for never beats
        /// the rate by more than one burst.
        #[test]
        fn long_run_rate_never_exceeds_the_cap(sizes in proptest::collection::vec(1u64..100_000, 1..200)) {
            let rate = 1_000_000u64;
            let burst = 50_000u64;
            let mut b = TokenBucket::new(rate, burst, Duration::ZERO);
            let mut now = Duration::ZERO;
            let mut sent = 0u64;
            for s in sizes {
                now += b.take(s, now);
                sent += s;
                let allowed = burst as f64 + now.as_secs_f64() * rate as f64;
                prop_assert!(sent as f64 <= allowed + 1.0, "sent {} allowed {}", sent, allowed);
            }
        }
    }
}
