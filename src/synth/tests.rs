use super::*;

#[test]
fn labels_round_trip() {
    for g in Grade::ALL {
        assert_eq!(Grade::from_label(g.label()), Some(g));
        assert_eq!(g.label().parse::<Grade>().unwrap(), g);
    }
    assert_eq!(Grade::from_label("cin 2"), Some(Grade::Cin2));
    assert_eq!(Grade::from_label("non_neoplasm"), Some(Grade::NonNeoplasm));
    assert_eq!(Grade::from_label("CIN4"), None);
    assert_eq!(parse_size("2560x1920").unwrap(), (2560, 1920));
    assert!(parse_size("2560").is_err());
    assert_eq!("JPG".parse::<SynthFormat>().unwrap(), SynthFormat::Jpeg);
}

#[test]
fn render_is_deterministic() {
    for g in Grade::ALL {
        let a = render(g, 320, 240, 7);
        let b = render(g, 320, 240, 7);
        assert_eq!(a.dimensions(), (320, 240));
        assert!(
            a.as_raw() == b.as_raw(),
            "{g}: same seed must give the same image"
        );
        let c = render(g, 320, 240, 8);
        assert!(a.as_raw() != c.as_raw(), "{g}: different seeds must differ");
    }
    // independent of the number of threads
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let a = render(Grade::Cin1, 400, 300, 11);
    let b = one.install(|| render(Grade::Cin1, 400, 300, 11));
    assert!(a.as_raw() == b.as_raw());
    // odd sizes and tiny sizes work
    assert_eq!(render(Grade::Cin2, 17, 33, 1).dimensions(), (17, 33));
    for (w, h) in [(1, 1), (2, 7), (5, 3), (64, 4)] {
        for seed in 0..8 {
            assert_eq!(render(Grade::Cin3, w, h, seed).dimensions(), (w, h));
        }
    }
    let m = render_with_masks(Grade::Cin3, 97, 61, 3);
    assert_eq!(m.image.dimensions(), (97, 61));
    assert_eq!(m.epithelium.dimensions(), (97, 61));
    assert!(m.image.as_raw() == render(Grade::Cin3, 97, 61, 3).as_raw());
}

#[test]
fn plan_is_balanced_and_grouped() {
    for (n, k) in [(8, 3), (13, 3), (40, 3), (7, 1), (9, 5)] {
        let p = plan(n, k);
        assert_eq!(p.len(), n);
        let mut per_grade = [0usize; 4];
        for x in &p {
            per_grade[Grade::ALL.iter().position(|g| *g == x.grade).unwrap()] += 1;
        }
        let (lo, hi) = (
            per_grade.iter().min().unwrap(),
            per_grade.iter().max().unwrap(),
        );
        assert!(hi - lo <= 1, "n={n}: {per_grade:?}");
        // one grade per patient, at most k images each, contiguous ids from 1
        let mut patients: std::collections::BTreeMap<usize, (Grade, usize)> = Default::default();
        for x in &p {
            let e = patients.entry(x.patient).or_insert((x.grade, 0));
            assert_eq!(e.0, x.grade);
            e.1 += 1;
        }
        assert!(patients.values().all(|&(_, c)| c <= k && c >= 1));
        let ids: Vec<usize> = patients.keys().copied().collect();
        assert_eq!(ids, (1..=ids.len()).collect::<Vec<_>>());
    }
}

#[test]
fn generate_writes_images_labels_and_readme() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = SynthOptions::new(dir.path().join("set"), 8);
    opts.width = 256;
    opts.height = 192;
    opts.seed = 42;
    let summary = generate(&opts, None).unwrap();
    assert_eq!(summary.images.len(), 8);
    assert_eq!(summary.labels_csv, opts.out.join("labels.csv"));

    let readme = std::fs::read_to_string(opts.out.join("README.txt")).unwrap();
    assert!(
        readme.contains("SYNTHETIC") && readme.contains("not clinical")
            || readme.contains("NOT CLINICAL")
    );

    let mut rdr = csv::Reader::from_path(&summary.labels_csv).unwrap();
    assert_eq!(
        rdr.headers().unwrap(),
        vec!["path", "label", "patient_id", "slide_id"]
    );
    let rows: Vec<csv::StringRecord> = rdr.records().map(|r| r.unwrap()).collect();
    assert_eq!(rows.len(), 8);
    let mut per_grade = std::collections::HashMap::new();
    let mut patient_grade = std::collections::HashMap::new();
    for (row, im) in rows.iter().zip(&summary.images) {
        let path = opts.out.join(&row[0]);
        assert_eq!(path, im.path);
        let grade = Grade::from_label(&row[1]).unwrap();
        assert_eq!(grade, im.grade);
        assert_eq!(&row[2], im.patient_id);
        // Two images per slide, within the patient.
        assert_eq!(&row[3], im.slide_id);
        assert!(row[3].starts_with(&format!("{}-S", &row[2])), "{}", &row[3]);
        assert!(
            row[0].starts_with(&format!("{}_{}_", &row[2], &row[1])),
            "{}",
            &row[0]
        );
        assert!(row[0].ends_with(".jpg"));
        *per_grade.entry(grade).or_insert(0) += 1;
        assert_eq!(
            *patient_grade.entry(row[2].to_string()).or_insert(grade),
            grade
        );
        let img = image::open(&path).unwrap();
        assert_eq!((img.width(), img.height()), (256, 192));
    }
    assert_eq!(per_grade.len(), 4);
    assert!(per_grade.values().all(|&c| c == 2));
    let files = std::fs::read_dir(&opts.out).unwrap().count();
    assert_eq!(files, 8 + 2);

    // byte-for-byte deterministic
    let mut opts2 = opts.clone();
    opts2.out = dir.path().join("again");
    let again = generate(&opts2, None).unwrap();
    for (a, b) in summary.images.iter().zip(&again.images) {
        assert_eq!(
            std::fs::read(&a.path).unwrap(),
            std::fs::read(&b.path).unwrap()
        );
    }
    assert_eq!(
        std::fs::read(&summary.labels_csv).unwrap(),
        std::fs::read(&again.labels_csv).unwrap()
    );

    // png works too
    let mut opts3 = opts.clone();
    opts3.out = dir.path().join("png");
    opts3.n = 2;
    opts3.format = SynthFormat::Png;
    let png = generate(&opts3, None).unwrap();
    assert!(png
        .images
        .iter()
        .all(|i| i.path.extension().unwrap() == "png"));
    let img = image::open(&png.images[0].path).unwrap().to_rgb8();
    assert!(img.as_raw() == render(png.images[0].grade, 256, 192, image_seed(42, 0)).as_raw());
}

/// A pixel counts as nuclear (haematoxylin-dominated) when, in optical density, it is
/// dark enough and its red absorption is high relative to green: eosin absorbs mostly
/// green (OD red/green about 0.2), haematoxylin red and green alike (about 0.85).
/// A ratio, so the per-image stain intensity jitter does not move it.
fn is_nuclear(p: &image::Rgb<u8>) -> bool {
    let od = |v: u8| -((v as f32 + 1.0) / 256.0).ln();
    let (r, g) = (od(p.0[0]), od(p.0[1]));
    g > 0.6 && r > 0.6 * g
}

/// Fraction of nuclear pixels inside the epithelium.
fn nuclear_fraction(grade: Grade, seed: u64) -> f64 {
    let m = render_with_masks(grade, 640, 480, seed);
    let (mut n, mut dark) = (0usize, 0usize);
    for (p, e) in m.image.pixels().zip(m.epithelium.pixels()) {
        if e.0[0] > 0 {
            n += 1;
            if is_nuclear(p) {
                dark += 1;
            }
        }
    }
    dark as f64 / n.max(1) as f64
}

#[test]
fn atypia_grows_with_grade() {
    let seeds = [1u64, 2, 3, 4, 5, 6, 7, 8];
    let mean =
        |g: Grade| seeds.iter().map(|&s| nuclear_fraction(g, s)).sum::<f64>() / seeds.len() as f64;
    let (c3, c2, c1, nn) = (
        mean(Grade::Cin3),
        mean(Grade::Cin2),
        mean(Grade::Cin1),
        mean(Grade::NonNeoplasm),
    );
    eprintln!("nuclear fraction: CIN3 {c3:.3} CIN2 {c2:.3} CIN1 {c1:.3} Non-neoplasm {nn:.3}");
    assert!(
        c3 > c2 && c2 > c1 && c1 > nn,
        "CIN3 {c3} CIN2 {c2} CIN1 {c1} NN {nn}"
    );
    assert!(
        c3 > 1.5 * c1 && c1 > 2.0 * nn,
        "CIN3 {c3} CIN1 {c1} NN {nn}"
    );

    // the lesion mask follows the grade too
    let lesion = |g: Grade| {
        let m = render_with_masks(g, 320, 240, 9);
        let e = m.epithelium.pixels().filter(|p| p.0[0] > 0).count().max(1);
        m.lesion.pixels().filter(|p| p.0[0] > 0).count() as f64 / e as f64
    };
    assert_eq!(lesion(Grade::NonNeoplasm), 0.0);
    assert!(lesion(Grade::Cin3) > lesion(Grade::Cin2) && lesion(Grade::Cin2) > lesion(Grade::Cin1));
}

/// Writes one image per grade to $SYNTH_PREVIEW_DIR (default /tmp/synth_preview) and
/// prints the render time. `cargo test --release --lib synth::tests::preview -- --ignored`
#[test]
#[ignore]
fn preview() {
    let dir = std::env::var("SYNTH_PREVIEW_DIR").unwrap_or_else(|_| "/tmp/synth_preview".into());
    let (w, h) = std::env::var("SYNTH_PREVIEW_SIZE")
        .ok()
        .and_then(|s| parse_size(&s).ok())
        .unwrap_or((1280, 960));
    let seed: u64 = std::env::var("SYNTH_PREVIEW_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    std::fs::create_dir_all(&dir).unwrap();
    for g in Grade::ALL {
        let mut best = f64::INFINITY;
        let mut img = None;
        for _ in 0..3 {
            let t = std::time::Instant::now();
            img = Some(render(g, w, h, seed));
            best = best.min(t.elapsed().as_secs_f64());
        }
        let img = img.unwrap();
        eprintln!("{g}: {w}x{h} in {:.1} ms (best of 3)", best * 1e3);
        img.save(format!("{dir}/{}.png", g.label())).unwrap();
        // a 1:1 crop centred on the epithelium
        let m = render_with_masks(g, w, h, seed);
        let (mut sx, mut sy, mut n) = (0u64, 0u64, 0u64);
        for (x, y, p) in m.epithelium.enumerate_pixels() {
            if p.0[0] > 0 {
                sx += x as u64;
                sy += y as u64;
                n += 1;
            }
        }
        let (cw, chh) = (w.min(1000), h.min(750));
        let cx = (sx / n.max(1)) as u32;
        let cy = (sy / n.max(1)) as u32;
        let x0 = cx.saturating_sub(cw / 2).min(w - cw);
        let y0 = cy.saturating_sub(chh / 2).min(h - chh);
        image::imageops::crop_imm(&img, x0, y0, cw, chh)
            .to_image()
            .save(format!("{dir}/{}_crop.png", g.label()))
            .unwrap();
    }
}

/// Per-seed table of the nuclear fraction, to tune the generator.
#[test]
#[ignore]
fn nuclear_fraction_table() {
    for g in Grade::ALL {
        let v: Vec<String> = (1..=12)
            .map(|s| format!("{:.3}", nuclear_fraction(g, s)))
            .collect();
        eprintln!("{g}: {}", v.join(" "));
    }
}

/// A contact sheet (rows: grades, columns: seeds) at $SYNTH_PREVIEW_DIR/sheet.png.
#[test]
#[ignore]
fn contact_sheet() {
    let dir = std::env::var("SYNTH_PREVIEW_DIR").unwrap_or_else(|_| "/tmp/synth_preview".into());
    let first: u64 = std::env::var("SYNTH_PREVIEW_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let (w, h, cols) = (480u32, 360u32, 4u32);
    let mut sheet = RgbImage::new(w * cols, h * 4);
    for (r, g) in Grade::ALL.iter().enumerate() {
        for c in 0..cols {
            let img = render(*g, w, h, first + c as u64);
            image::imageops::replace(&mut sheet, &img, (c * w) as i64, (r as u32 * h) as i64);
        }
    }
    std::fs::create_dir_all(&dir).unwrap();
    sheet.save(format!("{dir}/sheet.png")).unwrap();
}

/// Wall time of `generate` for $SYNTH_BENCH_N (default 8) full-size JPEGs.
#[test]
#[ignore]
fn bench_generate() {
    let n: usize = std::env::var("SYNTH_BENCH_N")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    let dir = tempfile::tempdir().unwrap();
    let opts = SynthOptions::new(dir.path(), n);
    let t = std::time::Instant::now();
    generate(&opts, None).unwrap();
    let dt = t.elapsed().as_secs_f64();
    eprintln!(
        "generate: {n} images 2560x1920 jpeg in {dt:.2} s ({:.0} ms/image, {} threads)",
        dt * 1e3 / n as f64,
        rayon::current_num_threads()
    );
}
