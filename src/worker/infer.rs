//! `cinflow worker infer`: grades the slides of `cinflow.job/v1` messages.
//!
//! Per job: fetch every image from S3 and decode/CLAHE/resize it (in parallel,
//! on blocking threads), run the backbone, head and Grad-CAM on the batch, write
//! the overlays, raw maps and result JSON under keys derived from the job id and
//! the model version, publish a `cinflow.result/v1` event with confirms, and
//! only then ack. A redelivered job rewrites the same objects.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rayon::prelude::*;
use tracing::Instrument;

use super::consume::{Broker, Handler, Incoming, Outcome};
use super::serving::Serving;
use super::stores::Stores;
use super::{blocking, Step, WorkerConfig};
use crate::model::Manifest;
use crate::pipeline::{render_artifacts, Graded, Model, Prepared};
use crate::queue::messages::{check_id, JobMessage};
use crate::result::{
    class_slug, HeatmapRef, ImageResult, ImageStatus, JobIds, JobTimings, RawMapRef, ResultRecord,
};
use crate::storage::{join_key, ObjectStore, StoreError};

/// The inference handler.
#[derive(Debug)]
pub struct InferWorker {
    pub stores: Arc<Stores>,
    pub serving: Arc<Serving>,
    pub cfg: WorkerConfig,
    pub worker_name: String,
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// Keys of one job's results under one model version.
#[derive(Clone)]
struct Keys {
    prefix: String,
}

impl Keys {
    fn new(results_prefix: &str, job_id: &str, m: &Manifest) -> Keys {
        Keys {
            prefix: join_key(&[results_prefix, job_id, &m.name, &m.version]),
        }
    }
    fn result(&self) -> String {
        join_key(&[&self.prefix, "result.json"])
    }
    fn fhir(&self) -> String {
        join_key(&[&self.prefix, "diagnostic-report.json"])
    }
    fn heatmap(&self, image: usize, class: &str) -> String {
        join_key(&[
            &self.prefix,
            &format!("images/{image:03}/heatmap-{}.png", class_slug(class)),
        ])
    }
    fn raw(&self, image: usize) -> String {
        join_key(&[&self.prefix, &format!("images/{image:03}/cam.npy")])
    }
}

/// What fetching and preparing one image gave.
type PreparedImage = Result<Prepared, String>;

/// One image of a job: its index, URI, and what it has to render (or its error).
type JobImage<'a> = (
    usize,
    &'a String,
    Result<(&'a Prepared, &'a Graded), String>,
);

fn store_step(e: StoreError) -> Step {
    if e.is_retriable() {
        Step::Transient(e.to_string())
    } else {
        Step::Permanent(e.to_string())
    }
}

impl InferWorker {
    /// A usable job id for a message that could not be parsed.
    fn fallback_job_id(msg: &Incoming) -> String {
        match &msg.message_id {
            Some(id) if check_id("message_id", id).is_ok() => id.clone(),
            _ => format!(
                "unidentified-{}",
                &crate::hashing::sha256_hex(&msg.data)[..32]
            ),
        }
    }

    /// Writes `record` and its FHIR DiagnosticReport (under its job's keys; the
    /// record last, as the LIS reads it first) and announces it; a failure is
    /// transient.
    async fn write_and_announce(
        &self,
        mut record: ResultRecord,
        keys: &Keys,
        broker: &Broker,
    ) -> Result<(), String> {
        let home = {
            let stores = self.stores.clone();
            blocking(move || stores.home())
                .await
                .map_err(|e| e.to_string())?
        };
        let key = keys.result();
        let fhir_key = keys.fhir();
        record.result_uri = Some(home.uri(&key));
        record.fhir_report_uri = Some(home.uri(&fhir_key));
        record.worker = Some(self.worker_name.clone());
        let json = serde_json::to_vec_pretty(&record).expect("result serialises");
        let report = crate::result::fhir::diagnostic_report(
            &record,
            &crate::result::fhir::Systems::new(&self.cfg.fhir_system),
        );
        let report = serde_json::to_vec_pretty(&report).expect("report serialises");
        let put = {
            let json = json.clone();
            move || {
                home.put(&fhir_key, &report, "application/fhir+json")
                    .and_then(|()| home.put(&key, &json, "application/json"))
                    .map_err(|e| Step::Transient(e.to_string()))
            }
        };
        super::retrying(&self.cfg, "write result", put)
            .await
            .map_err(|s| s.text())?;
        let status = match record.status {
            ImageStatus::Ok => "ok",
            ImageStatus::Error => "error",
        };
        let id = format!(
            "{}:{}",
            record.job_id.as_deref().unwrap_or("-"),
            record.model.version
        );
        broker
            .publish_event(&format!("result.{status}"), &id, &json)
            .await
            .map_err(|e| format!("result event: {e}"))
    }

    /// Writes the error result of a job refused as a whole and dead-letters it.
    async fn refuse(
        &self,
        msg: &Incoming,
        job: Option<&JobMessage>,
        reason: String,
        broker: &Broker,
    ) -> Outcome {
        let model = self.serving.current();
        let m = model.manifest();
        let job_id = job
            .map(|j| j.job_id.clone())
            .unwrap_or_else(|| Self::fallback_job_id(msg));
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
        record.attempt = Some(msg.delivery_count + 1);
        let keys = Keys::new(&self.cfg.results_prefix, &job_id, m);
        match self.write_and_announce(record, &keys, broker).await {
            Ok(()) => Outcome::Rejected { reason },
            Err(e) => Outcome::Retry {
                reason: format!("cannot record the rejection ({reason}): {e}"),
            },
        }
    }

    async fn grade_job(&self, msg: Incoming, job: JobMessage, broker: Broker) -> Outcome {
        let received = msg.received;
        // The model: the served one, or the alias/version the job names.
        let model = match &job.model {
            None => self.serving.current(),
            Some(want) => {
                let serving = self.serving.clone();
                let want = want.clone();
                let get = move || {
                    serving.get(&want).map_err(|e| {
                        if e.is_retriable() {
                            Step::Transient(e.to_string())
                        } else {
                            Step::Permanent(e.to_string())
                        }
                    })
                };
                match super::retrying(&self.cfg, "load the requested model", get).await {
                    Ok(m) => m,
                    Err(Step::Permanent(e)) => {
                        return self.refuse(&msg, Some(&job), e, &broker).await
                    }
                    Err(Step::Transient(e)) => return Outcome::Retry { reason: e },
                }
            }
        };
        let m = model.manifest().clone();
        let keys = Keys::new(&self.cfg.results_prefix, &job.job_id, &m);

        // The slide's images in batches, so memory stays bounded however many
        // images a job has.
        let mut images = Vec::with_capacity(job.images.len());
        let (mut fetch_prepare_ms, mut infer_ms, mut upload_ms) = (0.0, 0.0, 0.0);
        let batch = self.cfg.batch_size.max(1);
        for (n, chunk) in job.images.chunks(batch).enumerate() {
            let done = match self
                .grade_batch(&model, &keys, n * batch, chunk.to_vec())
                .await
            {
                Ok(d) => d,
                Err(e) => return Outcome::Retry { reason: e.text() },
            };
            images.extend(done.images);
            fetch_prepare_ms += done.fetch_prepare_ms;
            infer_ms += done.infer_ms;
            upload_ms += done.upload_ms;
        }
        for i in &images {
            crate::observe::metrics().image_done(i.timings.as_ref(), i.predicted_class.as_deref());
        }
        let mut record = ResultRecord::new(
            Some(job.job_id.clone()),
            Some(job.slide_id.clone()),
            &m,
            model.provider(),
            images,
        );
        record.ids = ids(&job);
        record.attempt = Some(msg.delivery_count + 1);
        record.timings = Some(JobTimings {
            queue_wait_ms: msg.queue_wait_ms,
            fetch_prepare_ms,
            infer_ms,
            upload_ms,
            total_ms: ms(received),
        });
        let error = record.error.clone();
        if let Err(e) = self.write_and_announce(record, &keys, &broker).await {
            return Outcome::Retry { reason: e };
        }
        match error {
            None => {
                tracing::info!(
                    model = %m.version,
                    images = job.images.len(),
                    ms = ms(received),
                    "job graded"
                );
                Outcome::Done
            }
            Some(reason) => Outcome::Rejected { reason },
        }
    }
}

/// One batch of a job's images, graded and uploaded.
struct BatchDone {
    images: Vec<ImageResult>,
    fetch_prepare_ms: f64,
    infer_ms: f64,
    upload_ms: f64,
}

impl InferWorker {
    /// Fetches, prepares, grades and uploads `uris` (the job's images from
    /// index `first` on); transient failures are retried within the budget.
    async fn grade_batch(
        &self,
        model: &Arc<Model>,
        keys: &Keys,
        first: usize,
        uris: Vec<String>,
    ) -> Result<BatchDone, Step> {
        let t = Instant::now();
        let prepared = {
            let (stores, model, uris, limit) = (
                self.stores.clone(),
                model.clone(),
                uris.clone(),
                self.cfg.max_image_bytes,
            );
            let fetch = move || fetch_and_prepare(&stores, &model, &uris, limit);
            Arc::new(super::retrying(&self.cfg, "fetch images", fetch).await?)
        };
        let fetch_prepare_ms = ms(t);

        let t = Instant::now();
        let graded = {
            let (model, prepared) = (model.clone(), prepared.clone());
            let grade = move || {
                let ok: Vec<&Prepared> = prepared.iter().filter_map(|p| p.as_ref().ok()).collect();
                model.grade(&ok).map_err(|e| Step::Transient(e.to_string()))
            };
            Arc::new(super::retrying(&self.cfg, "inference", grade).await?)
        };
        let infer_ms = ms(t);

        let t = Instant::now();
        let images = {
            let (stores, model, keys) = (self.stores.clone(), model.clone(), keys.clone());
            let upload =
                move || upload_artifacts(&stores, &model, &keys, first, &uris, &prepared, &graded);
            super::retrying(&self.cfg, "upload heatmaps", upload).await?
        };
        Ok(BatchDone {
            images,
            fetch_prepare_ms,
            infer_ms,
            upload_ms: ms(t),
        })
    }
}

fn ids(job: &JobMessage) -> JobIds {
    JobIds {
        accession_id: job.accession_id.clone(),
        patient_id: job.patient_id.clone(),
        specimen_id: job.specimen_id.clone(),
    }
}

/// Downloads and prepares each image; a transient store failure fails the whole
/// step (so it is retried), anything else is that image's permanent error.
fn fetch_and_prepare(
    stores: &Stores,
    model: &Model,
    uris: &[String],
    limit: u64,
) -> Result<Vec<PreparedImage>, Step> {
    uris.par_iter()
        .map(|uri| {
            let t = Instant::now();
            let bytes = match stores.get_uri(uri, limit) {
                Ok(b) => b,
                Err(e) if e.is_retriable() => return Err(store_step(e)),
                Err(e) => return Ok(Err(e.to_string())),
            };
            let fetch_ms = ms(t);
            Ok(model
                .prepare(&bytes)
                .map(|mut p| {
                    p.timings.fetch_ms = fetch_ms;
                    p
                })
                .map_err(|e| e.to_string()))
        })
        .collect()
}

/// Renders and uploads each graded image's overlays and raw map; returns the
/// per-image results in job order (`first`: the job index of `uris[0]`).
fn upload_artifacts(
    stores: &Stores,
    model: &Model,
    keys: &Keys,
    first: usize,
    uris: &[String],
    prepared: &[PreparedImage],
    graded: &[Graded],
) -> Result<Vec<ImageResult>, Step> {
    let home = stores.home().map_err(store_step)?;
    let m = model.manifest();
    let mut graded_iter = graded.iter();
    let pairs: Vec<JobImage> = uris
        .iter()
        .zip(prepared)
        .enumerate()
        .map(|(i, (uri, p))| (first + i, uri, p))
        .map(|(i, uri, p)| match p {
            Ok(p) => (
                i,
                uri,
                Ok((p, graded_iter.next().expect("one grade per prepared image"))),
            ),
            Err(e) => (i, uri, Err(e.clone())),
        })
        .collect();
    pairs
        .into_par_iter()
        .map(|(i, uri, r)| {
            let (p, g) = match r {
                Ok(x) => x,
                Err(e) => return Ok(ImageResult::failed(uri.clone(), None, e)),
            };
            let t = Instant::now();
            let art = render_artifacts(p, g, m);
            let put = |key: &str, bytes: &[u8], ct: &str| {
                home.put(key, bytes, ct)
                    .map_err(|e| Step::Transient(e.to_string()))
            };
            let mut heatmaps = Vec::new();
            for h in &art.heatmaps {
                let key = keys.heatmap(i, &h.class);
                put(&key, &h.png, "image/png")?;
                heatmaps.push(HeatmapRef {
                    class: h.class.clone(),
                    overlay: home.uri(&key),
                    scale: h.scale,
                });
            }
            let raw = keys.raw(i);
            put(&raw, &art.raw_npy, "application/octet-stream")?;
            let mut result = ImageResult::graded(
                uri.clone(),
                p,
                g,
                m,
                heatmaps,
                RawMapRef {
                    uri: home.uri(&raw),
                    shape: art.raw_shape,
                    units: "logit".into(),
                },
            );
            if let Some(t2) = result.timings.as_mut() {
                t2.upload_ms = ms(t);
            }
            Ok(result)
        })
        .collect()
}

impl Handler for InferWorker {
    async fn handle(self: Arc<Self>, msg: Incoming, broker: Broker) -> Outcome {
        let job = match JobMessage::parse(&msg.data) {
            Ok(j) => j,
            Err(e) => {
                let id = Self::fallback_job_id(&msg);
                let span = tracing::info_span!("job", job_id = %id);
                return self
                    .refuse(&msg, None, e.to_string(), &broker)
                    .instrument(span)
                    .await;
            }
        };
        let span = tracing::info_span!("job", job_id = %job.job_id, slide_id = %job.slide_id);
        self.grade_job(msg, job, broker).instrument(span).await
    }

    async fn poison(self: Arc<Self>, msg: Incoming, reason: String, broker: Broker) -> Outcome {
        let job = JobMessage::parse(&msg.data).ok();
        let id = job
            .as_ref()
            .map(|j| j.job_id.clone())
            .unwrap_or_else(|| Self::fallback_job_id(&msg));
        let span = tracing::info_span!("job", job_id = %id);
        self.refuse(&msg, job.as_ref(), reason, &broker)
            .instrument(span)
            .await
    }
}

/// Polls the registry alias and switches models between jobs.
pub async fn follow_alias(serving: Arc<Serving>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let s = serving.clone();
        match tokio::task::spawn_blocking(move || s.refresh()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) if e.is_retriable() => {
                tracing::warn!(error = %e, "cannot check the model alias; will try again")
            }
            Ok(Err(_)) => {} // logged once by refresh
            Err(e) => tracing::error!(error = %e, "model refresh panicked"),
        }
    }
}
