//! Why a job's step failed, and whether that is worth retrying: the worker's
//! one error type. Each variant wraps a module's own error, whose
//! [`Transient`] answer decides; `settle` maps what is left to ack, requeue or
//! dead-letter from it.

use crate::model::RegistryError;
use crate::queue::QueueError;
use crate::retry::Transient;
use crate::storage::StoreError;

use super::serving::ServingError;

/// A failed step of a job.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Serving(#[from] ServingError),
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[cfg(feature = "train")]
    #[error(transparent)]
    Train(#[from] crate::train::TrainError),
    /// The worker's own disk (scratch folders): may free up.
    #[error("local disk: {0}")]
    Local(#[from] std::io::Error),
    /// What the job asks for can never be done (its content, not the system).
    #[error("{0}")]
    Invalid(String),
    /// Another error, with what was being done.
    #[error("{what}: {source}")]
    During {
        what: String,
        #[source]
        source: Box<JobError>,
    },
}

impl JobError {
    /// This error while doing `what`.
    pub fn during(self, what: impl Into<String>) -> JobError {
        JobError::During {
            what: what.into(),
            source: Box::new(self),
        }
    }
}

impl Transient for JobError {
    fn is_transient(&self) -> bool {
        match self {
            JobError::Store(e) => e.is_transient(),
            JobError::Registry(e) => e.is_transient(),
            JobError::Serving(e) => e.is_transient(),
            JobError::Queue(e) => e.is_transient(),
            #[cfg(feature = "train")]
            JobError::Train(e) => e.is_transient(),
            JobError::Local(_) => true,
            JobError::Invalid(_) => false,
            JobError::During { source, .. } => source.is_transient(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transience_comes_from_the_wrapped_error() {
        let down = JobError::from(StoreError::Unavailable {
            uri: "s3://b/k".into(),
            detail: "503".into(),
        });
        assert!(down.is_transient());
        assert!(down.during("fetch").is_transient());
        let missing = JobError::from(StoreError::NotFound {
            uri: "s3://b/k".into(),
        });
        assert!(!missing.during("fetch").is_transient());
        assert!(!JobError::Invalid("bad".into()).is_transient());
        assert_eq!(
            JobError::Invalid("bad".into()).during("labels").to_string(),
            "labels: bad"
        );
    }
}
