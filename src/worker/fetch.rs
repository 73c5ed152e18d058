//! Stage 1, fetch: async S3 GETs of a job's images, at most
//! `--fetch-concurrency` at once over all jobs. Each object is retried by
//! itself when its failure is transient, so one slow or failing GET never
//! makes the others run again.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::Semaphore;

use super::stores::Stores;
use crate::retry::RetryPolicy;
use crate::storage::StoreError;

/// Downloads images.
#[derive(Debug)]
pub struct Fetcher {
    pub stores: Arc<Stores>,
    pub slots: Semaphore,
    pub retry: RetryPolicy,
    /// Largest object accepted, in bytes.
    pub limit: u64,
}

/// An image's bytes and how long they took.
pub struct Fetched {
    pub bytes: Vec<u8>,
    pub ms: f64,
}

impl Fetcher {
    /// Reads the image `uri`, retrying transient failures of this object only.
    pub async fn fetch(&self, uri: &str) -> Result<Fetched, StoreError> {
        let _slot = self.slots.acquire().await.expect("never closed");
        let t = Instant::now();
        let bytes = self
            .retry
            .run("fetch", || self.stores.get_uri(uri, self.limit))
            .await?;
        crate::observe::health().progress();
        Ok(Fetched {
            bytes,
            ms: t.elapsed().as_secs_f64() * 1e3,
        })
    }
}
