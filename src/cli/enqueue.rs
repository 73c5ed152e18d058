//! `cinflow enqueue` and `cinflow enqueue-train`: publish jobs with confirms and
//! print their ids (what scanners' upload hooks and the nightly CronJob run).

use std::path::PathBuf;

use anyhow::Context;

use super::exit::{Exit, Input, Usage};

use crate::queue::enqueue::{group_into_jobs, publish_jobs, publish_train, Grouping};
use crate::queue::messages::{check_s3_uri, new_job_id, TrainMessage, TRAIN_SCHEMA};
use crate::queue::AmqpConfig;
use crate::storage::{ObjectStore, S3Config, S3Store};

#[derive(Debug, Clone, clap::Args)]
pub struct EnqueueArgs {
    /// Image URIs (s3://bucket/key).
    pub images: Vec<String>,
    /// A file with one image URI per line (blank lines and # comments ignored).
    #[arg(long)]
    pub list: Option<PathBuf>,
    /// Every image under this s3://bucket/prefix.
    #[arg(long)]
    pub prefix: Option<String>,
    /// How images become slides: one slide per folder, or per image.
    #[arg(long, env = "CINFLOW_ENQUEUE_GROUP", default_value = "folder")]
    pub group: Grouping,
    /// Registry version to grade with, or an alias that names one (default:
    /// the version the workers' alias points at when they take the job).
    #[arg(long, value_name = "VERSION_OR_ALIAS")]
    pub model_version: Option<String>,
    /// LIS accession (order) id of the slide, carried into the result and the
    /// FHIR report (only when the images make one slide).
    #[arg(long)]
    pub accession_id: Option<String>,
    /// LIS patient id of the slide (one slide only).
    #[arg(long)]
    pub patient_id: Option<String>,
    /// LIS specimen id of the slide (one slide only).
    #[arg(long)]
    pub specimen_id: Option<String>,
    #[command(flatten)]
    pub amqp: AmqpConfig,
    #[command(flatten)]
    pub s3: S3Config,
}

#[derive(Debug, Clone, clap::Args)]
pub struct EnqueueTrainArgs {
    /// s3:// URI of the labels manifest (path or uri, label, patient_id).
    #[arg(long, env = "CINFLOW_TRAIN_LABELS")]
    pub labels: String,
    /// Model name in the registry (`models/<name>/` in the bucket).
    #[arg(long, env = "CINFLOW_MODEL_NAME", value_name = "NAME")]
    pub model_name: String,
    /// Registry version whose backbone to use (default: the current one's).
    #[arg(long)]
    pub base_version: Option<String>,
    /// Hyper-parameter override as NAME=VALUE (JSON value), repeatable: --set max_epochs=100.
    #[arg(long = "set", value_parser = parse_override)]
    pub overrides: Vec<(String, serde_json::Value)>,
    /// Promotion margin on macro AUC (default: the worker's).
    #[arg(long)]
    pub promotion_margin: Option<f64>,
    #[command(flatten)]
    pub amqp: AmqpConfig,
}

fn parse_override(s: &str) -> Result<(String, serde_json::Value), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not NAME=VALUE"))?;
    let value = serde_json::from_str(v).unwrap_or_else(|_| serde_json::Value::String(v.into()));
    Ok((k.trim().to_string(), value))
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// Collects the URIs from arguments, the list file and the S3 prefix.
fn collect(a: &EnqueueArgs) -> anyhow::Result<Vec<String>> {
    let mut uris = a.images.clone();
    if let Some(list) = &a.list {
        let text = std::fs::read_to_string(list)
            .with_context(|| format!("cannot read {}", list.display()))?;
        uris.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_string),
        );
    }
    if let Some(prefix) = &a.prefix {
        let (bucket, key_prefix) = crate::storage::split_s3_prefix(prefix)
            .ok_or_else(|| Usage(format!("--prefix {prefix:?} is not s3://bucket/prefix")))?;
        let store = S3Store::new(&S3Config {
            bucket: bucket.to_string(),
            ..a.s3.clone()
        })?;
        let found: Vec<String> = store
            .list(key_prefix)?
            .into_iter()
            .filter(|k| crate::local::inputs::is_image_key(k))
            .map(|k| format!("s3://{bucket}/{k}"))
            .collect();
        if found.is_empty() {
            return Err(Input(format!("no images under {prefix}")).into());
        }
        uris.extend(found);
    }
    if uris.is_empty() {
        return Err(Usage("no images given (arguments, --list or --prefix)".into()).into());
    }
    for (i, u) in uris.iter().enumerate() {
        check_s3_uri(&format!("image {}", i + 1), u)?;
    }
    Ok(uris)
}

pub(super) fn enqueue(a: &EnqueueArgs) -> anyhow::Result<Exit> {
    let uris = collect(a)?;
    let mut jobs = group_into_jobs(&uris, a.group, a.model_version.as_deref());
    if a.accession_id.is_some() || a.patient_id.is_some() || a.specimen_id.is_some() {
        if jobs.len() != 1 {
            return Err(Usage(format!(
                "--accession-id/--patient-id/--specimen-id name one slide, but the images make {} slides",
                jobs.len()
            ))
            .into());
        }
        jobs[0].accession_id = a.accession_id.clone();
        jobs[0].patient_id = a.patient_id.clone();
        jobs[0].specimen_id = a.specimen_id.clone();
    }
    let ids = runtime()?.block_on(publish_jobs(&a.amqp, &jobs))?;
    for (id, job) in ids.iter().zip(&jobs) {
        println!("{id}\t{}\t{} image(s)", job.slide_id, job.images.len());
    }
    eprintln!(
        "published {} job(s) of {} image(s) to {}",
        ids.len(),
        uris.len(),
        a.amqp.jobs_exchange
    );
    Ok(Exit::Success)
}

pub(super) fn enqueue_train(a: &EnqueueTrainArgs) -> anyhow::Result<Exit> {
    let job = TrainMessage {
        schema: TRAIN_SCHEMA.into(),
        job_id: new_job_id(),
        labels: a.labels.clone(),
        model: a.model_name.clone(),
        base_version: a.base_version.clone(),
        hyper_parameters: a.overrides.iter().cloned().collect(),
        promotion_margin: a.promotion_margin,
    };
    // Validate exactly as the worker will, before anything is published.
    TrainMessage::parse(&serde_json::to_vec(&job)?)?;
    runtime()?.block_on(publish_train(&a.amqp, &job))?;
    println!("{}", job.job_id);
    Ok(Exit::Success)
}
