//! The model registry: versioned bundles in an object store, aliases (such as
//! `current`) that point at a promoted version, and the decision behind every
//! promotion.
//!
//! Layout under `models/<name>/`:
//! - `versions/<version>/manifest.json`, `backbone.onnx`, `head.safetensors` and the
//!   training report (`report/...`); `manifest.json` is written last, so a version
//!   without it is incomplete and invisible.
//! - `aliases/<alias>.json`: the version an alias points at, when and why.
//! - `decisions/<version>.json`: the promotion decision for every trained version.

use std::path::Path;
use std::sync::Arc;

use indicatif::ProgressBar;
use serde::{Deserialize, Serialize};

use super::{Bundle, BundleError, BACKBONE_FILE, HEAD_FILE, MANIFEST_FILE};
use crate::storage::{join_key, ObjectStore, StoreError};

/// Why a registry operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error("model version {version:?} of {name:?} already exists in the registry")]
    Exists { name: String, version: String },
    #[error("model version {version:?} of {name:?} is not in the registry")]
    NoVersion { name: String, version: String },
    #[error("{what} {value:?} may only contain letters, digits, '.', '_' and '-'")]
    BadName { what: &'static str, value: String },
    #[error("{uri}: {detail}")]
    Corrupt { uri: String, detail: String },
    #[error("cannot write {path}: {source}")]
    Local {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl crate::retry::Transient for RegistryError {
    /// Only an unavailable store: a missing, corrupt or conflicting version stays so.
    fn is_transient(&self) -> bool {
        matches!(self, RegistryError::Store(e) if e.is_transient())
    }
}

/// Where an alias points.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AliasRecord {
    pub alias: String,
    pub version: String,
    pub promoted_at: String,
    /// The version it pointed at before.
    pub previous: Option<String>,
    pub reason: String,
}

/// When a newly trained version replaces the current one.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, clap::Args)]
pub struct PromotionPolicy {
    /// Promote when the new model's macro AUC on the locked test split is at most
    /// this much below the current model's on the same images.
    #[arg(long, env = "CINFLOW_PROMOTION_MARGIN", default_value_t = 0.005)]
    pub promotion_margin: f64,
}

impl Default for PromotionPolicy {
    fn default() -> Self {
        PromotionPolicy {
            promotion_margin: 0.005,
        }
    }
}

/// The outcome of comparing a new version with the current one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    pub promoted: bool,
    pub reason: String,
    pub alias: String,
    pub new_version: String,
    pub new_macro_auc: Option<f64>,
    pub current_version: Option<String>,
    /// The current model's macro AUC on the same locked test images.
    pub current_macro_auc: Option<f64>,
    pub margin: f64,
}

impl PromotionPolicy {
    /// Decides on `new` against `current` (version and macro AUC on the same test
    /// images, or None when there is no current model). `incomparable` names why
    /// the two cannot be compared (different classes), which blocks promotion.
    pub fn decide(
        &self,
        alias: &str,
        new_version: &str,
        new_auc: Option<f64>,
        current: Option<(&str, Option<f64>)>,
        incomparable: Option<String>,
    ) -> Decision {
        let m = self.promotion_margin;
        let (promoted, reason) = match (new_auc, current, incomparable) {
            (None, _, _) => (false, "the new model's macro AUC is undefined".to_string()),
            (_, Some(_), Some(why)) => (
                false,
                format!("not comparable with the current model: {why}"),
            ),
            (Some(a), None, _) => (true, format!("no current model; new macro AUC {a:.4}")),
            (Some(a), Some((v, None)), _) => (
                true,
                format!("current model {v} has no macro AUC on this test split; new {a:.4}"),
            ),
            (Some(a), Some((v, Some(c))), _) if a >= c - m => (
                true,
                format!("new macro AUC {a:.4} >= current ({v}) {c:.4} - margin {m}"),
            ),
            (Some(a), Some((v, Some(c))), _) => (
                false,
                format!("new macro AUC {a:.4} < current ({v}) {c:.4} - margin {m}"),
            ),
        };
        Decision {
            promoted,
            reason,
            alias: alias.to_string(),
            new_version: new_version.to_string(),
            new_macro_auc: new_auc,
            current_version: current.map(|c| c.0.to_string()),
            current_macro_auc: current.and_then(|c| c.1),
            margin: m,
        }
    }
}

/// Versioned bundles of one model name in an object store.
#[derive(Debug, Clone)]
pub struct Registry {
    store: Arc<dyn ObjectStore>,
    name: String,
}

fn check_name(what: &'static str, value: &str) -> Result<(), RegistryError> {
    let ok = !value.is_empty()
        && !value.starts_with('.')
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(RegistryError::BadName {
            what,
            value: value.to_string(),
        })
    }
}

impl Registry {
    pub fn new(store: Arc<dyn ObjectStore>, name: &str) -> Result<Registry, RegistryError> {
        check_name("model name", name)?;
        Ok(Registry {
            store,
            name: name.to_string(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Checks that `version` can be published: a valid name not used yet.
    pub fn check_new_version(&self, version: &str) -> Result<(), RegistryError> {
        check_name("version", version)?;
        if self.versions()?.iter().any(|v| v == version) {
            return Err(RegistryError::Exists {
                name: self.name.clone(),
                version: version.to_string(),
            });
        }
        Ok(())
    }

    fn key(&self, parts: &[&str]) -> String {
        let mut all = vec!["models", self.name.as_str()];
        all.extend_from_slice(parts);
        join_key(&all)
    }

    /// URI of a version's folder.
    pub fn version_uri(&self, version: &str) -> String {
        self.store.uri(&self.key(&["versions", version]))
    }

    /// Uploads the bundle folder (and everything under it, such as its report) as
    /// a new version; the manifest goes last, so readers never see a partial one.
    pub fn publish(&self, dir: &Path) -> Result<String, RegistryError> {
        self.publish_showing(dir, &ProgressBar::hidden())
    }

    /// [`Registry::publish`], advancing `bar` by the bytes sent (its length is
    /// set to the bundle's size).
    pub fn publish_showing(&self, dir: &Path, bar: &ProgressBar) -> Result<String, RegistryError> {
        let bundle = Bundle::load(dir)?;
        let version = bundle.manifest.version.clone();
        check_name("version", &version)?;
        let manifest_key = self.key(&["versions", &version, MANIFEST_FILE]);
        if self.store.exists(&manifest_key)? {
            return Err(RegistryError::Exists {
                name: self.name.clone(),
                version,
            });
        }
        let mut files = Vec::new();
        collect_files(dir, dir, &mut files).map_err(|source| RegistryError::Local {
            path: dir.display().to_string(),
            source,
        })?;
        let total: u64 = files
            .iter()
            .filter_map(|rel| std::fs::metadata(dir.join(rel)).ok())
            .map(|m| m.len())
            .sum();
        bar.set_length(total);
        let advance = {
            let bar = bar.clone();
            move |n| bar.inc(n)
        };
        for rel in files.iter().filter(|r| r.as_str() != MANIFEST_FILE) {
            let path = dir.join(rel);
            let bytes = std::fs::read(&path).map_err(|source| RegistryError::Local {
                path: path.display().to_string(),
                source,
            })?;
            self.store.put_reporting(
                &self.key(&["versions", &version, rel]),
                &bytes,
                content_type(rel),
                &advance,
            )?;
        }
        let manifest =
            std::fs::read(dir.join(MANIFEST_FILE)).map_err(|source| RegistryError::Local {
                path: dir.display().to_string(),
                source,
            })?;
        self.store
            .put_reporting(&manifest_key, &manifest, "application/json", &advance)?;
        bar.finish_and_clear();
        Ok(version)
    }

    /// Complete versions, sorted.
    pub fn versions(&self) -> Result<Vec<String>, RegistryError> {
        let prefix = self.key(&["versions"]) + "/";
        Ok(self
            .store
            .list(&prefix)?
            .iter()
            .filter_map(|k| k.strip_prefix(&prefix))
            .filter_map(|rest| rest.strip_suffix(&format!("/{MANIFEST_FILE}")))
            .filter(|v| !v.contains('/'))
            .map(str::to_string)
            .collect())
    }

    /// Where `alias` points, if anywhere.
    pub fn alias(&self, alias: &str) -> Result<Option<AliasRecord>, RegistryError> {
        check_name("alias", alias)?;
        self.get_json(&self.key(&["aliases", &format!("{alias}.json")]))
    }

    /// A JSON record, or None when the object does not exist.
    fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<Option<T>, RegistryError> {
        match self.store.get(key) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|e| RegistryError::Corrupt {
                        uri: self.store.uri(key),
                        detail: e.to_string(),
                    })
            }
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Points `alias` at a complete version.
    pub fn set_alias(
        &self,
        alias: &str,
        version: &str,
        reason: &str,
    ) -> Result<AliasRecord, RegistryError> {
        if !self.versions()?.iter().any(|v| v == version) {
            return Err(RegistryError::NoVersion {
                name: self.name.clone(),
                version: version.to_string(),
            });
        }
        let record = AliasRecord {
            alias: alias.to_string(),
            version: version.to_string(),
            promoted_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            previous: self.alias(alias)?.map(|a| a.version),
            reason: reason.to_string(),
        };
        let json = serde_json::to_vec_pretty(&record).expect("alias serialises");
        self.store.put(
            &self.key(&["aliases", &format!("{alias}.json")]),
            &json,
            "application/json",
        )?;
        Ok(record)
    }

    /// Records the promotion decision of a version.
    pub fn record_decision(&self, decision: &Decision) -> Result<(), RegistryError> {
        let json = serde_json::to_vec_pretty(decision).expect("decision serialises");
        self.store.put(
            &self.key(&["decisions", &format!("{}.json", decision.new_version)]),
            &json,
            "application/json",
        )?;
        Ok(())
    }

    /// The recorded decision of a version, if any.
    pub fn decision(&self, version: &str) -> Result<Option<Decision>, RegistryError> {
        self.get_json(&self.key(&["decisions", &format!("{version}.json")]))
    }

    /// Reads one file of a version (for example `report/split.json`).
    pub fn get_file(&self, version: &str, rel: &str) -> Result<Vec<u8>, RegistryError> {
        Ok(self.store.get(&self.key(&["versions", version, rel]))?)
    }

    /// Downloads a version's bundle files into `dest` and verifies them; a folder
    /// that already holds the verified version is reused.
    pub fn fetch(&self, version: &str, dest: &Path) -> Result<Bundle, RegistryError> {
        self.fetch_showing(version, dest, &ProgressBar::hidden())
    }

    /// [`Registry::fetch`], advancing `bar` by the bytes received.
    pub fn fetch_showing(
        &self,
        version: &str,
        dest: &Path,
        bar: &ProgressBar,
    ) -> Result<Bundle, RegistryError> {
        check_name("version", version)?;
        if let Ok(b) = Bundle::load(dest) {
            if b.manifest.version == version {
                return Ok(b);
            }
        }
        let local = |source| RegistryError::Local {
            path: dest.display().to_string(),
            source,
        };
        let _ = std::fs::remove_dir_all(dest);
        std::fs::create_dir_all(dest).map_err(local)?;
        let advance = {
            let bar = bar.clone();
            move |n| bar.inc(n)
        };
        // The manifest first: a version that is not there is named as such.
        for f in [MANIFEST_FILE, HEAD_FILE, BACKBONE_FILE] {
            let key = self.key(&["versions", version, f]);
            let bytes = self.store.get_reporting(&key, &advance).map_err(|e| {
                if e.is_not_found() && f == MANIFEST_FILE {
                    RegistryError::NoVersion {
                        name: self.name.clone(),
                        version: version.to_string(),
                    }
                } else {
                    e.into()
                }
            })?;
            std::fs::write(dest.join(f), bytes).map_err(local)?;
        }
        Ok(Bundle::load(dest)?)
    }
}

fn collect_files(root: &Path, dir: &Path, out: &mut Vec<String>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            collect_files(root, &path, out)?;
        } else if let Ok(rel) = path.strip_prefix(root) {
            let rel = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy())
                .collect::<Vec<_>>()
                .join("/");
            if !rel.rsplit('/').next().unwrap_or("").starts_with('.') {
                out.push(rel);
            }
        }
    }
    out.sort();
    Ok(())
}

fn content_type(rel: &str) -> &'static str {
    match rel.rsplit('.').next() {
        Some("json") => "application/json",
        Some("png") => "image/png",
        Some("html") => "text/html; charset=utf-8",
        Some("csv") => "text/csv",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_promotes_within_the_margin_only() {
        let p = PromotionPolicy {
            promotion_margin: 0.01,
        };
        assert!(p.decide("current", "v2", Some(0.9), None, None).promoted);
        assert!(
            p.decide("current", "v2", Some(0.895), Some(("v1", Some(0.9))), None)
                .promoted
        );
        let d = p.decide("current", "v2", Some(0.85), Some(("v1", Some(0.9))), None);
        assert!(
            !d.promoted && d.reason.contains("0.8500 < current (v1) 0.9000"),
            "{}",
            d.reason
        );
        assert!(!p.decide("current", "v2", None, None, None).promoted);
        let d = p.decide(
            "current",
            "v2",
            Some(0.99),
            Some(("v1", Some(0.5))),
            Some("classes differ".into()),
        );
        assert!(!d.promoted);
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("version", "20261125T220000Z").is_ok());
        for bad in ["", "../x", "a/b", ".hidden", "a b"] {
            assert!(check_name("version", bad).is_err(), "{bad:?}");
        }
    }
}
