//! The JSON messages on the broker (docs/storage-and-broker.md, "Broker", and docs/results.md, "Result record"), each versioned by its
//! `schema` field and documented as JSON Schema in `src/queue/schemas/`, for
//! publishers written in any language.

use serde::{Deserialize, Serialize};

/// Schema tag of an inference job.
pub const JOB_SCHEMA: &str = "cinflow.job/v1";
/// Schema tag of a training job.
pub const TRAIN_SCHEMA: &str = "cinflow.train/v1";
/// Largest promotion margin a training job may ask for (a margin on macro AUC;
/// negative ones would promote a worse model).
pub const MAX_PROMOTION_MARGIN: f64 = 0.5;

/// Why a message cannot be processed; the text goes into the dead-letter header.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MessageError {
    #[error("message is not valid JSON: {0}")]
    Json(String),
    #[error("message schema is {found:?}, expected {expected:?}")]
    Schema {
        found: Option<String>,
        expected: &'static str,
    },
    #[error("field {field:?}: {reason}")]
    Field { field: String, reason: String },
    #[error("message is {bytes} bytes; at most {limit} are accepted (--max-message-bytes)")]
    TooLarge { bytes: usize, limit: usize },
}

fn field(field: &str, reason: impl Into<String>) -> MessageError {
    MessageError::Field {
        field: field.to_string(),
        reason: reason.into(),
    }
}

/// An inference job: grade the images of one slide (`cinflow.job/v1`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobMessage {
    pub schema: String,
    /// Unique id; also the AMQP `message_id`.
    pub job_id: String,
    pub slide_id: String,
    /// `s3://bucket/key` URIs of the slide's images.
    pub images: Vec<String>,
    /// Registry alias or version to grade with (default: the worker's alias).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accession_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patient_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub specimen_id: Option<String>,
}

/// A training job (`cinflow.train/v1`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainMessage {
    pub schema: String,
    pub job_id: String,
    /// `s3://` URI of the labels manifest (path or uri, label, patient_id).
    pub labels: String,
    /// Model name in the registry (its `current` version is the one to beat).
    pub model: String,
    /// Registry version whose backbone to use (default: the current one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_version: Option<String>,
    /// Overrides of the training hyper-parameters, by name (`learning_rate`, `max_epochs`, ...).
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub hyper_parameters: serde_json::Map<String, serde_json::Value>,
    /// Promotion margin on macro AUC (default: the worker's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promotion_margin: Option<f64>,
}

fn schema_of(bytes: &[u8], expected: &'static str) -> Result<serde_json::Value, MessageError> {
    let v: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| MessageError::Json(e.to_string()))?;
    let found = v.get("schema").and_then(|s| s.as_str()).map(str::to_string);
    if found.as_deref() != Some(expected) {
        return Err(MessageError::Schema { found, expected });
    }
    Ok(v)
}

/// Checks an identifier (job, slide, model): 1-200 letters, digits, `.`, `_`,
/// `-` or `:`, and not `.`, `..` or any other run of dots alone (ids become
/// object key segments, where those name folders).
pub fn check_id(name: &str, v: &str) -> Result<(), MessageError> {
    if v.trim().is_empty() {
        return Err(field(name, "must not be empty"));
    }
    if v.chars().all(|c| c == '.') {
        return Err(field(
            name,
            format!("{v:?} cannot be an object key segment ('.' and '..' name folders)"),
        ));
    }
    if v.len() > 200
        || !v
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-:".contains(c))
    {
        return Err(field(
            name,
            format!("{v:?} must be at most 200 letters, digits, '.', '_', '-' or ':'"),
        ));
    }
    Ok(())
}

/// Checks an `s3://bucket/key` URI.
pub fn check_s3_uri(name: &str, uri: &str) -> Result<(), MessageError> {
    match uri.strip_prefix("s3://").and_then(|r| r.split_once('/')) {
        Some((bucket, key)) if !bucket.is_empty() && !key.is_empty() => {
            crate::storage::check_key(key).map_err(|e| field(name, e.to_string()))
        }
        _ => Err(field(
            name,
            format!("{uri:?} is not an s3://bucket/key URI"),
        )),
    }
}

/// What a worker accepts beyond a message's own rules: its size, and the
/// buckets a job may make the worker read (the worker's credentials reach
/// further than the publisher's should).
#[derive(Debug, Clone, PartialEq)]
pub struct Admission {
    /// Largest message body accepted, in bytes.
    pub max_message_bytes: usize,
    /// Buckets that image and label URIs may name.
    pub allowed_buckets: Vec<String>,
}

impl Admission {
    /// Parses and validates an inference job against the worker's limits.
    pub fn job(&self, bytes: &[u8]) -> Result<JobMessage, MessageError> {
        self.check_size(bytes)?;
        let job = JobMessage::parse(bytes)?;
        for (i, uri) in job.images.iter().enumerate() {
            self.check_bucket(&format!("images[{i}]"), uri)?;
        }
        Ok(job)
    }

    /// Parses and validates a training job against the worker's limits.
    pub fn train(&self, bytes: &[u8]) -> Result<TrainMessage, MessageError> {
        self.check_size(bytes)?;
        let job = TrainMessage::parse(bytes)?;
        self.check_bucket("labels", &job.labels)?;
        Ok(job)
    }

    fn check_size(&self, bytes: &[u8]) -> Result<(), MessageError> {
        if bytes.len() > self.max_message_bytes {
            return Err(MessageError::TooLarge {
                bytes: bytes.len(),
                limit: self.max_message_bytes,
            });
        }
        Ok(())
    }

    fn check_bucket(&self, name: &str, uri: &str) -> Result<(), MessageError> {
        let bucket = uri
            .strip_prefix("s3://")
            .and_then(|r| r.split('/').next())
            .unwrap_or_default();
        if self.allowed_buckets.iter().any(|b| b == bucket) {
            return Ok(());
        }
        Err(field(
            name,
            format!(
                "bucket {bucket:?} is not one this worker may read (--allowed-buckets: {})",
                self.allowed_buckets.join(", ")
            ),
        ))
    }
}

impl JobMessage {
    /// Parses and validates a job; every rejection names the problem.
    pub fn parse(bytes: &[u8]) -> Result<JobMessage, MessageError> {
        let v = schema_of(bytes, JOB_SCHEMA)?;
        let job: JobMessage = typed(v)?;
        job.validate()?;
        Ok(job)
    }

    pub fn validate(&self) -> Result<(), MessageError> {
        check_id("job_id", &self.job_id)?;
        check_id("slide_id", &self.slide_id)?;
        if self.images.is_empty() {
            return Err(field("images", "a job needs at least one image"));
        }
        if self.images.len() > 1000 {
            return Err(field(
                "images",
                format!("{} images; at most 1000 per job", self.images.len()),
            ));
        }
        for (i, uri) in self.images.iter().enumerate() {
            check_s3_uri(&format!("images[{i}]"), uri)?;
        }
        Ok(())
    }
}

impl TrainMessage {
    /// Parses and validates a training job.
    pub fn parse(bytes: &[u8]) -> Result<TrainMessage, MessageError> {
        let v = schema_of(bytes, TRAIN_SCHEMA)?;
        let job: TrainMessage = typed(v)?;
        check_id("job_id", &job.job_id)?;
        check_id("model", &job.model)?;
        check_s3_uri("labels", &job.labels)?;
        if let Some(m) = job.promotion_margin {
            if !(0.0..=MAX_PROMOTION_MARGIN).contains(&m) {
                return Err(field(
                    "promotion_margin",
                    format!("{m} is out of range: a margin on macro AUC from 0 to {MAX_PROMOTION_MARGIN}"),
                ));
            }
        }
        Ok(job)
    }
}

/// The message as a typed struct; a wrong type names its field
/// (`job_id: invalid type: integer `7`, expected a string`).
fn typed<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Result<T, MessageError> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        MessageError::Json(if path == "." {
            inner.to_string()
        } else {
            format!("{path}: {inner}")
        })
    })
}

/// A fresh job id: 32 random hex digits.
pub fn new_job_id() -> String {
    let bytes: [u8; 16] = rand::random();
    hex::encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(images: &[&str]) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "schema": JOB_SCHEMA, "job_id": "j1", "slide_id": "s1", "images": images,
        }))
        .unwrap()
    }

    #[test]
    fn jobs_are_validated_with_readable_reasons() {
        let j = JobMessage::parse(&job(&["s3://b/slides/a.jpg"])).unwrap();
        assert_eq!((j.job_id.as_str(), j.images.len()), ("j1", 1));
        let e = |b: &[u8]| JobMessage::parse(b).unwrap_err().to_string();
        assert!(e(b"{not json").contains("not valid JSON"));
        assert!(e(br#"{"schema":"cinflow.job/v9"}"#).contains("expected \"cinflow.job/v1\""));
        assert!(e(&job(&[])).contains("at least one image"));
        assert!(e(&job(&["/local/a.jpg"])).contains("images[0]"));
        assert!(e(&job(&["s3://b/../etc/passwd"])).contains("images[0]"));
        let no_slide = br#"{"schema":"cinflow.job/v1","job_id":"j","images":["s3://b/k"]}"#;
        assert!(e(no_slide).contains("slide_id"));
        let wrong_type =
            br#"{"schema":"cinflow.job/v1","job_id":7,"slide_id":"s","images":["s3://b/k"]}"#;
        assert!(
            e(wrong_type).contains("job_id: invalid type"),
            "{}",
            e(wrong_type)
        );
        for id in [".", "..", "..."] {
            let dots = serde_json::json!({"schema": JOB_SCHEMA, "job_id": id, "slide_id": "s", "images": ["s3://b/k"]});
            let e = e(&serde_json::to_vec(&dots).unwrap());
            assert!(e.contains("job_id") && e.contains("object key"), "{e}");
        }
        assert!(check_id("job_id", "a.b..c").is_ok());
    }

    #[test]
    fn admission_limits_size_and_buckets() {
        let a = Admission {
            max_message_bytes: 200,
            allowed_buckets: vec!["lab".into(), "scans".into()],
        };
        assert!(a.job(&job(&["s3://lab/a.jpg", "s3://scans/b.jpg"])).is_ok());
        let e = a
            .job(&job(&["s3://lab/a.jpg", "s3://other/b.jpg"]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("images[1]") && e.contains("\"other\"") && e.contains("lab, scans"),
            "{e}"
        );
        let big: Vec<String> = (0..20).map(|i| format!("s3://lab/{i}.jpg")).collect();
        let big: Vec<&str> = big.iter().map(String::as_str).collect();
        let e = a.job(&job(&big)).unwrap_err().to_string();
        assert!(
            e.contains("at most 200") && e.contains("--max-message-bytes"),
            "{e}"
        );
        let t = serde_json::json!({"schema": TRAIN_SCHEMA, "job_id": "t", "labels": "s3://other/l.csv", "model": "m"});
        let e = a
            .train(&serde_json::to_vec(&t).unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("labels") && e.contains("other"), "{e}");
    }

    #[test]
    fn the_json_schema_examples_are_accepted() {
        for (text, train) in [
            (include_str!("schemas/job.v1.schema.json"), false),
            (include_str!("schemas/train.v1.schema.json"), true),
        ] {
            let schema: serde_json::Value = serde_json::from_str(text).unwrap();
            for ex in schema["examples"].as_array().unwrap() {
                let bytes = serde_json::to_vec(ex).unwrap();
                if train {
                    TrainMessage::parse(&bytes).unwrap();
                } else {
                    JobMessage::parse(&bytes).unwrap();
                }
            }
            let required: Vec<&str> = schema["required"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap())
                .collect();
            assert!(required.contains(&"schema") && required.contains(&"job_id"));
        }
    }

    #[test]
    fn train_jobs_are_validated() {
        let ok = serde_json::json!({"schema": TRAIN_SCHEMA, "job_id": "t1", "labels": "s3://b/labels.csv", "model": "cin4",
            "hyper_parameters": {"max_epochs": 5}});
        let t = TrainMessage::parse(&serde_json::to_vec(&ok).unwrap()).unwrap();
        assert_eq!(t.hyper_parameters["max_epochs"], 5);
        let bad = serde_json::json!({"schema": TRAIN_SCHEMA, "job_id": "t1", "labels": "labels.csv", "model": "cin4"});
        let e = TrainMessage::parse(&serde_json::to_vec(&bad).unwrap()).unwrap_err();
        assert!(e.to_string().contains("labels"), "{e}");
        for m in [-0.1, 0.7] {
            let bad = serde_json::json!({"schema": TRAIN_SCHEMA, "job_id": "t1", "labels": "s3://b/l.csv", "model": "cin4", "promotion_margin": m});
            let e = TrainMessage::parse(&serde_json::to_vec(&bad).unwrap()).unwrap_err();
            assert!(
                e.to_string().contains("promotion_margin")
                    && e.to_string().contains("out of range"),
                "{e}"
            );
        }
        assert_eq!(new_job_id().len(), 32);
    }
}
