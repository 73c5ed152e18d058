//! Loading, verifying and writing model bundle folders.

use std::path::{Path, PathBuf};

use super::{Head, HeadError, Manifest, OodModel, Task, OOD_FILE};
use crate::hashing::sha256_file;

pub const MANIFEST_FILE: &str = "manifest.json";
pub const BACKBONE_FILE: &str = "backbone.onnx";
pub const HEAD_FILE: &str = "head.safetensors";

/// Why a bundle was refused. Every variant names the bundle and what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("model bundle {dir}: {file} is missing or unreadable: {source}")]
    Missing {
        dir: String,
        file: String,
        source: std::io::Error,
    },
    #[error("model bundle {dir}: manifest.json is not valid: {detail}")]
    Manifest { dir: String, detail: String },
    #[error("model bundle {dir}: sha256 of {file} is {actual} but the manifest says {expected}; the bundle was modified or copied incompletely")]
    HashMismatch {
        dir: String,
        file: String,
        expected: String,
        actual: String,
    },
    #[error("model bundle {dir}: {source}")]
    Head { dir: String, source: HeadError },
    #[error("model bundle {dir}: head is [{rows} x {channels}] but the manifest needs [{want_rows} x {want_channels}] ({task:?}, {n_classes} classes, {want_channels} feature channels)")]
    HeadShape {
        dir: String,
        rows: usize,
        channels: usize,
        want_rows: usize,
        want_channels: usize,
        task: Task,
        n_classes: usize,
    },
    #[error("cannot write model bundle {dir}: {source}")]
    Write { dir: String, source: std::io::Error },
}

/// A verified model bundle: manifest checked, every file's sha256 matched, head shaped.
#[derive(Debug, Clone)]
pub struct Bundle {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub head: Head,
    /// The out-of-distribution model, when the manifest has an `ood` section.
    pub ood: Option<OodModel>,
}

impl Bundle {
    /// Loads and verifies a bundle folder; refuses it with a reason if anything is off.
    pub fn load(dir: &Path) -> Result<Bundle, BundleError> {
        let d = dir.display().to_string();
        let text = std::fs::read_to_string(dir.join(MANIFEST_FILE)).map_err(|source| {
            BundleError::Missing {
                dir: d.clone(),
                file: MANIFEST_FILE.into(),
                source,
            }
        })?;
        let manifest: Manifest =
            serde_json::from_str(&text).map_err(|e| BundleError::Manifest {
                dir: d.clone(),
                detail: e.to_string(),
            })?;
        let problems = manifest.problems();
        if !problems.is_empty() {
            return Err(BundleError::Manifest {
                dir: d,
                detail: problems.join("; "),
            });
        }
        for required in [BACKBONE_FILE, HEAD_FILE] {
            if !manifest.files.contains_key(required) {
                return Err(BundleError::Manifest {
                    dir: d,
                    detail: format!("\"files\" has no sha256 for {required}"),
                });
            }
        }
        for (file, expected) in &manifest.files {
            if file.contains('/') || file.contains("..") {
                return Err(BundleError::Manifest {
                    dir: d,
                    detail: format!("file name {file:?} must be a plain name inside the bundle"),
                });
            }
            let actual = sha256_file(&dir.join(file)).map_err(|source| BundleError::Missing {
                dir: d.clone(),
                file: file.clone(),
                source,
            })?;
            if !actual.eq_ignore_ascii_case(expected) {
                return Err(BundleError::HashMismatch {
                    dir: d,
                    file: file.clone(),
                    expected: expected.clone(),
                    actual,
                });
            }
        }
        let head = Head::load(&dir.join(HEAD_FILE)).map_err(|source| BundleError::Head {
            dir: d.clone(),
            source,
        })?;
        let (want_rows, want_channels) = (manifest.head_rows(), manifest.features.channels);
        if head.rows != want_rows || head.channels != want_channels {
            return Err(BundleError::HeadShape {
                dir: d,
                rows: head.rows,
                channels: head.channels,
                want_rows,
                want_channels,
                task: manifest.task,
                n_classes: manifest.classes.len(),
            });
        }
        let ood = match &manifest.ood {
            Some(_) => Some(OodModel::load(&dir.join(OOD_FILE), want_channels).map_err(
                |source| BundleError::Head {
                    dir: d.clone(),
                    source,
                },
            )?),
            None => None,
        };
        Ok(Bundle {
            dir: dir.to_path_buf(),
            manifest,
            head,
            ood,
        })
    }

    /// Path of the ONNX backbone.
    pub fn backbone_path(&self) -> PathBuf {
        self.dir.join(BACKBONE_FILE)
    }

    /// sha256 of the backbone as recorded (and verified) in the manifest.
    pub fn backbone_sha256(&self) -> &str {
        &self.manifest.files[BACKBONE_FILE]
    }

    /// sha256 of the head as recorded (and verified) in the manifest.
    pub fn head_sha256(&self) -> &str {
        &self.manifest.files[HEAD_FILE]
    }

    /// Writes a new bundle version at `out` with this bundle's backbone (copied bit
    /// for bit), `head`, and `manifest` (its file hashes are filled in here). The
    /// folder appears atomically: it is assembled beside `out` and renamed.
    pub fn write_version(
        &self,
        out: &Path,
        mut manifest: Manifest,
        head: &Head,
        ood: Option<&OodModel>,
    ) -> Result<Bundle, BundleError> {
        let d = out.display().to_string();
        let werr = |source| BundleError::Write {
            dir: d.clone(),
            source,
        };
        let parent = out
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent).map_err(werr)?;
        let tmp = parent.join(format!(
            ".{}.tmp-{}",
            out.file_name().and_then(|n| n.to_str()).unwrap_or("bundle"),
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(werr)?;
        std::fs::copy(self.backbone_path(), tmp.join(BACKBONE_FILE)).map_err(werr)?;
        let head_bytes = head.to_bytes();
        std::fs::write(tmp.join(HEAD_FILE), &head_bytes).map_err(werr)?;
        manifest.files.clear();
        manifest
            .files
            .insert(BACKBONE_FILE.into(), self.backbone_sha256().to_string());
        manifest
            .files
            .insert(HEAD_FILE.into(), crate::hashing::sha256_hex(&head_bytes));
        if let Some(o) = ood {
            let bytes = o.to_bytes();
            std::fs::write(tmp.join(OOD_FILE), &bytes).map_err(werr)?;
            manifest
                .files
                .insert(OOD_FILE.into(), crate::hashing::sha256_hex(&bytes));
        } else {
            manifest.ood = None;
        }
        let json = serde_json::to_string_pretty(&manifest).expect("manifest serialises");
        std::fs::write(tmp.join(MANIFEST_FILE), json + "\n").map_err(werr)?;
        if out.exists() {
            std::fs::remove_dir_all(out).map_err(werr)?;
        }
        std::fs::rename(&tmp, out).map_err(werr)?;
        Bundle::load(out)
    }
}
