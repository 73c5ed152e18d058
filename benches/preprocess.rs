//! Preprocessing cost at scanner size (2560x1920 -> 800x600): CLAHE, resize and the whole
//! path from JPEG bytes (decode, CLAHE, resize, normalise), each on one thread, plus the
//! throughput of a batch of 8 JPEGs spread over rayon's pool (one image per task, as the
//! workers batch them). The OpenCV comparison lives in scripts/bench-preprocess.sh.

use std::hint::black_box;
use std::time::Duration;

use cinflow::preprocess::{
    clahe_rgb, decode, normalise_into, preprocess, resize, PreprocessConfig,
};
use cinflow::synth::{render, Grade};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use image::RgbImage;
use rayon::prelude::*;

const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const STD: [f32; 3] = [0.229, 0.224, 0.225];
const BATCH: usize = 8;

fn jpeg(img: &RgbImage) -> Vec<u8> {
    cinflow::synth::encode(img, cinflow::synth::SynthFormat::Jpeg)
}

fn bench(c: &mut Criterion) {
    let cfg = PreprocessConfig::default();
    let plane = 3 * cfg.width as usize * cfg.height as usize;
    let slides: Vec<RgbImage> = Grade::ALL
        .iter()
        .enumerate()
        .map(|(i, &g)| render(g, 2560, 1920, i as u64))
        .collect();
    let jpegs: Vec<Vec<u8>> = (0..BATCH)
        .map(|i| jpeg(&slides[i % slides.len()]))
        .collect();
    let slide = decode(&jpegs[1]).unwrap();
    let equalised = clahe_rgb(&slide, &cfg.clahe);

    let mut g = c.benchmark_group("preprocess");
    g.sample_size(20).measurement_time(Duration::from_secs(4));
    g.bench_function("clahe 2560x1920 (1 thread)", |b| {
        b.iter(|| clahe_rgb(black_box(&slide), &cfg.clahe))
    });
    g.bench_function("resize 2560x1920->800x600 (1 thread)", |b| {
        b.iter(|| resize(black_box(&equalised), cfg.width, cfg.height))
    });
    let mut input = vec![0f32; plane];
    g.bench_function("whole path from JPEG (1 thread)", |b| {
        b.iter(|| {
            let img = preprocess(black_box(&jpegs[1]), &cfg).unwrap();
            normalise_into(&img, MEAN, STD, &mut input);
        })
    });

    let mut batch = vec![0f32; BATCH * plane];
    g.throughput(Throughput::Elements(BATCH as u64));
    g.sample_size(10).measurement_time(Duration::from_secs(8));
    g.bench_function(
        format!(
            "batch of {BATCH} JPEGs ({} threads)",
            rayon::current_num_threads()
        ),
        |b| {
            b.iter(|| {
                batch
                    .par_chunks_mut(plane)
                    .zip(&jpegs)
                    .for_each(|(out, bytes)| {
                        let img = preprocess(black_box(bytes), &cfg).unwrap();
                        normalise_into(&img, MEAN, STD, out);
                    })
            })
        },
    );
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
