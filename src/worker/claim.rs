//! One result per job: the claim.
//!
//! The first delivery of a job writes `results/<job_id>/claim.json`: the hash
//! of the job's content and the model version that grades it, named as the
//! worker serves it (the registry's model name and version, whatever name the
//! bundle's manifest carries). Every later delivery of the same job id reads
//! it first:
//! - a different content under the same id is a duplicate job id: the message
//!   is dead-lettered and nothing is written (the stored result stays as it is);
//! - the same content is graded by the claimed version, whatever the alias
//!   points at now, so a redelivery after a hot model switch rewrites the same
//!   result set instead of making a second one under the new version;
//! - if that version's result is already complete, it is announced again and
//!   the message acked, without grading anything.
//!
//! Two copies of one job never run at once: each delivery holds the job's
//! broker lease ([`crate::queue::lease`]) while it reads or writes the claim
//! and grades, and a copy that finds the lease taken waits in the delay queue.
//! On a store that honours `If-None-Match: *` (checked by a probe when the
//! worker starts, [`crate::storage::S3Client::conditional_writes`]) the
//! claim is moreover created only if absent, so even a worker on another
//! broker can never replace it.

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
    /// Model name in the registry the workers serve from (claims made
    /// before release 3 may carry the bundle manifest's name instead).
    pub model: String,
    /// The version every delivery of the job is graded with.
    pub version: String,
    pub claimed_at: String,
    pub worker: String,
}

/// The hash that tells two messages of one job id apart: of the message's
/// JSON in a canonical form (keys sorted at every level, no whitespace), so
/// that neither formatting nor field order matters, whichever serialiser the
/// publisher used and whether or not the message passed admission; of the
/// raw bytes when the message is not JSON.
pub fn content_sha256(raw: &[u8]) -> String {
    match serde_json::from_slice::<serde_json::Value>(raw) {
        Ok(v) => {
            let mut out = Vec::with_capacity(raw.len());
            canonical(&v, &mut out);
            crate::hashing::sha256_hex(&out)
        }
        Err(_) => crate::hashing::sha256_hex(raw),
    }
}

/// The content hash claims carried before [`content_sha256`]: of the job as
/// this release parses and serialises it. Accepted when comparing, so a job
/// claimed before an upgrade is not taken for a duplicate after it.
pub fn legacy_content_sha256(job: &JobMessage) -> String {
    crate::hashing::sha256_hex(&serde_json::to_vec(job).expect("job serialises"))
}

/// Writes `v` as compact JSON with every object's keys sorted.
fn canonical(v: &serde_json::Value, out: &mut Vec<u8>) {
    use serde_json::Value;
    match v {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push(b'{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend(serde_json::to_vec(k).expect("a key serialises"));
                out.push(b':');
                canonical(&map[k], out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                canonical(item, out);
            }
            out.push(b']');
        }
        scalar => out.extend(serde_json::to_vec(scalar).expect("a value serialises")),
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
    /// The store honours `If-None-Match: *`: claims are created only if absent.
    pub conditional: bool,
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

    /// Writes `claim` unless one exists and returns the one stored after
    /// the write (another worker's, if it came first). The caller holds the
    /// job's lease; on a store with conditional writes the claim is created
    /// only if absent besides.
    pub async fn write(&self, claim: &Claim) -> Result<Claim, JobError> {
        let key = claim_key(self.results_prefix, &claim.job_id);
        let bytes = bytes::Bytes::from(serde_json::to_vec_pretty(claim).expect("claim serialises"));
        if self.conditional {
            let created = self
                .retry
                .run("create claim", || {
                    self.stores
                        .put_if_absent(&key, bytes.clone(), "application/json")
                })
                .await
                .map_err(|e| JobError::from(e).during("write the job's claim"))?;
            if created {
                return Ok(claim.clone());
            }
        } else {
            self.retry
                .run("write claim", || {
                    self.stores.put(&key, bytes.clone(), "application/json")
                })
                .await
                .map_err(|e| JobError::from(e).during("write the job's claim"))?;
        }
        Ok(self
            .read(&claim.job_id)
            .await?
            .unwrap_or_else(|| claim.clone()))
    }

    /// Whether `claim` was made for a message with content `content`
    /// (`legacy`: the hash claims carried before [`content_sha256`]).
    pub fn same_content(claim: &Claim, content: &str, legacy: Option<&str>) -> bool {
        claim.content_sha256 == content || legacy == Some(claim.content_sha256.as_str())
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
        assert_eq!(content_sha256(a), content_sha256(b));
        assert_ne!(content_sha256(a), content_sha256(c));
        assert_ne!(
            content_sha256(b"not json"),
            content_sha256(b"not json either")
        );
        assert_eq!(claim_key("results", "j"), "results/j/claim.json");
    }

    #[test]
    fn content_is_the_same_for_python_json_dumps_and_nested_objects() {
        // What Python's json.dumps writes (", " and ": " separators, escaped
        // non-ASCII), against serde_json's compact form with other key order.
        let python = br#"{"job_id": "j", "slide_id": "caf\u00e9", "images": ["s3://b/k"], "x": {"b": 1, "a": [2.5, null]}}"#;
        let rust = "{\"x\":{\"a\":[2.5,null],\"b\":1},\"images\":[\"s3://b/k\"],\"slide_id\":\"caf\u{e9}\",\"job_id\":\"j\"}";
        assert_eq!(content_sha256(python), content_sha256(rust.as_bytes()));
        let mut out = Vec::new();
        canonical(&serde_json::from_slice(python).unwrap(), &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "{\"images\":[\"s3://b/k\"],\"job_id\":\"j\",\"slide_id\":\"caf\u{e9}\",\"x\":{\"a\":[2.5,null],\"b\":1}}"
        );
    }
}
