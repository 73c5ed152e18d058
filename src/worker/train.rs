//! `cinflow worker train`: runs `cinflow.train/v1` jobs (prefetch 1) with the
//! training code against S3: the labels manifest and images are staged from
//! S3, features are cached in the bucket, the new version is published to the
//! S3 registry (manifest last) and the alias moves only after the promotion
//! decision, so a crash mid-training leaves no promoted half-model; the job is
//! then redelivered. The outcome is written to `<train-results>/<job_id>.json`
//! and announced on the results exchange; the job is acked at the end.

use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tracing::Instrument;

use super::error::JobError;
use super::stores::{split_s3_uri, Stores};
use super::{blocking, WorkerConfig};
use crate::infer::InferConfig;
use crate::model::{Decision, PromotionPolicy, Registry};
use crate::queue::consumer::settle::Outcome;
use crate::queue::consumer::{Broker, Handler, Incoming};
use crate::queue::messages::TrainMessage;
use crate::queue::AmqpConfig;
use crate::retry::Transient;
use crate::storage::{join_key, S3Config};
use crate::train::{parse_labels, HyperParams, TrainOptions};

/// Schema tag of a training outcome.
pub const TRAIN_RESULT_SCHEMA: &str = "cinflow.train-result/v1";

/// `cinflow worker train`.
#[derive(Debug, Clone, clap::Args)]
pub struct TrainWorkerArgs {
    #[command(flatten)]
    pub amqp: AmqpConfig,
    #[command(flatten)]
    pub s3: S3Config,
    #[command(flatten)]
    pub infer: InferConfig,
    #[command(flatten)]
    pub worker: WorkerConfig,
    /// Alias that a better model is promoted to (and that names the base model).
    #[arg(
        long = "model-alias",
        env = "CINFLOW_MODEL_ALIAS",
        value_name = "ALIAS",
        default_value = "current"
    )]
    pub alias: String,
    /// The key that signs every version this worker publishes.
    #[command(flatten)]
    pub signing: crate::model::signing::ModelSigning,
    /// The keys the base version it trains from must be signed with.
    #[command(flatten)]
    pub trust: crate::model::signing::ModelTrust,
    /// Key prefix of the feature cache in the bucket.
    #[arg(long, env = "CINFLOW_FEATURE_PREFIX", default_value = "features")]
    pub feature_prefix: String,
    /// Key prefix of training outcomes in the bucket.
    #[arg(
        long,
        env = "CINFLOW_TRAIN_RESULTS_PREFIX",
        default_value = "train-results"
    )]
    pub train_results_prefix: String,
    /// Share of patients for validation (early stopping).
    #[arg(long, env = "CINFLOW_TRAIN_VALIDATION_FRACTION", default_value_t = 0.2)]
    pub validation_fraction: f64,
    /// Share of patients locked away for the test evaluation.
    #[arg(long, env = "CINFLOW_TRAIN_TEST_FRACTION", default_value_t = 0.1)]
    pub test_fraction: f64,
    /// Test images shown in the report's Grad-CAM gallery.
    #[arg(long, env = "CINFLOW_TRAIN_GALLERY", default_value_t = 12)]
    pub gallery: usize,
    #[command(flatten)]
    pub promotion: PromotionPolicy,
    #[command(flatten)]
    pub hyper: HyperParams,
}

/// What a training job produced (`cinflow.train-result/v1`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainResult {
    pub schema: String,
    pub job_id: String,
    pub model: String,
    pub status: crate::result::ImageStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version_uri: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report_uri: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<Decision>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_accuracy: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_macro_auc: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub features_computed: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub features_cached: Option<usize>,
    pub attempt: u32,
    pub worker: String,
    pub created_at: String,
}

/// The training handler.
#[derive(Debug)]
pub struct TrainWorker {
    pub stores: Arc<Stores>,
    pub args: TrainWorkerArgs,
    pub worker_name: String,
    /// The keys base versions must be signed with (`--trusted-keys`).
    pub trusted: Option<Arc<crate::model::signing::TrustedKeys>>,
}

impl TrainWorker {
    fn result(&self, job_id: &str, model: &str, msg: &Incoming) -> TrainResult {
        TrainResult {
            schema: TRAIN_RESULT_SCHEMA.into(),
            job_id: job_id.to_string(),
            model: model.to_string(),
            status: crate::result::ImageStatus::Error,
            error: None,
            version: None,
            version_uri: None,
            report_uri: None,
            decision: None,
            test_accuracy: None,
            test_macro_auc: None,
            features_computed: None,
            features_cached: None,
            attempt: msg.deliveries.earlier + 1,
            worker: self.worker_name.clone(),
            created_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        }
    }

    async fn record(&self, r: &TrainResult, broker: &Broker) -> Result<(), JobError> {
        let json = serde_json::to_vec_pretty(r).expect("train result serialises");
        let key = self.outcome_key(&r.job_id);
        let body = bytes::Bytes::from(json.clone());
        self.args
            .worker
            .retry_policy()
            .run("write training outcome", || {
                self.stores.put(&key, body.clone(), "application/json")
            })
            .await
            .map_err(|e| JobError::from(e).during("write training outcome"))?;
        let status = match r.status {
            crate::result::ImageStatus::Ok => "ok",
            crate::result::ImageStatus::Error => "error",
        };
        broker
            .publish_event(&format!("train.{status}"), &r.job_id, &json)
            .await
            .map_err(|e| JobError::from(e).during("training event"))
    }

    async fn refuse(&self, mut r: TrainResult, reason: String, broker: &Broker) -> Outcome {
        r.error = Some(reason.clone());
        match self.record(&r, broker).await {
            Ok(()) => Outcome::Rejected { reason },
            Err(e) if e.is_transient() => Outcome::Retry {
                reason: format!("cannot record the failure ({reason}): {e}"),
            },
            // A prefix that refuses writes will not take it later.
            Err(e) => Outcome::Rejected {
                reason: format!("{reason} (its outcome could not be written: {e})"),
            },
        }
    }

    fn outcome_key(&self, job_id: &str) -> String {
        join_key(&[&self.args.train_results_prefix, &format!("{job_id}.json")])
    }

    /// The successful outcome a previous delivery of `job_id` wrote, if any (it
    /// crashed or lost the broker between writing it and the ack).
    async fn already_trained(&self, job_id: &str) -> Result<Option<Vec<u8>>, JobError> {
        let key = self.outcome_key(job_id);
        self.args
            .worker
            .retry_policy()
            .run("read an earlier outcome", || self.stores.find(&key))
            .await
            .map_err(|e| JobError::from(e).during("read an earlier outcome"))
            .map(|found| {
                found.filter(|b| {
                    serde_json::from_slice::<TrainResult>(b)
                        .is_ok_and(|r| r.status == crate::result::ImageStatus::Ok)
                })
            })
    }

    async fn run_job(&self, msg: Incoming, job: TrainMessage, broker: Broker) -> Outcome {
        // A redelivered job that already finished is announced again, not
        // trained again (a second version of the same data would be noise).
        match self.already_trained(&job.job_id).await {
            Ok(Some(json)) => {
                tracing::info!(
                    "already trained by an earlier delivery; announcing its outcome again"
                );
                return match broker.publish_event("train.ok", &job.job_id, &json).await {
                    Ok(()) => Outcome::Done,
                    Err(e) => Outcome::of_failure(&JobError::from(e).during("training event")),
                };
            }
            Ok(None) => {}
            Err(e) => return self.fail(&msg, &job, &e, &broker).await,
        }
        let mut r = self.result(&job.job_id, &job.model, &msg);
        let (stores, args, j, trusted) = (
            self.stores.clone(),
            self.args.clone(),
            job.clone(),
            self.trusted.clone(),
        );
        let outcome = blocking(move || train_from_s3(&stores, &args, &j, trusted.as_ref())).await;
        match outcome {
            Ok(done) => {
                r.status = crate::result::ImageStatus::Ok;
                r.version_uri = Some(done.version_uri);
                r.report_uri = Some(done.report_uri);
                r.version = Some(done.outcome.version.clone());
                r.decision = done.outcome.decision.clone();
                r.test_accuracy = Some(done.outcome.test.accuracy);
                r.test_macro_auc = done.outcome.test.macro_auc;
                r.features_computed = Some(done.outcome.features_computed);
                r.features_cached = Some(done.outcome.features_cached);
                match self.record(&r, &broker).await {
                    Ok(()) => {
                        tracing::info!(
                            version = ?r.version,
                            promoted = r.decision.as_ref().is_some_and(|d| d.promoted),
                            "training job done"
                        );
                        Outcome::Done
                    }
                    Err(e) => Outcome::of_failure(&e),
                }
            }
            Err(e) if e.is_transient() => Outcome::Retry {
                reason: e.to_string(),
            },
            Err(e) => self.refuse(r, e.to_string(), &broker).await,
        }
    }

    /// A failure before training started: requeued when transient, else refused.
    async fn fail(
        &self,
        msg: &Incoming,
        job: &TrainMessage,
        e: &JobError,
        broker: &Broker,
    ) -> Outcome {
        match Outcome::of_failure(e) {
            Outcome::Rejected { reason } => {
                let r = self.result(&job.job_id, &job.model, msg);
                self.refuse(r, reason, broker).await
            }
            other => other,
        }
    }
}

struct Trained {
    outcome: crate::train::TrainOutcome,
    version_uri: String,
    report_uri: String,
}

/// Stages the labels and images from S3 and runs one training with the
/// registry and feature cache in the bucket.
fn train_from_s3(
    stores: &Stores,
    a: &TrainWorkerArgs,
    job: &TrainMessage,
    trusted: Option<&Arc<crate::model::signing::TrustedKeys>>,
) -> Result<Trained, JobError> {
    let home = stores.home();
    let mut registry = Registry::new(home.clone(), &job.model)?;
    if let Some(keys) = trusted {
        // A swapped base backbone would otherwise be signed into the new version.
        registry = registry.trusting(keys.clone());
    }
    let scratch = tempfile::tempdir()?;

    // The backbone: the base version's bundle (by default the alias's).
    let base = match &job.base_version {
        Some(v) => v.clone(),
        None => {
            registry
                .alias(&a.alias)?
                .ok_or_else(|| {
                    JobError::Invalid(format!(
                        "model {} has no {:?} alias to train from; name a base_version",
                        job.model, a.alias
                    ))
                })?
                .version
        }
    };
    let base_dir = scratch.path().join("base");
    let bar = crate::progress::download_bar("model");
    registry.fetch_showing(&base, &base_dir, &bar)?;
    bar.finish_and_clear();

    // The labels manifest and its images.
    let labels_bytes = stores
        .get_uri_blocking(&job.labels, 64 << 20)
        .map_err(|e| JobError::from(e).during(format!("labels {}", job.labels)))?;
    let labels_path = scratch.path().join("labels.csv");
    std::fs::write(&labels_path, &labels_bytes)?;
    let (labels_bucket, labels_key) = split_s3_uri(&job.labels).ok_or_else(|| {
        JobError::Invalid(format!("labels {:?} is not s3://bucket/key", job.labels))
    })?;
    let labels_dir = labels_key.rsplit_once('/').map_or("", |(d, _)| d);
    let images_dir = scratch.path().join("images");
    let wanted = std::sync::Mutex::new(Vec::<(String, PathBuf)>::new());
    let rows = parse_labels(&job.labels, &labels_bytes, &|raw: &str| {
        let uri = if raw.starts_with("s3://") {
            raw.to_string()
        } else if raw.contains("://") || raw.starts_with('/') {
            return Err(format!(
                "{raw:?}: the training worker reads s3:// URIs or keys relative to the labels file"
            ));
        } else {
            format!("s3://{labels_bucket}/{}", join_key(&[labels_dir, raw]))
        };
        let (bucket, key) =
            split_s3_uri(&uri).ok_or_else(|| format!("{raw:?} is not s3://bucket/key"))?;
        crate::storage::check_key(key).map_err(|e| e.to_string())?;
        let local = images_dir.join(bucket).join(key);
        wanted.lock().expect("lock").push((uri, local.clone()));
        Ok(local)
    })
    .map_err(|e| JobError::Invalid(e.to_string()))?;
    let wanted = wanted.into_inner().expect("lock");
    stage_images(stores, &wanted, a.worker.max_image_bytes)?;

    // Hyper-parameters: the worker's, with the job's overrides by name.
    let hyper = override_hyper(&a.hyper, &job.hyper_parameters).map_err(JobError::Invalid)?;
    let mut promotion = a.promotion;
    if let Some(m) = job.promotion_margin {
        promotion.promotion_margin = m;
    }
    let o = TrainOptions {
        labels: labels_path,
        backbone: base_dir,
        backbone_sha256: None,
        out: scratch.path().join("out"),
        classes: None,
        name: Some(job.model.clone()),
        version: None,
        validation_fraction: a.validation_fraction,
        test_fraction: a.test_fraction,
        feature_cache: None,
        registry: None,
        alias: a.alias.clone(),
        promotion,
        gallery: a.gallery,
        hyper,
        infer: a.infer.clone(),
        signing: a.signing.clone(),
        registry_store: Some(home.clone()),
        feature_store: Some((home.clone(), a.feature_prefix.clone())),
        labels_uri: Some(job.labels.clone()),
        labels_rows: Some(rows),
    };
    let outcome = crate::train::train(&o)?;
    let version_uri = registry.version_uri(&outcome.version);
    Ok(Trained {
        report_uri: format!("{version_uri}/report/report.html"),
        version_uri,
        outcome,
    })
}

/// Downloads the images (in parallel) to their staging paths.
fn stage_images(stores: &Stores, wanted: &[(String, PathBuf)], limit: u64) -> Result<(), JobError> {
    use rayon::prelude::*;
    wanted.par_iter().try_for_each(|(uri, local)| {
        if local.exists() {
            return Ok(());
        }
        let bytes = stores.get_uri_blocking(uri, limit)?;
        crate::observe::health().progress();
        if let Some(dir) = local.parent() {
            std::fs::create_dir_all(dir)?;
        }
        Ok(std::fs::write(local, bytes)?)
    })
}

/// The worker's hyper-parameters with a job's overrides (field names of
/// [`HyperParams`]); an unknown name or a wrong type is the job's error.
pub fn override_hyper(
    base: &HyperParams,
    overrides: &serde_json::Map<String, serde_json::Value>,
) -> Result<HyperParams, String> {
    let mut v = serde_json::to_value(base).expect("hyper-parameters serialise");
    let obj = v.as_object_mut().expect("an object");
    for (k, val) in overrides {
        if !obj.contains_key(k) {
            let mut known: Vec<&String> = obj.keys().collect();
            known.sort();
            return Err(format!(
                "hyper_parameters: unknown {k:?} (known: {})",
                known
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        obj.insert(k.clone(), val.clone());
    }
    let h: HyperParams = serde_json::from_value(v).map_err(|e| format!("hyper_parameters: {e}"))?;
    if let Some(p) = h.problems() {
        return Err(format!("hyper_parameters: {p}"));
    }
    Ok(h)
}

impl Handler for TrainWorker {
    async fn handle(self: Arc<Self>, msg: Incoming, broker: Broker) -> Outcome {
        let admission = self.args.worker.admission(&self.args.s3.bucket);
        let job = match admission.train(&msg.data) {
            Ok(j) => j,
            Err(e) => {
                let id = msg.message_id.clone().unwrap_or_else(|| {
                    format!(
                        "unidentified-{}",
                        &crate::hashing::sha256_hex(&msg.data)[..32]
                    )
                });
                let r = self.result(&sanitize(&id), "-", &msg);
                return self.refuse(r, e.to_string(), &broker).await;
            }
        };
        let span = tracing::info_span!("train_job", job_id = %job.job_id, model = %job.model);
        // Out-of-range numbers are refused before anything is downloaded.
        if let Err(reason) = override_hyper(&self.args.hyper, &job.hyper_parameters) {
            let r = self.result(&job.job_id, &job.model, &msg);
            return self.refuse(r, reason, &broker).instrument(span).await;
        }
        // Two copies of one training job never train at once: the second
        // waits, then finds the first's outcome and announces it again.
        let id = job.job_id.clone();
        let run = self.run_job(msg, job, broker.clone());
        broker
            .leased(&id, &format!("training job {id}"), run)
            .instrument(span)
            .await
    }

    async fn poison(self: Arc<Self>, msg: Incoming, reason: String, broker: Broker) -> Outcome {
        let (id, model) = match TrainMessage::parse(&msg.data) {
            Ok(j) => (j.job_id, j.model),
            Err(_) => (
                sanitize(
                    &msg.message_id
                        .clone()
                        .unwrap_or_else(|| "unidentified".into()),
                ),
                "-".into(),
            ),
        };
        let r = self.result(&id, &model, &msg);
        self.refuse(r, reason, &broker).await
    }
}

/// A job id usable as a key segment.
fn sanitize(id: &str) -> String {
    let s: String = id
        .chars()
        .take(200)
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-:".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    if s.is_empty() || s.starts_with('.') {
        format!("id{s}")
    } else {
        s
    }
}

/// Runs the training worker until SIGTERM/SIGINT.
pub async fn run(args: TrainWorkerArgs) -> anyhow::Result<()> {
    let shutdown = super::shutdown_signal()?;
    let name = super::worker_name("train");
    tracing::info!(worker = %name, amqp = ?args.amqp, s3 = ?args.s3, "starting");
    args.worker.consumer.serve_http().await?;
    // Nothing to load before consuming: a job brings its own base model.
    crate::observe::health().set_model_loaded(true);
    let handler = Arc::new(TrainWorker {
        stores: Arc::new(Stores::connect(args.s3.clone()).await?),
        args: args.clone(),
        worker_name: name.clone(),
        trusted: args.trust.load()?,
    });
    let opts = args.worker.consumer.consume_options(
        &args.amqp,
        args.amqp.train_queue.clone(),
        args.amqp.train_dlq(),
        1,
        &name,
        super::TRAIN_JOB_TIMEOUT_S,
    );
    crate::queue::consumer::run(handler, opts, shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hyper_parameter_overrides_are_checked() {
        let base = HyperParams::default();
        let mut o = serde_json::Map::new();
        o.insert("max_epochs".into(), 7.into());
        assert_eq!(override_hyper(&base, &o).unwrap().max_epochs, 7);
        o.insert("epochs".into(), 7.into());
        assert!(override_hyper(&base, &o)
            .unwrap_err()
            .contains("unknown \"epochs\""));
        let mut o = serde_json::Map::new();
        o.insert("learning_rate".into(), "fast".into());
        assert!(override_hyper(&base, &o).is_err());
        assert_eq!(sanitize("a/b"), "a_b");
    }
}
