//! A local folder as an object store: the embedded default of local mode.

use std::io::Read;
use std::path::{Path, PathBuf};

use super::{check_key, ObjectStore, StoreError};

/// Objects are files under `root`; keys are their relative paths.
#[derive(Debug, Clone)]
pub struct LocalStore {
    root: PathBuf,
}

impl LocalStore {
    /// A store rooted at `root` (created on the first write); a relative root is
    /// made absolute, so URIs in reports and logs stay meaningful.
    pub fn new(root: impl Into<PathBuf>) -> LocalStore {
        let root = root.into();
        LocalStore {
            root: std::path::absolute(&root).unwrap_or(root),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The file that holds `key`.
    pub fn path(&self, key: &str) -> Result<PathBuf, StoreError> {
        check_key(key)?;
        Ok(self.root.join(key))
    }

    fn io(&self, key: &str) -> impl Fn(std::io::Error) -> StoreError + '_ {
        let uri = self.uri(key);
        move |source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                StoreError::NotFound { uri: uri.clone() }
            } else {
                StoreError::Io {
                    uri: uri.clone(),
                    source,
                }
            }
        }
    }
}

impl ObjectStore for LocalStore {
    fn get_limited(&self, key: &str, limit: u64) -> Result<Vec<u8>, StoreError> {
        let path = self.path(key)?;
        let f = std::fs::File::open(&path).map_err(self.io(key))?;
        let size = f.metadata().map_err(self.io(key))?.len();
        if size > limit {
            return Err(StoreError::TooLarge {
                uri: self.uri(key),
                size,
                limit,
            });
        }
        let mut bytes = Vec::with_capacity(size as usize);
        f.take(limit.saturating_add(1))
            .read_to_end(&mut bytes)
            .map_err(self.io(key))?;
        Ok(bytes)
    }

    fn put(&self, key: &str, bytes: &[u8], _content_type: &str) -> Result<(), StoreError> {
        let path = self.path(key)?;
        let dir = path.parent().expect("a key has a parent folder");
        std::fs::create_dir_all(dir).map_err(self.io(key))?;
        // Write beside the target and rename: readers never see half an object.
        let tmp = dir.join(format!(
            ".{}.tmp-{}-{:?}",
            path.file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("object"),
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::write(&tmp, bytes).map_err(self.io(key))?;
        std::fs::rename(&tmp, &path).map_err(self.io(key))
    }

    fn exists(&self, key: &str) -> Result<bool, StoreError> {
        Ok(self.path(key)?.is_file())
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let mut out = Vec::new();
        let mut stack = vec![self.root.clone()];
        while let Some(dir) = stack.pop() {
            let entries = match std::fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(self.io(prefix)(e)),
            };
            for entry in entries {
                let entry = entry.map_err(self.io(prefix))?;
                let path = entry.path();
                let Ok(rel) = path.strip_prefix(&self.root) else {
                    continue;
                };
                let key = rel
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy())
                    .collect::<Vec<_>>()
                    .join("/");
                if key.rsplit('/').next().is_some_and(|n| n.starts_with('.')) {
                    continue; // temporary files of writes in progress
                }
                let ft = entry.file_type().map_err(self.io(&key))?;
                if ft.is_dir() {
                    if prefix.starts_with(&key) || key.starts_with(prefix) {
                        stack.push(path);
                    }
                } else if key.starts_with(prefix) {
                    out.push(key);
                }
            }
        }
        out.sort();
        Ok(out)
    }

    fn delete(&self, key: &str) -> Result<(), StoreError> {
        match std::fs::remove_file(self.path(key)?) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(self.io(key)(e)),
            _ => Ok(()),
        }
    }

    fn uri(&self, key: &str) -> String {
        format!("file://{}", self.root.join(key).display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_list_limits_and_delete() {
        let d = tempfile::tempdir().unwrap();
        let s = LocalStore::new(d.path().join("store"));
        assert!(s.list("").unwrap().is_empty());
        s.put("a/b/c.json", b"{}", "application/json").unwrap();
        s.put("a/d.bin", &[1, 2, 3], "application/octet-stream")
            .unwrap();
        s.put("z.txt", b"z", "text/plain").unwrap();
        assert_eq!(s.get("a/d.bin").unwrap(), vec![1, 2, 3]);
        assert_eq!(s.list("a/").unwrap(), vec!["a/b/c.json", "a/d.bin"]);
        assert_eq!(s.list("").unwrap().len(), 3);
        assert!(matches!(
            s.get_limited("a/d.bin", 2),
            Err(StoreError::TooLarge { size: 3, .. })
        ));
        assert!(s.get("nope").unwrap_err().is_not_found());
        assert!(s.get("../etc/passwd").is_err());
        s.delete("a/d.bin").unwrap();
        s.delete("a/d.bin").unwrap();
        assert!(!s.exists("a/d.bin").unwrap());
    }
}
