//! The result viewer in headless Chromium: `cinflow classify` writes a page per
//! image; tools/test_viewer.py opens it through chromedriver, over HTTP (a
//! local server of the output folder: the page reads the image's pixels and
//! blends them itself, "exact") and from a file:// URL (the browser keeps the
//! page from reading its neighbour's pixels: the page lays its heat layer over
//! the image at 40% and the browser blends, "composite"). It checks that the
//! page loads its image from beside itself and nothing from elsewhere, clicks
//! through classes and map kinds, and compares each state with an independent
//! NumPy/OpenCV drawing. Screenshots land in
//! `$CARGO_TARGET_TMPDIR/viewer-screenshots`.
//!
//! Tolerances: the page and NumPy draw on the same decoded JPEG (Chromium's and
//! OpenCV's libjpeg-turbo), so at most 0.5 grey levels on average and 2 at any
//! pixel but a few (share of pixels off by more than 2 under 0.1%), for the
//! exact canvas and for the composite heat layer; what the browser composited
//! (an element screenshot at one CSS pixel per canvas pixel: 8-bit blending in
//! Skia) within 1 level on average and 1% of pixels off by more than 2; against
//! the classify's own pre-drawn overlay (drawn before JPEG encoding at quality
//! 75 with 4:2:0 chroma subsampling, which blurs the jet colours) 8 levels on
//! average, where a wrong class or scale is off by tens.

mod common;

use std::path::{Path, PathBuf};

use cinflow::cam::CamScale;
use cinflow::model::Manifest;
use serde_json::Value;

/// How the browser opens the page.
#[derive(Clone, Copy, Debug)]
enum Via {
    Http,
    File,
}

impl Via {
    fn arg(self) -> &'static str {
        match self {
            Via::Http => "http",
            Via::File => "file",
        }
    }

    /// The drawing the page chooses when opened this way.
    fn drawing(self) -> &'static str {
        match self {
            Via::Http => "exact",
            Via::File => "composite",
        }
    }
}

fn run_viewer(
    page: &Path,
    record: &Path,
    shots: &Path,
    via: Via,
    scale: Option<&CamScale>,
) -> Value {
    let mut args = vec![
        page.to_str().unwrap().to_string(),
        record.to_str().unwrap().to_string(),
        shots.to_str().unwrap().to_string(),
        via.arg().to_string(),
    ];
    if let Some(s) = scale {
        args.push(serde_json::to_string(s).unwrap());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = common::run_python("tools/test_viewer.py", &args);
    serde_json::from_str(out.lines().last().unwrap()).unwrap()
}

fn within(d: &Value, mean: f64, share: f64) -> bool {
    d["mean_abs"].as_f64().unwrap() <= mean && d["share_over_2"].as_f64().unwrap() <= share
}

fn check(report: &Value, key: &str, via: Via, what: &str) {
    eprintln!("{what}: {report:#}");
    assert_eq!(report["drawing"], via.drawing(), "{what}");
    assert_eq!(report["external_requests"], serde_json::json!([]), "{what}");
    // The image came from beside the page, not from inside it.
    assert_eq!(
        report["image_in_folder"],
        format!("{key}/preprocessed.jpg"),
        "{what}"
    );
    assert_eq!(report["console_errors"], serde_json::json!([]), "{what}");
    let states = report["states"].as_array().unwrap();
    assert_eq!(states.len(), 4);
    for s in states {
        assert_eq!(s["shown"], s["expected_shown"], "{what}: {s}");
        assert_eq!(s["size"], serde_json::json!([800, 600]), "{what}: {s}");
        assert!(within(s, 0.5, 1e-3), "{what}: {s}");
        if let Via::File = via {
            assert_eq!(
                s["screenshot_size"],
                serde_json::json!([800, 600]),
                "{what}: {s}"
            );
            assert!(within(&s["composited"], 1.0, 1e-2), "{what}: {s}");
        }
    }
    // Switching changed what is drawn: the overlays have heat, the image alone has none.
    assert!(states[0]["heat_pixels"].as_u64().unwrap() > 1000, "{what}");
    assert_eq!(states[3]["heat_pixels"], 0);
    let rust = report["rust_overlay_mean_abs"].as_f64().unwrap();
    assert!(rust <= 8.0, "{what}: page vs pre-drawn overlay {rust}");
    for shot in report["screenshots"].as_array().unwrap() {
        let b = std::fs::read(shot.as_str().unwrap()).unwrap();
        assert_eq!(&b[1..4], b"PNG");
    }
    let text = report["figure_text"].as_str().unwrap();
    assert!(
        text.contains("P(CIN2+)") || text.contains("Grade"),
        "{text}"
    );
}

#[test]
fn viewer_page_draws_every_overlay_as_numpy_does_in_headless_chromium() {
    let tmp = tempfile::tempdir().unwrap();
    let images = common::synth_images(&tmp.path().join("in"), 2, 1024, 768);
    let shots = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("viewer-screenshots");

    // A bundle without a fixed scale: each overlay on its own map's maximum.
    let plain = common::tiny_bundle(4);
    let out = tmp.path().join("plain");
    let r =
        cinflow::local::classify(&common::classify_options(&plain, &out, images.clone())).unwrap();
    assert_eq!(r.failed, 0);
    let key = &r.results[0].0;
    assert!(out.join("index.html").is_file());
    let index = std::fs::read_to_string(out.join("index.html")).unwrap();
    assert!(index.contains(&format!("href=\"{key}.html\"")), "{index}");
    for via in [Via::Http, Via::File] {
        let report = run_viewer(
            &out.join(format!("{key}.html")),
            &out.join(format!("{key}.json")),
            &shots.join("map-maximum"),
            via,
            None,
        );
        check(&report, key, via, &format!("map maximum, {via:?}"));
    }

    // The same bundle with a version scale: the median of the positive map
    // values, so overlays are neither blank nor saturated.
    let (_, maps) = common::read_npy(&out.join(key).join("cam.npy"));
    let mut positive: Vec<f32> = maps.into_iter().filter(|v| *v > 0.0).collect();
    positive.sort_by(f32::total_cmp);
    let scaled = tmp.path().join("scaled-bundle");
    common::copy_dir(&plain, &scaled);
    let manifest_path = scaled.join("manifest.json");
    let mut m: Manifest = serde_json::from_slice(&std::fs::read(&manifest_path).unwrap()).unwrap();
    let scale = CamScale {
        grad_cam: positive[positive.len() / 2],
        contrastive: positive[positive.len() / 3],
        percentile: 50.0,
        fitted_on: "test".into(),
        images: 1,
    };
    m.cam_scale = Some(scale.clone());
    std::fs::write(&manifest_path, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
    let out = tmp.path().join("scaled");
    let r = cinflow::local::classify(&common::classify_options(&scaled, &out, images)).unwrap();
    let key = &r.results[0].0;
    let record: Value =
        serde_json::from_slice(&std::fs::read(out.join(format!("{key}.json"))).unwrap()).unwrap();
    for h in record["images"][0]["heatmaps"].as_array().unwrap() {
        assert_eq!(h["scale_source"], "model");
        assert_eq!(h["map"], "grad-cam");
        assert_eq!(h["scale"].as_f64().unwrap() as f32, scale.grad_cam);
    }
    let report = run_viewer(
        &out.join(format!("{key}.html")),
        &out.join(format!("{key}.json")),
        &shots.join("model-scale"),
        Via::Http,
        Some(&scale),
    );
    check(&report, key, Via::Http, "model scale");
    eprintln!("screenshots in {}", shots.display());
}
