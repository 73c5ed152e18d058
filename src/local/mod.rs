//! Local mode: grading folders of images (`cinflow classify`), fitting a head
//! without libtorch (`cinflow fit-head`) and the embedded demo (`cinflow
//! demo`), with a local folder as the object store and no broker. It runs the
//! same serving engine ([`crate::engine`]) and artifact writer
//! ([`crate::pipeline::artifacts`]) as the inference worker.

pub mod classify;
pub mod demo;
pub mod fit_head;
pub mod inputs;

pub use classify::{classify, ClassifyOptions, ClassifyReport};
