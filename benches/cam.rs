//! Grad-CAM cost for DenseNet-161-sized features (2208 x 19 x 25) and the
//! overlay rendering that follows it, with and without the legend band.

use cinflow::cam::legend::{self, Legend};
use cinflow::cam::{class_maps, jpeg_bytes, overlay, png_bytes, upsample_bilinear};
use cinflow::infer::FeatureMap;
use cinflow::model::Triage;
use cinflow::model::{Head, Task};
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};

fn features() -> FeatureMap {
    let (k, h, w) = (2208, 19, 25);
    FeatureMap {
        channels: k,
        height: h,
        width: w,
        data: (0..k * h * w)
            .map(|i| ((i as f32 * 0.618).sin()).max(0.0))
            .collect(),
    }
}

fn bench(c: &mut Criterion) {
    let f = features();
    let head = Head {
        rows: 4,
        channels: f.channels,
        weight: (0..4 * f.channels)
            .map(|i| (i as f32 * 0.37).cos() * 0.05)
            .collect(),
        bias: vec![0.0; 4],
    };
    c.bench_function("cam/class_maps 4x2208x19x25", |b| {
        b.iter(|| class_maps(black_box(&f), black_box(&head), Task::Multiclass))
    });
    c.bench_function("cam/pool+logits 2208x19x25", |b| {
        b.iter(|| head.logits(&black_box(&f).global_average_pool()))
    });
    let maps = class_maps(&f, &head, Task::Multiclass);
    c.bench_function("cam/upsample 19x25->600x800", |b| {
        b.iter(|| upsample_bilinear(black_box(maps.map(0)), 19, 25, 600, 800))
    });
    let up = upsample_bilinear(maps.map(0), 19, 25, 600, 800);
    let img = image::RgbImage::from_pixel(800, 600, image::Rgb([200, 150, 180]));
    c.bench_function("cam/overlay+png 800x600", |b| {
        b.iter(|| png_bytes(&overlay(black_box(&img), black_box(&up), 1.0)))
    });
    // The legend band burned into every pre-drawn overlay (text and colour bar).
    let legend = Legend {
        class: "CIN2",
        map: cinflow::cam::MapKind::GradCam,
        scale: 3.25,
        p_cin2_plus: Some(0.87),
        triage: Some(Triage::Likely),
    };
    let drawn = overlay(&img, &up, 1.0);
    c.bench_function("cam/legend 800x600", |b| {
        b.iter(|| {
            let mut o = drawn.clone();
            legend::draw(black_box(&mut o), &legend);
            o
        })
    });
    c.bench_function("cam/overlay+legend+jpeg75 800x600", |b| {
        b.iter(|| {
            let mut o = overlay(black_box(&img), black_box(&up), 1.0);
            legend::draw(&mut o, &legend);
            jpeg_bytes(&o, 75)
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
