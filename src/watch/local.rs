//! `--local-dir`: a folder that a scanner writes to. Before each listing, files
//! that have not changed for `--local-min-age-s` seconds are uploaded under the
//! watched prefix (the folder's relative paths become keys), so a scanner
//! without S3 export still feeds the watcher.
//!
//! A file is uploaded once: the S3 object's `sha256` metadata (which every
//! cinflow PUT records) is compared with the file's before uploading, and
//! files already checked are remembered by size and modification time. A
//! slide's marker is uploaded last, only when every other file of its folder
//! is in S3, so the marker never announces a slide whose images are still on
//! their way. Hidden files (other than the marker) and `*.tmp`/`*.part` files
//! are never uploaded.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::{Rules, WatchError};
use crate::storage::{join_key, S3Client, StoreError};

/// Uploads a local folder's settled files under the watched prefix.
#[derive(Debug)]
pub struct LocalFolder {
    dir: PathBuf,
    min_age: Duration,
    /// Files known to be in S3, by path: (size, modification time).
    uploaded: HashMap<PathBuf, (u64, SystemTime)>,
}

struct Found {
    path: PathBuf,
    /// '/'-separated, relative to the folder.
    rel: String,
    size: u64,
    modified: SystemTime,
}

impl LocalFolder {
    pub fn new(dir: &Path, min_age: Duration) -> Result<LocalFolder, WatchError> {
        if !dir.is_dir() {
            return Err(WatchError::Usage(format!(
                "--local-dir {} is not a folder",
                dir.display()
            )));
        }
        Ok(LocalFolder {
            dir: dir.to_path_buf(),
            min_age,
            uploaded: HashMap::new(),
        })
    }

    /// Uploads what is new; returns how many files were uploaded.
    pub async fn sync(&mut self, rules: &Rules, s3: &S3Client) -> Result<usize, WatchError> {
        // File system work on a blocking thread, off the watcher's runtime.
        let dir = self.dir.clone();
        let found = blocking(move || {
            let mut found = Vec::new();
            walk(&dir, &dir, &mut found).map(|()| found)
        })
        .await
        .map_err(|source| io_error(&self.dir, source))?;
        let now = SystemTime::now();
        // Per folder: the files to consider, the marker apart.
        let mut folders: BTreeMap<String, (Vec<Found>, Option<Found>)> = BTreeMap::new();
        for f in found {
            let (folder, name) = f.rel.rsplit_once('/').unwrap_or(("", f.rel.as_str()));
            let is_marker = Some(name) == rules.marker.as_deref();
            if (name.starts_with('.') && !is_marker)
                || name.ends_with(".tmp")
                || name.ends_with(".part")
            {
                continue;
            }
            let entry = folders.entry(folder.to_string()).or_default();
            if is_marker {
                entry.1 = Some(f);
            } else {
                entry.0.push(f);
            }
        }
        let mut uploaded = 0;
        for (_, (files, marker)) in folders {
            let mut pending = false;
            for f in &files {
                match self.upload(f, now, rules, s3).await? {
                    Some(did) => uploaded += usize::from(did),
                    None => pending = true,
                }
            }
            if let (Some(m), false) = (marker, pending) {
                if let Some(true) = self.upload(&m, now, rules, s3).await? {
                    uploaded += 1;
                }
            }
        }
        Ok(uploaded)
    }

    /// Uploads one file if it has settled and is not in S3 yet: None while it
    /// is too young, else whether it was uploaded.
    async fn upload(
        &mut self,
        f: &Found,
        now: SystemTime,
        rules: &Rules,
        s3: &S3Client,
    ) -> Result<Option<bool>, WatchError> {
        if self.uploaded.get(&f.path) == Some(&(f.size, f.modified)) {
            return Ok(Some(false));
        }
        if now.duration_since(f.modified).unwrap_or_default() < self.min_age {
            return Ok(None);
        }
        let path = f.path.clone();
        let (bytes, sha) = blocking(move || {
            let bytes = std::fs::read(path)?;
            let sha = crate::hashing::sha256_hex(&bytes);
            Ok((bytes, sha))
        })
        .await
        .map_err(|source| io_error(&f.path, source))?;
        let key = join_key(&[&rules.prefix, &f.rel]);
        let stored = match s3.head_metadata(&rules.bucket, &key).await {
            Ok(meta) => meta.get("sha256").cloned(),
            Err(e) if e.is_not_found() => None,
            Err(e) => return Err(e.into()),
        };
        let did = stored.as_deref() != Some(sha.as_str());
        if did {
            let content_type = match f.rel.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase()) {
                Some(e) if e == "jpg" || e == "jpeg" => "image/jpeg",
                Some(e) if e == "png" => "image/png",
                Some(e) if e == "tif" || e == "tiff" => "image/tiff",
                Some(e) if e == "json" => "application/json",
                _ => "application/octet-stream",
            };
            s3.put(&rules.bucket, &key, bytes.into(), content_type)
                .await?;
            tracing::info!(file = %f.path.display(), key = %key, "uploaded from the local folder");
        }
        self.uploaded.insert(f.path.clone(), (f.size, f.modified));
        Ok(Some(did))
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
}

fn io_error(path: &Path, source: std::io::Error) -> WatchError {
    WatchError::Store(StoreError::Io {
        uri: path.display().to_string(),
        source,
    })
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<Found>) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let path = e.path();
        let meta = e.metadata()?;
        if meta.is_dir() {
            walk(root, &path, out)?;
        } else if meta.is_file() {
            let rel = path
                .strip_prefix(root)
                .expect("under the root")
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join("/");
            out.push(Found {
                path,
                rel,
                size: meta.len(),
                modified: meta.modified()?,
            });
        }
    }
    Ok(())
}
