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
//! `K/heatmap-<class>.jpg` (see [`crate::pipeline::artifacts`]), `K.html` (the
//! result viewer, [`crate::viewer`]), and for the run `summary.csv` and
//! `index.html` (every image with its grade and triage, linking its viewer).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::Semaphore;

use super::inputs::{expand, file_uri, output_key};
use crate::engine::{on_cpu, Grader, GraderConfig};
use crate::infer::InferConfig;
use crate::pipeline::{render, Drawing, Model, ModelError, Prepared};
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
    pub drawing: Drawing,
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
        0 => 2 * o.grader.sizing_batch() + rayon::current_num_threads(),
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
    let index = o.out.join("index.html");
    std::fs::write(&index, index_page(&m.name, &m.version, &results)).map_err(|source| {
        ClassifyError::Write {
            path: index.display().to_string(),
            source,
        }
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
        let (grader, out, drawing, bar) = (grader.clone(), o.out.clone(), o.drawing, bar.clone());
        tasks.spawn(async move {
            let r = one_image(&grader, &out, drawing, &key, &path).await;
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
    drawing: Drawing,
    key: &str,
    path: &Path,
) -> Result<ImageResult, ClassifyError> {
    let model = grader.model().clone();
    let uri = file_uri(path);
    let failed = |sha: Option<String>, e: String| {
        tracing::warn!(image = %path.display(), error = %e, "image not graded");
        (ImageResult::failed(uri.clone(), sha, e), None)
    };
    let t = Instant::now();
    let read = {
        let path = path.to_path_buf();
        tokio::task::spawn_blocking(move || std::fs::read(path))
            .await
            .expect("read task")
    };
    let (result, viewer) = match read {
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
                        Ok(g) => write_graded(&model, out, drawing, key, uri.clone(), p, g).await?,
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
    let page = crate::viewer::page(&record, &[viewer], model.manifest().cam_scale.as_ref());
    write_file(out.join(viewer_name(key)), page.into()).await?;
    Ok(result)
}

/// The viewer page of the image with key `key`, beside its `K.json`.
pub fn viewer_name(key: &str) -> String {
    format!("{key}.html")
}

async fn write_graded(
    model: &Arc<Model>,
    out: &Path,
    drawing: Drawing,
    key: &str,
    uri: String,
    prepared: Arc<Prepared>,
    mut graded: crate::pipeline::Graded,
) -> Result<(ImageResult, Option<crate::viewer::ViewerImage>), ClassifyError> {
    let (rendered, render_ms) = {
        let (m, p, g) = (model.clone(), prepared.clone(), graded.clone());
        on_cpu(move || {
            let t = Instant::now();
            let r = render(&p, &g, m.manifest(), drawing);
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
    // The record's paths and the page's links are both relative to `out`.
    let locate = |name: &str| format!("{key}/{name}");
    let viewer = rendered.viewer_image(&graded, locate);
    Ok((
        rendered.image_result(uri, &prepared, &graded, model.manifest(), locate),
        Some(viewer),
    ))
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

/// `index.html`: one row per image (grade, P(CIN2+), triage, quality flags)
/// linking its viewer page.
fn index_page(model: &str, version: &str, results: &[(String, ImageResult)]) -> String {
    use std::fmt::Write as _;
    let esc = crate::report::html_escape;
    let mut h = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>cinflow results</title>\
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:1.5em auto;padding:0 1em}}\
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:left}}\
.prelim{{background:#fff4d6;border:1px solid #e8c766;padding:0.5em 1em;border-radius:6px}}</style></head><body>\
<h1>cinflow results</h1><p class=\"prelim\"><b>Preliminary, for decision support:</b> for a pathologist to review, not a diagnosis.</p>\
<p>Model {} version {}; {} images. Open an image to see its overlays for every class.</p>\
<table><tr><th>image</th><th>grade</th><th>P(CIN2+)</th><th>triage</th><th>quality flags</th></tr>",
        esc(model),
        esc(version),
        results.len()
    );
    for (key, r) in results {
        let _ =
            write!(
            h,
            "<tr><td><a href=\"{}\">{}</a></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&viewer_name(key)),
            esc(key),
            esc(r.predicted_class.as_deref().unwrap_or(r.error.as_deref().unwrap_or("not graded"))),
            r.p_cin2_plus.map(|p| format!("{:.1}%", 100.0 * p)).unwrap_or_default(),
            r.triage.map(|t| t.as_str()).unwrap_or_default(),
            esc(&r.quality.as_ref().map(|q| q.summary()).unwrap_or_default()),
        );
    }
    h.push_str("</table></body></html>\n");
    h
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
