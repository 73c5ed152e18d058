//! The model registry: versioned bundles in an object store, aliases (such as
//! `current`) that point at a promoted version, and the decision behind every
//! promotion.
//!
//! Layout under `models/<name>/`:
//! - `versions/<version>/manifest.json`, `backbone.onnx`, `head.safetensors` and the
//!   training report (`report/...`); `manifest.json` is written last, so a version
//!   without it is incomplete and invisible. A signed version has
//!   `manifest.sig.json` too, written just before the manifest
//!   ([`super::signing`]).
//! - `aliases/<alias>.json`: the version an alias points at, when and why.
//! - `decisions/<version>.json`: the promotion decision for every trained version.

use std::path::Path;
use std::sync::Arc;

use indicatif::ProgressBar;
use serde::{Deserialize, Serialize};

use super::signing::{SigningError, SigningKey, TrustedKeys, SIGNATURE_FILE};
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
    #[error(transparent)]
    Signing(#[from] SigningError),
    #[error("model {name:?} version {version:?} is refused: {source}")]
    Untrusted {
        name: String,
        version: String,
        #[source]
        source: SigningError,
    },
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
    /// The version later candidates must also stay within the margins of, so
    /// that quality cannot drift down by a margin per promotion: the last
    /// version that was at least as good as its anchor on both figures, or the
    /// one a person pointed the alias at. Absent in records from before it
    /// existed: then the current version is the anchor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anchor: Option<String>,
}

/// When a newly trained version replaces the current one.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, clap::Args)]
pub struct PromotionPolicy {
    /// Promote only when the new model's macro AUC on the validation split is
    /// at most this much below the current model's, and the anchor's, on the
    /// same images.
    #[arg(long, env = "CINFLOW_PROMOTION_MARGIN", default_value_t = 0.005)]
    pub promotion_margin: f64,
    /// ...and its CIN2+ sensitivity at its own rule-out threshold at most this
    /// much below theirs at their own thresholds (4- and 3-class models).
    #[arg(long, env = "CINFLOW_SENSITIVITY_MARGIN", default_value_t = 0.02)]
    #[serde(default = "default_sensitivity_margin")]
    pub sensitivity_margin: f64,
}

fn default_sensitivity_margin() -> f64 {
    0.02
}

impl Default for PromotionPolicy {
    fn default() -> Self {
        PromotionPolicy {
            promotion_margin: 0.005,
            sensitivity_margin: default_sensitivity_margin(),
        }
    }
}

/// What promotion compares, for one model on the validation split.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct PromotionFigures {
    pub macro_auc: Option<f64>,
    /// CIN2+ sensitivity at the model's own rule-out threshold (None without
    /// a refer band).
    pub cin2_sensitivity: Option<f64>,
}

/// A model compared against: its version and figures on the same images.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Compared {
    pub version: String,
    pub figures: PromotionFigures,
}

/// The outcome of comparing a new version with the current one (and the anchor).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    pub promoted: bool,
    pub reason: String,
    pub alias: String,
    /// The split every figure of the decision is computed on (`validation`:
    /// the locked test split is only reported, never decided on).
    #[serde(default)]
    pub split: String,
    pub new_version: String,
    pub new_macro_auc: Option<f64>,
    #[serde(default)]
    pub new_cin2_sensitivity: Option<f64>,
    pub current_version: Option<String>,
    /// The current model's macro AUC on the same images.
    pub current_macro_auc: Option<f64>,
    #[serde(default)]
    pub current_cin2_sensitivity: Option<f64>,
    /// The anchor when it is not the current version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anchor: Option<Compared>,
    /// The anchor from this decision on (what the alias records).
    #[serde(default)]
    pub next_anchor: Option<String>,
    pub margin: f64,
    #[serde(default)]
    pub sensitivity_margin: f64,
}

impl PromotionPolicy {
    /// Decides on `new` (its figures on the validation split) against
    /// `current` and the alias's `anchor` (figures on the same images; None:
    /// no current model, or the anchor is the current version).
    /// `incomparable` names why the models cannot be compared (different
    /// classes, a model that could not be evaluated), which blocks promotion.
    pub fn decide(
        &self,
        alias: &str,
        new_version: &str,
        new: PromotionFigures,
        current: Option<&Compared>,
        anchor: Option<&Compared>,
        incomparable: Option<String>,
    ) -> Decision {
        let (m, ms) = (self.promotion_margin, self.sensitivity_margin);
        let mut failures = Vec::new();
        let mut passes = Vec::new();
        if new.macro_auc.is_none() {
            failures.push("the new model's macro AUC is undefined".to_string());
        }
        if let (Some(why), Some(_)) = (&incomparable, current) {
            failures.push(format!("not comparable with the current model: {why}"));
        }
        let others: Vec<(&str, &Compared)> = [("current", current), ("anchor", anchor)]
            .into_iter()
            .filter_map(|(role, c)| Some((role, c?)))
            .collect();
        if incomparable.is_none() {
            for (role, c) in &others {
                let v = &c.version;
                if let (Some(a), Some(b)) = (new.macro_auc, c.figures.macro_auc) {
                    let line = format!("macro AUC {a:.4} vs {role} ({v}) {b:.4} - margin {m}");
                    if a >= b - m {
                        passes.push(line)
                    } else {
                        failures.push(line)
                    }
                }
                match (new.cin2_sensitivity, c.figures.cin2_sensitivity) {
                    (Some(a), Some(b)) => {
                        let line = format!(
                            "CIN2+ sensitivity at rule-out {a:.4} vs {role} ({v}) {b:.4} - margin {ms}"
                        );
                        if a >= b - ms {
                            passes.push(line)
                        } else {
                            failures.push(line)
                        }
                    }
                    (None, Some(_)) => failures.push(format!(
                        "the new model has no CIN2+ refer band, the {role} ({v}) has"
                    )),
                    _ => {}
                }
            }
        }
        let promoted = failures.is_empty();
        let reason = match (promoted, others.is_empty()) {
            (true, true) => format!(
                "no current model; new macro AUC {} on the validation split",
                new.macro_auc.map_or("n/a".into(), |a| format!("{a:.4}"))
            ),
            (true, false) if passes.is_empty() => {
                "the current model has no figures on this validation split".to_string()
            }
            (true, false) => format!("on the validation split: {}", passes.join("; ")),
            (false, _) => format!(
                "not promoted, on the validation split: {}",
                failures.join("; ")
            ),
        };
        // The anchor moves to the new version only when it is at least as good
        // as the anchor (the current version when no other is recorded).
        let reference = anchor.or(current);
        let next_anchor = match (promoted, reference) {
            (false, r) => r.map(|c| c.version.clone()),
            (true, None) => Some(new_version.to_string()),
            (true, Some(r)) => {
                let no_worse = |a: Option<f64>, b: Option<f64>| match (a, b) {
                    (Some(a), Some(b)) => a >= b,
                    (_, None) => true,
                    (None, Some(_)) => false,
                };
                let better = no_worse(new.macro_auc, r.figures.macro_auc)
                    && no_worse(new.cin2_sensitivity, r.figures.cin2_sensitivity);
                Some(if better {
                    new_version.to_string()
                } else {
                    r.version.clone()
                })
            }
        };
        Decision {
            promoted,
            reason,
            alias: alias.to_string(),
            split: "validation".into(),
            new_version: new_version.to_string(),
            new_macro_auc: new.macro_auc,
            new_cin2_sensitivity: new.cin2_sensitivity,
            current_version: current.map(|c| c.version.clone()),
            current_macro_auc: current.and_then(|c| c.figures.macro_auc),
            current_cin2_sensitivity: current.and_then(|c| c.figures.cin2_sensitivity),
            anchor: anchor.cloned(),
            next_anchor,
            margin: m,
            sensitivity_margin: ms,
        }
    }
}

/// Versioned bundles of one model name in an object store.
#[derive(Debug, Clone)]
pub struct Registry {
    store: Arc<dyn ObjectStore>,
    name: String,
    /// Signs what [`Registry::publish`] uploads.
    signing: Option<Arc<SigningKey>>,
    /// Versions [`Registry::fetch`] accepts must be signed by one of these.
    trust: Option<Arc<TrustedKeys>>,
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
            signing: None,
            trust: None,
        })
    }

    /// This registry signing every version it publishes with `key`.
    pub fn signing_with(mut self, key: Arc<SigningKey>) -> Registry {
        self.signing = Some(key);
        self
    }

    /// This registry fetching only versions signed by one of `keys`.
    pub fn trusting(mut self, keys: Arc<TrustedKeys>) -> Registry {
        self.trust = Some(keys);
        self
    }

    /// Whether fetched versions must be signed.
    pub fn verifies(&self) -> bool {
        self.trust.is_some()
    }

    fn untrusted(&self, version: &str, source: SigningError) -> RegistryError {
        RegistryError::Untrusted {
            name: self.name.clone(),
            version: version.to_string(),
            source,
        }
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
        // A signature left in the folder by an earlier publish is not this one's.
        for rel in files
            .iter()
            .filter(|r| r.as_str() != MANIFEST_FILE && r.as_str() != SIGNATURE_FILE)
        {
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
        if let Some(key) = &self.signing {
            self.store.put(
                &self.key(&["versions", &version, SIGNATURE_FILE]),
                &key.sign(&manifest),
                "application/json",
            )?;
        }
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
        self.set_alias_anchored(alias, version, reason, version)
    }

    /// Points `alias` at `version`, recording `anchor` as the version later
    /// promotions must also stay within the margins of.
    pub fn set_alias_anchored(
        &self,
        alias: &str,
        version: &str,
        reason: &str,
        anchor: &str,
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
            anchor: Some(anchor.to_string()),
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
            // A cached copy is checked as a download is: a cache is a folder
            // anyone on the node may have written.
            if b.manifest.version == version && self.check_local(version, dest).is_ok() {
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
        // The manifest first: a version that is not there is named as such;
        // then every file it lists (head, backbone, and the OOD model when
        // there is one).
        let get = |f: &str| -> Result<Vec<u8>, RegistryError> {
            let key = self.key(&["versions", version, f]);
            self.store.get_reporting(&key, &advance).map_err(|e| {
                if e.is_not_found() && f == MANIFEST_FILE {
                    RegistryError::NoVersion {
                        name: self.name.clone(),
                        version: version.to_string(),
                    }
                } else {
                    e.into()
                }
            })
        };
        let manifest = get(MANIFEST_FILE)?;
        if let Some(trust) = &self.trust {
            let sig = match self
                .store
                .get(&self.key(&["versions", version, SIGNATURE_FILE]))
            {
                Ok(sig) => Some(sig),
                Err(e) if e.is_not_found() => None,
                Err(e) => return Err(e.into()),
            };
            let key_id = trust
                .verify(&manifest, sig.as_deref())
                .map_err(|e| self.untrusted(version, e))?;
            tracing::info!(model = %self.name, version, key_id, "signature verified");
            if let Some(sig) = sig {
                std::fs::write(dest.join(SIGNATURE_FILE), sig).map_err(local)?;
            }
        }
        std::fs::write(dest.join(MANIFEST_FILE), &manifest).map_err(local)?;
        let listed: Vec<String> = serde_json::from_slice::<crate::model::Manifest>(&manifest)
            .map(|m| m.files.into_keys().collect())
            .unwrap_or_else(|_| vec![HEAD_FILE.into(), BACKBONE_FILE.into()]);
        for f in &listed {
            // Bundle::load refuses such names too; never write outside `dest`.
            if f.contains('/') || f.contains("..") || f == MANIFEST_FILE {
                continue;
            }
            std::fs::write(dest.join(f), get(f)?).map_err(local)?;
        }
        Ok(Bundle::load(dest)?)
    }
}

impl Registry {
    /// Checks a local copy of `version` in `dir` against the trusted keys
    /// (nothing to check without them).
    fn check_local(&self, version: &str, dir: &Path) -> Result<(), RegistryError> {
        let Some(trust) = &self.trust else {
            return Ok(());
        };
        let read = |f: &str| std::fs::read(dir.join(f)).ok();
        let manifest = read(MANIFEST_FILE).unwrap_or_default();
        trust
            .verify(&manifest, read(SIGNATURE_FILE).as_deref())
            .map(|_| ())
            .map_err(|e| self.untrusted(version, e))
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

    fn compared(version: &str, auc: f64, sens: Option<f64>) -> Compared {
        Compared {
            version: version.into(),
            figures: PromotionFigures {
                macro_auc: Some(auc),
                cin2_sensitivity: sens,
            },
        }
    }

    fn figures(auc: Option<f64>, sens: Option<f64>) -> PromotionFigures {
        PromotionFigures {
            macro_auc: auc,
            cin2_sensitivity: sens,
        }
    }

    #[test]
    fn policy_promotes_within_the_margins_only() {
        let p = PromotionPolicy {
            promotion_margin: 0.01,
            sensitivity_margin: 0.02,
        };
        let new = |auc, sens| figures(Some(auc), Some(sens));
        let d = p.decide("current", "v2", new(0.9, 0.95), None, None, None);
        assert!(d.promoted && d.split == "validation");
        assert_eq!(d.next_anchor.as_deref(), Some("v2"));
        let v1 = compared("v1", 0.9, Some(0.96));
        let d = p.decide("current", "v2", new(0.895, 0.95), Some(&v1), None, None);
        assert!(d.promoted, "{}", d.reason);
        // Within the margin but worse: promoted, and v1 stays the anchor.
        assert_eq!(d.next_anchor.as_deref(), Some("v1"));
        let d = p.decide("current", "v2", new(0.85, 0.96), Some(&v1), None, None);
        assert!(
            !d.promoted && d.reason.contains("macro AUC 0.8500 vs current (v1) 0.9000"),
            "{}",
            d.reason
        );
        // Macro AUC as good, CIN2+ sensitivity at the operating point worse.
        let d = p.decide("current", "v2", new(0.95, 0.9), Some(&v1), None, None);
        assert!(!d.promoted && d.reason.contains("CIN2+ sensitivity at rule-out 0.9000"));
        let d = p.decide(
            "current",
            "v2",
            figures(Some(0.95), None),
            Some(&v1),
            None,
            None,
        );
        assert!(!d.promoted && d.reason.contains("no CIN2+ refer band"));
        let d = p.decide("current", "v2", figures(None, None), None, None, None);
        assert!(!d.promoted);
        let d = p.decide(
            "current",
            "v2",
            new(0.99, 1.0),
            Some(&compared("v1", 0.5, None)),
            None,
            Some("classes differ".into()),
        );
        assert!(!d.promoted);
    }

    #[test]
    fn quality_cannot_drift_down_a_margin_per_promotion() {
        let p = PromotionPolicy {
            promotion_margin: 0.01,
            sensitivity_margin: 0.02,
        };
        // v2 was promoted 0.008 below v1 (within the margin): v1 stayed the
        // anchor. v3, 0.008 below v2, is within the margin of v2 but not of v1.
        let v1 = compared("v1", 0.900, Some(0.96));
        let v2 = compared("v2", 0.892, Some(0.96));
        let new = figures(Some(0.884), Some(0.96));
        let d = p.decide("current", "v3", new, Some(&v2), Some(&v1), None);
        assert!(!d.promoted, "{}", d.reason);
        assert!(d.reason.contains("vs anchor (v1) 0.9000"), "{}", d.reason);
        assert_eq!(d.next_anchor.as_deref(), Some("v1"));
        // A version better than the anchor becomes the anchor.
        let d = p.decide(
            "current",
            "v3",
            figures(Some(0.91), Some(0.97)),
            Some(&v2),
            Some(&v1),
            None,
        );
        assert!(d.promoted);
        assert_eq!(d.next_anchor.as_deref(), Some("v3"));
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("version", "20261125T220000Z").is_ok());
        for bad in ["", "../x", "a/b", ".hidden", "a b"] {
            assert!(check_name("version", bad).is_err(), "{bad:?}");
        }
    }
}
