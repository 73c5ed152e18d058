//! Training-path costs: feature extraction (decode, CLAHE, resize and the 8 views
//! through the tiny exported backbone) per image, and one epoch of head training
//! on DenseNet-161-sized pooled features (2208 channels) with the seed's batch size.
//! `scripts/bench-retrain.sh` measures a whole cold retrain against one with 10%
//! new images.

use std::hint::black_box;
use std::path::PathBuf;

use criterion::{criterion_group, criterion_main, Criterion};

use cinflow::pipeline::Model;
use cinflow::train::{train_head, HeadData, HyperParams, TrainDevice};

fn tiny_bundle(dir: &std::path::Path) -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let python = std::env::var_os("CINFLOW_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join(".venv/bin/python"));
    let out = dir.join("tiny");
    let status = std::process::Command::new(python)
        .arg(root.join("tools/export_backbone.py"))
        .args(["--arch", "tiny", "--classes", "4", "--seed", "3", "--out"])
        .arg(&out)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("run the export tool (scripts/setup.sh makes the venv)");
    assert!(status.success());
    out
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let model = Model::load(&tiny_bundle(dir.path()), &Default::default()).unwrap();
    let img = cinflow::synth::render(cinflow::synth::Grade::Cin2, 2560, 1920, 5);
    let jpeg = cinflow::synth::encode(&img, cinflow::synth::SynthFormat::Jpeg);
    let mut g = c.benchmark_group("train");
    g.sample_size(10);
    g.bench_function("features/2560x1920 jpeg, 8 views, tiny backbone", |b| {
        b.iter(|| {
            let p = model.prepare(black_box(&jpeg)).unwrap();
            cinflow::train::view_features(&model, &p).unwrap()
        })
    });

    // One epoch = max_epochs 1 (features are standardised once per run, as in training).
    let (n, k) = (800, 2208);
    let views: Vec<Vec<Vec<f32>>> = (0..n)
        .map(|i| {
            (0..8)
                .map(|v| {
                    (0..k)
                        .map(|j| (((i * 31 + v * 7 + j) as f32) * 0.618).sin().max(0.0))
                        .collect()
                })
                .collect()
        })
        .collect();
    let labels: Vec<usize> = (0..n).map(|i| i % 4).collect();
    let data = HeadData {
        task: cinflow::model::Task::Multiclass,
        classes: 4,
        train: views[..640].iter().map(|v| v.as_slice()).collect(),
        train_labels: labels[..640].to_vec(),
        val: views[640..].iter().map(|v| v[0].as_slice()).collect(),
        val_labels: labels[640..].to_vec(),
    };
    for epochs in [1, 11] {
        let hp = HyperParams {
            max_epochs: epochs,
            train_device: TrainDevice::Cpu,
            ..Default::default()
        };
        g.bench_function(
            format!("head/{epochs} epochs, 640 train + 160 val images x 2208 features"),
            |b| b.iter(|| train_head(black_box(&data), &hp, None).unwrap()),
        );
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
