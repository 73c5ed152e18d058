//! Queue workers: `cinflow worker infer` grades slides from `cinflow.infer`,
//! `cinflow worker train` retrains the head from `cinflow.train`. Both share the
//! consumer loop in [`consume`] (manual acks, dead-lettering with a reason,
//! reconnects, graceful shutdown); CPU-heavy work runs on blocking threads so
//! the AMQP heartbeats keep flowing.

pub mod consume;
pub mod infer;
pub mod serving;
pub mod stores;
#[cfg(feature = "train")]
pub mod train;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::infer::InferConfig;
use crate::model::Registry;
use crate::queue::AmqpConfig;
use crate::storage::S3Config;

pub use consume::{Outcome, REASON_HEADER};

/// How a worker runs jobs.
#[derive(Debug, Clone, clap::Args)]
pub struct WorkerConfig {
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
    /// First backoff between retries and broker reconnects, in milliseconds (doubled each time).
    #[arg(long, env = "CINFLOW_RETRY_BACKOFF_MS", default_value_t = 500)]
    pub retry_backoff_ms: u64,
    /// Longest backoff, in milliseconds.
    #[arg(long, env = "CINFLOW_RETRY_BACKOFF_MAX_MS", default_value_t = 30_000)]
    pub retry_backoff_max_ms: u64,
    /// Key prefix of results in the worker's bucket.
    #[arg(long, env = "CINFLOW_RESULTS_PREFIX", default_value = "results")]
    pub results_prefix: String,
    /// Images of a job fetched, graded and uploaded together (bounds memory per job).
    #[arg(
        id = "worker_batch_size",
        long = "batch-size",
        env = "CINFLOW_BATCH_SIZE",
        default_value_t = 8
    )]
    pub batch_size: usize,
    /// Largest image object accepted, in bytes.
    #[arg(long, env = "CINFLOW_MAX_IMAGE_BYTES", default_value_t = 512 << 20)]
    pub max_image_bytes: u64,
    /// Base of the identifier systems in FHIR reports (patient, specimen and
    /// accession ids): `urn:...` gets `:patient-id`, a URL `/patient-id`.
    #[arg(long, env = "CINFLOW_FHIR_SYSTEM", default_value = "urn:cinflow")]
    pub fhir_system: String,
    /// Address of the HTTP server with /metrics, /healthz and /readyz (`off`: none).
    #[arg(long, env = "CINFLOW_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    pub metrics_addr: String,
}

/// Starts the metrics and health server unless `--metrics-addr off`.
pub async fn serve_http(cfg: &WorkerConfig) -> anyhow::Result<()> {
    if cfg.metrics_addr != "off" {
        crate::observe::http::serve(&cfg.metrics_addr).await?;
    }
    Ok(())
}

/// The served model: a name in the S3 registry and the alias to follow.
#[derive(Debug, Clone, clap::Args)]
pub struct ModelSource {
    /// Model name in the registry (`models/<name>/` in the bucket).
    #[arg(long = "model-name", env = "CINFLOW_MODEL_NAME")]
    pub name: String,
    /// Alias to serve; a newly promoted version is picked up without a restart.
    #[arg(
        long = "model-alias",
        env = "CINFLOW_MODEL_ALIAS",
        default_value = "current"
    )]
    pub alias: String,
    /// Seconds between checks of the alias.
    #[arg(
        long = "model-poll-s",
        env = "CINFLOW_MODEL_POLL_S",
        default_value_t = 30
    )]
    pub poll_s: u64,
    /// Local folder for downloaded model versions.
    #[arg(
        long = "model-cache",
        env = "CINFLOW_MODEL_CACHE",
        default_value = "/tmp/cinflow-models"
    )]
    pub cache: PathBuf,
}

/// `cinflow worker infer`.
#[derive(Debug, Clone, clap::Args)]
pub struct InferWorkerArgs {
    #[command(flatten)]
    pub amqp: AmqpConfig,
    #[command(flatten)]
    pub s3: S3Config,
    #[command(flatten)]
    pub model: ModelSource,
    #[command(flatten)]
    pub infer: InferConfig,
    #[command(flatten)]
    pub worker: WorkerConfig,
}

/// A failed step of a job: worth retrying, or never going to work.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    Transient(String),
    Permanent(String),
}

impl Step {
    pub fn text(&self) -> String {
        match self {
            Step::Transient(t) | Step::Permanent(t) => t.clone(),
        }
    }
}

/// Runs `f` on a blocking thread (a panic there is re-raised here).
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(v) => v,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// Runs `f` on blocking threads until it succeeds, fails permanently, or has
/// failed transiently for longer than the retry budget.
pub async fn retrying<T, F>(cfg: &WorkerConfig, what: &str, f: F) -> Result<T, Step>
where
    T: Send + 'static,
    F: Fn() -> Result<T, Step> + Send + Sync + 'static,
{
    let f = Arc::new(f);
    let started = Instant::now();
    let budget = Duration::from_secs(cfg.retry_for_s);
    let mut delay = Duration::from_millis(cfg.retry_backoff_ms.max(1));
    let max = Duration::from_millis(cfg.retry_backoff_max_ms.max(cfg.retry_backoff_ms));
    loop {
        let g = f.clone();
        match blocking(move || g()).await {
            Err(Step::Transient(e)) if started.elapsed() + delay < budget => {
                crate::observe::metrics().retried(what);
                tracing::warn!(error = %e, retry_in = ?delay, "{what} failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(max);
            }
            Err(Step::Transient(e)) => {
                return Err(Step::Transient(format!(
                    "{what}: still failing after {:.0} s: {e}",
                    started.elapsed().as_secs_f64()
                )))
            }
            other => return other,
        }
    }
}

/// A watch that turns true on SIGTERM or SIGINT.
pub fn shutdown_signal() -> anyhow::Result<watch::Receiver<bool>> {
    let (tx, rx) = watch::channel(false);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| anyhow::anyhow!("cannot listen for SIGTERM: {e}"))?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: stopping"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: stopping"),
        }
        let _ = tx.send(true);
    });
    Ok(rx)
}

/// This process's name on the broker and in results: `<kind>@<host>:<pid>`.
pub fn worker_name(kind: &str) -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into());
    format!("cinflow-{kind}@{host}:{}", std::process::id())
}

fn consume_options(
    amqp: &AmqpConfig,
    worker: &WorkerConfig,
    queue: String,
    dlq: String,
    prefetch: u16,
    name: &str,
) -> consume::ConsumeOptions {
    consume::ConsumeOptions {
        amqp: amqp.clone(),
        queue,
        dlq,
        prefetch,
        drain: Duration::from_secs(worker.drain_timeout_s),
        backoff_min: Duration::from_millis(worker.retry_backoff_ms.max(1)),
        backoff_max: Duration::from_millis(
            worker.retry_backoff_max_ms.max(worker.retry_backoff_ms),
        ),
        connection_name: name.to_string(),
    }
}

/// Runs the inference worker until SIGTERM/SIGINT.
pub async fn run_infer(args: InferWorkerArgs) -> anyhow::Result<()> {
    let shutdown = shutdown_signal()?;
    let name = worker_name("infer");
    tracing::info!(worker = %name, amqp = ?args.amqp, s3 = ?args.s3, "starting");
    // Up before the model loads: live at once, ready only once it is served.
    serve_http(&args.worker).await?;
    let stores = Arc::new(stores::Stores::new(args.s3.clone()));
    // The model first: nothing is consumed before it is loaded. An unreachable
    // S3 is waited for (up to --retry-for-s); a missing alias or a bad bundle is
    // an error at once.
    let started = Instant::now();
    let mut delay = Duration::from_millis(args.worker.retry_backoff_ms.max(1));
    let serving = loop {
        let (stores, src, infer) = (stores.clone(), args.model.clone(), args.infer.clone());
        let start = move || -> Result<serving::Serving, serving::ServingError> {
            let home = stores.home().map_err(crate::model::RegistryError::from)?;
            let registry = Registry::new(home, &src.name)?;
            serving::Serving::start(registry, &src.alias, src.cache.clone(), infer)
        };
        match blocking(start).await {
            Ok(s) => break s,
            Err(e)
                if e.is_retriable()
                    && started.elapsed() < Duration::from_secs(args.worker.retry_for_s)
                    && !*shutdown.borrow() =>
            {
                tracing::warn!(error = %e, retry_in = ?delay, "cannot load the model yet");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_millis(args.worker.retry_backoff_max_ms));
            }
            Err(e) => {
                return Err(anyhow::Error::new(e).context(format!(
                    "cannot load model {} ({}) from the registry in s3://{}",
                    args.model.name, args.model.alias, args.s3.bucket
                )))
            }
        }
    };
    let serving = Arc::new(serving);
    {
        let model = serving.current();
        let m = model.manifest();
        tracing::info!(model = %m.name, version = %m.version, provider = model.provider(), "model loaded");
        crate::observe::metrics().serving(m, model.provider());
        // Serving::start ran one warm-up inference.
        crate::observe::health().set_model_loaded(true);
    }
    let follow = tokio::spawn(infer::follow_alias(
        serving.clone(),
        Duration::from_secs(args.model.poll_s.max(1)),
    ));
    let handler = Arc::new(infer::InferWorker {
        stores,
        serving,
        cfg: args.worker.clone(),
        worker_name: name.clone(),
    });
    let opts = consume_options(
        &args.amqp,
        &args.worker,
        args.amqp.infer_queue.clone(),
        args.amqp.infer_dlq(),
        args.worker.concurrency,
        &name,
    );
    let r = consume::run(handler, opts, shutdown).await;
    follow.abort();
    tracing::info!("stopped");
    r
}
