//! The worker's object stores: one async S3 client for every bucket a job
//! names, and the worker's own bucket (models, results, feature caches).
//!
//! The fetch and put stages call the async methods, one attempt each, and
//! retry per object themselves. The registry and the training worker use the
//! synchronous [`S3Store`]s from blocking threads; those retry per operation.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::storage::{S3Client, S3Config, S3Store, StoreError};

/// The S3 stores a worker reads from and writes to.
#[derive(Debug)]
pub struct Stores {
    cfg: S3Config,
    client: S3Client,
    handle: tokio::runtime::Handle,
    by_bucket: Mutex<HashMap<String, Arc<S3Store>>>,
}

/// Splits `s3://bucket/key`.
pub fn split_s3_uri(uri: &str) -> Option<(&str, &str)> {
    uri.strip_prefix("s3://")?
        .split_once('/')
        .filter(|(b, k)| !b.is_empty() && !k.is_empty())
}

fn bad_uri(uri: &str) -> StoreError {
    StoreError::BadKey {
        key: uri.to_string(),
        reason: "not an s3://bucket/key URI",
    }
}

impl Stores {
    /// Connects on the current runtime (lazily: the first request opens the connection).
    pub async fn connect(cfg: S3Config) -> Result<Stores, StoreError> {
        let client = S3Client::connect(&cfg).await?;
        Ok(Stores {
            cfg,
            client,
            handle: tokio::runtime::Handle::current(),
            by_bucket: Mutex::new(HashMap::new()),
        })
    }

    /// The worker's own bucket as a synchronous store (blocking threads only).
    pub fn home(&self) -> Arc<S3Store> {
        self.bucket(&self.cfg.bucket)
    }

    /// A bucket as a synchronous store (blocking threads only).
    pub fn bucket(&self, bucket: &str) -> Arc<S3Store> {
        let mut map = self.by_bucket.lock().expect("stores lock");
        map.entry(bucket.to_string())
            .or_insert_with(|| {
                let _on = self.handle.enter();
                Arc::new(S3Store::with_client(
                    self.client.clone(),
                    bucket,
                    self.cfg.retry_policy(),
                ))
            })
            .clone()
    }

    /// Reads the object a URI names, refusing ones over `limit` bytes; one
    /// attempt (async).
    pub async fn get_uri(&self, uri: &str, limit: u64) -> Result<Vec<u8>, StoreError> {
        let (bucket, key) = split_s3_uri(uri).ok_or_else(|| bad_uri(uri))?;
        self.client.get(bucket, key, limit).await
    }

    /// [`Stores::get_uri`] from a blocking thread, retried per `--s3-attempts`.
    pub fn get_uri_blocking(&self, uri: &str, limit: u64) -> Result<Vec<u8>, StoreError> {
        let (bucket, key) = split_s3_uri(uri).ok_or_else(|| bad_uri(uri))?;
        crate::storage::ObjectStore::get_limited(&*self.bucket(bucket), key, limit)
    }

    /// Writes an object in the worker's own bucket; one attempt (async).
    pub async fn put(
        &self,
        key: &str,
        bytes: bytes::Bytes,
        content_type: &str,
    ) -> Result<(), StoreError> {
        self.client
            .put(&self.cfg.bucket, key, bytes, content_type)
            .await
    }

    /// Creates an object in the worker's own bucket only if absent
    /// ([`S3Client::put_if_absent`]); one attempt (async).
    pub async fn put_if_absent(
        &self,
        key: &str,
        bytes: bytes::Bytes,
        content_type: &str,
    ) -> Result<bool, StoreError> {
        self.client
            .put_if_absent(&self.cfg.bucket, key, bytes, content_type)
            .await
    }

    /// Whether the worker's own bucket honours conditional creates, probed
    /// under `probe_key` ([`S3Client::conditional_writes`]).
    pub async fn conditional_writes(&self, probe_key: &str) -> Result<bool, StoreError> {
        self.client
            .conditional_writes(&self.cfg.bucket, probe_key)
            .await
    }

    /// Reads an object of the worker's own bucket; one attempt (async).
    pub async fn get(&self, key: &str) -> Result<Vec<u8>, StoreError> {
        self.client.get(&self.cfg.bucket, key, u64::MAX).await
    }

    /// Reads an object of the worker's own bucket if it exists; one attempt (async).
    pub async fn find(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        match self.get(key).await {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The URI of a key in the worker's own bucket.
    pub fn uri(&self, key: &str) -> String {
        crate::storage::s3_uri(&self.cfg.bucket, key)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn uris_split_into_bucket_and_key() {
        assert_eq!(
            super::split_s3_uri("s3://b/slides/a.jpg"),
            Some(("b", "slides/a.jpg"))
        );
        for bad in ["s3://b", "s3:///k", "s3://b/", "http://b/k"] {
            assert_eq!(super::split_s3_uri(bad), None, "{bad}");
        }
    }
}
