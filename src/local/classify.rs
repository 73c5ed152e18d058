//! `cinflow classify`: grading local image files with the serving engine.
//!
//! Every image runs the worker's stages: read (blocking thread) -> prepare
//! (decode, CLAHE, resize on rayon) -> grade (the model's inference thread,
//! which batches images up to `max_batch`) -> render (rayon) -> write. Up to
//! `in_flight` images are between read and write at once, which bounds memory
//! and keeps every core and the backbone busy.
//!
//! Outputs, per input image with key `K` (the file stem, made unique):
//! `K.json` (a `cinflow.result/v2` record), `K/preprocessed.jpg`, `K/cam.npy`,
//! `K/heatmap-<class>.jpg` (see [`crate::pipeline::artifacts`]), and one
//! `summary.csv` for the run.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::Semaphore;

use super::inputs::{expand, file_uri, output_key};
use crate::engine::{on_cpu, Grader, GraderConfig};
use crate::infer::InferConfig;
use crate::pipeline::{render, Model, ModelError, Overlays, Prepared};
use crate::result::{ImageResult, ImageStatus, ResultRecord};

/// What to grade and how.
#[derive(Debug, Clone)]
pub struct ClassifyOptions {
    /// Model bundle folder.
    pub model: PathBuf,
    /// Output folder.
    pub out: PathBuf,
    pub infer: InferConfig,
    pub grader: GraderConfig,
    pub overlays: Overlays,
    /// Images between read and write at once (0: twice the batch plus the cores).
    pub in_flight: usize,
    /// Image files and folders (searched recursively).
    pub inputs: Vec<PathBuf>,
}

/// Why a classify run could not run at all (per-image failures are entries).
#[derive(Debug, thiserror::Error)]
pub enum ClassifyError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("no images found in {0:?}")]
    NoImages(Vec<PathBuf>),
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// What a classify run did.
#[derive(Debug, Clone)]
pub struct ClassifyReport {
    pub total: usize,
    pub graded: usize,
    pub failed: usize,
    /// Output key and result per input image, in input order.
    pub results: Vec<(String, ImageResult)>,
    /// Seconds from the model being loaded to the last image written.
    pub wall_s: f64,
}

/// Grades every input; per-image failures become error entries, not a crash.
pub fn classify(o: &ClassifyOptions) -> Result<ClassifyReport, ClassifyError> {
    let model = Arc::new(Model::load(&o.model, &o.infer)?);
    let m = model.manifest();
    tracing::info!(model = %m.name, version = %m.version, provider = model.provider(), "model loaded");
    let write_err = |path: &Path| {
        let path = path.display().to_string();
        move |source| ClassifyError::Write { path, source }
    };
    std::fs::create_dir_all(&o.out).map_err(write_err(&o.out))?;
    let paths = expand(&o.inputs);
    if paths.is_empty() {
        return Err(ClassifyError::NoImages(o.inputs.clone()));
    }
    let mut used = HashSet::new();
    let keyed: Vec<(String, PathBuf)> = paths
        .into_iter()
        .map(|p| (output_key(&p, &mut used), p))
        .collect();
    let in_flight = match o.in_flight {
        0 => 2 * o.grader.max_batch + rayon::current_num_threads(),
        n => n,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("cinflow-classify")
        .enable_all()
        .build()
        .map_err(write_err(Path::new("(runtime)")))?;
    let started = Instant::now();
    let results = rt.block_on(grade_all(o, model.clone(), keyed, in_flight))?;
    let wall_s = started.elapsed().as_secs_f64();
    let summary = o.out.join("summary.csv");
    write_summary(&summary, &m.classes, &results).map_err(|e| ClassifyError::Write {
        path: summary.display().to_string(),
        source: std::io::Error::other(e),
    })?;
    let failed = results
        .iter()
        .filter(|(_, r)| r.status == ImageStatus::Error)
        .count();
    Ok(ClassifyReport {
        total: results.len(),
        graded: results.len() - failed,
        failed,
        results,
        wall_s,
    })
}

async fn grade_all(
    o: &ClassifyOptions,
    model: Arc<Model>,
    keyed: Vec<(String, PathBuf)>,
    in_flight: usize,
) -> Result<Vec<(String, ImageResult)>, ClassifyError> {
    let grader = Arc::new(Grader::start(model, o.grader));
    let room = Arc::new(Semaphore::new(in_flight.max(1)));
    let bar = crate::progress::progress_bar(keyed.len() as u64, "classify");
    let mut tasks = tokio::task::JoinSet::new();
    let n = keyed.len();
    for (i, (key, path)) in keyed.into_iter().enumerate() {
        let permit = room.clone().acquire_owned().await.expect("never closed");
        let (grader, out, overlays, bar) = (grader.clone(), o.out.clone(), o.overlays, bar.clone());
        tasks.spawn(async move {
            let r = one_image(&grader, &out, overlays, &key, &path).await;
            drop(permit);
            bar.inc(1);
            (i, r.map(|r| (key, r)))
        });
    }
    let mut results: Vec<Option<(String, ImageResult)>> = vec![None; n];
    while let Some(done) = tasks.join_next().await {
        let (i, r) = done.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
        results[i] = Some(r?);
    }
    bar.finish_and_clear();
    Ok(results
        .into_iter()
        .map(|r| r.expect("every image answers"))
        .collect())
}

/// Read -> prepare -> grade -> render -> write of one image.
async fn one_image(
    grader: &Grader,
    out: &Path,
    overlays: Overlays,
    key: &str,
    path: &Path,
) -> Result<ImageResult, ClassifyError> {
    let model = grader.model().clone();
    let uri = file_uri(path);
    let failed = |sha: Option<String>, e: String| {
        tracing::warn!(image = %path.display(), error = %e, "image not graded");
        ImageResult::failed(uri.clone(), sha, e)
    };
    let t = Instant::now();
    let read = {
        let path = path.to_path_buf();
        tokio::task::spawn_blocking(move || std::fs::read(path))
            .await
            .expect("read task")
    };
    let result = match read {
        Err(e) => failed(None, format!("cannot read file: {e}")),
        Ok(bytes) => {
            let read_ms = t.elapsed().as_secs_f64() * 1e3;
            let m = model.clone();
            match on_cpu(move || m.prepare(&bytes)).await {
                Err(e) => failed(None, e.to_string()),
                Ok(mut p) => {
                    p.timings.fetch_ms = read_ms;
                    let p = Arc::new(p);
                    match grader.grade(p.clone(), 0).await {
                        Err(e) => failed(Some(p.sha256.clone()), e.to_string()),
                        Ok(g) => {
                            write_graded(&model, out, overlays, key, uri.clone(), p, g).await?
                        }
                    }
                }
            }
        }
    };
    let record = ResultRecord::new(
        None,
        None,
        model.manifest(),
        model.provider(),
        vec![result.clone()],
    );
    let json = serde_json::to_vec_pretty(&record).expect("result serialises");
    let file = out.join(format!("{key}.json"));
    write_file(file, json.into()).await?;
    Ok(result)
}

async fn write_graded(
    model: &Arc<Model>,
    out: &Path,
    overlays: Overlays,
    key: &str,
    uri: String,
    prepared: Arc<Prepared>,
    mut graded: crate::pipeline::Graded,
) -> Result<ImageResult, ClassifyError> {
    let (rendered, render_ms) = {
        let (m, p, g) = (model.clone(), prepared.clone(), graded.clone());
        on_cpu(move || {
            let t = Instant::now();
            let r = render(&p, &g, m.manifest(), overlays);
            (r, t.elapsed().as_secs_f64() * 1e3)
        })
        .await
    };
    graded.timings.render_ms = render_ms;
    let t = Instant::now();
    let dir = out.join(key);
    for a in &rendered.artifacts {
        write_file(dir.join(&a.name), a.bytes.clone()).await?;
    }
    graded.timings.upload_ms = t.elapsed().as_secs_f64() * 1e3;
    Ok(
        rendered.image_result(uri, &prepared, &graded, model.manifest(), |name| {
            format!("{key}/{name}")
        }),
    )
}

async fn write_file(path: PathBuf, bytes: bytes::Bytes) -> Result<(), ClassifyError> {
    let shown = path.display().to_string();
    tokio::task::spawn_blocking(move || {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(&path, &bytes)
    })
    .await
    .expect("write task")
    .map_err(|source| ClassifyError::Write {
        path: shown,
        source,
    })
}

fn write_summary(
    path: &Path,
    classes: &[String],
    results: &[(String, ImageResult)],
) -> Result<(), csv::Error> {
    let mut w = csv::Writer::from_path(path)?;
    let mut header = vec![
        "key".to_string(),
        "image".into(),
        "status".into(),
        "predicted_class".into(),
        "p_cin2_plus".into(),
        "triage".into(),
        "qc_flags".into(),
    ];
    header.extend(classes.iter().map(|c| format!("p_{c}")));
    header.push("error".into());
    w.write_record(&header)?;
    for (key, r) in results {
        let mut row = vec![
            key.clone(),
            r.uri.clone(),
            format!("{:?}", r.status).to_lowercase(),
            r.predicted_class.clone().unwrap_or_default(),
            r.p_cin2_plus.map(|p| format!("{p:.6}")).unwrap_or_default(),
            r.triage.map(|t| t.to_string()).unwrap_or_default(),
            r.quality.as_ref().map(|q| q.summary()).unwrap_or_default(),
        ];
        row.extend(classes.iter().map(|c| {
            r.probabilities
                .as_ref()
                .and_then(|p| p.get(c))
                .map(|p| format!("{p:.6}"))
                .unwrap_or_default()
        }));
        row.push(r.error.clone().unwrap_or_default());
        w.write_record(&row)?;
    }
    w.flush()?;
    Ok(())
}
