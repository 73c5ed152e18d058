//! Observability of the queue workers: Prometheus metrics with explicit
//! buckets and low-cardinality labels (stage, outcome, class — never a job or
//! slide id), and the health state behind `/healthz` and `/readyz`. The HTTP
//! server that exposes them is in [`http`].

pub mod http;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::model::Manifest;
use crate::pipeline::StageTimings;

/// Seconds buckets of the per-image stages (fetch, decode, preprocess, infer,
/// cam, upload): a few milliseconds for CAM on GPU up to tens of seconds for a
/// large TIFF over a slow link.
pub const STAGE_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Seconds buckets of whole jobs and of the queue wait: a one-image slide on a
/// GPU up to a backlog of hours (training jobs land in the top buckets).
pub const JOB_BUCKETS: [f64; 14] = [
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0, 3600.0, 14400.0,
];

/// The per-image stages measured, as the `stage` label names them.
pub const STAGES: [&str; 8] = [
    "fetch",
    "decode",
    "preprocess",
    "batch_wait",
    "infer",
    "cam",
    "render",
    "upload",
];

/// Buckets of the images per backbone call.
pub const BATCH_BUCKETS: [f64; 8] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabel {
    pub stage: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StepLabel {
    pub step: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CauseLabel {
    pub cause: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClassLabel {
    pub class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TriageLabel {
    pub triage: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    pub name: String,
    pub version: String,
    pub architecture: String,
    pub provider: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn stage_histogram() -> Histogram {
    Histogram::new(STAGE_BUCKETS)
}

/// Every metric a worker exports (names without the `cinflow_` prefix).
pub struct Metrics {
    registry: Registry,
    /// Jobs settled, by outcome: `done`, `rejected` (dead-lettered as bad
    /// input), `poison` (dead-lettered after too many failed deliveries),
    /// `gave_up`, `failed`, `delayed`, `waiting` (another copy of the job
    /// ran), `quarantined`, `returned`, `requeued`, `abandoned`
    /// (docs/delivery.md).
    pub jobs: Family<OutcomeLabel, Counter>,
    pub job_seconds: Histogram,
    pub queue_wait_seconds: Histogram,
    pub stage_seconds: HistogramFamily<StageLabel>,
    /// Images per backbone call (cross-job batching at work when above 1).
    pub backbone_batch_images: Histogram,
    /// Images whose artifacts were rendered (once per image: a retried upload
    /// does not render again).
    pub renders: Counter,
    /// Bytes of artifacts uploaded (preprocessed images, raw maps, overlays).
    pub artifact_bytes: Counter,
    pub in_flight: Gauge,
    /// The decode memory budget (`--memory-budget-mb`) and the share admitted now.
    pub decode_budget_bytes: Gauge,
    pub decode_budget_used_bytes: Gauge,
    /// Transient failures retried, by step (`fetch images`, `inference`, …).
    pub retries: Family<StepLabel, Counter>,
    /// Messages republished to the dead-letter queue, by cause.
    pub dead_letters: Family<CauseLabel, Counter>,
    /// Images of finished jobs, by outcome (`graded`, `error`).
    pub images: Family<OutcomeLabel, Counter>,
    /// Predicted class of every graded image.
    pub predictions: Family<ClassLabel, Counter>,
    /// CIN2+ triage of every graded slide (models with a refer band).
    pub slide_triage: Family<TriageLabel, Counter>,
    /// 1 for the model version being served.
    pub model_info: Family<ModelLabels, Gauge>,
    /// Alias changes followed, by outcome (`switched`, `refused`).
    pub model_switches: Family<OutcomeLabel, Counter>,
    /// Model versions refused because their signature does not verify, by
    /// reason (`unsigned`, `unknown_key`, `mismatch`, `malformed`).
    pub model_refusals: Family<ReasonLabel, Counter>,
    pub broker_connected: Gauge,
    pub broker_reconnects: Counter,
    pub ready: Gauge,
    /// `cinflow watch`: slides found complete, by outcome (`enqueued`,
    /// `already`, `refused`).
    pub watch_slides: Family<OutcomeLabel, Counter>,
    /// `cinflow watch`: slides still being uploaded at the last listing.
    pub watch_waiting: Gauge,
    /// `cinflow watch`: 1 while this watcher is the active one of its prefix.
    pub watch_active: Gauge,
    /// `cinflow lis-bridge`: deliveries by destination (`hl7`, `fhir`) and
    /// outcome (`accepted`, `refused`, `failed`, `skipped`).
    pub lis_deliveries: Family<DeliveryLabels, Counter>,
    /// `cinflow lis-bridge`: sign-outs received, by outcome (`recorded`,
    /// `not_final`, `not_graded`, `unknown_diagnosis`, `invalid`, `failed`).
    pub lis_signouts: Family<OutcomeLabel, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeliveryLabels {
    pub destination: String,
    pub outcome: String,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut m = Metrics {
            registry: Registry::with_prefix("cinflow"),
            jobs: Family::default(),
            job_seconds: Histogram::new(JOB_BUCKETS),
            queue_wait_seconds: Histogram::new(JOB_BUCKETS),
            stage_seconds: Family::new_with_constructor(stage_histogram),
            backbone_batch_images: Histogram::new(BATCH_BUCKETS),
            renders: Counter::default(),
            artifact_bytes: Counter::default(),
            in_flight: Gauge::default(),
            decode_budget_bytes: Gauge::default(),
            decode_budget_used_bytes: Gauge::default(),
            retries: Family::default(),
            dead_letters: Family::default(),
            images: Family::default(),
            predictions: Family::default(),
            slide_triage: Family::default(),
            model_info: Family::default(),
            model_switches: Family::default(),
            model_refusals: Family::default(),
            broker_connected: Gauge::default(),
            broker_reconnects: Counter::default(),
            ready: Gauge::default(),
            watch_slides: Family::default(),
            watch_waiting: Gauge::default(),
            watch_active: Gauge::default(),
            lis_deliveries: Family::default(),
            lis_signouts: Family::default(),
        };
        m.registry.register(
            "jobs",
            "Jobs settled, by outcome (done, rejected, poison, gave_up, failed, delayed, returned, requeued, abandoned)",
            m.jobs.clone(),
        );
        m.registry.register(
            "job_duration_seconds",
            "Receipt to settlement of a job",
            m.job_seconds.clone(),
        );
        m.registry.register(
            "queue_wait_seconds",
            "Publisher's timestamp to receipt (one-second resolution)",
            m.queue_wait_seconds.clone(),
        );
        m.registry.register(
            "stage_duration_seconds",
            "Per-image stage durations (fetch, decode, preprocess, batch_wait, infer, cam, render, upload)",
            m.stage_seconds.clone(),
        );
        m.registry.register(
            "backbone_batch_images",
            "Images per backbone call (from one or more jobs)",
            m.backbone_batch_images.clone(),
        );
        m.registry.register(
            "renders",
            "Images whose artifacts were rendered",
            m.renders.clone(),
        );
        m.registry.register(
            "artifact_bytes",
            "Bytes of artifacts uploaded (preprocessed images, raw maps, overlays)",
            m.artifact_bytes.clone(),
        );
        m.registry.register(
            "jobs_in_flight",
            "Jobs being processed",
            m.in_flight.clone(),
        );
        m.registry.register(
            "decode_budget_bytes",
            "Memory budget for decoding and preprocessing images (--memory-budget-mb)",
            m.decode_budget_bytes.clone(),
        );
        m.registry.register(
            "decode_budget_used_bytes",
            "Share of the decode budget held by images being decoded and preprocessed",
            m.decode_budget_used_bytes.clone(),
        );
        m.registry.register(
            "retries",
            "Transient failures retried, by step",
            m.retries.clone(),
        );
        m.registry.register(
            "dead_letters",
            "Messages sent to the dead-letter queue, by cause (rejected, poison)",
            m.dead_letters.clone(),
        );
        m.registry.register(
            "images",
            "Images of finished jobs, by outcome (graded, error)",
            m.images.clone(),
        );
        m.registry.register(
            "predictions",
            "Predicted class of graded images",
            m.predictions.clone(),
        );
        m.registry.register(
            "slide_triage",
            "CIN2+ triage of graded slides (CIN2+ likely, refer, CIN2+ unlikely)",
            m.slide_triage.clone(),
        );
        m.registry.register(
            "model_info",
            "The model version being served (value 1)",
            m.model_info.clone(),
        );
        m.registry.register(
            "model_switches",
            "Alias changes followed, by outcome (switched, refused)",
            m.model_switches.clone(),
        );
        m.registry.register(
            "model_refusals",
            "Model versions refused because their signature does not verify, by reason",
            m.model_refusals.clone(),
        );
        m.registry.register(
            "broker_connected",
            "1 while the AMQP connection is up",
            m.broker_connected.clone(),
        );
        m.registry.register(
            "broker_reconnects",
            "AMQP sessions lost and re-established",
            m.broker_reconnects.clone(),
        );
        m.registry
            .register("ready", "1 while /readyz answers 200", m.ready.clone());
        m.registry.register(
            "watch_slides",
            "Complete slides a watcher found, by outcome (enqueued, already, refused)",
            m.watch_slides.clone(),
        );
        m.registry.register(
            "watch_waiting_slides",
            "Slides still being uploaded at the watcher's last listing",
            m.watch_waiting.clone(),
        );
        m.registry.register(
            "watch_active",
            "1 while this watcher is the active one of its prefix",
            m.watch_active.clone(),
        );
        m.registry.register(
            "lis_deliveries",
            "Results the LIS bridge delivered, by destination (hl7, fhir) and outcome (accepted, refused, failed, skipped)",
            m.lis_deliveries.clone(),
        );
        m.registry.register(
            "lis_signouts",
            "Signed-out results the LIS bridge received, by outcome (recorded, not_final, not_graded, unknown_diagnosis, invalid, failed)",
            m.lis_signouts.clone(),
        );
        m
    }

    /// Counts one sign-out received by the bridge.
    pub fn lis_signout(&self, outcome: &str) {
        self.lis_signouts
            .get_or_create(&OutcomeLabel {
                outcome: outcome.into(),
            })
            .inc();
    }

    /// Counts one LIS delivery of the bridge.
    pub fn lis_delivered(&self, destination: &str, outcome: &str) {
        self.lis_deliveries
            .get_or_create(&DeliveryLabels {
                destination: destination.into(),
                outcome: outcome.into(),
            })
            .inc();
    }

    /// Counts `n` complete slides of a watcher's listing with `outcome`.
    pub fn watch_slides(&self, outcome: &str, n: usize) {
        self.watch_slides
            .get_or_create(&OutcomeLabel {
                outcome: outcome.into(),
            })
            .inc_by(n as u64);
    }

    /// The Prometheus text exposition (OpenMetrics).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    pub fn job_settled(&self, outcome: &str) {
        self.jobs
            .get_or_create(&OutcomeLabel {
                outcome: outcome.into(),
            })
            .inc();
    }

    pub fn retried(&self, step: &str) {
        self.retries
            .get_or_create(&StepLabel { step: step.into() })
            .inc();
    }

    pub fn dead_lettered(&self, cause: &str) {
        self.dead_letters
            .get_or_create(&CauseLabel {
                cause: cause.into(),
            })
            .inc();
    }

    /// Counts a graded slide's CIN2+ triage.
    pub fn slide_triaged(&self, triage: crate::model::Triage) {
        self.slide_triage
            .get_or_create(&TriageLabel {
                triage: triage.as_str().into(),
            })
            .inc();
    }

    /// Records one image's stage timings (milliseconds) and its outcome.
    pub fn image_done(&self, timings: Option<&StageTimings>, predicted: Option<&str>) {
        let outcome = if predicted.is_some() {
            "graded"
        } else {
            "error"
        };
        self.images
            .get_or_create(&OutcomeLabel {
                outcome: outcome.into(),
            })
            .inc();
        if let Some(class) = predicted {
            self.predictions
                .get_or_create(&ClassLabel {
                    class: class.into(),
                })
                .inc();
        }
        if let Some(t) = timings {
            let ms = [
                t.fetch_ms,
                t.decode_ms,
                t.preprocess_ms,
                t.infer_wait_ms,
                t.infer_ms,
                t.cam_ms,
                t.render_ms,
                t.upload_ms,
            ];
            for (stage, ms) in STAGES.iter().zip(ms) {
                self.stage_seconds
                    .get_or_create(&StageLabel {
                        stage: (*stage).into(),
                    })
                    .observe(ms / 1e3);
            }
        }
    }

    /// Marks `m` as the served model (and only it).
    pub fn serving(&self, m: &Manifest, provider: &str) {
        self.model_info.clear();
        self.model_info
            .get_or_create(&ModelLabels {
                name: m.name.clone(),
                version: m.version.clone(),
                architecture: m.architecture.clone(),
                provider: provider.into(),
            })
            .set(1);
    }

    pub fn model_refused(&self, reason: &str) {
        self.model_refusals
            .get_or_create(&ReasonLabel {
                reason: reason.into(),
            })
            .inc();
    }

    pub fn model_switch(&self, outcome: &str) {
        self.model_switches
            .get_or_create(&OutcomeLabel {
                outcome: outcome.into(),
            })
            .inc();
    }
}

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

/// What `/readyz` answers from: ready once the model is loaded and warmed up
/// (training workers: once started) and while the broker connection is up.
/// `/healthz` answers from the progress state: failing when jobs are in
/// flight and none has made progress for longer than the stall limit.
#[derive(Debug, Default)]
pub struct Health {
    model_loaded: AtomicBool,
    broker_connected: AtomicBool,
    jobs_in_flight: AtomicU64,
    /// Milliseconds since [`epoch`] of the last progress.
    last_progress_ms: AtomicU64,
    /// 0: never stalled.
    stall_limit_ms: AtomicU64,
}

/// The process's clock for progress.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    epoch().elapsed().as_millis() as u64
}

/// Jobs stuck without progress.
#[derive(Debug, Clone, PartialEq)]
pub struct Stall {
    pub jobs: u64,
    pub for_s: f64,
}

impl Health {
    pub fn set_model_loaded(&self, v: bool) {
        self.model_loaded.store(v, Ordering::SeqCst);
        self.publish();
    }

    pub fn set_broker_connected(&self, v: bool) {
        self.broker_connected.store(v, Ordering::SeqCst);
        metrics().broker_connected.set(i64::from(v));
        self.publish();
    }

    pub fn model_loaded(&self) -> bool {
        self.model_loaded.load(Ordering::SeqCst)
    }

    pub fn broker_connected(&self) -> bool {
        self.broker_connected.load(Ordering::SeqCst)
    }

    pub fn ready(&self) -> bool {
        self.model_loaded() && self.broker_connected()
    }

    /// `/healthz` fails after `limit` without progress while jobs run (zero: never).
    pub fn set_stall_limit(&self, limit: Duration) {
        self.stall_limit_ms
            .store(limit.as_millis() as u64, Ordering::SeqCst);
    }

    /// Something moved: an object fetched or written, a batch graded, an
    /// epoch trained, a job started or settled.
    pub fn progress(&self) {
        self.last_progress_ms.store(now_ms(), Ordering::SeqCst);
    }

    /// The jobs in flight and how long since progress, if past the limit.
    pub fn stalled(&self) -> Option<Stall> {
        let limit = self.stall_limit_ms.load(Ordering::SeqCst);
        let jobs = self.jobs_in_flight.load(Ordering::SeqCst);
        let idle = now_ms().saturating_sub(self.last_progress_ms.load(Ordering::SeqCst));
        (limit > 0 && jobs > 0 && idle > limit).then(|| Stall {
            jobs,
            for_s: idle as f64 / 1e3,
        })
    }

    fn publish(&self) {
        metrics().ready.set(i64::from(self.ready()));
    }
}

/// The process's health state.
pub fn health() -> &'static Health {
    static HEALTH: OnceLock<Health> = OnceLock::new();
    HEALTH.get_or_init(Health::default)
}

/// Counts a job in flight until dropped (also when its task is aborted).
#[derive(Debug)]
pub struct InFlight(());

impl InFlight {
    pub fn start() -> InFlight {
        metrics().in_flight.inc();
        let h = health();
        h.progress();
        h.jobs_in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        metrics().in_flight.dec();
        let h = health();
        h.jobs_in_flight.fetch_sub(1, Ordering::SeqCst);
        h.progress();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_the_stage_buckets_and_counts() {
        let m = Metrics::new();
        m.job_settled("done");
        m.job_settled("done");
        m.retried("fetch images");
        let t = StageTimings {
            fetch_ms: 3.0,
            decode_ms: 40.0,
            preprocess_ms: 20.0,
            infer_wait_ms: 0.0,
            infer_ms: 700.0,
            cam_ms: 2.0,
            render_ms: 9.0,
            upload_ms: 60.0,
        };
        m.image_done(Some(&t), Some("CIN2"));
        m.image_done(None, None);
        let text = m.encode();
        assert!(
            text.contains("cinflow_jobs_total{outcome=\"done\"} 2"),
            "{text}"
        );
        assert!(text.contains("cinflow_retries_total{step=\"fetch images\"} 1"));
        assert!(text.contains("cinflow_images_total{outcome=\"error\"} 1"));
        assert!(text.contains("cinflow_predictions_total{class=\"CIN2\"} 1"));
        // 0.7 s of inference falls in the le=1.0 bucket, not in le=0.5.
        assert!(
            text.contains("cinflow_stage_duration_seconds_bucket{le=\"1.0\",stage=\"infer\"} 1")
        );
        assert!(
            text.contains("cinflow_stage_duration_seconds_bucket{le=\"0.5\",stage=\"infer\"} 0")
        );
        for stage in STAGES {
            assert!(
                text.contains(&format!(
                    "stage_duration_seconds_count{{stage=\"{stage}\"}} 1"
                )),
                "{stage}: {text}"
            );
        }
    }
}
