//! Whether to try again, decided in one place.
//!
//! Every module's error type says whether a failure is worth retrying
//! ([`Transient`]: throttling, 5xx, timeouts, a broker hiccup) or never going to
//! work (a corrupt image, a missing object, a broken model). [`RetryPolicy::run`]
//! is the one retry loop: it retries transient failures with exponential
//! backoff until its limit, and returns everything else at once. The worker's
//! `settle` stage maps what is left to ack, requeue or dead-letter from the same
//! property.

use std::future::Future;
use std::time::{Duration, Instant};

/// An error that knows whether trying again later could succeed.
pub trait Transient: std::fmt::Display {
    fn is_transient(&self) -> bool;
}

/// How long a transient failure is retried.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Limit {
    /// At most this many attempts in all (1: no retry).
    Attempts(u32),
    /// Until this much time has passed since the first attempt.
    For(Duration),
}

/// Exponential backoff with a cap, and a limit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Wait before the second attempt; doubled after each failure.
    pub first: Duration,
    /// Longest wait between attempts.
    pub max: Duration,
    pub limit: Limit,
}

impl RetryPolicy {
    /// Whether another attempt may start after `attempts` failed ones, the first
    /// at `started`, given the wait `delay` before it.
    fn allows(&self, attempts: u32, started: Instant, delay: Duration) -> bool {
        match self.limit {
            Limit::Attempts(n) => attempts < n.max(1),
            Limit::For(budget) => started.elapsed() + delay < budget,
        }
    }

    /// Runs `op` until it succeeds, fails permanently, or the limit is reached;
    /// returns the last error. `what` names the step in logs and in the
    /// `cinflow_retries_total{step}` metric (keep it low-cardinality).
    pub async fn run<T, E, F, Fut>(&self, what: &str, mut op: F) -> Result<T, E>
    where
        E: Transient,
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let started = Instant::now();
        let mut delay = self.first.max(Duration::from_millis(1));
        let mut attempts = 0;
        loop {
            attempts += 1;
            match op().await {
                Err(e) if e.is_transient() && self.allows(attempts, started, delay) => {
                    crate::observe::metrics().retried(what);
                    tracing::warn!(error = %e, attempt = attempts, retry_in = ?delay, "{what} failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(self.max.max(self.first));
                }
                other => return other,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[derive(Debug)]
    struct E(bool);
    impl std::fmt::Display for E {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "transient={}", self.0)
        }
    }
    impl Transient for E {
        fn is_transient(&self) -> bool {
            self.0
        }
    }

    fn policy(limit: Limit) -> RetryPolicy {
        RetryPolicy {
            first: Duration::from_millis(1),
            max: Duration::from_millis(2),
            limit,
        }
    }

    fn count(p: RetryPolicy, transient: bool) -> u32 {
        let n = AtomicU32::new(0);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let r: Result<(), E> = rt.block_on(p.run("test", || {
            n.fetch_add(1, Ordering::SeqCst);
            async move { Err(E(transient)) }
        }));
        assert!(r.is_err());
        n.load(Ordering::SeqCst)
    }

    #[test]
    fn transient_failures_are_retried_up_to_the_limit_and_permanent_ones_never() {
        assert_eq!(count(policy(Limit::Attempts(4)), true), 4);
        assert_eq!(count(policy(Limit::Attempts(4)), false), 1);
        assert_eq!(count(policy(Limit::Attempts(1)), true), 1);
        assert!(count(policy(Limit::For(Duration::from_millis(30))), true) > 2);
    }

    #[test]
    fn success_after_failures_is_returned() {
        let n = AtomicU32::new(0);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let r = rt.block_on(policy(Limit::Attempts(5)).run("test", || {
            let k = n.fetch_add(1, Ordering::SeqCst);
            async move {
                if k < 2 {
                    Err(E(true))
                } else {
                    Ok(k)
                }
            }
        }));
        assert_eq!(r.unwrap(), 2);
    }
}
