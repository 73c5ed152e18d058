//! Stage 5, put: async S3 PUTs into the worker's bucket. Every object is
//! retried by itself with the bytes already rendered, so a failed PUT never
//! re-renders anything or re-sends the objects that landed. The result record
//! is written last, after the FHIR report and the viewer page, because the LIS
//! reads it first.

use std::sync::Arc;

use bytes::Bytes;

use super::keys::Keys;
use super::stores::Stores;
use crate::pipeline::Rendered;
use crate::retry::RetryPolicy;
use crate::storage::StoreError;

/// Uploads a job's objects.
#[derive(Debug)]
pub struct Putter {
    pub stores: Arc<Stores>,
    pub retry: RetryPolicy,
}

impl Putter {
    /// Writes one object, retrying transient failures.
    pub async fn put(&self, key: &str, bytes: Bytes, content_type: &str) -> Result<(), StoreError> {
        self.retry
            .run("put", || self.stores.put(key, bytes.clone(), content_type))
            .await?;
        crate::observe::health().progress();
        Ok(())
    }

    /// Writes the artifacts of the job's image `image`, all at once.
    pub async fn put_image(
        &self,
        keys: &Keys,
        image: usize,
        rendered: &Rendered,
    ) -> Result<(), StoreError> {
        futures_util::future::try_join_all(rendered.artifacts.iter().map(|a| {
            let key = keys.artifact(image, &a.name);
            async move { self.put(&key, a.bytes.clone(), a.content_type).await }
        }))
        .await?;
        crate::observe::metrics()
            .artifact_bytes
            .inc_by(rendered.bytes() as u64);
        Ok(())
    }

    /// Writes the FHIR report and the viewer page, then the result record.
    pub async fn put_result(
        &self,
        keys: &Keys,
        fhir: Bytes,
        viewer: Bytes,
        record: Bytes,
    ) -> Result<(), StoreError> {
        self.put(&keys.fhir(), fhir, "application/fhir+json")
            .await?;
        self.put(&keys.viewer(), viewer, "text/html; charset=utf-8")
            .await?;
        self.put(&keys.result(), record, "application/json").await
    }
}
