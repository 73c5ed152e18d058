//! Whole-worker throughput, side by side with its references in one run on
//! the same machine: publishes N one-image jobs of synthetic 2560x1920 slides,
//! lets a `cinflow worker infer` process grade them from S3, and reports
//! - images/s of the worker;
//! - images/s of the preprocessing alone (decode + CLAHE + resize + normalise
//!   of the same bytes on every core, no I/O): the ceiling when the backbone is
//!   nearly free (a GPU; the tiny backbone stands in for one here);
//! - images/s of bare inference (backbone + head + Grad-CAM on already
//!   prepared images, best of batch 1 and `--max-batch`): the ceiling when the
//!   backbone dominates (DenseNet-161 on CPU);
//! - images/s of a plain Python worker (tools/reference_worker.py: pika, boto3,
//!   OpenCV, onnxruntime, one overlay per image) on the same jobs, when
//!   `--python DIR` names where pika and boto3 are installed;
//! - per-stage latency from the result records, CPU milliseconds per image
//!   outside the backbone, and bytes written per image.
//!
//! Run through `scripts/bench-worker.sh` (starts Garage, uses the local
//! RabbitMQ, installs pika and boto3 for the reference into the cache).
//!
//!   bench_worker [--images N] [--arch densenet161|inception_resnet_v2|tiny]
//!                [--concurrency C] [--max-batch B] [--size WxH]
//!                [--device auto|cpu|cuda] [--python DIR]

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use cinflow::infer::{Device, InferConfig};
use cinflow::model::Registry;
use cinflow::pipeline::Model;
use cinflow::queue::messages::{JobMessage, JOB_SCHEMA};
use cinflow::queue::{
    confirm_channel, connect, declare_topology, delete_topology, publish_json, AmqpConfig,
};
use cinflow::result::ResultRecord;
use cinflow::storage::{ObjectStore, S3Config, S3Store};
use futures_lite::StreamExt;
use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;

struct Opts {
    images: usize,
    arch: String,
    concurrency: u16,
    max_batch: usize,
    size: (u32, u32),
    device: String,
    /// Where pika and boto3 are installed, for the Python reference worker.
    python_lib: Option<PathBuf>,
}

fn parse() -> anyhow::Result<Opts> {
    let mut o = Opts {
        images: 16,
        arch: "densenet161".into(),
        concurrency: 2,
        max_batch: 0,
        size: (2560, 1920),
        device: "auto".into(),
        python_lib: None,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let v = args.get(i + 1).context("a value after each flag")?;
        match args[i].as_str() {
            "--images" => o.images = v.parse()?,
            "--arch" => o.arch = v.clone(),
            "--concurrency" => o.concurrency = v.parse()?,
            "--max-batch" => o.max_batch = v.parse()?,
            "--python" => o.python_lib = Some(PathBuf::from(v)),
            "--device" => o.device = v.clone(),
            "--size" => {
                let (w, h) = v.split_once('x').context("--size WxH")?;
                o.size = (w.parse()?, h.parse()?);
            }
            "--bench" => {
                i += 1;
                continue;
            }
            other => anyhow::bail!("unknown flag {other}"),
        }
        i += 2;
    }
    Ok(o)
}

fn percentile(mut v: Vec<f64>, q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * q).round() as usize]
}

fn main() -> anyhow::Result<()> {
    let o = parse()?;
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let exe = std::env::current_exe()?;
    let bin = exe
        .parent()
        .and_then(|d| d.parent())
        .map(|d| d.join("cinflow"))
        .filter(|p| p.exists())
        .context("build the cinflow binary first (cargo build --release)")?;
    let tmp = tempfile::tempdir()?;
    let tag = format!("bench-worker-{}", std::process::id());

    // The model: a random-weight export of the chosen backbone.
    let bundle = tmp.path().join("model");
    let py = std::env::var_os("CINFLOW_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join(".venv/bin/python"));
    let st = Command::new(&py)
        .arg(root.join("tools/export_backbone.py"))
        .args([
            "--arch",
            &o.arch,
            "--classes",
            "4",
            "--seed",
            "1",
            "--version",
            "v1",
        ])
        .arg("--out")
        .arg(&bundle)
        .stdout(Stdio::null())
        .status()?;
    anyhow::ensure!(st.success(), "export of {} failed", o.arch);

    // The images, in S3.
    let s3 = S3Config {
        attempts: 5,
        ..s3_from_env()?
    };
    let store = Arc::new(S3Store::new(&s3)?);
    let mut uris = Vec::new();
    let mut jpegs = Vec::new();
    for i in 0..o.images {
        let grade = cinflow::synth::Grade::ALL[i % 4];
        let img = cinflow::synth::render(grade, o.size.0, o.size.1, 1000 + i as u64);
        let mut jpeg = Vec::new();
        img.write_to(
            &mut std::io::Cursor::new(&mut jpeg),
            image::ImageFormat::Jpeg,
        )?;
        let key = format!("{tag}/slides/{i:04}.jpg");
        store.put(&key, &jpeg, "image/jpeg")?;
        uris.push(format!("s3://{}/{key}", s3.bucket));
        jpegs.push(jpeg);
    }
    eprintln!(
        "[bench] {} images of {}x{} in {}",
        o.images,
        o.size.0,
        o.size.1,
        store.uri(&tag)
    );

    // Bare inference: the same model, images already decoded and preprocessed.
    let infer = InferConfig {
        device: match o.device.as_str() {
            "cpu" => Device::Cpu,
            "cuda" => Device::Cuda,
            _ => Device::Auto,
        },
        ..Default::default()
    };
    let (prep_ips, bare_ips, render_alone_ms, upload_alone_ms, provider) = {
        use rayon::prelude::*;
        let model = Model::load(&bundle, &infer)?;
        model.prepare(&jpegs[0])?; // page in the code and tables
        let t = Instant::now();
        let prepared: Vec<_> = jpegs
            .par_iter()
            .map(|b| model.prepare(b))
            .collect::<Result<_, _>>()?;
        let prep_ips = o.images as f64 / t.elapsed().as_secs_f64();
        eprintln!(
            "[bench] preprocessing alone: {prep_ips:.2} images/s on {} threads",
            rayon::current_num_threads()
        );
        let mut best: f64 = 0.0;
        let served = cinflow::engine::GraderConfig {
            max_batch: o.max_batch,
            ..Default::default()
        }
        .for_provider(model.provider())
        .max_batch;
        let mut sizes = vec![1, served];
        sizes.dedup();
        for batch in sizes {
            let chunks: Vec<Vec<&cinflow::pipeline::Prepared>> =
                prepared.chunks(batch).map(|c| c.iter().collect()).collect();
            model.grade(&chunks[0])?; // warm-up at this shape
            let t = Instant::now();
            for c in &chunks {
                model.grade(c)?;
            }
            let ips = o.images as f64 / t.elapsed().as_secs_f64();
            eprintln!("[bench] bare inference, batch {batch}: {ips:.2} images/s");
            best = best.max(ips);
        }
        // Rendering alone, one thread, nothing else running: its CPU cost.
        let sample: Vec<_> = prepared.iter().take(8).collect();
        let graded = model.grade(&sample)?;
        let t = Instant::now();
        let rendered: Vec<_> = sample
            .iter()
            .zip(&graded)
            .map(|(p, g)| {
                cinflow::pipeline::render(
                    p,
                    g,
                    model.manifest(),
                    cinflow::pipeline::Drawing::default(),
                )
            })
            .collect();
        let render_ms = t.elapsed().as_secs_f64() * 1e3 / sample.len() as f64;
        eprintln!("[bench] rendering alone: {render_ms:.1} ms per image");
        // Uploading alone: this process's CPU (signing, hashing, HTTP) for the
        // same artifacts, the client's share of the put stage.
        let cpu = process_cpu_now();
        for (i, r) in rendered.iter().enumerate() {
            for a in &r.artifacts {
                store.put(
                    &format!("{tag}/upload-alone/{i}/{}", a.name),
                    &a.bytes,
                    a.content_type,
                )?;
            }
        }
        let upload_ms = (process_cpu_now() - cpu) * 1e3 / rendered.len() as f64;
        eprintln!("[bench] uploading alone: {upload_ms:.1} ms of client CPU per image");
        (prep_ips, best, render_ms, upload_ms, model.provider())
    };

    // The worker.
    let registry = Registry::new(store.clone(), &tag)?;
    registry.publish(&bundle)?;
    registry.set_alias("current", "v1", "benchmark")?;
    let amqp = AmqpConfig {
        url: std::env::var("CINFLOW_AMQP_URL")
            .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into()),
        jobs_exchange: format!("{tag}.jobs"),
        infer_queue: format!("{tag}.infer"),
        train_queue: format!("{tag}.train"),
        results_exchange: format!("{tag}.results"),
        delivery_limit: 5,
        confirm_timeout_s: 30,
        heartbeat_s: 30,
        ca_file: None,
    };
    let log = tmp.path().join("worker.log");
    let mut worker = Command::new(&bin)
        .args(["worker", "infer"])
        .current_dir(&root)
        .env("CINFLOW_AMQP_URL", &amqp.url)
        .env("CINFLOW_JOBS_EXCHANGE", &amqp.jobs_exchange)
        .env("CINFLOW_INFER_QUEUE", &amqp.infer_queue)
        .env("CINFLOW_TRAIN_QUEUE", &amqp.train_queue)
        .env("CINFLOW_RESULTS_EXCHANGE", &amqp.results_exchange)
        .env("CINFLOW_MODEL_NAME", &tag)
        .env("CINFLOW_MODEL_CACHE", tmp.path().join("models"))
        .env("CINFLOW_RESULTS_PREFIX", format!("{tag}/results"))
        .env("CINFLOW_CONCURRENCY", o.concurrency.to_string())
        .env("CINFLOW_MAX_BATCH", o.max_batch.to_string())
        .env("CINFLOW_DEVICE", &o.device)
        .stdout(Stdio::from(std::fs::File::create(&log)?))
        .stderr(Stdio::from(std::fs::File::create(&log)?.try_clone()?))
        .spawn()?;
    let rt = tokio::runtime::Runtime::new()?;
    let ch = rt.block_on(async {
        let conn = connect(&amqp, "cinflow-bench").await?;
        let ch = confirm_channel(&conn).await?;
        declare_topology(&ch, &amqp).await?;
        // Result events tell when each job is done (polling S3 would load the machine).
        let events = format!("{tag}.events");
        ch.queue_declare(
            events.as_str().into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
        ch.queue_bind(
            events.as_str().into(),
            amqp.results_exchange.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
        let consumer = ch
            .basic_consume(
                events.as_str().into(),
                "bench".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        anyhow::Ok((conn, ch, consumer))
    })?;
    let t = Instant::now();
    while !std::fs::read_to_string(&log)?.contains("consuming") {
        anyhow::ensure!(
            t.elapsed() < Duration::from_secs(300),
            "worker did not start:\n{}",
            std::fs::read_to_string(&log)?
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let t0 = Instant::now();
    let (machine_cpu0, worker_cpu0) = (machine_cpu_seconds(), process_cpu_seconds(worker.id()));
    rt.block_on(async {
        for (i, uri) in uris.iter().enumerate() {
            let job = JobMessage {
                schema: JOB_SCHEMA.into(),
                job_id: format!("job{i:04}"),
                slide_id: format!("slide{i:04}"),
                images: vec![uri.clone()],
                model: None,
                accession_id: None,
                patient_id: None,
                specimen_id: None,
            };
            publish_json(
                &ch.1,
                &amqp,
                &amqp.jobs_exchange,
                cinflow::queue::INFER_KEY,
                &job.job_id,
                &serde_json::to_vec(&job)?,
                None,
            )
            .await?;
        }
        anyhow::Ok(())
    })?;
    let mut results: Vec<ResultRecord> = rt.block_on(async {
        let mut out = Vec::new();
        let mut consumer = ch.2;
        while out.len() < o.images {
            let next = tokio::time::timeout(Duration::from_secs(3600), consumer.next())
                .await
                .context("no result event within an hour")?
                .context("event consumer closed")??;
            out.push(serde_json::from_slice::<ResultRecord>(&next.data)?);
        }
        anyhow::Ok(out)
    })?;
    results.sort_by(|a, b| a.job_id.cmp(&b.job_id));
    let wall = t0.elapsed().as_secs_f64();
    let worker_cpu_s = process_cpu_seconds(worker.id())
        .zip(worker_cpu0)
        .map(|(end, start)| end - start);
    let machine_cpu_s = machine_cpu_seconds()
        .zip(machine_cpu0)
        .map(|(end, start)| end - start);
    let _ = Command::new("kill")
        .args(["-TERM", &worker.id().to_string()])
        .status();
    let _ = worker.wait();
    anyhow::ensure!(
        results
            .iter()
            .all(|r| r.status == cinflow::result::ImageStatus::Ok),
        "some jobs failed"
    );
    let worker_ips = o.images as f64 / wall;

    let stage = |f: &dyn Fn(&ResultRecord) -> f64| -> (f64, f64) {
        let v: Vec<f64> = results.iter().map(f).collect();
        (percentile(v.clone(), 0.5), percentile(v, 0.9))
    };
    println!(
        "cinflow worker throughput: {} x {}x{} JPEG, {}, concurrency {}, {}",
        o.images, o.size.0, o.size.1, o.arch, o.concurrency, provider
    );
    println!("stage latency (ms)      median      p90");
    let rows: [(&str, Stage); 11] = [
        ("queue wait", |r| job(r).queue_wait_ms.unwrap_or(f64::NAN)),
        ("fetch", |r| img(r).fetch_ms),
        ("decode", |r| img(r).decode_ms),
        ("CLAHE + resize", |r| img(r).preprocess_ms),
        ("wait for batch", |r| img(r).infer_wait_ms),
        ("backbone", |r| img(r).infer_ms),
        ("head + Grad-CAM", |r| img(r).cam_ms),
        ("render", |r| img(r).render_ms),
        ("upload", |r| img(r).upload_ms),
        ("images per call", |r| {
            r.images[0].batch.map_or(f64::NAN, |b| b.images as f64)
        }),
        ("job total", |r| job(r).total_ms),
    ];
    for (name, f) in rows {
        let (p50, p90) = stage(&f);
        println!("  {name:<18} {p50:>9.1} {p90:>9.1}");
    }
    // CPU work per image outside the backbone (medians of the CPU stages; the
    // fetch and upload are async I/O).
    let outside = stage(&|r| {
        let t = img(r);
        t.decode_ms + t.preprocess_ms + t.cam_ms + t.render_ms
    })
    .0;
    let written = bytes_written(&store, &results[..results.len().min(8)])?;
    let python_ips = match &o.python_lib {
        Some(lib) => Some(python_reference(
            &py, lib, &bundle, &amqp, &rt, &uris, &tag,
        )?),
        None => None,
    };
    println!("CPU ms per image outside the backbone (decode + CLAHE/resize + CAM + render, medians): {outside:.1}");
    println!(
        "  of which render: {:.1} in the run; {render_alone_ms:.1} alone on one idle thread",
        stage(&|r| img(r).render_ms).0
    );
    println!(
        "render + upload alone: {:.1} ms of CPU per image ({render_alone_ms:.1} + {upload_alone_ms:.1}; target <= 20)",
        render_alone_ms + upload_alone_ms
    );
    let per_image = |s: f64| 1e3 * s / o.images as f64;
    if let Some(cpu) = worker_cpu_s {
        println!(
            "worker process CPU per image, everything: {:.1} ms",
            per_image(cpu)
        );
        if let Some(all) = machine_cpu_s {
            println!(
                "  machine CPU per image during the run: {:.1} ms, of which {:.1} outside the worker (S3 server, broker, publisher)",
                per_image(all),
                per_image(all - cpu)
            );
        }
    }
    println!(
        "bytes written per image: {:.0} kB (target <= 500 kB): {:.0} kB of image artifacts, {:.0} kB of the job's documents (viewer page {:.0} kB, record, FHIR report)",
        written.total() / 1e3,
        written.artifacts / 1e3,
        written.documents / 1e3,
        written.viewer / 1e3
    );
    println!();
    println!(
        "images/s, side by side ({} threads):",
        rayon::current_num_threads()
    );
    println!("  worker:              {worker_ips:>8.2}  ({wall:.1} s wall)");
    println!("  preprocessing alone: {prep_ips:>8.2}  worker/preprocessing = {:.2} (target >= 0.5 with a nearly free backbone)", worker_ips / prep_ips);
    println!("  bare inference:      {bare_ips:>8.2}  worker/bare = {:.2} (target >= 0.95 when the backbone dominates)", worker_ips / bare_ips);
    if let Some(p) = python_ips {
        println!("  Python worker:       {p:>8.2}  worker/Python = {:.2} (target >= 5 with the tiny backbone)", worker_ips / p);
    }
    // Leave the shared broker and bucket as they were.
    let _ = rt.block_on(delete_topology(&ch.1, &amqp));
    for k in store.list(&format!("{tag}/"))? {
        let _ = store.delete(&k);
    }
    for k in store.list(&format!("{tag}/python-results/"))? {
        let _ = store.delete(&k);
    }
    for k in store.list(&format!("models/{tag}/"))? {
        let _ = store.delete(&k);
    }
    Ok(())
}

/// User + system CPU seconds of a running process (Linux /proc).
fn process_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// CPU seconds this process has used (every thread), to the nanosecond.
fn process_cpu_now() -> f64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `t` is a valid timespec for the call to fill.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut t) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_PROCESS_CPUTIME_ID)");
    t.tv_sec as f64 + t.tv_nsec as f64 * 1e-9
}

/// Busy CPU seconds of the whole machine since boot (Linux /proc/stat: every
/// state but idle and iowait).
fn machine_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let ticks: Vec<f64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .map(|t| t.parse().ok())
        .collect::<Option<_>>()?;
    let idle = ticks.get(3)? + ticks.get(4)?;
    Some((ticks.iter().take(8).sum::<f64>() - idle) / 100.0)
}

/// Mean bytes stored per image by one-image jobs, split by what they are.
struct Written {
    /// The image's own artifacts (`images/NNN/...`).
    artifacts: f64,
    /// The job's documents: record, FHIR report, viewer page.
    documents: f64,
    /// Of the documents, the viewer page.
    viewer: f64,
}

impl Written {
    fn total(&self) -> f64 {
        self.artifacts + self.documents
    }
}

/// Mean bytes stored per image by the given one-image jobs (every object
/// under each result's prefix).
fn bytes_written(store: &S3Store, results: &[ResultRecord]) -> anyhow::Result<Written> {
    let (mut artifacts, mut documents, mut viewer) = (0usize, 0usize, 0usize);
    for r in results {
        let uri = r.result_uri.as_deref().context("result URI")?;
        let key = uri.split_once(&format!("{}/", store.bucket())).unwrap().1;
        let prefix = key.trim_end_matches("result.json");
        for k in store.list(prefix)? {
            let len = store.get(&k)?.len();
            let name = &k[prefix.len()..];
            if name.starts_with("images/") {
                artifacts += len;
            } else {
                documents += len;
                if name == cinflow::viewer::VIEWER_NAME {
                    viewer += len;
                }
            }
        }
    }
    let n = results.len().max(1) as f64;
    Ok(Written {
        artifacts: artifacts as f64 / n,
        documents: documents as f64 / n,
        viewer: viewer as f64 / n,
    })
}

/// Runs tools/reference_worker.py on the same jobs (its own queue); images/s.
fn python_reference(
    py: &std::path::Path,
    lib: &std::path::Path,
    bundle: &std::path::Path,
    amqp: &AmqpConfig,
    rt: &tokio::runtime::Runtime,
    uris: &[String],
    tag: &str,
) -> anyhow::Result<f64> {
    let queue = format!("{tag}.python");
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let (conn, ch) = rt.block_on(async {
        let conn = connect(amqp, "cinflow-bench-python").await?;
        let ch = confirm_channel(&conn).await?;
        ch.queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await?;
        for (i, uri) in uris.iter().enumerate() {
            let body = serde_json::json!({"job_id": format!("py{i:04}"), "images": [uri]});
            publish_json(
                &ch,
                amqp,
                "",
                &queue,
                &format!("py{i:04}"),
                &serde_json::to_vec(&body)?,
                None,
            )
            .await?;
        }
        anyhow::Ok((conn, ch))
    })?;
    let t = Instant::now();
    let st = Command::new(py)
        .arg(root.join("tools/reference_worker.py"))
        .arg(bundle)
        .arg(&queue)
        .arg(format!("{tag}/python-results"))
        .arg(uris.len().to_string())
        .env("PYTHONPATH", lib)
        .env("CINFLOW_AMQP_URL", &amqp.url)
        .status()?;
    let ips = uris.len() as f64 / t.elapsed().as_secs_f64();
    anyhow::ensure!(st.success(), "the Python reference worker failed");
    rt.block_on(async {
        let _ = ch
            .queue_delete(queue.as_str().into(), Default::default())
            .await;
        let _ = conn.close(200, "done".into()).await;
    });
    Ok(ips)
}

/// Reads one stage's milliseconds from a result.
type Stage = fn(&ResultRecord) -> f64;

fn img(r: &ResultRecord) -> cinflow::pipeline::StageTimings {
    r.images[0].timings.unwrap_or_default()
}

fn job(r: &ResultRecord) -> cinflow::result::JobTimings {
    r.timings.unwrap_or_default()
}

fn s3_from_env() -> anyhow::Result<S3Config> {
    Ok(S3Config {
        endpoint: Some(
            std::env::var("CINFLOW_S3_ENDPOINT")
                .context("CINFLOW_S3_ENDPOINT is not set: run through scripts/bench-worker.sh")?,
        ),
        region: std::env::var("AWS_REGION").unwrap_or_else(|_| "garage".into()),
        bucket: std::env::var("CINFLOW_S3_BUCKET").unwrap_or_else(|_| "cinflow".into()),
        force_path_style: true,
        attempts: 5,
        backoff_ms: 200,
        timeout_s: 30,
        ca_file: None,
    })
}
