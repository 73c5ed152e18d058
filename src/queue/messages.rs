//! The JSON messages on the broker (README.md, "Broker" and "Result record"), each versioned by its
//! `schema` field and documented as JSON Schema in `src/queue/schemas/`, for
//! publishers written in any language.

use serde::{Deserialize, Serialize};

/// Schema tag of an inference job.
pub const JOB_SCHEMA: &str = "cinflow.job/v1";
/// Schema tag of a training job.
pub const TRAIN_SCHEMA: &str = "cinflow.train/v1";

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

/// Checks an identifier (job, slide, model): 1-200 letters, digits, `.`, `_`, `-` or `:`.
pub fn check_id(name: &str, v: &str) -> Result<(), MessageError> {
    if v.trim().is_empty() {
        return Err(field(name, "must not be empty"));
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
            if !m.is_finite() {
                return Err(field("promotion_margin", "must be a number"));
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
        assert_eq!(new_job_id().len(), 32);
    }
}
