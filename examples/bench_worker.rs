//! Whole-worker throughput: publishes N one-image jobs of synthetic 2560x1920
//! slides, lets a `cinflow worker infer` process grade them from S3, and reports
//! images/s, per-stage latency read from the results, and the ratio to bare
//! inference (backbone + head + Grad-CAM on already preprocessed images) of the
//! same model on the same machine in the same run. The target is a ratio of at
//! least 0.90: fetching, decoding and CLAHE should overlap inference.
//!
//! Run through `scripts/bench-worker.sh` (starts Garage, uses the local RabbitMQ).
//!
//!   bench_worker [--images N] [--arch densenet161|inception_resnet_v2|tiny]
//!                [--concurrency C] [--size WxH] [--device auto|cpu|cuda]

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
    size: (u32, u32),
    device: String,
}

fn parse() -> anyhow::Result<Opts> {
    let mut o = Opts {
        images: 16,
        arch: "densenet161".into(),
        concurrency: 2,
        size: (2560, 1920),
        device: "auto".into(),
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let v = args.get(i + 1).context("a value after each flag")?;
        match args[i].as_str() {
            "--images" => o.images = v.parse()?,
            "--arch" => o.arch = v.clone(),
            "--concurrency" => o.concurrency = v.parse()?,
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
    let (bare_ips, provider) = {
        let model = Model::load(&bundle, &infer)?;
        let prepared: Vec<_> = uris
            .iter()
            .map(|u| {
                let key = u.split_once(&format!("{}/", s3.bucket)).unwrap().1;
                model.prepare(&store.get(key)?).map_err(anyhow::Error::from)
            })
            .collect::<anyhow::Result<_>>()?;
        model.grade(&[&prepared[0]])?; // warm-up
        let t = Instant::now();
        for p in &prepared {
            model.grade(&[p])?;
        }
        (
            o.images as f64 / t.elapsed().as_secs_f64(),
            model.provider(),
        )
    };
    eprintln!("[bench] bare inference: {bare_ips:.2} images/s ({provider})");

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
    let rows: [(&str, Stage); 9] = [
        ("queue wait", |r| job(r).queue_wait_ms.unwrap_or(f64::NAN)),
        ("fetch", |r| img(r).fetch_ms),
        ("decode", |r| img(r).decode_ms),
        ("CLAHE + resize", |r| img(r).preprocess_ms),
        ("wait for backbone", |r| img(r).infer_wait_ms),
        ("backbone", |r| img(r).infer_ms),
        ("head + Grad-CAM", |r| img(r).cam_ms),
        ("render + upload", |r| img(r).upload_ms),
        ("job total", |r| job(r).total_ms),
    ];
    for (name, f) in rows {
        let (p50, p90) = stage(&f);
        println!("  {name:<18} {p50:>9.1} {p90:>9.1}");
    }
    println!("bare inference:  {bare_ips:.2} images/s");
    println!("worker:          {worker_ips:.2} images/s ({wall:.1} s wall)");
    println!(
        "ratio worker / bare inference: {:.2} (target >= 0.90)",
        worker_ips / bare_ips
    );
    // Leave the shared broker and bucket as they were.
    let _ = rt.block_on(delete_topology(&ch.1, &amqp));
    for k in store.list(&format!("{tag}/"))? {
        let _ = store.delete(&k);
    }
    for k in store.list(&format!("models/{tag}/"))? {
        let _ = store.delete(&k);
    }
    Ok(())
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
