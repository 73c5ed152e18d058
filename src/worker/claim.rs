//! One result per job: the claim.
//!
//! The first delivery of a job writes `results/<job_id>/claim.json`: the hash
//! of the job's content and the model version that grades it. Every later
//! delivery of the same job id reads it first:
//! - a different content under the same id is a duplicate job id: the message
//!   is dead-lettered and nothing is written (the stored result stays as it is);
//! - the same content is graded by the claimed version, whatever the alias
//!   points at now, so a redelivery after a hot model switch rewrites the same
//!   result set instead of making a second one under the new version;
//! - if that version's result is already complete, it is announced again and
//!   the message acked, without grading anything.
//!
//! Two deliveries of one job never run at once from one queue (the broker hands
//! a message to one consumer at a time, and a worker that loses its
//! connection stops its jobs). Two *copies* of one job published twice can
//! race; after writing its claim a worker reads it back and follows the one
//! that landed, which narrows that window to the moment between the two
//! writes.

use serde::{Deserialize, Serialize};

use super::error::JobError;
use super::stores::Stores;
use crate::queue::messages::JobMessage;
use crate::retry::RetryPolicy;
use crate::storage::join_key;

/// Schema tag of a claim.
pub const CLAIM_SCHEMA: &str = "cinflow.claim/v1";

/// Which model version owns a job id, and for what content.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Claim {
    pub schema: String,
    pub job_id: String,
    /// SHA-256 of the job's content ([`content_sha256`]).
    pub content_sha256: String,
    /// Model name in the registry.
    pub model: String,
    /// The version every delivery of the job is graded with.
    pub version: String,
    pub claimed_at: String,
    pub worker: String,
}

/// The hash that tells two messages of one job id apart: of the job as parsed
/// (so formatting and field order do not matter), or of the raw bytes when
/// the message could not be parsed.
pub fn content_sha256(job: Option<&JobMessage>, raw: &[u8]) -> String {
    match job {
        Some(j) => crate::hashing::sha256_hex(&serde_json::to_vec(j).expect("job serialises")),
        None => crate::hashing::sha256_hex(raw),
    }
}

/// The key of a job's claim.
pub fn claim_key(results_prefix: &str, job_id: &str) -> String {
    join_key(&[results_prefix, job_id, "claim.json"])
}

/// The reason a message reusing a job id with other content is refused.
pub fn duplicate_reason(job_id: &str, claim: &Claim) -> String {
    format!(
        "duplicate job_id with different content: job {job_id} was already received with other content (graded by {} {}); the stored result is left untouched; publish the new job with a new job_id",
        claim.model, claim.version
    )
}

/// Reads and writes claims in the worker's bucket.
#[derive(Debug, Clone, Copy)]
pub struct Claims<'a> {
    pub stores: &'a Stores,
    pub retry: RetryPolicy,
    pub results_prefix: &'a str,
}

impl Claims<'_> {
    /// The claim on `job_id`, if a delivery made one.
    pub async fn read(&self, job_id: &str) -> Result<Option<Claim>, JobError> {
        let key = claim_key(self.results_prefix, job_id);
        let bytes = self
            .retry
            .run("read claim", || self.stores.find(&key))
            .await
            .map_err(|e| JobError::from(e).during("read the job's claim"))?;
        match bytes {
            None => Ok(None),
            Some(b) => serde_json::from_slice(&b).map(Some).map_err(|e| {
                JobError::Invalid(format!(
                    "the claim {} is not a cinflow claim ({e}); remove it to grade the job again",
                    self.stores.uri(&key)
                ))
            }),
        }
    }

    /// Writes `claim` and returns the one stored after the write (another
    /// worker's, if it wrote last).
    pub async fn write(&self, claim: &Claim) -> Result<Claim, JobError> {
        let key = claim_key(self.results_prefix, &claim.job_id);
        let bytes = bytes::Bytes::from(serde_json::to_vec_pretty(claim).expect("claim serialises"));
        self.retry
            .run("write claim", || {
                self.stores.put(&key, bytes.clone(), "application/json")
            })
            .await
            .map_err(|e| JobError::from(e).during("write the job's claim"))?;
        Ok(self
            .read(&claim.job_id)
            .await?
            .unwrap_or_else(|| claim.clone()))
    }
}

impl Claim {
    pub fn new(
        job_id: &str,
        content_sha256: String,
        model: &str,
        version: &str,
        worker: &str,
    ) -> Claim {
        Claim {
            schema: CLAIM_SCHEMA.into(),
            job_id: job_id.into(),
            content_sha256,
            model: model.into(),
            version: version.into(),
            claimed_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            worker: worker.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_ignores_formatting_but_not_fields() {
        let a = br#"{"schema":"cinflow.job/v1","job_id":"j","slide_id":"s","images":["s3://b/k"]}"#;
        let b = br#"{ "images": ["s3://b/k"], "slide_id": "s", "job_id": "j", "schema": "cinflow.job/v1" }"#;
        let c =
            br#"{"schema":"cinflow.job/v1","job_id":"j","slide_id":"s","images":["s3://b/k2"]}"#;
        let h = |raw: &[u8]| content_sha256(JobMessage::parse(raw).ok().as_ref(), raw);
        assert_eq!(h(a), h(b));
        assert_ne!(h(a), h(c));
        assert_ne!(h(b"not json"), h(b"not json either"));
        assert_eq!(claim_key("results", "j"), "results/j/claim.json");
    }
}
