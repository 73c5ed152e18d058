//! The real architectures (random weights: no downloads here) exported by the
//! export tool and run by `cinflow classify` on scanner-size 2560x1920 images.

mod common;

use cinflow::local::classify;
use cinflow::model::Bundle;

fn export_and_classify(arch: &str, channels: usize, classes: u32) {
    let tmp = tempfile::tempdir().unwrap();
    let bundle = tmp.path().join(arch);
    common::run_python(
        "tools/export_backbone.py",
        &[
            "--arch",
            arch,
            "--classes",
            &classes.to_string(),
            "--out",
            bundle.to_str().unwrap(),
        ],
    );
    let b = Bundle::load(&bundle).unwrap();
    assert_eq!(b.manifest.architecture, arch);
    assert_eq!(b.manifest.features.channels, channels);
    let images = common::synth_images(&tmp.path().join("in"), 1, 2560, 1920);
    let out = tmp.path().join("out");
    let report = classify(&common::classify_options(&bundle, &out, images)).unwrap();
    assert_eq!((report.graded, report.failed), (1, 0));
    let img = &report.results[0].1;
    assert_eq!(img.original_size, Some([2560, 1920]));
    let raw = img.raw_map.as_ref().unwrap();
    assert_eq!(raw.shape[0], classes as usize);
    let (shape, data) = common::read_npy(&out.join(&raw.uri));
    // Mean of each class map plus its bias is the logit (1e-4), here with the
    // full channel count of the architecture.
    let area = shape[1] * shape[2];
    for (c, z) in img.logits.as_ref().unwrap().iter().enumerate() {
        let mean = data[c * area..(c + 1) * area]
            .iter()
            .map(|v| f64::from(*v))
            .sum::<f64>()
            / area as f64;
        let bias = f64::from(b.head.bias[c]);
        assert!(
            (mean + bias - f64::from(*z)).abs() < 1e-4,
            "{arch} class {c}"
        );
    }
}

#[test]
fn densenet161_bundle_grades_a_scanner_size_image() {
    export_and_classify("densenet161", 2208, 4);
}

#[test]
fn inception_resnet_v2_bundle_grades_a_scanner_size_image() {
    export_and_classify("inception_resnet_v2", 1536, 2);
}
