//! Times cinflow's preprocessing on one thread and writes its outputs, for
//! `scripts/bench-preprocess.sh`, which times OpenCV on the same files
//! (`tools/bench_preprocess_opencv.py bench`) and compares the results.
//!
//! Usage: `cargo run --release --example bench_preprocess -- DIR [REPEAT]`
//!
//! Writes into DIR a synthetic 2560x1920 H&E-like slide as `slide.png` and `slide.jpg`
//! (quality 90), our outputs `rust_clahe.png`, `rust_preprocessed_png.png`,
//! `rust_preprocessed_jpg.png` and `rust_decoded_jpg.png`, and prints the best-of-REPEAT
//! timings in milliseconds as one JSON object on stdout.

use std::path::PathBuf;
use std::time::Instant;

use cinflow::preprocess::{
    clahe_rgb, decode, normalise_into, preprocess, preprocess_image, resize, PreprocessConfig,
};
use cinflow::synth::{render, Grade};

const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const STD: [f32; 3] = [0.229, 0.224, 0.225];

fn best_ms<T>(repeat: usize, mut f: impl FnMut() -> T) -> f64 {
    std::hint::black_box(f()); // warm-up
    (0..repeat)
        .map(|_| {
            let start = Instant::now();
            std::hint::black_box(f());
            start.elapsed().as_secs_f64() * 1e3
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().expect("usage: bench_preprocess DIR [REPEAT]"));
    let repeat: usize = args
        .next()
        .map_or(10, |r| r.parse().expect("REPEAT is a number"));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = PreprocessConfig::default();

    let slide = render(Grade::Cin2, 2560, 1920, 7);
    let png = cinflow::synth::encode(&slide, cinflow::synth::SynthFormat::Png);
    let jpg = cinflow::synth::encode(&slide, cinflow::synth::SynthFormat::Jpeg);
    std::fs::write(dir.join("slide.png"), &png).unwrap();
    std::fs::write(dir.join("slide.jpg"), &jpg).unwrap();

    let decoded = decode(&png).unwrap();
    let equalised = clahe_rgb(&decoded, &cfg.clahe);
    let (w, h) = (cfg.width as usize, cfg.height as usize);
    let mut input = vec![0f32; 3 * w * h];
    let small = resize(&equalised, cfg.width, cfg.height);

    let clahe_ms = best_ms(repeat, || clahe_rgb(&decoded, &cfg.clahe));
    let resize_ms = best_ms(repeat, || resize(&equalised, cfg.width, cfg.height));
    let decode_jpeg_ms = best_ms(repeat, || decode(&jpg).unwrap());
    let normalise_ms = best_ms(repeat, || normalise_into(&small, MEAN, STD, &mut input));
    let full_jpeg_ms = best_ms(repeat, || {
        let img = preprocess(&jpg, &cfg).unwrap();
        normalise_into(&img, MEAN, STD, &mut input);
    });

    equalised.save(dir.join("rust_clahe.png")).unwrap();
    preprocess_image(&decoded, &cfg)
        .save(dir.join("rust_preprocessed_png.png"))
        .unwrap();
    let from_jpg = decode(&jpg).unwrap();
    from_jpg.save(dir.join("rust_decoded_jpg.png")).unwrap();
    preprocess_image(&from_jpg, &cfg)
        .save(dir.join("rust_preprocessed_jpg.png"))
        .unwrap();

    println!(
        "{{\"clahe_ms\": {clahe_ms:.3}, \"resize_ms\": {resize_ms:.3}, \
         \"decode_jpeg_ms\": {decode_jpeg_ms:.3}, \"normalise_ms\": {normalise_ms:.3}, \
         \"full_jpeg_ms\": {full_jpeg_ms:.3}, \"jpeg_bytes\": {}, \"repeat\": {repeat}}}",
        jpg.len()
    );
}
