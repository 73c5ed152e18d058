//! `cinflow registry`: list versions and aliases of a registry (a folder, or the
//! S3 bucket the workers serve from), or point an alias at a version by hand (a
//! rollback, or overriding a decision); `cinflow publish-model`: a bundle into
//! the S3 registry.

use super::exit::{Exit, Input};
use std::sync::Arc;

use crate::model::Registry;
use crate::storage::LocalStore;

#[derive(Debug, Clone, clap::Args)]
pub struct RegistryArgs {
    /// Registry folder; without it, the registry in the S3 bucket (`--s3-bucket`,
    /// `models/<name>/`), which the workers serve from.
    #[arg(long, env = "CINFLOW_REGISTRY")]
    pub registry: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub s3: crate::storage::S3Config,
    /// Model name in the registry (`models/<name>/`).
    #[arg(
        long = "model-name",
        alias = "name",
        env = "CINFLOW_MODEL_NAME",
        value_name = "NAME"
    )]
    pub name: String,
    #[command(subcommand)]
    pub action: RegistryAction,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum RegistryAction {
    /// List versions with their test figures and promotion decisions.
    List {
        /// Alias to show.
        #[arg(
            long = "model-alias",
            alias = "alias",
            value_name = "ALIAS",
            default_value = "current"
        )]
        alias: String,
    },
    /// Point an alias at a version.
    Promote {
        version: String,
        /// Alias to move.
        #[arg(
            long = "model-alias",
            alias = "alias",
            value_name = "ALIAS",
            default_value = "current"
        )]
        alias: String,
        /// Why (kept in the alias record).
        #[arg(long, default_value = "promoted by hand")]
        reason: String,
    },
}

pub(super) fn run(a: &RegistryArgs) -> anyhow::Result<Exit> {
    let store: Arc<dyn crate::storage::ObjectStore> = match &a.registry {
        Some(dir) => Arc::new(LocalStore::new(dir)),
        None => Arc::new(crate::storage::S3Store::new(&a.s3)?),
    };
    let r = Registry::new(store, &a.name)?;
    match &a.action {
        RegistryAction::List { alias } => {
            let current = r.alias(alias)?;
            for v in r.versions()? {
                let d = r.decision(&v)?;
                let mark = if current.as_ref().is_some_and(|c| c.version == v) {
                    format!("  <- {alias}")
                } else {
                    String::new()
                };
                // Decisions from before promotion used the validation split were on the test split.
                let split = d.as_ref().map_or(String::new(), |d| {
                    if d.split.is_empty() {
                        "test".to_string()
                    } else {
                        d.split.clone()
                    }
                });
                println!(
                    "{v}: macro AUC {} ({split}); {}{mark}",
                    d.as_ref()
                        .and_then(|d| d.new_macro_auc)
                        .map_or("n/a".into(), |x| format!("{x:.4}")),
                    d.map_or("no decision recorded".into(), |d| format!(
                        "{} ({})",
                        if d.promoted {
                            "promoted"
                        } else {
                            "not promoted"
                        },
                        d.reason
                    )),
                );
            }
            if current.is_none() {
                println!("alias {alias:?} points nowhere");
            }
        }
        RegistryAction::Promote {
            version,
            alias,
            reason,
        } => {
            let rec = r.set_alias(alias, version, reason)?;
            println!(
                "{alias} -> {} (was {})",
                rec.version,
                rec.previous.as_deref().unwrap_or("nothing")
            );
        }
    }
    Ok(Exit::Success)
}

/// `cinflow publish-model`: a bundle folder into the S3 registry.
#[derive(Debug, Clone, clap::Args)]
pub struct PublishModelArgs {
    /// Model bundle folder (manifest.json, backbone.onnx, head.safetensors, …).
    pub bundle: std::path::PathBuf,
    /// Model name in the registry (`models/<name>/` in the bucket).
    #[arg(long = "model-name", env = "CINFLOW_MODEL_NAME", value_name = "NAME")]
    pub name: String,
    /// Alias to point at the published version (`none`: publish only).
    #[arg(
        long = "model-alias",
        alias = "alias",
        env = "CINFLOW_MODEL_ALIAS",
        value_name = "ALIAS",
        default_value = "current"
    )]
    pub alias: String,
    #[command(flatten)]
    pub signing: crate::model::signing::ModelSigning,
    #[command(flatten)]
    pub s3: crate::storage::S3Config,
}

/// Verifies the bundle, uploads it as a new version (manifest last) and moves
/// the alias. Publishing the same version again with identical files is a no-op
/// that leaves an existing alias alone (so a seeding job can be re-run without
/// undoing a promotion); a different bundle under an existing version is refused.
pub(super) fn publish(a: &PublishModelArgs) -> anyhow::Result<Exit> {
    let store = Arc::new(crate::storage::S3Store::new(&a.s3)?);
    let mut r = Registry::new(store, &a.name)?;
    if let Some(key) = a.signing.load()? {
        eprintln!("signing with key {}", key.key_id());
        r = r.signing_with(key);
    }
    // Registry::publish verifies the bundle (every file's sha256) first.
    let bar = crate::progress::transfer_bar("upload");
    let version = match r.publish_showing(&a.bundle, &bar) {
        Ok(v) => {
            println!("published {} {v} to {}", a.name, r.version_uri(&v));
            v
        }
        Err(crate::model::RegistryError::Exists { version, .. }) => {
            let theirs = r.get_file(&version, "manifest.json")?;
            let ours = std::fs::read(a.bundle.join("manifest.json"))?;
            if theirs != ours {
                return Err(Input(format!(
                    "{} version {version} already exists in the registry with a different manifest; give the new bundle its own version",
                    a.name
                ))
                .into());
            }
            println!(
                "{} {version} is already published (identical manifest)",
                a.name
            );
            // Re-running a seeding job must not undo a later promotion.
            if a.alias != "none" && r.alias(&a.alias)?.is_some() {
                println!("alias {} left as it is", a.alias);
                return Ok(Exit::Success);
            }
            version
        }
        Err(e) => return Err(e.into()),
    };
    if a.alias != "none" {
        let rec = r.set_alias(&a.alias, &version, "published by cinflow publish-model")?;
        println!(
            "{} -> {} (was {})",
            a.alias,
            rec.version,
            rec.previous.as_deref().unwrap_or("nothing")
        );
    }
    Ok(Exit::Success)
}
