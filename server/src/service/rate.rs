//! A rate limit per user: a token bucket that holds up to a minute's worth
//! of units and refills at that rate. Time is passed in.

use std::collections::HashMap;
use std::sync::Mutex;

/// Units a user may take: up to `per_minute` at once, `per_minute` a
/// minute over time.
#[derive(Debug)]
pub struct RateLimiter {
    per_minute: u32,
    buckets: Mutex<HashMap<String, Bucket>>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at_ms: u64,
}

impl RateLimiter {
    /// A limit of `per_minute` units a minute (at least one).
    pub fn new(per_minute: u32) -> Self {
        Self {
            per_minute: per_minute.max(1),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes `n` units for `user` at `now_ms`; `false`, taking nothing, if
    /// fewer are left.
    pub fn take(&self, user: &str, n: usize, now_ms: u64) -> bool {
        let cap = f64::from(self.per_minute);
        let mut buckets = self.buckets.lock().expect("rate limiter lock");
        let b = buckets.entry(user.to_owned()).or_insert(Bucket {
            tokens: cap,
            at_ms: now_ms,
        });
        let elapsed = now_ms.saturating_sub(b.at_ms) as f64 / 1000.0;
        b.tokens = (b.tokens + elapsed * cap / 60.0).min(cap);
        b.at_ms = now_ms;
        if b.tokens < n as f64 {
            return false;
        }
        b.tokens -= n as f64;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_up_to_the_limit_then_the_refill_rate() {
        let r = RateLimiter::new(60);
        assert!(r.take("bob", 50, 0));
        assert!(r.take("bob", 10, 0));
        assert!(!r.take("bob", 1, 0), "the minute's worth is spent");
        // One unit a second comes back.
        assert!(!r.take("bob", 2, 1_000));
        assert!(r.take("bob", 2, 2_000));
        // Never more than a minute's worth, however long the pause.
        assert!(!r.take("bob", 61, 3_600_000));
        assert!(r.take("bob", 60, 3_600_000));
    }

    #[test]
    fn a_refused_take_takes_nothing_and_users_are_apart() {
        let r = RateLimiter::new(10);
        assert!(!r.take("eve", 11, 0));
        assert!(r.take("eve", 10, 0));
        assert!(r.take("bob", 10, 0), "eve's use is not bob's");
        // A clock that steps back refills nothing.
        assert!(!r.take("eve", 1, 0));
    }
}
