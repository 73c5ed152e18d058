//! `s3://bucket/key` URIs to objects: one [`S3Store`] per bucket, made on first
//! use. Like every store, call it from blocking threads only.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::storage::{ObjectStore, S3Config, S3Store, StoreError};

/// The S3 stores a worker reads from and writes to.
#[derive(Debug)]
pub struct Stores {
    cfg: S3Config,
    by_bucket: Mutex<HashMap<String, Arc<S3Store>>>,
}

/// Splits `s3://bucket/key`.
pub fn split_s3_uri(uri: &str) -> Option<(&str, &str)> {
    uri.strip_prefix("s3://")?
        .split_once('/')
        .filter(|(b, k)| !b.is_empty() && !k.is_empty())
}

impl Stores {
    pub fn new(cfg: S3Config) -> Stores {
        Stores {
            cfg,
            by_bucket: Mutex::new(HashMap::new()),
        }
    }

    /// The worker's own bucket (models, results, feature caches).
    pub fn home(&self) -> Result<Arc<S3Store>, StoreError> {
        self.bucket(&self.cfg.bucket.clone())
    }

    pub fn bucket(&self, bucket: &str) -> Result<Arc<S3Store>, StoreError> {
        let mut map = self.by_bucket.lock().expect("stores lock");
        if let Some(s) = map.get(bucket) {
            return Ok(s.clone());
        }
        let store = Arc::new(S3Store::new(&S3Config {
            bucket: bucket.to_string(),
            ..self.cfg.clone()
        })?);
        map.insert(bucket.to_string(), store.clone());
        Ok(store)
    }

    /// Reads the object a URI names, refusing ones over `limit` bytes.
    pub fn get_uri(&self, uri: &str, limit: u64) -> Result<Vec<u8>, StoreError> {
        let (bucket, key) = split_s3_uri(uri).ok_or_else(|| StoreError::BadKey {
            key: uri.to_string(),
            reason: "not an s3://bucket/key URI",
        })?;
        self.bucket(bucket)?.get_limited(key, limit)
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
