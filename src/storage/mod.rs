//! Object stores: where images, feature caches, model versions and results live.
//! A local folder now (local mode); S3 behind the same trait for the workers.
//!
//! Keys are `/`-separated relative paths (`models/cin4/versions/v3/manifest.json`).
//! The trait is synchronous: every caller is CPU-heavy code that already runs on
//! blocking threads.

mod local;
mod s3;

pub use local::LocalStore;
pub use s3::{
    classify, s3_uri, split_s3_prefix, ListedObject, S3Client, S3Config, S3Store, MULTIPART_OVER,
    PART_BYTES,
};

/// Why an object store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{uri}: no such object")]
    NotFound { uri: String },
    #[error("{uri}: {size} bytes is more than the {limit}-byte limit")]
    TooLarge { uri: String, size: u64, limit: u64 },
    #[error("{key:?} is not a valid object key: {reason}")]
    BadKey { key: String, reason: &'static str },
    /// Throttling, 5xx, timeouts, connection errors: worth retrying later.
    #[error("{uri}: object store unavailable: {detail}")]
    Unavailable { uri: String, detail: String },
    /// Refused for good (access denied, no such bucket, bad request).
    #[error("{uri}: {detail}")]
    Backend { uri: String, detail: String },
    #[error("{uri}: {source}")]
    Io {
        uri: String,
        #[source]
        source: std::io::Error,
    },
}

impl crate::retry::Transient for StoreError {
    /// Whether trying again later could succeed (a local folder never recovers by itself).
    fn is_transient(&self) -> bool {
        match self {
            StoreError::Unavailable { .. } => true,
            StoreError::Io { source, .. } => matches!(
                source.kind(),
                std::io::ErrorKind::Interrupted | std::io::ErrorKind::TimedOut
            ),
            _ => false,
        }
    }
}

impl StoreError {
    pub fn is_not_found(&self) -> bool {
        matches!(self, StoreError::NotFound { .. })
    }
}

/// Told the number of bytes moved since its last call.
pub type Progress = dyn Fn(u64) + Send + Sync;

/// A flat key-value store of byte objects.
pub trait ObjectStore: Send + Sync + std::fmt::Debug {
    /// Reads a whole object, refusing ones larger than `limit` bytes.
    fn get_limited(&self, key: &str, limit: u64) -> Result<Vec<u8>, StoreError>;

    /// Writes an object; readers see the old or the new object, never a part.
    fn put(&self, key: &str, bytes: &[u8], content_type: &str) -> Result<(), StoreError>;

    /// Whether an object exists.
    fn exists(&self, key: &str) -> Result<bool, StoreError>;

    /// Every key under `prefix`, sorted.
    fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError>;

    /// Deletes an object (no error when it is absent).
    fn delete(&self, key: &str) -> Result<(), StoreError>;

    /// A URI naming the object, for logs, reports and messages.
    fn uri(&self, key: &str) -> String;

    /// Reads a whole object (no size limit beyond memory).
    fn get(&self, key: &str) -> Result<Vec<u8>, StoreError> {
        self.get_limited(key, u64::MAX)
    }

    /// Like [`ObjectStore::get`], telling `progress` how many bytes arrived as
    /// they arrive (a model download on a terminal).
    fn get_reporting(&self, key: &str, progress: &Progress) -> Result<Vec<u8>, StoreError> {
        let bytes = self.get(key)?;
        progress(bytes.len() as u64);
        Ok(bytes)
    }

    /// Like [`ObjectStore::put`], telling `progress` how many bytes were sent
    /// as they are sent (a model upload on a terminal).
    fn put_reporting(
        &self,
        key: &str,
        bytes: &[u8],
        content_type: &str,
        progress: &Progress,
    ) -> Result<(), StoreError> {
        self.put(key, bytes, content_type)?;
        progress(bytes.len() as u64);
        Ok(())
    }
}

/// Checks a key: relative, `/`-separated, no empty, `.` or `..` segments.
pub fn check_key(key: &str) -> Result<(), StoreError> {
    let bad = |reason| {
        Err(StoreError::BadKey {
            key: key.to_string(),
            reason,
        })
    };
    if key.is_empty() {
        return bad("empty");
    }
    if key.starts_with('/') {
        return bad("keys are relative");
    }
    if key.contains('\\') || key.contains('\0') {
        return bad("backslash or NUL");
    }
    if key
        .split('/')
        .any(|s| s.is_empty() || s == "." || s == "..")
    {
        return bad("empty, '.' or '..' segment");
    }
    Ok(())
}

/// Joins key segments with `/`, skipping empty ones.
pub fn join_key(parts: &[&str]) -> String {
    parts
        .iter()
        .map(|p| p.trim_matches('/'))
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_checked() {
        assert!(check_key("a/b.json").is_ok());
        for k in ["", "/a", "a//b", "a/../b", "./a", "a\\b"] {
            assert!(check_key(k).is_err(), "{k:?}");
        }
        assert_eq!(join_key(&["models/", "cin4", "", "/v1/"]), "models/cin4/v1");
    }
}
