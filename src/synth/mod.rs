//! Synthetic CIN-like H&E images for demos, tests and benchmarks.
//!
//! **These images are synthetic. They are not clinical data and must never be used to
//! train, validate or claim anything about a clinical model.** They exist so that the
//! demo, the test-suite and the benchmarks have realistic-looking inputs of the real size
//! (2560x1920 by default) without shipping patient images.
//!
//! Each image shows pink stroma (eosin) with fibrous streaks, fibroblasts, lymphocytes and
//! capillaries, a squamous epithelium band with an undulating basement membrane and
//! surface, and a near-white lumen above it. The grade sets how far up the epithelium the
//! atypical cells reach (larger, darker, pleomorphic, crowded nuclei with random
//! orientation): none for Non-neoplasm, the lower third for CIN1 (with koilocytes
//! above), the lower two thirds for CIN2 and (nearly) the full thickness for CIN3; above
//! the atypical zone the epithelium matures normally (cells grow, flatten and their nuclei
//! shrink towards the surface). Magnification, thickness, position, orientation (any of
//! the 8 flips/rotations), stain intensity and hue, blur, vignetting and noise vary per
//! image.
//!
//! Everything is deterministic: [`render`] depends only on its arguments and
//! [`generate`] writes byte-identical files for the same options, whatever the number of
//! threads.

mod render;

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{bail, Context, Result};
use image::{GrayImage, RgbImage};
use rayon::prelude::*;

/// The four diagnostic classes, most severe first (the class order of the models).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Grade {
    Cin3,
    Cin2,
    Cin1,
    NonNeoplasm,
}

impl Grade {
    pub const ALL: [Grade; 4] = [Grade::Cin3, Grade::Cin2, Grade::Cin1, Grade::NonNeoplasm];

    /// The class label used in manifests and CSV files.
    pub fn label(&self) -> &'static str {
        match self {
            Grade::Cin3 => "CIN3",
            Grade::Cin2 => "CIN2",
            Grade::Cin1 => "CIN1",
            Grade::NonNeoplasm => "Non-neoplasm",
        }
    }

    /// Parses a label; accepts the exact labels and common spellings
    /// (case-insensitive, `CIN 2`, `non_neoplasm`, `nonneoplasm`, `normal`).
    pub fn from_label(s: &str) -> Option<Grade> {
        let k: String = s
            .trim()
            .chars()
            .filter(|c| !matches!(c, ' ' | '-' | '_'))
            .flat_map(|c| c.to_lowercase())
            .collect();
        match k.as_str() {
            "cin3" => Some(Grade::Cin3),
            "cin2" => Some(Grade::Cin2),
            "cin1" => Some(Grade::Cin1),
            "nonneoplasm" | "nonneoplastic" | "normal" => Some(Grade::NonNeoplasm),
            _ => None,
        }
    }
}

impl fmt::Display for Grade {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

impl FromStr for Grade {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Grade::from_label(s).with_context(|| {
            format!("unknown grade {s:?} (expected CIN3, CIN2, CIN1 or Non-neoplasm)")
        })
    }
}

/// Image file format written by [`generate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SynthFormat {
    /// Baseline JPEG, quality 90 (what microscope cameras usually save).
    #[default]
    Jpeg,
    Png,
}

impl SynthFormat {
    pub const JPEG_QUALITY: u8 = 90;

    pub fn extension(&self) -> &'static str {
        match self {
            SynthFormat::Jpeg => "jpg",
            SynthFormat::Png => "png",
        }
    }
}

impl FromStr for SynthFormat {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "jpeg" | "jpg" => Ok(SynthFormat::Jpeg),
            "png" => Ok(SynthFormat::Png),
            _ => bail!("unknown image format {s:?} (expected jpeg or png)"),
        }
    }
}

impl fmt::Display for SynthFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SynthFormat::Jpeg => "jpeg",
            SynthFormat::Png => "png",
        })
    }
}

/// Parses `WIDTHxHEIGHT`, e.g. `2560x1920`.
pub fn parse_size(s: &str) -> Result<(u32, u32)> {
    let (w, h) = s
        .trim()
        .split_once(['x', 'X'])
        .with_context(|| format!("size {s:?} is not WIDTHxHEIGHT"))?;
    let w: u32 = w
        .trim()
        .parse()
        .with_context(|| format!("bad width in {s:?}"))?;
    let h: u32 = h
        .trim()
        .parse()
        .with_context(|| format!("bad height in {s:?}"))?;
    if w < MIN_SIDE || h < MIN_SIDE {
        bail!("size {s:?} is too small (each side must be at least {MIN_SIDE})");
    }
    Ok((w, h))
}

/// Smallest supported side of a synthetic image.
pub const MIN_SIDE: u32 = 16;

#[derive(Debug, Clone)]
pub struct SynthOptions {
    /// Output folder (created if missing).
    pub out: PathBuf,
    /// Number of images.
    pub n: usize,
    pub width: u32,
    pub height: u32,
    pub seed: u64,
    pub format: SynthFormat,
    /// Images per (synthetic) patient; every patient has one grade.
    pub images_per_patient: usize,
}

impl SynthOptions {
    /// Defaults: 2560x1920 JPEG, seed 0, 3 images per patient.
    pub fn new(out: impl Into<PathBuf>, n: usize) -> Self {
        SynthOptions {
            out: out.into(),
            n,
            width: 2560,
            height: 1920,
            seed: 0,
            format: SynthFormat::Jpeg,
            images_per_patient: 3,
        }
    }
}

/// What [`generate`] wrote.
#[derive(Debug, Clone)]
pub struct SynthSummary {
    /// `labels.csv` (`path,label,patient_id,slide_id`, paths relative to its
    /// folder; two images per slide).
    pub labels_csv: PathBuf,
    /// The images in CSV order (by patient, then image index).
    pub images: Vec<SynthImage>,
}

#[derive(Debug, Clone)]
pub struct SynthImage {
    pub path: PathBuf,
    pub grade: Grade,
    pub patient_id: String,
    pub slide_id: String,
}

/// One synthetic image of `grade`, fully determined by the arguments.
pub fn render(grade: Grade, width: u32, height: u32, seed: u64) -> RgbImage {
    render::render_full(grade, width, height, seed, false).image
}

/// One synthetic image with its ground truth: where the epithelium is and where the
/// atypical (lesional) part of it is. Useful to check that a Grad-CAM map points at the
/// lesion. Same image as [`render`] for the same arguments.
pub struct SynthRender {
    pub image: RgbImage,
    /// 255 inside the squamous epithelium, 0 elsewhere.
    pub epithelium: GrayImage,
    /// 255 inside the atypical zone of the epithelium (all 0 for Non-neoplasm).
    pub lesion: GrayImage,
}

pub fn render_with_masks(grade: Grade, width: u32, height: u32, seed: u64) -> SynthRender {
    let r = render::render_full(grade, width, height, seed, true);
    SynthRender {
        image: r.image,
        epithelium: r.epithelium,
        lesion: r.lesion,
    }
}

/// SplitMix64 finaliser: decorrelates per-image seeds.
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The seed of image `index` of a set generated with `seed`.
pub fn image_seed(seed: u64, index: usize) -> u64 {
    seed ^ splitmix64(index as u64)
}

/// One planned image: generation index, grade, patient and index within the patient.
#[derive(Debug, Clone)]
struct Plan {
    index: usize,
    grade: Grade,
    patient: usize,
    within: usize,
}

/// Image i gets grade ALL[i % 4] (so grades stay balanced for any n); the images of one
/// grade are grouped into patients of `k`, the last one of each grade possibly smaller.
/// Patient numbers are 1-based and contiguous.
fn plan(n: usize, k: usize) -> Vec<Plan> {
    let mut v: Vec<Plan> = (0..n)
        .map(|i| {
            let g = i % 4;
            let j = i / 4;
            Plan {
                index: i,
                grade: Grade::ALL[g],
                patient: (j / k) * 4 + g + 1,
                within: j % k + 1,
            }
        })
        .collect();
    v.sort_by_key(|p| (p.patient, p.within));
    v
}

fn patient_id(p: usize) -> String {
    format!("P{p:04}")
}

/// Slides of two images each: a patient's images 1-2 are slide S1, 3-4 S2, ...
fn slide_id(p: &Plan) -> String {
    format!("{}-S{}", patient_id(p.patient), (p.within - 1) / 2 + 1)
}

/// Writes `opts.n` synthetic images, `labels.csv` and `README.txt` into `opts.out`.
/// Images are rendered in parallel; the output is byte-for-byte deterministic.
pub fn generate(
    opts: &SynthOptions,
    progress: Option<&indicatif::ProgressBar>,
) -> Result<SynthSummary> {
    if opts.images_per_patient == 0 {
        bail!("images_per_patient must be at least 1");
    }
    if opts.width < MIN_SIDE || opts.height < MIN_SIDE {
        bail!(
            "image size {}x{} is too small (each side must be at least {MIN_SIDE})",
            opts.width,
            opts.height
        );
    }
    std::fs::create_dir_all(&opts.out)
        .with_context(|| format!("creating {}", opts.out.display()))?;
    let plans = plan(opts.n, opts.images_per_patient);
    if let Some(pb) = progress {
        pb.set_length(opts.n as u64);
    }
    tracing::info!(
        n = opts.n,
        width = opts.width,
        height = opts.height,
        seed = opts.seed,
        out = %opts.out.display(),
        "generating synthetic CIN-like images (not clinical data)"
    );

    let ext = opts.format.extension();
    let images: Vec<SynthImage> = plans
        .par_iter()
        .map(|p| -> Result<SynthImage> {
            let name = format!(
                "{}_{}_{:02}.{ext}",
                patient_id(p.patient),
                p.grade.label(),
                p.within
            );
            let path = opts.out.join(&name);
            let img = render(
                p.grade,
                opts.width,
                opts.height,
                image_seed(opts.seed, p.index),
            );
            write_image(&img, &path, opts.format)
                .with_context(|| format!("writing {}", path.display()))?;
            if let Some(pb) = progress {
                pb.inc(1);
            }
            Ok(SynthImage {
                path,
                grade: p.grade,
                patient_id: patient_id(p.patient),
                slide_id: slide_id(p),
            })
        })
        .collect::<Result<_>>()?;

    let labels_csv = opts.out.join("labels.csv");
    {
        let mut w = csv::Writer::from_path(&labels_csv)
            .with_context(|| format!("writing {}", labels_csv.display()))?;
        w.write_record(["path", "label", "patient_id", "slide_id"])?;
        for im in &images {
            let rel = im
                .path
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default();
            w.write_record([
                rel.as_str(),
                im.grade.label(),
                im.patient_id.as_str(),
                im.slide_id.as_str(),
            ])?;
        }
        w.flush()?;
    }
    write_readme(opts, &plans)?;
    Ok(SynthSummary { labels_csv, images })
}

fn write_image(img: &RgbImage, path: &Path, format: SynthFormat) -> Result<()> {
    std::fs::write(path, encode(img, format))?;
    Ok(())
}

/// Encodes an image as this generator writes it (JPEG quality 90, or PNG).
pub fn encode(img: &RgbImage, format: SynthFormat) -> Vec<u8> {
    let mut out = Vec::new();
    let done = match format {
        SynthFormat::Jpeg => img.write_with_encoder(
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, SynthFormat::JPEG_QUALITY),
        ),
        SynthFormat::Png => img.write_with_encoder(image::codecs::png::PngEncoder::new(&mut out)),
    };
    done.expect("encoding an in-memory RGB8 image cannot fail");
    out
}

fn write_readme(opts: &SynthOptions, plans: &[Plan]) -> Result<()> {
    let patients = plans.iter().map(|p| p.patient).max().unwrap_or(0);
    let per_grade: Vec<String> = Grade::ALL
        .iter()
        .map(|g| {
            format!(
                "{}: {}",
                g.label(),
                plans.iter().filter(|p| p.grade == *g).count()
            )
        })
        .collect();
    let text = format!(
        "SYNTHETIC IMAGES - NOT CLINICAL DATA\n\
         ====================================\n\
         \n\
         These {n} images were generated by `cinflow synth` (cinflow {version}). They are\n\
         computer-drawn imitations of H&E-stained cervical biopsy fields, made for demos,\n\
         tests and benchmarks of the software. They do not come from any patient, carry no\n\
         diagnostic meaning, and must not be used to train, validate or evaluate a clinical\n\
         model or to make any statement about CIN grading performance.\n\
         \n\
         The \"patients\" (P0001...) are fictitious groups that let the patient-level data\n\
         split be exercised. The grade of an image only sets how far up the drawn\n\
         epithelium the atypical nuclei reach (none, lower third, lower two thirds, full\n\
         thickness).\n\
         \n\
         Parameters: n={n} size={w}x{h} seed={seed} format={fmt} images_per_patient={k}\n\
         Patients: {patients}; images per grade: {per_grade}\n\
         Files: labels.csv (path,label,patient_id,slide_id; paths relative to this folder; two images per slide)\n\
         The same parameters always produce byte-identical files.\n",
        n = opts.n,
        version = env!("CARGO_PKG_VERSION"),
        w = opts.width,
        h = opts.height,
        seed = opts.seed,
        fmt = opts.format,
        k = opts.images_per_patient,
        per_grade = per_grade.join(", "),
    );
    let path = opts.out.join("README.txt");
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests;
