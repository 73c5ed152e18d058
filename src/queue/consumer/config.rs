//! How a consumer (a worker, the LIS bridge) takes messages, retries and
//! stops: the flags both share, and the consumer loop's options built from them.

use std::time::Duration;

use crate::queue::AmqpConfig;
use crate::retry::{Limit, RetryPolicy};

/// How a consumer (a worker, the LIS bridge) takes messages, retries and stops.
#[derive(Debug, Clone, clap::Args)]
pub struct ConsumerConfig {
    /// Jobs processed at once; also the AMQP prefetch (training workers always take 1).
    #[arg(long, env = "CINFLOW_CONCURRENCY", default_value_t = 2)]
    pub concurrency: u16,
    /// Seconds in-flight jobs get to finish after SIGTERM/SIGINT; unfinished
    /// ones then go back to the queue. Keep it below the pod's grace period.
    #[arg(long, env = "CINFLOW_DRAIN_TIMEOUT_S", default_value_t = 60)]
    pub drain_timeout_s: u64,
    /// How long a job keeps retrying transient failures (S3 outage, throttling)
    /// before it is returned to the queue.
    #[arg(long, env = "CINFLOW_RETRY_FOR_S", default_value_t = 300)]
    pub retry_for_s: u64,
    /// Seconds a job whose transient failures outlasted --retry-for-s waits in
    /// the delay queue before it is handed out again.
    #[arg(long, env = "CINFLOW_RETRY_DELAY_S", default_value_t = 60)]
    pub retry_delay_s: u64,
    /// Rounds through the delay queue before a job is given up (error result,
    /// dead-letter with the last reason); 0: never.
    #[arg(long, env = "CINFLOW_RETRY_ROUNDS", default_value_t = 24)]
    pub retry_rounds: u32,
    /// Longest a job may run, in seconds; then it counts as a failed delivery.
    /// Keep it below the broker's `consumer_timeout`. Default: 1500 (25
    /// minutes) for inference, 18000 (5 hours) for training, 600 for the LIS
    /// bridge.
    #[arg(long, env = "CINFLOW_JOB_TIMEOUT_S")]
    pub job_timeout_s: Option<u64>,
    /// /healthz fails when jobs are in flight and none has made progress (an
    /// object fetched or written, a batch graded, an epoch trained) for this
    /// many seconds: a wedged inference call or S3 request gets the pod
    /// restarted. 0: never.
    #[arg(long, env = "CINFLOW_STALL_LIMIT_S", default_value_t = 600)]
    pub stall_limit_s: u64,
    /// First backoff between retries and broker reconnects, in milliseconds (doubled each time).
    #[arg(long, env = "CINFLOW_RETRY_BACKOFF_MS", default_value_t = 500)]
    pub retry_backoff_ms: u64,
    /// Longest backoff, in milliseconds.
    #[arg(long, env = "CINFLOW_RETRY_BACKOFF_MAX_MS", default_value_t = 30_000)]
    pub retry_backoff_max_ms: u64,
    /// Address of the HTTP server with /metrics, /healthz and /readyz (`off`: none).
    #[arg(long, env = "CINFLOW_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    pub metrics_addr: String,
}

impl ConsumerConfig {
    /// How long a step retries transient failures (`--retry-for-s`, backoff flags).
    pub fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy {
            first: Duration::from_millis(self.retry_backoff_ms.max(1)),
            max: Duration::from_millis(self.retry_backoff_max_ms.max(self.retry_backoff_ms)),
            limit: Limit::For(Duration::from_secs(self.retry_for_s)),
        }
    }

    /// Starts the metrics and health server unless `--metrics-addr off`.
    pub async fn serve_http(&self) -> anyhow::Result<()> {
        if self.metrics_addr != "off" {
            crate::observe::http::serve(&self.metrics_addr).await?;
        }
        Ok(())
    }

    /// The consumer loop's options for `queue` (dead letters to `dlq`).
    pub fn consume_options(
        &self,
        amqp: &AmqpConfig,
        queue: String,
        dlq: String,
        prefetch: u16,
        name: &str,
        default_job_timeout_s: u64,
    ) -> crate::queue::consumer::ConsumeOptions {
        crate::observe::health().set_stall_limit(Duration::from_secs(self.stall_limit_s));
        crate::queue::consumer::ConsumeOptions {
            amqp: amqp.clone(),
            queue,
            dlq,
            subscribe: None,
            prefetch,
            drain: Duration::from_secs(self.drain_timeout_s),
            job_timeout: Duration::from_secs(
                self.job_timeout_s.unwrap_or(default_job_timeout_s).max(1),
            ),
            retry_delay: Duration::from_secs(self.retry_delay_s),
            retry_rounds: self.retry_rounds,
            settle_retry: self.retry_policy(),
            backoff_min: Duration::from_millis(self.retry_backoff_ms.max(1)),
            backoff_max: Duration::from_millis(
                self.retry_backoff_max_ms.max(self.retry_backoff_ms),
            ),
            connection_name: name.to_string(),
        }
    }
}
