//! The pace of the CA's own writes to the cluster (secret-mode Secrets,
//! root ConfigMaps, their Events): a token bucket shared by every
//! controller that writes, so a burst of new service accounts or a root
//! rotation over thousands of copies reaches the API server at a steady,
//! bounded rate.

use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;

/// A token bucket: `rate` tokens a second, at most `burst` saved up.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl TokenBucket {
    /// A full bucket. A rate of 0 is taken as 1 a second; a burst below 1
    /// as 1.
    pub fn new(rate: f64, burst: u32) -> Self {
        let rate = if rate.is_finite() && rate > 0.0 {
            rate
        } else {
            1.0
        };
        let burst = f64::from(burst.max(1));
        Self {
            rate,
            burst,
            state: Mutex::new((burst, Instant::now())),
        }
    }

    /// Tokens a second.
    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// Waits for one token. Callers are served one at a time, in the
    /// order they asked (the lock is fair), so the wait of each is at most
    /// its place in the queue over the rate.
    pub async fn take(&self) {
        let mut state = self.state.lock().await;
        let (tokens, at) = &mut *state;
        let now = Instant::now();
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.rate).min(self.burst);
        *at = now;
        if *tokens < 1.0 {
            let wait = Duration::from_secs_f64((1.0 - *tokens) / self.rate);
            tokio::time::sleep(wait).await;
            let later = Instant::now();
            *tokens += later.duration_since(*at).as_secs_f64() * self.rate;
            *at = later;
        }
        *tokens = (*tokens - 1.0).max(0.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_burst_then_the_rate() {
        let bucket = TokenBucket::new(10.0, 5);
        let start = Instant::now();
        for _ in 0..5 {
            bucket.take().await;
        }
        assert_eq!(start.elapsed(), Duration::ZERO, "the burst is free");
        for _ in 0..20 {
            bucket.take().await;
        }
        let took = start.elapsed();
        // 20 more at 10/s: 2 s (the paused clock is exact up to rounding).
        assert!(
            took >= Duration::from_millis(1990) && took <= Duration::from_millis(2010),
            "{took:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn idle_time_refills_at_most_the_burst() {
        let bucket = TokenBucket::new(100.0, 10);
        for _ in 0..10 {
            bucket.take().await;
        }
        tokio::time::sleep(Duration::from_secs(60)).await;
        let start = Instant::now();
        for _ in 0..30 {
            bucket.take().await;
        }
        // 10 saved up, then 20 at 100/s.
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(195) && took <= Duration::from_millis(205),
            "{took:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_takers_share_the_rate() {
        let bucket = std::sync::Arc::new(TokenBucket::new(50.0, 1));
        let start = Instant::now();
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..8 {
            let b = bucket.clone();
            set.spawn(async move {
                for _ in 0..25 {
                    b.take().await;
                }
            });
        }
        while set.join_next().await.is_some() {}
        // 200 tokens, 1 free, 199 at 50/s.
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(3970) && took <= Duration::from_millis(4010),
            "{took:?}"
        );
    }
}
