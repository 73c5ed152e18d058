//! Stage 3, grade: the job's pinned model version's inference thread, which
//! batches images across jobs (up to `--max-batch`, waiting at most
//! `--batch-wait-ms`) and routes each grade back to its job. See
//! [`crate::engine::Grader`].

use std::sync::Arc;

use crate::engine::Grader;
use crate::infer::InferError;
use crate::pipeline::{Graded, Prepared};

/// Grades one prepared image of the job tagged `job`.
pub async fn grade(grader: &Grader, image: Arc<Prepared>, job: u64) -> Result<Graded, InferError> {
    grader.grade(image, job).await
}
