//! The model an inference worker serves: the registry alias's version, switched
//! to a newly promoted version between jobs. A new version is downloaded and
//! verified (every file's sha256 against its manifest), its session started and
//! warmed up at the batch sizes it will serve, and its inference thread started
//! before it replaces the old one; if any of that fails the old model stays.
//!
//! Each loaded version is a [`Grader`]: a job holds the one it started with
//! until it ends, so its images are all graded by one version, and the old
//! version's session is dropped when its last job finishes. GPU memory is thus
//! bounded by two versions (the served one and the one being warmed up) plus
//! the versions jobs asked for by name (at most [`MAX_OTHER_MODELS`]).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

use crate::engine::{Grader, GraderConfig};
use crate::infer::InferConfig;
use crate::model::{Registry, RegistryError};
use crate::pipeline::{Model, ModelError};
use crate::retry::Transient;

/// Why a model could not be served.
#[derive(Debug, thiserror::Error)]
pub enum ServingError {
    #[error("model {name}: no alias or version {want:?} in the registry")]
    Unknown { name: String, want: String },
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("model {name} version {version}: {source}")]
    Load {
        name: String,
        version: String,
        #[source]
        source: Box<ModelError>,
    },
}

impl crate::retry::Transient for ServingError {
    /// Whether the registry's store was only unavailable.
    fn is_transient(&self) -> bool {
        matches!(self, ServingError::Registry(e) if e.is_transient())
    }
}

/// The served model and the registry it comes from. Blocking: call from
/// blocking threads.
#[derive(Debug)]
pub struct Serving {
    registry: Registry,
    alias: String,
    cache: PathBuf,
    infer: InferConfig,
    grader: GraderConfig,
    current: RwLock<Arc<Grader>>,
    /// A version that failed to load, so it is not retried on every poll.
    failed: Mutex<Option<String>>,
    /// Versions that jobs asked for by name (`model` field), kept loaded.
    others: Mutex<HashMap<String, Arc<Grader>>>,
}

/// Versions named by jobs kept loaded besides the served one.
pub const MAX_OTHER_MODELS: usize = 2;

impl Serving {
    /// Loads the version `alias` points at.
    pub fn start(
        registry: Registry,
        alias: &str,
        cache: PathBuf,
        infer: InferConfig,
        grader: GraderConfig,
    ) -> Result<Serving, ServingError> {
        let version = registry
            .alias(alias)?
            .ok_or_else(|| ServingError::Unknown {
                name: registry.name().to_string(),
                want: alias.to_string(),
            })?
            .version;
        let model = load(&registry, &cache, &infer, grader, &version)?;
        Ok(Serving {
            registry,
            alias: alias.to_string(),
            cache,
            infer,
            grader,
            current: RwLock::new(Arc::new(model)),
            failed: Mutex::new(None),
            others: Mutex::new(HashMap::new()),
        })
    }

    /// The model new jobs use.
    pub fn current(&self) -> Arc<Grader> {
        self.current.read().expect("model lock").clone()
    }

    pub fn alias(&self) -> &str {
        &self.alias
    }

    /// The model name in the registry.
    pub fn name(&self) -> &str {
        self.registry.name()
    }

    /// Follows the alias: loads and switches to the version it points at now.
    /// Returns the new version when it switched.
    pub fn refresh(&self) -> Result<Option<String>, ServingError> {
        let Some(target) = self.registry.alias(&self.alias)? else {
            return Ok(None);
        };
        let version = target.version;
        if self.current().model().manifest().version == version {
            return Ok(None);
        }
        if self.failed.lock().expect("lock").as_deref() == Some(version.as_str()) {
            return Ok(None);
        }
        match load(
            &self.registry,
            &self.cache,
            &self.infer,
            self.grader,
            &version,
        ) {
            Ok(model) => {
                let old = std::mem::replace(
                    &mut *self.current.write().expect("model lock"),
                    Arc::new(model),
                );
                tracing::info!(
                    model = %self.registry.name(),
                    from = %old.model().manifest().version,
                    to = %version,
                    "switched to the newly promoted model"
                );
                let m = crate::observe::metrics();
                let cur = self.current();
                m.serving(cur.model().manifest(), cur.model().provider());
                m.model_switch("switched");
                self.prune_cache();
                Ok(Some(version))
            }
            Err(e) if e.is_transient() => Err(e),
            Err(e) => {
                *self.failed.lock().expect("lock") = Some(version.clone());
                crate::observe::metrics().model_switch("refused");
                tracing::error!(
                    error = %e,
                    serving = %self.current().model().manifest().version,
                    "the promoted model cannot be loaded; keeping the current one"
                );
                Err(e)
            }
        }
    }

    /// The model a job names: an alias or a version of the served model name.
    pub fn get(&self, want: &str) -> Result<Arc<Grader>, ServingError> {
        let current = self.current();
        if want == self.alias || want == current.model().manifest().version {
            return Ok(current);
        }
        let version = match self.registry.alias(want) {
            Ok(Some(a)) => a.version,
            Ok(None) => want.to_string(),
            // Not a valid alias name: maybe a version, checked below.
            Err(RegistryError::BadName { .. }) => want.to_string(),
            Err(e) => return Err(e.into()),
        };
        self.version(&version, want)
    }

    /// A version of the served model name by its id (`want`: what the job
    /// asked for, for the error).
    pub fn version(&self, version: &str, want: &str) -> Result<Arc<Grader>, ServingError> {
        let current = self.current();
        if version == current.model().manifest().version {
            return Ok(current);
        }
        if let Some(m) = self.others.lock().expect("lock").get(version) {
            return Ok(m.clone());
        }
        if !self.registry.versions()?.iter().any(|v| v == version) {
            return Err(ServingError::Unknown {
                name: self.registry.name().to_string(),
                want: want.to_string(),
            });
        }
        let model = Arc::new(load(
            &self.registry,
            &self.cache,
            &self.infer,
            self.grader,
            version,
        )?);
        let mut others = self.others.lock().expect("lock");
        if others.len() >= MAX_OTHER_MODELS {
            others.clear();
        }
        others.insert(version.to_string(), model.clone());
        Ok(model)
    }
}

impl Serving {
    /// Deletes downloaded versions that are no longer served, so the cache does
    /// not grow with every promotion. Jobs still running on an old version keep
    /// their loaded session; only its files go.
    fn prune_cache(&self) {
        let keep: Vec<String> = std::iter::once(self.current().model().manifest().version.clone())
            .chain(self.others.lock().expect("lock").keys().cloned())
            .collect();
        let dir = self.cache.join(self.registry.name());
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if !keep.contains(&name) {
                if let Err(err) = std::fs::remove_dir_all(e.path()) {
                    tracing::warn!(path = %e.path().display(), error = %err, "cannot prune the model cache");
                }
            }
        }
    }
}

fn load(
    registry: &Registry,
    cache: &std::path::Path,
    infer: &InferConfig,
    grader: GraderConfig,
    version: &str,
) -> Result<Grader, ServingError> {
    let dir = cache.join(registry.name()).join(version);
    let started = std::time::Instant::now();
    let bar = crate::progress::download_bar("model");
    if let Err(e) = registry.fetch_showing(version, &dir, &bar) {
        if let RegistryError::Untrusted { source, .. } = &e {
            crate::observe::metrics().model_refused(source.label());
            tracing::error!(model = registry.name(), version, error = %e, "model version refused: its signature does not verify against --trusted-keys");
        }
        return Err(e.into());
    }
    bar.finish_and_clear();
    if bar.position() > 0 {
        tracing::info!(
            model = registry.name(),
            version,
            bytes = bar.position(),
            seconds = started.elapsed().as_secs_f64(),
            "downloaded the model"
        );
    }
    let err = |source: ModelError| ServingError::Load {
        name: registry.name().to_string(),
        version: version.to_string(),
        source: Box::new(source),
    };
    let model = Model::load(&dir, infer).map_err(err)?;
    // A model that cannot run one inference is not served. On a GPU every batch
    // size is its own shape (cuDNN picks algorithms per shape): warm them all.
    let sizes: Vec<usize> = if model.provider() == crate::infer::CPU_PROVIDER {
        vec![1]
    } else {
        (1..=grader.for_provider(model.provider()).max_batch).collect()
    };
    model.warm_up(&sizes).map_err(|e| err(e.into()))?;
    Ok(Grader::start(Arc::new(model), grader))
}
