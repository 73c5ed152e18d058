//! `cinflow worker infer`: one `cinflow.job/v1` message, top to bottom.
//!
//! 1. Check the message against the worker's limits and parse it (a bad one
//!    is refused: error result and dead-letter).
//! 2. Take the job's lease (one copy of a job at a time, on every worker;
//!    a copy that finds it taken waits in the delay queue), then pin the
//!    model version through the job's [claim](super::claim): an earlier
//!    delivery's version, else the served one or the alias/version the job
//!    names, claimed now. Another content under the same job id is refused
//!    without touching the stored result; a job whose result is already
//!    complete is announced again (the stored bytes), not graded again.
//! 3. Per image, concurrently (at most `--images-in-flight` over all jobs):
//!    [`fetch`](super::fetch) -> [`prepare`](super::prepare) (admitted
//!    against the memory budget) -> [`grade`](super::grade) (batched across
//!    jobs) -> [`render`](super::render) -> [`put`](super::put). An image that
//!    can never be graded (missing, corrupt, too large) becomes an error
//!    entry; a transient failure that outlasts its object's retries fails the
//!    job.
//! 4. The FHIR report, then the result record, then the `cinflow.result/v2`
//!    event (publisher confirms).
//! 5. The outcome goes to [`settle`](crate::queue::consumer::settle): ack only now, so any
//!    earlier crash means redelivery, never loss; a redelivered job rewrites
//!    the same objects under the same version.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::Semaphore;
use tracing::Instrument;

use super::claim::{content_sha256, duplicate_reason, legacy_content_sha256, Claim, Claims};
use super::error::JobError;
use super::fetch::Fetcher;
use super::keys::Keys;
use super::prepare::Preparer;
use super::put::Putter;
use super::serving::{Serving, ServingError};
use crate::engine::Grader;
use crate::model::Manifest;
use crate::pipeline::Drawing;
use crate::queue::consumer::settle::Outcome;
use crate::queue::consumer::{Broker, Handler, Incoming};
use crate::queue::messages::{check_id, Admission, JobMessage};
use crate::result::fhir::{diagnostic_report, Systems};
use crate::result::{ImageResult, ImageStatus, JobIds, JobTimings, ResultRecord};
use crate::retry::{RetryPolicy, Transient};
use crate::viewer::ViewerImage;

/// The inference handler and its stages.
#[derive(Debug)]
pub struct InferWorker {
    pub serving: Arc<Serving>,
    pub fetcher: Fetcher,
    pub putter: Putter,
    /// Decodes and preprocesses within the memory budget.
    pub preparer: Preparer,
    /// Images between fetch and put at once, over all jobs (bounds memory).
    pub images: Semaphore,
    pub drawing: Drawing,
    /// Message size and bucket limits.
    pub admission: Admission,
    /// Retries of the job's own reads and writes outside the stages (its
    /// claim, a stored result).
    pub retry: RetryPolicy,
    pub results_prefix: String,
    pub fhir: Systems,
    pub worker_name: String,
    /// Tags jobs for the grader's count of jobs per backbone call.
    pub next_tag: AtomicU64,
    /// The results store honours `If-None-Match: *` (probed at start).
    pub conditional_claims: bool,
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// The model version a delivery grades with.
enum Pin {
    /// Grade with this version.
    Model(Arc<Grader>),
    /// The claimed version's result is stored and final: nothing to grade.
    Stored(Outcome),
    /// The job id was claimed for other content: the reason to refuse it.
    Duplicate(String),
}

impl InferWorker {
    async fn grade_job(&self, msg: Incoming, job: JobMessage, broker: Broker) -> Outcome {
        let received = msg.received;
        let grader = match self.pin(&msg, &job.job_id, Some(&job), &broker).await {
            Ok(Pin::Model(grader)) => grader,
            Ok(Pin::Stored(outcome)) => return outcome,
            Ok(Pin::Duplicate(reason)) => return Outcome::Rejected { reason },
            Err(e) => return self.fail(&msg, Some(&job), None, &e, &broker).await,
        };
        let m = grader.model().manifest().clone();
        let keys = self.keys(&job.job_id, &m.version);
        let tag = self.next_tag.fetch_add(1, Ordering::Relaxed);

        let images = futures_util::future::try_join_all(
            job.images
                .iter()
                .enumerate()
                .map(|(i, uri)| self.image(&grader, &keys, tag, i, uri.clone())),
        )
        .await;
        let (images, viewer): (Vec<ImageResult>, Vec<_>) = match images {
            Ok(images) => images.into_iter().unzip(),
            Err(e) => {
                return self
                    .fail(&msg, Some(&job), Some(&grader), &e, &broker)
                    .await
            }
        };
        for i in &images {
            crate::observe::metrics().image_done(i.timings.as_ref(), i.predicted_class.as_deref());
        }
        let timings = job_timings(&images, msg.queue_wait_ms, received);
        let mut record = ResultRecord::new(
            Some(job.job_id.clone()),
            Some(job.slide_id.clone()),
            &m,
            grader.model().provider(),
            images,
        );
        record.ids = ids(&job);
        record.attempt = Some(msg.deliveries.earlier + 1);
        if let Some(t) = record.slide_grade.as_ref().and_then(|g| g.triage) {
            crate::observe::metrics().slide_triaged(t);
        }
        record.timings = Some(timings);
        let error = record.error.clone();
        if let Err(e) = self
            .write_and_announce(record, &viewer, &m, &keys, &broker)
            .await
        {
            // Nothing more can be written (a results prefix that refuses
            // writes): dead-lettered with the reason, or delayed if transient.
            return Outcome::of_failure(&e);
        }
        match error {
            None => {
                tracing::info!(model = %m.version, images = job.images.len(), ms = ms(received), "job graded");
                Outcome::Done
            }
            Some(reason) => Outcome::Rejected { reason },
        }
    }

    /// The keys of a job's results under one version of the served model.
    fn keys(&self, job_id: &str, version: &str) -> Keys {
        Keys::new(&self.results_prefix, job_id, self.serving.name(), version)
    }

    fn claims(&self) -> Claims<'_> {
        Claims {
            stores: &self.putter.stores,
            retry: self.retry,
            results_prefix: &self.results_prefix,
            conditional: self.conditional_claims,
        }
    }

    /// `claim` if it was made for a message with `msg`'s content, else the
    /// reason to refuse the message as a duplicate job id.
    fn judge(
        &self,
        claim: Claim,
        msg: &Incoming,
        job: Option<&JobMessage>,
    ) -> Result<Claim, String> {
        let legacy = job.map(legacy_content_sha256);
        if Claims::same_content(&claim, &content_sha256(&msg.data), legacy.as_deref()) {
            Ok(claim)
        } else {
            Err(duplicate_reason(&claim.job_id, &claim))
        }
    }

    /// The one model version of the job `job_id`: the one an earlier
    /// delivery claimed (unless its result is stored and final), else the
    /// served one or the one the job names, claimed now. The caller holds
    /// the job's lease.
    async fn pin(
        &self,
        msg: &Incoming,
        job_id: &str,
        job: Option<&JobMessage>,
        broker: &Broker,
    ) -> Result<Pin, JobError> {
        let claim = match self.claims().read(job_id).await? {
            Some(earlier) => earlier,
            None => {
                let grader = self
                    .choose_model(job.and_then(|j| j.model.as_deref()))
                    .await?;
                let mine = Claim::new(
                    job_id,
                    content_sha256(&msg.data),
                    self.serving.name(),
                    &grader.model().manifest().version,
                    &self.worker_name,
                );
                let stored = self.claims().write(&mine).await?;
                if stored.version == mine.version && stored.worker == mine.worker {
                    return Ok(Pin::Model(grader));
                }
                // Only where the lease does not reach: a worker on another broker.
                tracing::warn!(other = %stored.worker, "another worker claimed the job first; following its claim");
                stored
            }
        };
        let claim = match self.judge(claim, msg, job) {
            Ok(claim) => claim,
            Err(reason) => return Ok(Pin::Duplicate(reason)),
        };
        if let Some(outcome) = self.stored(msg, &claim, broker).await {
            return Ok(Pin::Stored(outcome));
        }
        let version = claim.version;
        let grader = self
            .load("load the claimed model version", move |s| {
                s.version(&version, &version)
            })
            .await?;
        Ok(Pin::Model(grader))
    }

    /// If an earlier delivery or another copy stored a final result under
    /// the claimed version, announces its stored bytes again (so every event
    /// of a job is the same) and says how to settle this delivery. A stored
    /// OK result is final. A stored error result is final too, unless this
    /// message was sent back by `cinflow dead-letters requeue` after the
    /// error was written (its cause may be fixed): then it is graded again.
    async fn stored(&self, msg: &Incoming, claim: &Claim, broker: &Broker) -> Option<Outcome> {
        let stores = &self.putter.stores;
        let key = Keys::new(
            &self.results_prefix,
            &claim.job_id,
            &claim.model,
            &claim.version,
        )
        .result();
        let found = self
            .retry
            .run("read an earlier result", || stores.find(&key))
            .await;
        let json = match found {
            Ok(Some(json)) => json,
            Ok(None) => return None,
            Err(e) => {
                return Some(Outcome::of_failure(
                    &JobError::from(e).during("read an earlier result"),
                ))
            }
        };
        let record: ResultRecord = serde_json::from_slice(&json).ok()?;
        if let Some(error) = &record.error {
            let written = chrono::DateTime::parse_from_rfc3339(&record.created_at).ok();
            let regrade = match (msg.requeued_at, written) {
                (Some(requeued), Some(written)) => requeued > written,
                (Some(_), None) => true,
                (None, _) => false,
            };
            if regrade {
                tracing::info!("requeued after its error result; grading it again");
                return None;
            }
            tracing::info!(error = %error, "an earlier delivery or another copy stored an error result; announcing it again");
            let announced = broker
                .publish_event("result.error", &event_id(&record), &json)
                .await;
            return Some(match announced {
                Err(e) => Outcome::of_failure(&JobError::from(e).during("result event")),
                // The copy that wrote it has dead-lettered the job.
                Ok(()) if msg.deliveries.waits > 0 => Outcome::Done,
                Ok(()) => Outcome::Rejected {
                    reason: error.clone(),
                },
            });
        }
        tracing::info!(
            attempt = ?record.attempt,
            "already graded by an earlier delivery or another copy; announcing its result again"
        );
        let id = event_id(&record);
        Some(match broker.publish_event("result.ok", &id, &json).await {
            Ok(()) => Outcome::Done,
            Err(e) => Outcome::of_failure(&JobError::from(e).during("result event")),
        })
    }

    /// The served model, or the alias or version the job names.
    async fn choose_model(&self, want: Option<&str>) -> Result<Arc<Grader>, JobError> {
        let Some(want) = want else {
            return Ok(self.serving.current());
        };
        let want = want.to_string();
        self.load("load model", move |s| s.get(&want)).await
    }

    /// Loads a model on a blocking thread. The registry's store retries each
    /// request itself (`--s3-attempts`); a registry that stays away is a
    /// transient failure of the job, which then waits in the delay queue.
    async fn load(
        &self,
        what: &str,
        get: impl FnOnce(&Serving) -> Result<Arc<Grader>, ServingError> + Send + 'static,
    ) -> Result<Arc<Grader>, JobError> {
        let serving = self.serving.clone();
        tokio::task::spawn_blocking(move || get(&serving))
            .await
            .expect("model loading panicked")
            .map_err(|e| JobError::from(e).during(what))
    }

    /// fetch -> prepare -> grade -> render -> put of the job's image `i`.
    async fn image(
        &self,
        grader: &Arc<Grader>,
        keys: &Keys,
        tag: u64,
        i: usize,
        uri: String,
    ) -> Result<(ImageResult, Option<ViewerImage>), JobError> {
        let _slot = self.images.acquire().await.expect("never closed");
        let model = grader.model();
        let fetched = match self.fetcher.fetch(&uri).await {
            Ok(f) => f,
            Err(e) if e.is_transient() => return Err(JobError::from(e).during("fetch")),
            Err(e) => return Ok((ImageResult::failed(uri, None, e.to_string()), None)),
        };
        let prepared = match self
            .preparer
            .prepare(model, fetched.bytes, fetched.ms)
            .await
        {
            Ok(p) => Arc::new(p),
            Err(e) => return Ok((ImageResult::failed(uri, None, e.to_string()), None)),
        };
        let mut graded = match super::grade::grade(grader, prepared.clone(), tag).await {
            Ok(g) => g,
            Err(e) => {
                let sha = Some(prepared.sha256.clone());
                return Ok((ImageResult::failed(uri, sha, e.to_string()), None));
            }
        };
        let (rendered, render_ms) =
            super::render::render(model, &prepared, &graded, self.drawing).await;
        graded.timings.render_ms = render_ms;
        let t = Instant::now();
        self.putter
            .put_image(keys, i, &rendered)
            .await
            .map_err(|e| JobError::from(e).during("upload"))?;
        graded.timings.upload_ms = ms(t);
        let stores = &self.putter.stores;
        let viewer = rendered.viewer_image(&graded, |name| Keys::artifact_in_job(i, name));
        Ok((
            rendered.image_result(uri, &prepared, &graded, model.manifest(), |name| {
                stores.uri(&keys.artifact(i, name))
            }),
            Some(viewer),
        ))
    }

    /// Writes `record`, its viewer page (`viewer[i]` is what it shows of the record's
    /// image `i`) and its FHIR DiagnosticReport (the record last, as the LIS
    /// reads it first) and announces it.
    async fn write_and_announce(
        &self,
        mut record: ResultRecord,
        viewer: &[Option<ViewerImage>],
        m: &Manifest,
        keys: &Keys,
        broker: &Broker,
    ) -> Result<(), JobError> {
        let stores = &self.putter.stores;
        record.result_uri = Some(stores.uri(&keys.result()));
        record.fhir_report_uri = Some(stores.uri(&keys.fhir()));
        record.viewer_uri = Some(stores.uri(&keys.viewer()));
        record.worker = Some(self.worker_name.clone());
        let json = serde_json::to_vec_pretty(&record).expect("result serialises");
        let page = crate::viewer::page(&record, viewer, m.cam_scale.as_ref());
        let report = diagnostic_report(&record, &self.fhir);
        let report = serde_json::to_vec_pretty(&report).expect("report serialises");
        self.putter
            .put_result(keys, report.into(), page.into(), json.clone().into())
            .await
            .map_err(|e| JobError::from(e).during("write result"))?;
        let status = match record.status {
            ImageStatus::Ok => "ok",
            ImageStatus::Error => "error",
        };
        let id = event_id(&record);
        broker
            .publish_event(&format!("result.{status}"), &id, &json)
            .await
            .map_err(|e| JobError::from(e).during("result event"))
    }

    /// A failure left after the stages' retries: a transient one returns the
    /// job to the queue; a permanent one writes the job's error result and
    /// refuses it. `pinned`: the job's model version, if already known.
    async fn fail(
        &self,
        msg: &Incoming,
        job: Option<&JobMessage>,
        pinned: Option<&Arc<Grader>>,
        e: &JobError,
        broker: &Broker,
    ) -> Outcome {
        match Outcome::of_failure(e) {
            Outcome::Rejected { reason } => self.refuse(msg, job, pinned, reason, broker).await,
            other => other,
        }
    }

    /// Writes the error result of a job refused as a whole (under its claimed
    /// model version) and dead-letters it. A message whose job id holds other
    /// content is dead-lettered without writing anything.
    async fn refuse(
        &self,
        msg: &Incoming,
        job: Option<&JobMessage>,
        pinned: Option<&Arc<Grader>>,
        reason: String,
        broker: &Broker,
    ) -> Outcome {
        let job_id = job
            .map(|j| j.job_id.clone())
            .unwrap_or_else(|| fallback_job_id(msg));
        let grader = match pinned {
            Some(g) => g.clone(),
            None => match self.pin(msg, &job_id, job, broker).await {
                // A job completed by an earlier delivery or another copy
                // (poison only because its ack never reached the broker)
                // keeps its result: announced again, never overwritten.
                Ok(Pin::Stored(outcome)) => return outcome,
                Ok(Pin::Model(grader)) => grader,
                Ok(Pin::Duplicate(dup)) => {
                    return Outcome::Rejected {
                        reason: format!("{reason}; {dup}"),
                    }
                }
                Err(e) if e.is_transient() => {
                    return Outcome::Retry {
                        reason: format!("cannot record the rejection ({reason}): {e}"),
                    }
                }
                // The model the job names does not exist: recorded under the served one.
                Err(_) => self.serving.current(),
            },
        };
        let model = grader.model();
        let m = model.manifest();
        let mut record = ResultRecord::rejected(
            job_id.clone(),
            m,
            model.provider(),
            job.map(|j| j.images.clone()).unwrap_or_default(),
            &reason,
        );
        if let Some(j) = job {
            record.slide_id = Some(j.slide_id.clone());
            record.ids = ids(j);
        }
        record.attempt = Some(msg.deliveries.earlier + 1);
        let keys = self.keys(&job_id, &m.version);
        let viewer = vec![None; record.images.len()];
        match self
            .write_and_announce(record, &viewer, m, &keys, broker)
            .await
        {
            Ok(()) => Outcome::Rejected { reason },
            Err(e) if e.is_transient() => Outcome::Retry {
                reason: format!("cannot record the rejection ({reason}): {e}"),
            },
            // A results prefix that refuses writes will not take it later.
            Err(e) => Outcome::Rejected {
                reason: format!("{reason} (its error result could not be written: {e})"),
            },
        }
    }
}

/// The id of a result event: the job and the version that graded it.
fn event_id(record: &ResultRecord) -> String {
    format!(
        "{}:{}",
        record.job_id.as_deref().unwrap_or("-"),
        record.model.version
    )
}

/// A usable job id for a message that was refused: its `job_id` if it has a
/// valid one, else its AMQP message id, else a hash of its bytes.
fn fallback_job_id(msg: &Incoming) -> String {
    let from_json = serde_json::from_slice::<serde_json::Value>(&msg.data)
        .ok()
        .and_then(|v| v.get("job_id")?.as_str().map(str::to_string))
        .filter(|id| check_id("job_id", id).is_ok());
    if let Some(id) = from_json {
        return id;
    }
    match &msg.message_id {
        Some(id) if check_id("message_id", id).is_ok() => id.clone(),
        _ => format!(
            "unidentified-{}",
            &crate::hashing::sha256_hex(&msg.data)[..32]
        ),
    }
}

fn ids(job: &JobMessage) -> JobIds {
    JobIds {
        accession_id: job.accession_id.clone(),
        patient_id: job.patient_id.clone(),
        specimen_id: job.specimen_id.clone(),
    }
}

/// The job's critical path per stage group: its images run concurrently, so
/// each figure is the slowest image's.
fn job_timings(
    images: &[ImageResult],
    queue_wait_ms: Option<f64>,
    received: Instant,
) -> JobTimings {
    let worst = |f: &dyn Fn(&crate::pipeline::StageTimings) -> f64| {
        images
            .iter()
            .filter_map(|i| i.timings.as_ref())
            .map(f)
            .fold(0.0, f64::max)
    };
    JobTimings {
        queue_wait_ms,
        fetch_prepare_ms: worst(&|t| t.fetch_ms + t.decode_ms + t.preprocess_ms),
        infer_ms: worst(&|t| t.infer_wait_ms + t.infer_ms + t.cam_ms),
        upload_ms: worst(&|t| t.render_ms + t.upload_ms),
        total_ms: ms(received),
    }
}

impl Handler for InferWorker {
    async fn handle(self: Arc<Self>, msg: Incoming, broker: Broker) -> Outcome {
        let job = match self.admission.job(&msg.data) {
            Ok(j) => j,
            Err(e) => {
                let id = fallback_job_id(&msg);
                let span = tracing::info_span!("job", job_id = %id);
                let refuse = self.refuse(&msg, None, None, e.to_string(), &broker);
                return broker
                    .leased(&id, &format!("job {id}"), refuse)
                    .instrument(span)
                    .await;
            }
        };
        let span = tracing::info_span!("job", job_id = %job.job_id, slide_id = %job.slide_id);
        let id = job.job_id.clone();
        let grade = self.grade_job(msg, job, broker.clone());
        broker
            .leased(&id, &format!("job {id}"), grade)
            .instrument(span)
            .await
    }

    async fn poison(self: Arc<Self>, msg: Incoming, reason: String, broker: Broker) -> Outcome {
        // Read as `handle` reads it, so the claim's content hash is the same.
        let job = self.admission.job(&msg.data).ok();
        let id = job
            .as_ref()
            .map(|j| j.job_id.clone())
            .unwrap_or_else(|| fallback_job_id(&msg));
        let span = tracing::info_span!("job", job_id = %id);
        let refuse = self.refuse(&msg, job.as_ref(), None, reason, &broker);
        broker
            .leased(&id, &format!("job {id}"), refuse)
            .instrument(span)
            .await
    }
}

/// Polls the registry alias and switches models between jobs.
pub async fn follow_alias(serving: Arc<Serving>, every: std::time::Duration) {
    loop {
        tokio::time::sleep(every).await;
        let s = serving.clone();
        match tokio::task::spawn_blocking(move || s.refresh()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) if e.is_transient() => {
                tracing::warn!(error = %e, "cannot check the model alias; will try again")
            }
            Ok(Err(_)) => {} // logged once by refresh
            Err(e) => tracing::error!(error = %e, "model refresh panicked"),
        }
    }
}
