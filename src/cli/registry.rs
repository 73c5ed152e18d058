//! `cinflow registry`: list versions and aliases of a registry folder, or point
//! an alias at a version by hand (a rollback, or overriding a decision).

use std::process::ExitCode;
use std::sync::Arc;

use crate::model::Registry;
use crate::storage::LocalStore;

#[derive(Debug, Clone, clap::Args)]
pub struct RegistryArgs {
    /// Registry folder.
    #[arg(long, env = "CINFLOW_REGISTRY")]
    pub registry: std::path::PathBuf,
    /// Model name.
    #[arg(long, env = "CINFLOW_MODEL_NAME")]
    pub name: String,
    #[command(subcommand)]
    pub action: RegistryAction,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum RegistryAction {
    /// List versions with their test figures and promotion decisions.
    List {
        /// Alias to show.
        #[arg(long, default_value = "current")]
        alias: String,
    },
    /// Point an alias at a version.
    Promote {
        version: String,
        #[arg(long, default_value = "current")]
        alias: String,
        /// Why (kept in the alias record).
        #[arg(long, default_value = "promoted by hand")]
        reason: String,
    },
}

pub(super) fn run(a: &RegistryArgs) -> anyhow::Result<ExitCode> {
    let r = Registry::new(Arc::new(LocalStore::new(&a.registry)), &a.name)?;
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
                println!(
                    "{v}: macro AUC {}; {}{mark}",
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
    Ok(ExitCode::SUCCESS)
}
