//! Command-line interface: local mode (`classify`, `preprocess`, `synth`, `demo`,
//! `train`, `fit-head`, `verify`, `registry`), the broker side (`enqueue`,
//! `enqueue-train`) and the queue workers (`worker`). Errors are reported here with `anyhow`.

mod bench_backbone;
mod classify;
mod deadletters;
mod enqueue;
pub mod exit;
mod queues;
pub mod reference;
mod registry;
mod worker;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

pub use exit::Exit;

pub use crate::local::demo::DemoArgs;
pub use crate::local::fit_head::FitHeadArgs;
pub use crate::local::ClassifyReport;
pub use bench_backbone::{bench_backbone, BenchBackboneArgs, BenchBackboneReport};
pub use classify::{classify, ClassifyArgs};

/// Grades cervical biopsy images for CIN and explains each grade with Grad-CAM.
#[derive(Debug, Parser)]
#[command(name = "cinflow", version, about)]
pub struct Cli {
    /// Log format: `text` for people, `json` for log collectors.
    #[arg(
        long,
        env = "CINFLOW_LOG_FORMAT",
        default_value = "text",
        global = true
    )]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Grade images or folders of images with a model bundle (local mode).
    Classify(ClassifyArgs),
    /// Write the CLAHE'd, resized image exactly as the model sees it.
    Preprocess(PreprocessArgs),
    /// Generate synthetic CIN-like H&E images with a labels CSV (demos, tests, benchmarks only).
    Synth(SynthArgs),
    /// Retrain the head on labelled images (patient-level split, cached features of 8
    /// views, tch training, evaluation report) and optionally promote it in a registry.
    #[cfg(feature = "train")]
    Train(Box<crate::train::TrainOptions>),
    /// Fit a closed-form linear head (diagonal LDA) on labelled images; no libtorch needed.
    FitHead(FitHeadArgs),
    /// Inspect a model registry folder or move an alias by hand.
    Registry(registry::RegistryArgs),
    /// Upload a model bundle folder to the S3 registry and point an alias at it.
    PublishModel(Box<registry::PublishModelArgs>),
    /// Publish inference jobs for images in S3 (one job per slide) and print their ids.
    Enqueue(Box<enqueue::EnqueueArgs>),
    /// Publish a training job (what the nightly CronJob runs) and print its id.
    EnqueueTrain(Box<enqueue::EnqueueTrainArgs>),
    /// Scanner intake: watch an S3 prefix that scanners upload into and enqueue
    /// each complete slide version exactly once (prints each job id and slide).
    Watch(Box<crate::watch::WatchArgs>),
    /// LIS side: deliver each result to the LIS as HL7 v2.5.1 ORU^R01 over
    /// MLLP and/or a FHIR R4 transaction, acking only what the LIS accepted.
    LisBridge(Box<crate::lis::LisBridgeArgs>),
    /// List the dead-letter queue with each message's reason, or send messages back to work.
    DeadLetters(Box<deadletters::DeadLettersArgs>),
    /// Broker queues: `migrate` recreates queues an earlier release declared
    /// with other arguments, keeping their messages.
    Queues(Box<queues::QueuesArgs>),
    /// Run a queue worker (`infer` or `train`) against RabbitMQ and S3.
    Worker(worker::WorkerArgs),
    /// Load ONNX Runtime and set up the device without a model (check a GPU node
    /// or an image before it serves); exits 5 if the runtime or device cannot be used.
    CheckRuntime(crate::infer::InferConfig),
    /// Time the bare backbone at the bundle's input size (no decoding, no head);
    /// prints one JSON line.
    BenchBackbone(Box<BenchBackboneArgs>),
    /// Verify a model bundle (manifest, hashes, head shape) and print its summary.
    Verify {
        /// Bundle folder.
        bundle: PathBuf,
    },
    /// The embedded default: synthetic data -> tiny backbone -> fitted head -> graded
    /// held-out images with heatmaps, all in a local folder.
    Demo(DemoArgs),
}

#[derive(Debug, clap::Args)]
pub struct PreprocessArgs {
    /// Input image (JPEG, PNG or TIFF).
    pub input: PathBuf,
    /// Output PNG.
    pub output: PathBuf,
    /// Output width.
    #[arg(long, default_value_t = 800)]
    pub width: u32,
    /// Output height.
    #[arg(long, default_value_t = 600)]
    pub height: u32,
    /// CLAHE clip limit (OpenCV semantics).
    #[arg(long, default_value_t = 40.0)]
    pub clip_limit: f64,
    /// CLAHE tile grid as COLSxROWS.
    #[arg(long, default_value = "8x8", value_parser = parse_size)]
    pub tiles: (u32, u32),
}

#[derive(Debug, clap::Args)]
pub struct SynthArgs {
    /// Output folder (images, labels.csv, README.txt).
    #[arg(long)]
    pub out: PathBuf,
    /// Number of images.
    #[arg(long)]
    pub n: usize,
    /// Image size as WIDTHxHEIGHT.
    #[arg(long, default_value = "2560x1920", value_parser = parse_size)]
    pub size: (u32, u32),
    /// Random seed (the output is deterministic for a seed).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Image file format.
    #[arg(long, default_value = "jpeg")]
    pub format: SynthFormatArg,
    /// Images per synthetic patient.
    #[arg(long, default_value_t = 3)]
    pub images_per_patient: usize,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum SynthFormatArg {
    Jpeg,
    Png,
}

pub use crate::local::inputs::parse_size;

fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,ort=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// The log format asked for on a command line that did not parse: the flag
/// (`--log-format json` or `--log-format=json`) or its environment variable.
fn requested_log_format() -> LogFormat {
    let args: Vec<String> = std::env::args().collect();
    let flag = args.iter().enumerate().find_map(|(i, a)| {
        a.strip_prefix("--log-format=")
            .map(str::to_string)
            .or_else(|| (a == "--log-format").then(|| args.get(i + 1).cloned().unwrap_or_default()))
    });
    match flag.or_else(|| std::env::var("CINFLOW_LOG_FORMAT").ok()) {
        Some(f) if f.eq_ignore_ascii_case("json") => LogFormat::Json,
        _ => LogFormat::Text,
    }
}

/// Reports a fatal error the way the log format asks: one `error: …` line for
/// people, or one JSON log line (with the exit code and its kind) for log
/// collectors.
fn report_fatal(format: LogFormat, exit: Exit, message: &str) {
    match format {
        LogFormat::Text => eprintln!("error: {message}"),
        LogFormat::Json => tracing::error!(
            exit_code = exit.code(),
            exit = exit.name(),
            error = message,
            "cinflow stopped"
        ),
    }
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            let format = requested_log_format();
            let informational = matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            );
            if informational || matches!(format, LogFormat::Text) {
                e.exit();
            }
            init_logging(format);
            report_fatal(format, Exit::Usage, e.render().to_string().trim());
            return Exit::Usage.into();
        }
    };
    init_logging(cli.log_format);
    match run(cli.command) {
        Ok(exit) => exit.into(),
        Err(e) => {
            let exit = Exit::of(&e);
            report_fatal(cli.log_format, exit, &format!("{e:#}"));
            exit.into()
        }
    }
}

fn run(command: Command) -> anyhow::Result<Exit> {
    match command {
        Command::Classify(args) => {
            let report = classify(&args)?;
            eprintln!(
                "graded {} of {} images into {} ({} failed)",
                report.graded,
                report.total,
                args.out.display(),
                report.failed
            );
            Ok(Exit::of_counts(report.total, report.failed))
        }
        Command::Preprocess(a) => {
            let bytes = std::fs::read(&a.input)
                .with_context(|| format!("cannot read {}", a.input.display()))?;
            let cfg = crate::preprocess::PreprocessConfig {
                width: a.width,
                height: a.height,
                clahe: crate::preprocess::ClaheParams {
                    clip_limit: a.clip_limit,
                    tile_grid: [a.tiles.0, a.tiles.1],
                },
            };
            let img = crate::preprocess::preprocess(&bytes, &cfg)
                .with_context(|| a.input.display().to_string())?;
            img.save_with_format(&a.output, image::ImageFormat::Png)
                .with_context(|| format!("cannot write {}", a.output.display()))?;
            eprintln!(
                "wrote {} ({}x{})",
                a.output.display(),
                img.width(),
                img.height()
            );
            Ok(Exit::Success)
        }
        Command::Synth(a) => {
            let opts = crate::synth::SynthOptions {
                out: a.out.clone(),
                n: a.n,
                width: a.size.0,
                height: a.size.1,
                seed: a.seed,
                format: match a.format {
                    SynthFormatArg::Jpeg => crate::synth::SynthFormat::Jpeg,
                    SynthFormatArg::Png => crate::synth::SynthFormat::Png,
                },
                images_per_patient: a.images_per_patient,
            };
            let bar = progress_bar(a.n as u64, "synth");
            let summary = crate::synth::generate(&opts, Some(&bar))?;
            bar.finish_and_clear();
            eprintln!(
                "wrote {} SYNTHETIC images (for demos, tests and benchmarks; not clinical data) and {}",
                summary.images.len(),
                summary.labels_csv.display()
            );
            Ok(Exit::Success)
        }
        #[cfg(feature = "train")]
        Command::Train(o) => {
            let out = crate::train::train(&o)?;
            print_train_outcome(&out);
            Ok(Exit::Success)
        }
        Command::Registry(a) => registry::run(&a),
        Command::PublishModel(a) => registry::publish(&a),
        Command::CheckRuntime(cfg) => match crate::infer::check_runtime(&cfg) {
            Ok(r) => {
                println!("ONNX Runtime: {}", r.ort_lib);
                let listed = |yes| {
                    if yes {
                        "in this build"
                    } else {
                        "not in this build"
                    }
                };
                println!("CUDA execution provider: {}", listed(r.cuda_listed));
                println!("TensorRT execution provider: {}", listed(r.tensorrt_listed));
                let device = clap::ValueEnum::to_possible_value(&cfg.device)
                    .map_or_else(|| "?".into(), |v| v.get_name().to_string());
                println!(
                    "device {device}: sessions run on {}, IO binding {}",
                    r.provider,
                    if r.io_binding { "on" } else { "off" }
                );
                Ok(Exit::Success)
            }
            Err(e) => Err(e.into()),
        },
        Command::BenchBackbone(a) => {
            println!("{}", serde_json::to_string(&bench_backbone(&a)?)?);
            Ok(Exit::Success)
        }
        Command::Enqueue(a) => enqueue::enqueue(&a),
        Command::EnqueueTrain(a) => enqueue::enqueue_train(&a),
        Command::Watch(a) => {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?
                .block_on(crate::watch::run(&a))?;
            Ok(Exit::Success)
        }
        Command::LisBridge(a) => {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?
                .block_on(crate::lis::run(*a))?;
            Ok(Exit::Success)
        }
        Command::DeadLetters(a) => deadletters::run(&a),
        Command::Queues(a) => queues::run(&a),
        Command::Worker(a) => {
            worker::run(a)?;
            Ok(Exit::Success)
        }
        Command::FitHead(a) => {
            crate::local::fit_head::fit_head(&a)?;
            Ok(Exit::Success)
        }
        Command::Verify { bundle } => {
            let b = crate::model::Bundle::load(&bundle)?;
            let m = &b.manifest;
            println!(
                "{} {} ({}, {:?}, classes {:?}, {} feature channels, input {}x{}): all {} file hashes match",
                m.name,
                m.version,
                m.architecture,
                m.task,
                m.classes,
                m.features.channels,
                m.input.width,
                m.input.height,
                m.files.len()
            );
            match &m.calibration {
                Some(c) => println!(
                    "calibrated: temperature {:.4} (fitted on {} {} images)",
                    c.temperature, c.images, c.fitted_on
                ),
                None => println!("calibrated: no (probabilities as the head gives them)"),
            }
            match &m.refer_band {
                Some(b) => println!(
                    "CIN2+ triage: rule-out {:.4} (sensitivity {:.1}%), rule-in {:.4} (specificity {:.1}%), chosen on {} {} images",
                    b.rule_out.threshold,
                    100.0 * b.rule_out.sensitivity,
                    b.rule_in.threshold,
                    100.0 * b.rule_in.specificity,
                    b.positives + b.negatives,
                    b.fitted_on
                ),
                None => println!("CIN2+ triage: none (no refer band in this bundle)"),
            }
            match &m.cam_scale {
                Some(s) => println!(
                    "overlay scale: {:.3} (Grad-CAM), {:.3} (contrastive), the {}th percentile of {} {} images' maps",
                    s.grad_cam, s.contrastive, s.percentile, s.images, s.fitted_on
                ),
                None => println!("overlay scale: none (each overlay on its own map's maximum)"),
            }
            if let Some(q) = &m.quality_review {
                println!(
                    "input quality: {} of {} {} images fail a check",
                    q.flagged_images, q.images, q.fitted_on
                );
            }
            Ok(Exit::Success)
        }
        Command::Demo(a) => crate::local::demo::demo(&a),
    }
}

/// Prints what a training run produced.
#[cfg(feature = "train")]
pub fn print_train_outcome(o: &crate::train::TrainOutcome) {
    println!("trained {} -> {}", o.version, o.bundle.display());
    println!(
        "  features:        {} images computed, {} from the cache",
        o.features_computed, o.features_cached
    );
    println!("  locked test:     {}", o.test.headline());
    println!("  mean of 8 views: {}", o.test_tta.headline());
    if let Some(b) = &o.refer_band {
        println!(
            "  CIN2+ band:      rule-out {:.3}, rule-in {:.3} (validation: sensitivity {:.1}%, specificity {:.1}%)",
            b.rule_out.threshold,
            b.rule_in.threshold,
            100.0 * b.rule_out.sensitivity,
            100.0 * b.rule_in.specificity
        );
    }
    for l in &o.levels.levels {
        println!("  {:<16} {}", format!("per {}:", l.level), l.headline());
    }
    if let Some(d) = &o.decision {
        println!(
            "  registry:        {} ({})",
            if d.promoted {
                "promoted"
            } else {
                "NOT promoted"
            },
            d.reason
        );
    }
    println!(
        "  report:          {}",
        o.report_dir.join("report.html").display()
    );
}

pub use crate::progress::progress_bar;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("2560x1920"), Ok((2560, 1920)));
        assert!(parse_size("800").is_err());
        assert!(parse_size("0x5").is_err());
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        // debug_assert only checks in debug builds; the suite runs --release, and
        // two flattened settings with one id would silently share a value.
        fn unique(cmd: &clap::Command, path: &str) {
            let mut seen = std::collections::HashSet::new();
            for a in cmd.get_arguments() {
                for key in [
                    Some(format!("id {}", a.get_id())),
                    a.get_long().map(|l| format!("--{l}")),
                    a.get_env().map(|e| format!("env {}", e.to_string_lossy())),
                ]
                .into_iter()
                .flatten()
                {
                    assert!(seen.insert(key.clone()), "{path}: {key} is used twice");
                }
            }
            for sub in cmd.get_subcommands() {
                unique(sub, &format!("{path} {}", sub.get_name()));
            }
        }
        unique(&Cli::command(), "cinflow");
    }

    /// One meaning per flag name: wherever a long flag appears it reads the
    /// same environment variable and takes the same kind of value, and an
    /// environment variable always belongs to the same flag.
    #[test]
    fn one_meaning_per_flag_name() {
        use clap::CommandFactory;
        use std::collections::BTreeMap;
        type Seen = BTreeMap<String, (String, String, String)>;
        fn walk(cmd: &clap::Command, path: &str, by_long: &mut Seen, by_env: &mut Seen) {
            for a in cmd.get_arguments() {
                let Some(long) = a.get_long() else { continue };
                let env = a
                    .get_env()
                    .map_or(String::new(), |e| e.to_string_lossy().into_owned());
                let value = a.get_value_names().map_or(String::new(), |v| v.join(" "));
                let here = (path.to_string(), env.clone(), value.clone());
                if let Some((first, e, v)) = by_long.get(long) {
                    // A one-shot command may leave out the environment
                    // variable that a long-running command reads.
                    let env_agrees = e == &env || e.is_empty() || env.is_empty();
                    assert!(
                        env_agrees && v == &value,
                        "--{long}: `{first}` reads env {e:?} and takes {v:?}, `{path}` reads {env:?} and takes {value:?}"
                    );
                } else {
                    by_long.insert(long.to_string(), here.clone());
                }
                if !env.is_empty() {
                    if let Some((first, l, _)) = by_env.get(&env) {
                        assert_eq!(l, long, "{env}: --{l} in `{first}`, --{long} in `{path}`");
                    } else {
                        by_env.insert(env.clone(), (path.to_string(), long.to_string(), value));
                    }
                }
            }
            for sub in cmd.get_subcommands() {
                walk(sub, &format!("{path} {}", sub.get_name()), by_long, by_env);
            }
        }
        let (mut by_long, mut by_env) = (Seen::new(), Seen::new());
        walk(&Cli::command(), "cinflow", &mut by_long, &mut by_env);
        for (long, (_, _, value)) in &by_long {
            let expected = match long.as_str() {
                "model" => "BUNDLE_DIR",
                "model-name" => "NAME",
                "model-alias" => "ALIAS",
                "model-version" => "VERSION_OR_ALIAS",
                _ => continue,
            };
            assert_eq!(value, expected, "--{long}");
        }
    }
}
