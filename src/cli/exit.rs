//! Exit codes: the one place that decides which code a command ends with.
//!
//! | code | meaning |
//! | --- | --- |
//! | 0 | success |
//! | 1 | failure not otherwise classified (a bug, a full disk) |
//! | 2 | usage error: unknown flag, missing or contradictory arguments |
//! | 3 | partial success: some inputs failed, the rest were done |
//! | 4 | input error: an image, bundle, labels file, registry entry or message that cannot be used |
//! | 5 | runtime unavailable: ONNX Runtime, the execution provider (GPU) or libtorch |
//! | 6 | service unavailable: the broker or the object store cannot be reached or refused |
//!
//! Errors are classified by walking the `anyhow` chain and asking each known
//! error type (wrapped variants included) what kind of failure it is.

use std::process::ExitCode;

use crate::infer::InferError;
use crate::lis::LisError;
use crate::local::classify::ClassifyError;
use crate::model::signing::SigningError;
use crate::model::{BundleError, HeadError, RegistryError};
use crate::pipeline::ModelError;
use crate::preprocess::PreprocessError;
use crate::queue::messages::MessageError;
use crate::queue::QueueError;
use crate::storage::StoreError;
use crate::train::split::SplitError;
use crate::train::{FeatureError, LabelsError, TrainError};
use crate::watch::WatchError;
use crate::worker::serving::ServingError;
use crate::worker::JobError;

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Success,
    Failure,
    Usage,
    Partial,
    Input,
    Runtime,
    Service,
}

impl Exit {
    /// Every exit, in code order (for the generated reference).
    pub const ALL: [Exit; 7] = [
        Exit::Success,
        Exit::Failure,
        Exit::Usage,
        Exit::Partial,
        Exit::Input,
        Exit::Runtime,
        Exit::Service,
    ];

    pub fn code(self) -> u8 {
        match self {
            Exit::Success => 0,
            Exit::Failure => 1,
            Exit::Usage => 2,
            Exit::Partial => 3,
            Exit::Input => 4,
            Exit::Runtime => 5,
            Exit::Service => 6,
        }
    }

    /// A short name, the `exit` field of a fatal JSON log line.
    pub fn name(self) -> &'static str {
        match self {
            Exit::Success => "success",
            Exit::Failure => "failure",
            Exit::Usage => "usage",
            Exit::Partial => "partial",
            Exit::Input => "input",
            Exit::Runtime => "runtime-unavailable",
            Exit::Service => "service-unavailable",
        }
    }

    pub fn meaning(self) -> &'static str {
        match self {
            Exit::Success => "success",
            Exit::Failure => "failure not otherwise classified (a bug, a full disk)",
            Exit::Usage => "usage error: unknown flag, missing or contradictory arguments",
            Exit::Partial => "partial success: some inputs failed, the rest were done",
            Exit::Input => {
                "input error: an image, bundle, labels file, registry entry or message that cannot be used"
            }
            Exit::Runtime => {
                "runtime unavailable: ONNX Runtime, the execution provider (GPU) or libtorch"
            }
            Exit::Service => {
                "service unavailable: the broker or the object store cannot be reached or refused"
            }
        }
    }

    /// The exit of a command that tried `total` inputs and `failed` of them failed.
    pub fn of_counts(total: usize, failed: usize) -> Exit {
        match failed {
            0 => Exit::Success,
            f if f >= total => Exit::Input,
            _ => Exit::Partial,
        }
    }

    /// What a fatal error means for the exit code.
    pub fn of(err: &anyhow::Error) -> Exit {
        err.chain()
            .find_map(|e| {
                macro_rules! try_as {
                    ($($t:ty),*) => {$(
                        if let Some(x) = e.downcast_ref::<$t>() {
                            return Some(x.exit());
                        }
                    )*};
                }
                try_as!(
                    Usage,
                    Input,
                    InferError,
                    BundleError,
                    HeadError,
                    ModelError,
                    StoreError,
                    QueueError,
                    RegistryError,
                    SigningError,
                    ClassifyError,
                    PreprocessError,
                    ServingError,
                    JobError,
                    MessageError,
                    TrainError,
                    FeatureError,
                    LabelsError,
                    SplitError,
                    WatchError,
                    LisError
                );
                if let Some(io) = e.downcast_ref::<std::io::Error>() {
                    return Some(io_exit(io));
                }
                None
            })
            .unwrap_or(Exit::Failure)
    }
}

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> ExitCode {
        ExitCode::from(e.code())
    }
}

/// Arguments that contradict each other or name nothing (exit 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Usage(pub String);

/// An input that cannot be used, found by a command rather than a library
/// type (exit 4).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Input(pub String);

trait Classify {
    fn exit(&self) -> Exit;
}

impl Classify for WatchError {
    fn exit(&self) -> Exit {
        match self {
            WatchError::Usage(_) => Exit::Usage,
            WatchError::Store(e) => e.exit(),
            WatchError::Queue(e) => e.exit(),
        }
    }
}

impl Classify for LisError {
    fn exit(&self) -> Exit {
        match self {
            LisError::Usage(_) | LisError::Fhir(_) => Exit::Usage,
            LisError::Store(e) => e.exit(),
        }
    }
}

impl Classify for Usage {
    fn exit(&self) -> Exit {
        Exit::Usage
    }
}

impl Classify for Input {
    fn exit(&self) -> Exit {
        Exit::Input
    }
}

fn io_exit(e: &std::io::Error) -> Exit {
    use std::io::ErrorKind::*;
    match e.kind() {
        NotFound | PermissionDenied | InvalidData | InvalidInput | UnexpectedEof => Exit::Input,
        _ => Exit::Failure,
    }
}

impl Classify for InferError {
    fn exit(&self) -> Exit {
        match self {
            InferError::Runtime { .. }
            | InferError::CudaUnavailable(_)
            | InferError::TensorRtUnavailable(_) => Exit::Runtime,
            InferError::Session { .. } | InferError::Interface { .. } => Exit::Input,
            InferError::Run(_) => Exit::Failure,
        }
    }
}

impl Classify for BundleError {
    fn exit(&self) -> Exit {
        match self {
            BundleError::Write { .. } => Exit::Failure,
            _ => Exit::Input,
        }
    }
}

impl Classify for HeadError {
    fn exit(&self) -> Exit {
        Exit::Input
    }
}

impl Classify for ModelError {
    fn exit(&self) -> Exit {
        match self {
            ModelError::Bundle(b) => b.exit(),
            ModelError::Infer(i) => i.exit(),
        }
    }
}

impl Classify for StoreError {
    fn exit(&self) -> Exit {
        match self {
            StoreError::NotFound { .. }
            | StoreError::TooLarge { .. }
            | StoreError::BadKey { .. } => Exit::Input,
            StoreError::Unavailable { .. } | StoreError::Backend { .. } => Exit::Service,
            StoreError::Io { source, .. } => io_exit(source),
        }
    }
}

impl Classify for QueueError {
    fn exit(&self) -> Exit {
        match self {
            QueueError::Config { .. } => Exit::Usage,
            _ => Exit::Service,
        }
    }
}

impl Classify for RegistryError {
    fn exit(&self) -> Exit {
        match self {
            RegistryError::Store(s) => s.exit(),
            RegistryError::Bundle(b) => b.exit(),
            RegistryError::BadName { .. } => Exit::Usage,
            RegistryError::Exists { .. }
            | RegistryError::NoVersion { .. }
            | RegistryError::Corrupt { .. } => Exit::Input,
            RegistryError::Local { source, .. } => io_exit(source),
            RegistryError::Signing(s) => s.exit(),
            RegistryError::Untrusted { .. } => Exit::Input,
        }
    }
}

impl Classify for SigningError {
    /// A key file that cannot be read is a bad flag; a signature that does
    /// not hold is bad input.
    fn exit(&self) -> Exit {
        match self {
            SigningError::Key { .. } => Exit::Usage,
            _ => Exit::Input,
        }
    }
}

impl Classify for ClassifyError {
    fn exit(&self) -> Exit {
        match self {
            ClassifyError::Model(m) => m.exit(),
            ClassifyError::NoImages(_) => Exit::Input,
            ClassifyError::Write { source, .. } => io_exit(source),
        }
    }
}

impl Classify for PreprocessError {
    fn exit(&self) -> Exit {
        Exit::Input
    }
}

impl Classify for ServingError {
    fn exit(&self) -> Exit {
        match self {
            ServingError::Unknown { .. } => Exit::Input,
            ServingError::Registry(r) => r.exit(),
            ServingError::Load { source, .. } => source.exit(),
        }
    }
}

impl Classify for JobError {
    fn exit(&self) -> Exit {
        match self {
            JobError::Store(s) => s.exit(),
            JobError::Registry(r) => r.exit(),
            JobError::Serving(s) => s.exit(),
            JobError::Queue(q) => q.exit(),
            #[cfg(feature = "train")]
            JobError::Train(t) => t.exit(),
            JobError::Local(io) => io_exit(io),
            JobError::Invalid(_) => Exit::Input,
            JobError::During { source, .. } => source.exit(),
        }
    }
}

impl Classify for MessageError {
    fn exit(&self) -> Exit {
        Exit::Input
    }
}

impl Classify for LabelsError {
    fn exit(&self) -> Exit {
        Exit::Input
    }
}

impl Classify for SplitError {
    fn exit(&self) -> Exit {
        Exit::Input
    }
}

impl Classify for FeatureError {
    fn exit(&self) -> Exit {
        match self {
            FeatureError::Read { .. } | FeatureError::Image { .. } => Exit::Input,
            FeatureError::Backbone(i) => i.exit(),
            FeatureError::Store(s) => s.exit(),
        }
    }
}

impl Classify for TrainError {
    fn exit(&self) -> Exit {
        match self {
            TrainError::Labels(_) | TrainError::Data(_) | TrainError::Split(_) => Exit::Input,
            TrainError::Features(f) => f.exit(),
            TrainError::Model(m) => m.exit(),
            TrainError::Bundle(b) => b.exit(),
            TrainError::Infer(i) => i.exit(),
            TrainError::Registry(r) => r.exit(),
            #[cfg(feature = "train")]
            TrainError::Head(h) => {
                use crate::train::HeadTrainError;
                match h {
                    HeadTrainError::NoCuda => Exit::Runtime,
                    HeadTrainError::Invalid(_) => Exit::Input,
                    HeadTrainError::Torch(_) => Exit::Failure,
                }
            }
            TrainError::Report(_) => Exit::Failure,
            TrainError::Io { source, .. } => io_exit(source),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_distinct_and_in_order() {
        for (i, e) in Exit::ALL.iter().enumerate() {
            assert_eq!(usize::from(e.code()), i);
        }
    }

    #[test]
    fn wrapped_errors_keep_their_kind() {
        let runtime = InferError::Runtime {
            path: "x".into(),
            detail: "y".into(),
        };
        let e =
            anyhow::Error::new(ClassifyError::Model(ModelError::Infer(runtime))).context("grading");
        assert_eq!(Exit::of(&e), Exit::Runtime);
        let unavailable = StoreError::Unavailable {
            uri: "s3://b/k".into(),
            detail: "timeout".into(),
        };
        let e = anyhow::Error::new(ServingError::Registry(RegistryError::Store(unavailable)));
        assert_eq!(Exit::of(&e), Exit::Service);
        assert_eq!(
            Exit::of(&anyhow::Error::new(Usage("x".into()))),
            Exit::Usage
        );
        let missing = std::io::Error::new(std::io::ErrorKind::NotFound, "gone");
        assert_eq!(
            Exit::of(&anyhow::Error::new(missing).context("cannot read labels.csv")),
            Exit::Input
        );
        assert_eq!(Exit::of(&anyhow::anyhow!("something odd")), Exit::Failure);
    }

    #[test]
    fn counts() {
        assert_eq!(Exit::of_counts(3, 0), Exit::Success);
        assert_eq!(Exit::of_counts(3, 1), Exit::Partial);
        assert_eq!(Exit::of_counts(3, 3), Exit::Input);
    }
}
