//! Queue workers: `cinflow worker infer` grades slides from `cinflow.infer`,
//! `cinflow worker train` retrains the head from `cinflow.train`. Both share the
//! consumer loop in [`crate::queue::consumer`] (manual acks, reconnects,
//! graceful shutdown, settling: ack, requeue, dead-letter with a reason).
//!
//! The inference worker is a staged pipeline, one file per stage:
//! [`fetch`] (async S3 GETs) -> [`prepare`] (decode, CLAHE, resize on rayon)
//! -> [`grade`] (one inference thread per model version, batching across
//! jobs) -> [`render`] (artifacts on rayon) -> [`put`] (async S3 PUTs) ->
//! settling; [`job`] reads a job top to bottom through them. Whether a
//! failure is retried is a property of its error type ([`error`],
//! [`crate::retry`]), and each object is retried by itself.

pub mod claim;
pub mod error;
pub mod fetch;
pub mod grade;
pub mod job;
pub mod keys;
pub mod prepare;
pub mod put;
pub mod render;
pub mod serving;
pub mod stores;
#[cfg(feature = "train")]
pub mod train;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::cam::MapKind;
use crate::engine::GraderConfig;
use crate::infer::InferConfig;
use crate::model::Registry;
use crate::pipeline::{Drawing, Overlays};
use crate::queue::messages::Admission;
use crate::queue::AmqpConfig;
use crate::retry::RetryPolicy;
use crate::storage::S3Config;

pub use crate::queue::consumer::settle::{Outcome, REASON_HEADER};
pub use crate::queue::consumer::ConsumerConfig;
pub use error::JobError;

/// How a worker runs jobs.
#[derive(Debug, Clone, clap::Args)]
pub struct WorkerConfig {
    #[command(flatten)]
    pub consumer: ConsumerConfig,
    /// Key prefix of results in the worker's bucket.
    #[arg(long, env = "CINFLOW_RESULTS_PREFIX", default_value = "results")]
    pub results_prefix: String,
    /// Largest image object accepted, in bytes.
    #[arg(long, env = "CINFLOW_MAX_IMAGE_BYTES", default_value_t = 512 << 20)]
    pub max_image_bytes: u64,
    /// Base of the identifier systems in FHIR reports (patient, specimen and
    /// accession ids): `urn:...` gets `:patient-id`, a URL `/patient-id`.
    #[arg(long, env = "CINFLOW_FHIR_SYSTEM", default_value = "urn:cinflow")]
    pub fhir_system: String,
    /// Buckets a job's image and label URIs may name, comma-separated (default:
    /// the worker's own bucket). Others are refused when the message is
    /// validated: the worker's credentials must not read for any publisher.
    #[arg(long, env = "CINFLOW_ALLOWED_BUCKETS", value_delimiter = ',')]
    pub allowed_buckets: Vec<String>,
    /// Largest message body accepted, in bytes; larger ones are refused.
    #[arg(long, env = "CINFLOW_MAX_MESSAGE_BYTES", default_value_t = 1 << 20)]
    pub max_message_bytes: usize,
}

impl WorkerConfig {
    /// The message limits; `own_bucket` is allowed when no list is given.
    pub fn admission(&self, own_bucket: &str) -> Admission {
        let mut allowed: Vec<String> = self
            .allowed_buckets
            .iter()
            .map(|b| b.trim().to_string())
            .filter(|b| !b.is_empty())
            .collect();
        if allowed.is_empty() {
            allowed.push(own_bucket.to_string());
        }
        Admission {
            max_message_bytes: self.max_message_bytes,
            allowed_buckets: allowed,
        }
    }

    /// How long a step retries transient failures (`--retry-for-s`, backoff flags).
    pub fn retry_policy(&self) -> RetryPolicy {
        self.consumer.retry_policy()
    }
}

/// How the inference worker's stages share the machine.
#[derive(Debug, Clone, clap::Args)]
pub struct EngineArgs {
    /// Most images per backbone call, from one job or several. 0: by device,
    /// 1 on the CPU (ONNX Runtime grades one image at a time fastest there), 8 on
    /// a GPU.
    #[arg(long, env = "CINFLOW_MAX_BATCH", default_value_t = 0)]
    pub max_batch: usize,
    /// Longest an image waits for others to fill its backbone call, in milliseconds.
    #[arg(long, env = "CINFLOW_BATCH_WAIT_MS", default_value_t = 5)]
    pub batch_wait_ms: u64,
    /// S3 GETs at once, over all jobs.
    #[arg(long, env = "CINFLOW_FETCH_CONCURRENCY", default_value_t = 16)]
    pub fetch_concurrency: usize,
    /// Images between fetch and upload at once, over all jobs: bounds memory
    /// (each holds its bytes, decoded pixels and tensor). 0: twice the batch
    /// (8 when it is chosen by device) plus the cores.
    #[arg(long, env = "CINFLOW_IMAGES_IN_FLIGHT", default_value_t = 0)]
    pub images_in_flight: usize,
    /// Memory for decoding and preprocessing images, over all jobs, in MiB:
    /// images are admitted from their header dimensions before they are
    /// decoded, and one that needs more than all of it is refused. 0: half the
    /// container's memory limit (a quarter of the machine's without one), at
    /// least 1024.
    #[arg(long, env = "CINFLOW_MEMORY_BUDGET_MB", default_value_t = 0)]
    pub memory_budget_mb: u32,
    /// Class overlays drawn as JPEGs beside the preprocessed image and raw maps:
    /// the predicted class's, every class's, or none.
    #[arg(long, env = "CINFLOW_OVERLAYS", value_enum, default_value_t = Overlays::Predicted)]
    pub overlays: Overlays,
    /// The map the pre-drawn overlays show: Grad-CAM (the class's evidence) or
    /// contrastive (its evidence against the classes' average).
    #[arg(long, env = "CINFLOW_HEATMAP", value_enum, default_value_t = MapKind::GradCam)]
    pub heatmap: MapKind,
}

impl EngineArgs {
    pub fn grader(&self) -> GraderConfig {
        GraderConfig {
            max_batch: self.max_batch,
            batch_wait: Duration::from_millis(self.batch_wait_ms),
        }
    }

    /// `--memory-budget-mb`, or its default.
    pub fn memory_budget_mib(&self) -> u32 {
        match self.memory_budget_mb {
            0 => prepare::default_budget_mib(),
            n => n,
        }
    }

    pub fn images_in_flight(&self) -> usize {
        match self.images_in_flight {
            0 => 2 * self.grader().sizing_batch() + rayon::current_num_threads(),
            n => n,
        }
    }
}

/// The served model: a name in the S3 registry and the alias to follow.
#[derive(Debug, Clone, clap::Args)]
pub struct ModelSource {
    /// Model name in the registry (`models/<name>/` in the bucket).
    #[arg(long = "model-name", env = "CINFLOW_MODEL_NAME", value_name = "NAME")]
    pub name: String,
    /// Alias to serve; a newly promoted version is picked up without a restart.
    #[arg(
        long = "model-alias",
        env = "CINFLOW_MODEL_ALIAS",
        value_name = "ALIAS",
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
    #[command(flatten)]
    pub trust: crate::model::signing::ModelTrust,
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
    pub engine: EngineArgs,
    #[command(flatten)]
    pub worker: WorkerConfig,
}

/// Runs `f` on a blocking thread (a panic there is re-raised here).
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(v) => v,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
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

/// Default `--job-timeout-s` of the inference worker.
pub const INFER_JOB_TIMEOUT_S: u64 = 1500;
/// Default `--job-timeout-s` of the training worker.
pub const TRAIN_JOB_TIMEOUT_S: u64 = 18_000;

/// Runs the inference worker until SIGTERM/SIGINT.
pub async fn run_infer(args: InferWorkerArgs) -> anyhow::Result<()> {
    let shutdown = shutdown_signal()?;
    let name = worker_name("infer");
    tracing::info!(worker = %name, amqp = ?args.amqp, s3 = ?args.s3, "starting");
    // Up before the model loads: live at once, ready only once it is served.
    args.worker.consumer.serve_http().await?;
    let stores = Arc::new(stores::Stores::connect(args.s3.clone()).await?);
    let conditional_claims =
        probe_conditional_writes(&stores, &args.worker.results_prefix, &name).await;
    let serving = Arc::new(load_served_model(&args, &stores, &shutdown).await?);
    {
        let g = serving.current();
        let (m, provider) = (g.model().manifest(), g.model().provider());
        tracing::info!(model = %m.name, version = %m.version, provider, max_batch = g.config().max_batch, memory_budget_mib = args.engine.memory_budget_mib(), "model loaded");
        crate::observe::metrics().serving(m, provider);
        // Serving::start warmed the model up.
        crate::observe::health().set_model_loaded(true);
    }
    let follow = tokio::spawn(job::follow_alias(
        serving.clone(),
        Duration::from_secs(args.model.poll_s.max(1)),
    ));
    let retry = args.worker.retry_policy();
    let handler = Arc::new(job::InferWorker {
        serving,
        fetcher: fetch::Fetcher {
            stores: stores.clone(),
            slots: tokio::sync::Semaphore::new(args.engine.fetch_concurrency.max(1)),
            retry,
            limit: args.worker.max_image_bytes,
        },
        putter: put::Putter { stores, retry },
        preparer: prepare::Preparer::new(args.engine.memory_budget_mib()),
        images: tokio::sync::Semaphore::new(args.engine.images_in_flight()),
        drawing: Drawing {
            overlays: args.engine.overlays,
            map: args.engine.heatmap,
        },
        admission: args.worker.admission(&args.s3.bucket),
        retry,
        results_prefix: args.worker.results_prefix.clone(),
        fhir: crate::result::fhir::Systems::new(&args.worker.fhir_system),
        worker_name: name.clone(),
        next_tag: Default::default(),
        conditional_claims,
    });
    let opts = args.worker.consumer.consume_options(
        &args.amqp,
        args.amqp.infer_queue.clone(),
        args.amqp.infer_dlq(),
        args.worker.consumer.concurrency,
        &name,
        INFER_JOB_TIMEOUT_S,
    );
    let r = crate::queue::consumer::run(handler, opts, shutdown).await;
    follow.abort();
    tracing::info!("stopped");
    r
}

/// Whether the results store honours conditional creates, said in the log:
/// which mechanism keeps two copies of a job from both grading it.
async fn probe_conditional_writes(
    stores: &stores::Stores,
    results_prefix: &str,
    worker: &str,
) -> bool {
    let me: String = worker
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let probe = crate::storage::join_key(&[
        results_prefix,
        ".probes",
        &format!("{me}-{}.txt", chrono::Utc::now().timestamp_micros()),
    ]);
    match stores.conditional_writes(&probe).await {
        Ok(true) => {
            tracing::info!(probe = %stores.uri(&probe), "one grading per job: the store honours If-None-Match, so claims are created only if absent; a broker lease per job keeps copies from running at once");
            true
        }
        Ok(false) => {
            tracing::info!(probe = %stores.uri(&probe), "one grading per job: the store ignores If-None-Match (a second conditional PUT was not refused with 412); a broker lease per job keeps copies from running at once and guards the claim");
            false
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot probe the store for conditional writes; claims are written under the job's broker lease alone");
            false
        }
    }
}

/// The model first: nothing is consumed before it is loaded and warm. An
/// unreachable S3 is waited for (up to --retry-for-s); a missing alias or a
/// bad bundle is an error at once.
async fn load_served_model(
    args: &InferWorkerArgs,
    stores: &Arc<stores::Stores>,
    shutdown: &watch::Receiver<bool>,
) -> anyhow::Result<serving::Serving> {
    let trust = args.model.trust.load()?;
    let load = || {
        let (stores, src, infer, grader, trust) = (
            stores.clone(),
            args.model.clone(),
            args.infer.clone(),
            args.engine.grader(),
            trust.clone(),
        );
        async move {
            if *shutdown.borrow() {
                return Err(serving::ServingError::Unknown {
                    name: src.name,
                    want: "(shutting down)".into(),
                });
            }
            blocking(move || {
                let mut registry = Registry::new(stores.home(), &src.name)?;
                if let Some(keys) = trust.clone() {
                    registry = registry.trusting(keys);
                }
                serving::Serving::start(registry, &src.alias, src.cache.clone(), infer, grader)
            })
            .await
        }
    };
    args.worker
        .retry_policy()
        .run("load model", load)
        .await
        .map_err(|e| {
            anyhow::Error::new(e).context(format!(
                "cannot load model {} ({}) from the registry in s3://{}",
                args.model.name, args.model.alias, args.s3.bucket
            ))
        })
}
