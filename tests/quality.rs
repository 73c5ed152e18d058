//! Input quality control on real image files: the measurements agree with
//! OpenCV (tools/reference_quality.py), and `cinflow classify` flags blurred,
//! blank, over-exposed and undersized images with their reasons, triages them
//! `refer` and says so in summary.csv, while a sharp tissue image passes.

mod common;

use std::path::{Path, PathBuf};

use cinflow::model::Triage;
use cinflow::quality::{check, measure, QualityThresholds};
use image::{Rgb, RgbImage};

/// The bad inputs a lab sees, made from a synthetic tissue image.
fn inputs(dir: &Path) -> Vec<(&'static str, PathBuf)> {
    std::fs::create_dir_all(dir).unwrap();
    let tissue = cinflow::synth::render(cinflow::synth::Grade::Cin2, 1600, 1200, 41);
    let save = |name: &str, img: &RgbImage| {
        let p = dir.join(format!("{name}.png"));
        img.save(&p).unwrap();
        p
    };
    let blurred = image::imageops::blur(&tissue, 12.0);
    let mut glass = RgbImage::from_pixel(1600, 1200, Rgb([236, 234, 238]));
    for (i, px) in glass.pixels_mut().enumerate() {
        // Faint sensor noise on empty glass.
        let n = ((i * 7919) % 5) as u8;
        px.0 = [px.0[0] - n, px.0[1], px.0[2] - n / 2];
    }
    let mut overexposed = tissue.clone();
    for px in overexposed.pixels_mut() {
        px.0 = px.0.map(|v| (f32::from(v) * 2.4).min(255.0) as u8);
    }
    let small = image::imageops::resize(&tissue, 320, 240, image::imageops::FilterType::Triangle);
    vec![
        ("tissue", save("tissue", &tissue)),
        ("blurred", save("blurred", &blurred)),
        ("glass", save("glass", &glass)),
        ("overexposed", save("overexposed", &overexposed)),
        ("small", save("small", &small)),
    ]
}

#[test]
fn measurements_match_opencv() {
    let tmp = tempfile::tempdir().unwrap();
    let inputs = inputs(tmp.path());
    // 1. The measurements themselves, on the very thumbnail cinflow measures
    //    (saved as PNG): the same to 1e-9.
    let thumbs: Vec<PathBuf> = inputs
        .iter()
        .map(|(name, p)| {
            let img = image::open(p).unwrap().to_rgb8();
            let thumb = cinflow::preprocess::resize(&img, 800, 600);
            let path = tmp.path().join(format!("{name}-thumb.png"));
            thumb.save(&path).unwrap();
            path
        })
        .collect();
    let run = |paths: &[PathBuf]| -> Vec<serde_json::Value> {
        let mut args = vec!["800".to_string(), "600".to_string()];
        args.extend(paths.iter().map(|p| p.display().to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        serde_json::from_str(&common::run_python("tools/reference_quality.py", &args)).unwrap()
    };
    let keys = [
        "focus",
        "tissue_fraction",
        "overexposed_fraction",
        "underexposed_fraction",
    ];
    for (path, theirs) in thumbs.iter().zip(run(&thumbs)) {
        let ours = measure(&image::open(path).unwrap().to_rgb8());
        let ours = serde_json::to_value(ours).unwrap();
        for k in keys {
            let (a, b) = (ours[k].as_f64().unwrap(), theirs[k].as_f64().unwrap());
            assert!(
                (a - b).abs() <= 1e-9 * b.abs().max(1.0),
                "{} {k}: {a} vs OpenCV {b}",
                path.display()
            );
        }
    }
    // 2. The whole path from the original: cinflow's area resize is within one
    //    grey level of cv2.INTER_AREA, so focus agrees to 3% and the shares to 0.01.
    let originals: Vec<PathBuf> = inputs.iter().map(|(_, p)| p.clone()).collect();
    for ((name, path), theirs) in inputs.iter().zip(run(&originals)) {
        let img = image::open(path).unwrap().to_rgb8();
        let q = check(&img, (800, 600), &QualityThresholds::default());
        let ours = serde_json::to_value(q.measurements).unwrap();
        eprintln!("{name}: {ours} / OpenCV {theirs}");
        let (a, b) = (
            ours["focus"].as_f64().unwrap(),
            theirs["focus"].as_f64().unwrap(),
        );
        assert!(
            (a - b).abs() <= 0.03 * b.max(1.0),
            "{name} focus: {a} vs {b}"
        );
        for k in &keys[1..] {
            let (a, b) = (ours[k].as_f64().unwrap(), theirs[k].as_f64().unwrap());
            assert!((a - b).abs() <= 0.01, "{name} {k}: {a} vs {b}");
        }
    }
}

#[test]
fn classify_flags_bad_inputs_and_refers_them() {
    let tmp = tempfile::tempdir().unwrap();
    let inputs = inputs(&tmp.path().join("in"));
    // The tiny 4-class bundle with a refer band, so images are triaged.
    let bundle = common::worker::bundle_as_version(
        &common::tiny_bundle(4),
        &tmp.path().join("model"),
        "cin-qc",
        "v1",
    );
    let out = tmp.path().join("out");
    let paths: Vec<PathBuf> = inputs.iter().map(|(_, p)| p.clone()).collect();
    let report = cinflow::local::classify(&common::classify_options(&bundle, &out, paths)).unwrap();
    assert_eq!(report.failed, 0);
    let expected: [(&str, &[&str]); 5] = [
        ("tissue", &[]),
        ("blurred", &["focus"]),
        ("glass", &["focus", "tissue"]),
        // Clipped white reads as glass: too little tissue is seen, too.
        ("overexposed", &["tissue", "overexposed"]),
        ("small", &["size"]),
    ];
    let summary = std::fs::read_to_string(out.join("summary.csv")).unwrap();
    for ((name, path), (want_name, want)) in inputs.iter().zip(expected) {
        assert_eq!(*name, want_name);
        let uri = format!("file://{}", path.display());
        let (_, r) = report.results.iter().find(|(_, r)| r.uri == uri).unwrap();
        let q = r.quality.as_ref().expect("quality measured");
        let checks: Vec<&str> = q.flags.iter().map(|f| f.check.as_str()).collect();
        assert_eq!(checks, want, "{name}: {q:?}");
        if want.is_empty() {
            assert_ne!(r.triage, None);
        } else {
            assert_eq!(r.triage, Some(Triage::Refer), "{name}");
            let line = summary
                .lines()
                .find(|l| l.contains(&format!("{name}.png")))
                .unwrap();
            assert!(line.contains(&q.flags[0].reason), "{line}");
        }
    }
}
