//! cinflow's preprocessing against OpenCV, the research code's path, on real-size images.
//!
//! OpenCV runs in the project's Python (`CINFLOW_PYTHON`, which .cargo/config.toml points
//! at `.venv/bin/python`) through `tools/bench_preprocess_opencv.py reference`, which
//! documents the reference path. Tolerances:
//! - CLAHE alone: at most 1 grey level, and at most 0.1% of samples off at all. Our CLAHE
//!   follows OpenCV's integer and `f32` arithmetic step by step and is byte-identical on
//!   these images; the slack only covers an OpenCV build that rounds a float tie otherwise.
//! - CLAHE + resize: at most 1 grey level. The resize keeps an 8-bit intermediate between
//!   its two passes where `INTER_AREA` accumulates in `f32`, which puts roughly one sample
//!   in eight one level off; at most a quarter may be.

use std::path::{Path, PathBuf};
use std::process::Command;

use cinflow::preprocess::{clahe_rgb, decode, preprocess, ClaheParams, PreprocessConfig};
use image::{Rgb, RgbImage};

/// The project's Python with OpenCV; fails (never skips) when it is missing.
fn python() -> String {
    let py = std::env::var("CINFLOW_PYTHON")
        .ok()
        .or_else(|| option_env!("CINFLOW_PYTHON").map(String::from))
        .unwrap_or_else(|| {
            panic!("CINFLOW_PYTHON is not set: run scripts/setup.sh (creates .venv, which .cargo/config.toml points CINFLOW_PYTHON at)")
        });
    match Command::new(&py).args(["-c", "import cv2"]).output() {
        Ok(out) if out.status.success() => py,
        Ok(out) => panic!(
            "{py} cannot import cv2 ({}): run scripts/setup.sh",
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(err) => panic!("cannot run {py} ({err}): run scripts/setup.sh"),
    }
}

/// Deterministic textured test image: smooth per-channel gradients, dark and bright
/// Gaussian blobs (nucleus- and lumen-like) and uniform noise.
fn textured(width: u32, height: u32, seed: u64) -> RgbImage {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let (w, h) = (width as f32, height as f32);
    let mut acc = vec![0f32; 3 * width as usize * height as usize];
    for (i, px) in acc.chunks_exact_mut(3).enumerate() {
        let (x, y) = (
            (i % width as usize) as f32 / w,
            (i / width as usize) as f32 / h,
        );
        px[0] = 150.0 + 60.0 * x - 30.0 * y + 20.0 * (9.0 * x + 4.0 * y).sin();
        px[1] = 90.0 + 50.0 * y + 25.0 * (7.0 * y - 3.0 * x).cos();
        px[2] = 170.0 - 40.0 * x * y + 15.0 * (11.0 * x).sin();
    }
    for _ in 0..60 {
        let r = next();
        let (cx, cy) = (
            (r % u64::from(width)) as f32,
            ((r >> 16) % u64::from(height)) as f32,
        );
        let radius = 8.0 + ((r >> 32) % 90) as f32;
        let strength = [0, 8, 16].map(|s| ((r >> (40 + s)) % 160) as f32 - 110.0);
        let reach = 3.0 * radius;
        let (x0, x1) = (
            (cx - reach).max(0.0) as u32,
            (cx + reach).min(w - 1.0) as u32,
        );
        let (y0, y1) = (
            (cy - reach).max(0.0) as u32,
            (cy + reach).min(h - 1.0) as u32,
        );
        for y in y0..=y1 {
            for x in x0..=x1 {
                let d2 = ((x as f32 - cx).powi(2) + (y as f32 - cy).powi(2)) / (radius * radius);
                let f = (-d2).exp();
                let i = 3 * (y as usize * width as usize + x as usize);
                for c in 0..3 {
                    acc[i + c] += strength[c] * f;
                }
            }
        }
    }
    let pixels = acc
        .chunks_exact(3)
        .map(|px| {
            let n = next();
            let noise = |c: u32| ((n >> (8 * c)) % 25) as f32 - 12.0;
            [0, 1, 2].map(|c| (px[c as usize] + noise(c)).clamp(0.0, 255.0) as u8)
        })
        .collect::<Vec<[u8; 3]>>();
    RgbImage::from_fn(width, height, |x, y| Rgb(pixels[(y * width + x) as usize]))
}

fn write_png(path: &Path, img: &RgbImage) -> Vec<u8> {
    let bytes = cinflow::cam::png_bytes(img);
    std::fs::write(path, &bytes).unwrap();
    bytes
}

/// (max abs difference, fraction of samples that differ).
fn compare(ours: &RgbImage, opencv: &RgbImage) -> (u8, f64) {
    assert_eq!(ours.dimensions(), opencv.dimensions());
    let diffs = ours
        .as_raw()
        .iter()
        .zip(opencv.as_raw())
        .map(|(a, b)| a.abs_diff(*b));
    let (worst, off) = diffs.fold((0, 0usize), |(m, n), d| (m.max(d), n + usize::from(d > 0)));
    (worst, off as f64 / ours.as_raw().len() as f64)
}

fn check_against_opencv(width: u32, height: u32, cfg: PreprocessConfig, seed: u64) {
    check_input_against_opencv(width, height, cfg, seed, false)
}

/// `jpeg`: the input is a JPEG (quality 90), decoded by both sides with libjpeg-turbo.
fn check_input_against_opencv(
    width: u32,
    height: u32,
    cfg: PreprocessConfig,
    seed: u64,
    jpeg: bool,
) {
    let py = python();
    let dir = tempfile::tempdir().unwrap();
    let input: PathBuf = dir
        .path()
        .join(if jpeg { "input.jpg" } else { "input.png" });
    let (clahe_out, pre_out) = (
        dir.path().join("cv_clahe.png"),
        dir.path().join("cv_pre.png"),
    );
    let bytes = if jpeg {
        let b = cinflow::synth::encode(
            &textured(width, height, seed),
            cinflow::synth::SynthFormat::Jpeg,
        );
        std::fs::write(&input, &b).unwrap();
        b
    } else {
        write_png(&input, &textured(width, height, seed))
    };

    let tool = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/bench_preprocess_opencv.py");
    let [cols, rows] = cfg.clahe.tile_grid;
    let status = Command::new(&py)
        .arg(&tool)
        .arg("reference")
        .args([&input, &clahe_out, &pre_out])
        .args(["--clip", &cfg.clahe.clip_limit.to_string()])
        .args(["--grid", &cols.to_string(), &rows.to_string()])
        .args(["--size", &cfg.width.to_string(), &cfg.height.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "{} reference failed", tool.display());
    let read = |p: &Path| decode(&std::fs::read(p).unwrap()).unwrap();

    let decoded = decode(&bytes).unwrap();
    let (worst, off) = compare(&clahe_rgb(&decoded, &cfg.clahe), &read(&clahe_out));
    println!(
        "{width}x{height} CLAHE: max diff {worst}, {:.4}% of samples off",
        off * 100.0
    );
    assert!(
        worst <= 1,
        "CLAHE differs from OpenCV by {worst} grey levels"
    );
    assert!(
        off <= 0.001,
        "CLAHE differs from OpenCV on {:.3}% of samples",
        off * 100.0
    );

    let ours = preprocess(&bytes, &cfg).unwrap();
    assert_eq!(ours.dimensions(), (cfg.width, cfg.height));
    let (worst, off) = compare(&ours, &read(&pre_out));
    println!(
        "{width}x{height} CLAHE+resize: max diff {worst}, {:.2}% off",
        off * 100.0
    );
    assert!(
        worst <= 1,
        "preprocessing differs from OpenCV by {worst} grey levels"
    );
    assert!(
        off <= 0.25,
        "preprocessing differs from OpenCV on {:.1}% of samples",
        off * 100.0
    );
}

#[test]
fn matches_opencv_at_scanner_size() {
    check_against_opencv(2560, 1920, PreprocessConfig::default(), 1);
}

#[test]
fn matches_opencv_from_a_jpeg_at_scanner_size() {
    check_input_against_opencv(2560, 1920, PreprocessConfig::default(), 4, true);
}

#[test]
fn matches_opencv_when_tiles_do_not_divide() {
    // 2501 % 8 and 1877 % 8 are non-zero: OpenCV pads the image for the histograms.
    check_against_opencv(2501, 1877, PreprocessConfig::default(), 2);
}

#[test]
fn matches_opencv_with_other_parameters() {
    // Width divides the grid, height does not (OpenCV then pads both sides), a low clip
    // limit that clips most bins, and a non-square grid and output.
    let cfg = PreprocessConfig {
        width: 700,
        height: 333,
        clahe: ClaheParams {
            clip_limit: 2.0,
            tile_grid: [6, 5],
        },
    };
    check_against_opencv(1200, 901, cfg, 3);
}

/// JPEG colour models besides YCbCr, decoded by `cv2.imdecode(..., IMREAD_COLOR)` and by
/// [`decode`]: an Adobe CMYK JPEG written by Pillow, a YCCK JPEG written by libjpeg
/// (mozjpeg), and a greyscale JPEG. Tolerance 0: every sample of every pixel must equal
/// OpenCV's (both run libjpeg-turbo, and the CMYK -> RGB step is OpenCV's integer formula).
#[test]
fn cmyk_ycck_and_grey_jpegs_decode_like_opencv() {
    let py = python();
    let dir = tempfile::tempdir().unwrap();
    // Not multiples of the 8x8 / 16x16 blocks, so partial blocks are covered too.
    let (width, height) = (643u32, 481u32);
    let rgb = textured(width, height, 5);
    // Ink from the texture, black from a diagonal ramp that spans 0..=255.
    let cmyk: Vec<u8> = rgb
        .enumerate_pixels()
        .flat_map(|(x, y, p)| [p[0], p[1], p[2], ((x + y) * 255 / (width + height)) as u8])
        .collect();
    let raw = dir.path().join("cmyk.raw");
    std::fs::write(&raw, &cmyk).unwrap();
    let (adobe, grey, ycck) = (
        dir.path().join("adobe_cmyk.jpg"),
        dir.path().join("grey.jpg"),
        dir.path().join("ycck.jpg"),
    );

    let pillow = r#"
import sys
from PIL import Image
raw, w, h, adobe, grey = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
data = open(raw, "rb").read()
Image.frombytes("CMYK", (w, h), data).save(adobe, quality=90)
Image.frombytes("L", (w, h), data[0::4]).save(grey, quality=90)
"#;
    let status = Command::new(&py)
        .args(["-c", pillow])
        .arg(&raw)
        .args([width.to_string(), height.to_string()])
        .args([&adobe, &grey])
        .status()
        .unwrap();
    assert!(status.success(), "Pillow could not write the test JPEGs");

    let mut c = mozjpeg::Compress::new(mozjpeg::ColorSpace::JCS_CMYK);
    c.set_color_space(mozjpeg::ColorSpace::JCS_YCCK);
    c.set_size(width as usize, height as usize);
    c.set_quality(90.0);
    let mut c = c.start_compress(Vec::new()).unwrap();
    c.write_scanlines(&cmyk).unwrap();
    std::fs::write(&ycck, c.finish().unwrap()).unwrap();

    // The files are what they claim to be (libjpeg's reading of their headers).
    let space = |p: &Path| {
        let bytes = std::fs::read(p).unwrap();
        let space = mozjpeg::Decompress::new_mem(&bytes).unwrap().color_space();
        space
    };
    assert_eq!(space(&adobe), mozjpeg::ColorSpace::JCS_CMYK);
    assert!(std::fs::read(&adobe)
        .unwrap()
        .windows(5)
        .any(|w| w == b"Adobe"));
    assert_eq!(space(&ycck), mozjpeg::ColorSpace::JCS_YCCK);
    assert_eq!(space(&grey), mozjpeg::ColorSpace::JCS_GRAYSCALE);

    let opencv = r#"
import sys
import cv2
import numpy as np
for path in sys.argv[1:]:
    bgr = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_COLOR)
    assert bgr is not None and bgr.ndim == 3 and bgr.shape[2] == 3, path
    assert cv2.imwrite(path + ".png", bgr), path
"#;
    let status = Command::new(&py)
        .args(["-c", opencv])
        .args([&adobe, &ycck, &grey])
        .status()
        .unwrap();
    assert!(status.success(), "cv2.imdecode failed");

    for jpeg in [&adobe, &ycck, &grey] {
        let ours = decode(&std::fs::read(jpeg).unwrap()).unwrap();
        let png = PathBuf::from(format!("{}.png", jpeg.display()));
        let theirs = decode(&std::fs::read(&png).unwrap()).unwrap();
        let (worst, off) = compare(&ours, &theirs);
        let name = jpeg.file_name().unwrap().to_string_lossy();
        println!(
            "{name}: max diff {worst}, {:.4}% of samples off",
            off * 100.0
        );
        assert_eq!(worst, 0, "{name} differs from cv2.imdecode");
        // Not a degenerate image: the texture and the black ramp come through.
        let (lo, hi) = ours
            .as_raw()
            .iter()
            .fold((255u8, 0u8), |(lo, hi), &v| (lo.min(v), hi.max(v)));
        assert!(hi - lo > 100, "{name}: samples only span {lo}..={hi}");
    }
}
