//! PNG plots of a report, drawn for pathologists rather than engineers: training
//! curves, one-vs-rest ROC curves, the confusion matrix and the Grad-CAM gallery.
//!
//! Everything is drawn into an in-memory RGB buffer and saved as PNG with the
//! `image` crate, so the output format never depends on the file extension.

use std::error::Error;
use std::path::Path;
use std::sync::OnceLock;

use image::imageops::{self, FilterType};
use image::{ImageFormat, Rgb, RgbImage};
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::element::DashedPathElement;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::{register_font, FontStyle, FontTransform};

use super::metrics::Evaluation;
use super::{EpochRecord, GalleryItem, TrainingCurve};

/// A plot that could not be drawn or written.
#[derive(Debug, thiserror::Error)]
#[error("cannot draw {path}: {detail}")]
pub struct PlotError {
    /// The PNG that was to be written.
    pub path: String,
    /// What went wrong, from plotters or the image encoder.
    pub detail: String,
}

type Root<'a> = DrawingArea<BitMapBackend<'a>, Shift>;
type Drawn = Result<(), Box<dyn Error>>;
type Chart<'a, 'b> =
    ChartContext<'a, BitMapBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

const TRAINING_SIZE: (u32, u32) = (1400, 560);
const ROC_SIZE: (u32, u32) = (760, 720);
const TITLE: f64 = 24.0;
const AXIS: f64 = 18.0;
const TICK: f64 = 16.0;
const GREY: RGBColor = rgb(0x787878);
const MESH: RGBColor = rgb(0xe1e1e1);
const BEST: RGBColor = rgb(0x00823c);
const WRONG: RGBColor = rgb(0xc81e1e);
/// Okabe-Ito colours, told apart by colour-blind readers (yellow left out: unreadable on white).
const PALETTE: [u32; 7] = [
    0x0072b2, 0xd55e00, 0x009e73, 0xcc79a7, 0xe69f00, 0x56b4e9, 0x000000,
];
const TILE: (u32, u32) = (320, 240);
const BORDER: u32 = 5;
/// Height of one caption line under a gallery tile.
const LINE: u32 = 24;
const GAP: u32 = 20;
const HEADER: u32 = 84;
const MIN_WIDTH: u32 = 640;
const LEFT: HPos = HPos::Left;
const CENTRE: HPos = HPos::Center;

/// Loss and accuracy per epoch side by side, with learning-rate steps and the kept epoch.
pub fn training_curves(curve: &TrainingCurve, path: &Path) -> Result<(), PlotError> {
    let (w, h) = TRAINING_SIZE;
    render(path, white(w, h), |root| {
        let title = match curve.stopped.as_str() {
            "" => "Head training".to_string(),
            why => format!("Head training ({why})"),
        };
        let title = fit(&title, TITLE, true, w as i32 - 40);
        let body = root.margin(8, 0, 0, 0).titled(&title, font(TITLE, true))?;
        let (left, right) = body.split_horizontally(w / 2);
        panel(root, &left, curve, "Loss", |r| (r.train_loss, r.val_loss))?;
        let accuracy = |r: &EpochRecord| (100.0 * r.train_accuracy, 100.0 * r.val_accuracy);
        panel(root, &right, curve, "Accuracy", accuracy)
    })
}

/// One-vs-rest ROC curve per class with its AUC, against the chance diagonal.
pub fn roc_curves(eval: &Evaluation, title: &str, path: &Path) -> Result<(), PlotError> {
    let (w, h) = ROC_SIZE;
    render(path, white(w, h), |root| {
        let macro_auc = eval.macro_auc.map_or("n/a".into(), |a| format!("{a:.3}"));
        let caption = format!("{title} (macro AUC {macro_auc})");
        let axes = ["False positive rate", "True positive rate"];
        let mut chart = unit_square(root, &caption, w, axes)?;
        for (i, roc) in eval.roc.iter().enumerate() {
            let points = roc.fpr.iter().zip(&roc.tpr).map(|(&x, &y)| (x, y));
            let points = points.filter(|(x, y)| x.is_finite() && y.is_finite());
            let auc = roc.auc.map_or("AUC n/a".into(), |a| format!("AUC {a:.3}"));
            let line = class_colour(i).stroke_width(3);
            chart
                .draw_series(LineSeries::new(points, line))?
                .label(format!("{} ({auc})", roc.class))
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 26, y)], line));
        }
        // Listed last so the classes lead the legend; the line itself lies under them.
        let grey = GREY.stroke_width(2);
        let dashed = move |(x, y)| DashedPathElement::new([(x, y), (x + 26, y)], 6, 4, grey);
        chart
            .draw_series(std::iter::empty::<PathElement<(f64, f64)>>())?
            .label("chance")
            .legend(dashed);
        legend(&mut chart, SeriesLabelPosition::LowerRight)
    })
}

/// Reliability diagram of the locked test split before and after temperature
/// scaling: per confidence bin, the share of right answers against the mean
/// highest probability (a calibrated model lies on the diagonal), with each
/// curve's expected calibration error and the image count of each calibrated
/// bin.
pub fn reliability_diagram(
    before: &super::calibration::Reliability,
    after: &super::calibration::Reliability,
    temperature: f64,
    path: &Path,
) -> Result<(), PlotError> {
    let (w, h) = ROC_SIZE;
    render(path, white(w, h), |root| {
        let caption = format!("Calibration, locked test split (T = {temperature:.2})");
        let axes = ["Highest probability (bin mean)", "Share right"];
        let mut chart = unit_square(root, &caption, w, axes)?;
        for (i, (r, name)) in [(before, "uncalibrated"), (after, "temperature-scaled")]
            .into_iter()
            .enumerate()
        {
            let points: Vec<(f64, f64)> = r
                .bins
                .iter()
                .filter_map(|b| Some((b.confidence?, b.accuracy?)))
                .collect();
            let colour = class_colour(i);
            let line = colour.stroke_width(3);
            chart
                .draw_series(LineSeries::new(points.clone(), line))?
                .label(format!("{name} (ECE {:.3})", r.ece))
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 26, y)], line));
            chart.draw_series(
                points
                    .into_iter()
                    .map(|p| Circle::new(p, 5, colour.filled())),
            )?;
        }
        // How many images each calibrated point stands for: a one-image bin
        // says little.
        chart.draw_series(after.bins.iter().filter_map(|b| {
            let p = (b.confidence?, b.accuracy?);
            // Near the right edge the label goes to the left of its point.
            let dx = if p.0 > 0.85 { -64 } else { 8 };
            Some(
                EmptyElement::at(p)
                    + Text::new(format!("n={}", b.count), (dx, 6), font(TICK - 2.0, false)),
            )
        }))?;
        legend(&mut chart, SeriesLabelPosition::UpperLeft)
    })
}

/// Confusion matrix heat map (rows true, columns predicted) with counts and row percentages.
pub fn confusion_matrix(eval: &Evaluation, title: &str, path: &Path) -> Result<(), PlotError> {
    fonts(path)?;
    let l = cm_layout(eval, title);
    let n = eval.classes.len() as i32;
    let (centre, side) = (l.size.0 as i32 / 2, n * l.cell);
    render(path, white(l.size.0, l.size.1), |root| {
        let centred = style(AXIS, false, BLACK, CENTRE);
        let heading = style(TITLE, true, BLACK, CENTRE);
        put(root, title, (centre, 28), &heading)?;
        put(root, &l.subtitle, (centre, 62), &centred)?;
        for (i, row) in eval.confusion.iter().enumerate() {
            let total: u64 = row.iter().sum();
            for (j, &count) in row.iter().enumerate() {
                let v = eval.confusion_normalised[i][j];
                let (x, y) = (l.left + j as i32 * l.cell, l.top + i as i32 * l.cell);
                let cell = [(x, y), (x + l.cell, y + l.cell)];
                root.draw(&Rectangle::new(cell, heat(v).filled()))?;
                root.draw(&Rectangle::new(cell, MESH))?;
                let text = match total {
                    0 => format!("{count} (n/a)"),
                    _ => format!("{count} ({:.0}%)", 100.0 * v),
                };
                let ink = if v > 0.5 { WHITE } else { BLACK };
                let at = (x + l.cell / 2, y + l.cell / 2);
                put(root, &text, at, &style(AXIS, false, ink, CENTRE))?;
            }
        }
        let (x, y) = (l.left, l.top);
        root.draw(&Rectangle::new([(x, y), (x + side, y + side)], GREY))?;
        let right = style(AXIS, false, BLACK, HPos::Right);
        for (k, class) in eval.classes.iter().enumerate() {
            let mid = k as i32 * l.cell + l.cell / 2;
            put(root, class, (x - 12, y + mid), &right)?;
            put(root, class, (x + mid, y + side + 22), &centred)?;
        }
        let axis = style(AXIS + 2.0, true, BLACK, CENTRE);
        put(root, "Predicted", (x + side / 2, y + side + 60), &axis)?;
        let upright = axis.transform(FontTransform::Rotate270);
        let upright = upright.pos(Pos::new(HPos::Center, VPos::Center));
        let at = (x - l.names - 44, y + side / 2);
        root.draw(&Text::new("True", at, upright))?;
        Ok(())
    })
}

/// Grid of Grad-CAM overlays, bordered green when the grade is right and red when wrong.
pub fn gallery(items: &[GalleryItem], columns: usize, path: &Path) -> Result<(), PlotError> {
    fonts(path)?;
    let heading = "Grad-CAM of the predicted class, test images";
    let captions: Vec<Vec<String>> = items.iter().map(caption).collect();
    let lines = captions.iter().map(Vec::len).max().unwrap_or(2);
    let (w, h) = gallery_size(items.len(), columns, lines);
    let centre = w as i32 / 2;
    let title_style = style(TITLE - 2.0, true, BLACK, CENTRE);
    if items.is_empty() {
        return render(path, white(w, h), |root| {
            put(root, heading, (centre, 40), &title_style)?;
            let grey = style(AXIS, false, GREY, CENTRE);
            put(root, "no test images", (centre, 120), &grey)
        });
    }
    let cols = columns.clamp(1, items.len());
    let (cell_w, cell_h) = cell_size(lines);
    let x0 = (w - (cols as u32 * (cell_w + GAP) - GAP)) / 2;
    let origin = |k: usize| {
        let (col, row) = ((k % cols) as u32, (k / cols) as u32);
        (x0 + col * (cell_w + GAP), HEADER + row * (cell_h + GAP))
    };
    let mut canvas = white(w, h);
    for (k, item) in items.iter().enumerate() {
        let (x, y) = origin(k);
        let RGBColor(r, g, b) = if item.correct() { BEST } else { WRONG };
        let frame = RgbImage::from_pixel(cell_w, TILE.1 + 2 * BORDER, Rgb([r, g, b]));
        imageops::replace(&mut canvas, &frame, x.into(), y.into());
        let (x, y) = (x + BORDER, y + BORDER);
        imageops::replace(&mut canvas, &white(TILE.0, TILE.1), x.into(), y.into());
        let (ow, oh) = item.overlay.dimensions();
        if ow > 0 && oh > 0 {
            let scale = (TILE.0 as f64 / ow as f64).min(TILE.1 as f64 / oh as f64);
            let nw = ((ow as f64 * scale).round() as u32).clamp(1, TILE.0);
            let nh = ((oh as f64 * scale).round() as u32).clamp(1, TILE.1);
            let small = imageops::resize(&item.overlay, nw, nh, FilterType::Triangle);
            let (x, y) = (x + (TILE.0 - nw) / 2, y + (TILE.1 - nh) / 2);
            imageops::replace(&mut canvas, &small, x.into(), y.into());
        }
    }
    render(path, canvas, |root| {
        put(root, heading, (centre, 28), &title_style)?;
        let good = style(TICK, false, BEST, HPos::Right);
        let key = "green border: correct grade";
        put(root, key, (centre - 16, 60), &good)?;
        let bad = style(TICK, false, WRONG, LEFT);
        put(root, "red border: misclassified", (centre + 16, 60), &bad)?;
        for (k, (item, lines)) in items.iter().zip(&captions).enumerate() {
            let (x, y) = origin(k);
            let (x, y) = (x as i32, (y + TILE.1 + 2 * BORDER) as i32 + 16);
            let ink = if item.correct() { BLACK } else { WRONG };
            for (n, line) in lines.iter().enumerate() {
                let look = style(TICK, n == 0, if n == 0 { BLACK } else { ink }, LEFT);
                put(root, line, (x, y + (LINE as usize * n) as i32), &look)?;
            }
        }
        Ok(())
    })
}

fn panel(
    root: &Root,
    area: &Root,
    curve: &TrainingCurve,
    caption: &str,
    values: impl Fn(&EpochRecord) -> (f64, f64),
) -> Drawn {
    let (epochs, percent) = (&curve.epochs, caption == "Accuracy");
    let series = |pick: fn((f64, f64)) -> f64| -> Vec<(f64, f64)> {
        let points = epochs.iter().map(|r| (r.epoch as f64, pick(values(r))));
        points.filter(|p| p.1.is_finite()).collect()
    };
    let (train, valid) = (series(|v| v.0), series(|v| v.1));
    let first = epochs.first().map_or(1.0, |r| r.epoch as f64) - 0.5;
    let last = epochs.last().map_or(1.0, |r| r.epoch as f64);
    let last = last.max(first + 1.5) + 0.5;
    let highest = train.iter().chain(&valid).map(|p| p.1).fold(0.0, f64::max);
    let top = match (percent, highest > 0.0) {
        (true, _) => 100.0,
        (false, true) => highest * 1.1,
        (false, false) => 1.0,
    };
    let area = area.titled(caption, font(AXIS + 2.0, true))?;
    // The top margin is the band for the step and best labels, so they never
    // cover a curve or the legend.
    let mut chart = ChartBuilder::on(&area)
        .margin(14)
        .margin_top(52)
        .x_label_area_size(58)
        .y_label_area_size(76)
        .build_cartesian_2d(first..last, 0.0..top)?;
    let y_desc = if percent { "Accuracy (%)" } else { "Loss" };
    let decimals = [0, if percent { 0 } else { 2 }];
    mesh(&mut chart, ["Epoch", y_desc], decimals)?;

    let steps: Vec<(f64, f64)> = epochs
        .windows(2)
        .filter(|p| p[1].lr != p[0].lr)
        .map(|p| (p[1].epoch as f64, p[1].lr))
        .collect();
    for &(x, _) in &steps {
        let line = [(x, 0.0), (x, top)];
        chart.draw_series(DashedLineSeries::new(line, 8, 5, GREY.stroke_width(2)))?;
    }
    let kept = epochs.iter().any(|r| r.epoch == curve.best_epoch);
    let best = kept.then_some(curve.best_epoch as f64);
    if let Some(x) = best {
        chart.draw_series(LineSeries::new([(x, 0.0), (x, top)], BEST.stroke_width(2)))?;
    }
    for (points, name, i) in [(&train, "training", 0), (&valid, "validation", 1)] {
        let line = class_colour(i).stroke_width(3);
        // A single epoch is a point, not a line: mark it so it shows.
        let series = LineSeries::new(points.iter().copied(), line);
        let series = series.point_size(if points.len() < 3 { 5 } else { 0 });
        chart
            .draw_series(series)?
            .label(name)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 26, y)], line));
    }
    if let Some(&point) = best.and_then(|x| valid.iter().find(|p| p.0 == x)) {
        chart.draw_series([Circle::new(point, 7, BEST.filled())])?;
    }
    let corner = free_corner([&train, &valid], (first, last), top);
    legend(&mut chart, corner)?;

    let (xs, _) = area.get_pixel_range();
    let clamp = |x: i32, w: i32| x.clamp(xs.start + 4, (xs.end - w - 4).max(xs.start + 4));
    let grey = style(TICK, false, GREY, LEFT);
    let green = style(TICK, true, BEST, LEFT);
    let mut free_from = i32::MIN;
    for (x, lr) in steps {
        let (px, py) = chart.backend_coord(&(x, top));
        let text = format!("lr {}", fmt_lr(lr));
        let w = text_width(&text, TICK, false);
        let left = clamp((px - w / 2).max(free_from), w);
        put(root, &text, (left, py - 38), &grey)?;
        free_from = left + w + 10;
    }
    if let Some(x) = best {
        let (px, py) = chart.backend_coord(&(x, top));
        let w = text_width("best (kept)", TICK, true);
        let left = clamp(px - w / 2, w);
        put(root, "best (kept)", (left, py - 15), &green)?;
    }
    Ok(())
}

fn mesh(chart: &mut Chart, [x_desc, y_desc]: [&str; 2], [x_dp, y_dp]: [usize; 2]) -> Drawn {
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .axis_desc_style(font(AXIS, false))
        .label_style(font(TICK, false))
        .light_line_style(WHITE)
        .bold_line_style(MESH)
        // Epochs are whole numbers: no label at the ticks between them.
        .x_label_formatter(&|v| match x_dp == 0 && v.fract().abs() > 1e-6 {
            true => String::new(),
            false => format!("{v:.x_dp$}"),
        })
        .y_label_formatter(&|v| format!("{v:.y_dp$}"))
        .draw()?;
    Ok(())
}

/// A chart of [0, 1] x [0, 1] (a little past, so curves along the edges are
/// not hidden by the axes) with its caption fitted to `width`, the mesh and
/// the dashed diagonal: the frame of the ROC and reliability plots.
fn unit_square<'a, 'b>(
    root: &'a Root<'b>,
    caption: &str,
    width: u32,
    axes: [&str; 2],
) -> Result<Chart<'a, 'b>, Box<dyn Error>> {
    let caption = fit(caption, TITLE - 2.0, true, width as i32 - 40);
    let mut chart = ChartBuilder::on(root)
        .caption(caption, font(TITLE - 2.0, true))
        .margin(20)
        .x_label_area_size(60)
        .y_label_area_size(76)
        .build_cartesian_2d(-0.01..1.01, -0.01..1.01)?;
    mesh(&mut chart, axes, [1, 1])?;
    let diagonal = [(0.0, 0.0), (1.0, 1.0)];
    chart.draw_series(DashedLineSeries::new(diagonal, 10, 6, GREY.stroke_width(2)))?;
    Ok(chart)
}

fn legend<'a, 'b: 'a>(chart: &mut Chart<'a, 'b>, position: SeriesLabelPosition) -> Drawn {
    chart
        .configure_series_labels()
        .position(position)
        .label_font(font(TICK, false))
        .background_style(WHITE.mix(0.9))
        .border_style(GREY)
        .margin(12)
        .draw()?;
    Ok(())
}

/// The legend corner that the curves cross least, judged on points sampled along them.
fn free_corner(curves: [&[(f64, f64)]; 2], (x0, x1): (f64, f64), top: f64) -> SeriesLabelPosition {
    use SeriesLabelPosition::*;
    let along = |w: &[(f64, f64)], t: f64| {
        let x = w[0].0 + t * (w[1].0 - w[0].0);
        ((x - x0) / (x1 - x0), (w[0].1 + t * (w[1].1 - w[0].1)) / top)
    };
    let segments = curves.into_iter().flat_map(|c| c.windows(2));
    let samples: Vec<(f64, f64)> = segments
        .flat_map(|w| (0..=8).map(move |k| along(w, k as f64 / 8.0)))
        .collect();
    let crossings = |right: bool, upper: bool| {
        let inside = |&&(x, y): &&(f64, f64)| {
            let across = if right { x > 0.6 } else { x < 0.4 };
            across && if upper { y > 0.72 } else { y < 0.28 }
        };
        samples.iter().filter(inside).count()
    };
    let corners = [
        (UpperRight, true, true),
        (LowerRight, true, false),
        (UpperLeft, false, true),
        (LowerLeft, false, false),
    ];
    corners
        .into_iter()
        .min_by_key(|c| crossings(c.1, c.2))
        .map_or(UpperRight, |c| c.0)
}

struct CmLayout {
    size: (u32, u32),
    left: i32,
    top: i32,
    cell: i32,
    /// Width of the widest class name.
    names: i32,
    subtitle: String,
}

fn cm_layout(eval: &Evaluation, title: &str) -> CmLayout {
    let n = eval.classes.len().max(1) as i32;
    let widths = eval.classes.iter().map(|c| text_width(c, AXIS, false));
    let names = widths.max().unwrap_or(0);
    let cell = (names + 24).max(130);
    let ([lo, hi], accuracy) = (eval.accuracy_ci95, eval.accuracy);
    let subtitle = format!(
        "accuracy {:.1}% (95% CI {:.1}\u{2013}{:.1}%), n = {}",
        100.0 * accuracy,
        100.0 * lo,
        100.0 * hi,
        eval.n
    );
    let text = text_width(title, TITLE, true).max(text_width(&subtitle, AXIS, false));
    let grid_left = 60 + names + 16;
    let needed = grid_left + n * cell + 30;
    let width = needed.max(text + 40);
    let top = 100;
    let size = (width as u32, (top + n * cell + 90) as u32);
    let left = grid_left + (width - needed) / 2;
    CmLayout {
        size,
        left,
        top,
        cell,
        names,
        subtitle,
    }
}

/// Caption lines of a tile: its name, then the grades, split in two when too wide.
fn caption(item: &GalleryItem) -> Vec<String> {
    let width = cell_size(0).0 as i32;
    let (truth, predicted, p) = (&item.truth, &item.predicted, item.probability);
    let grades = format!("true {truth} / predicted {predicted} ({p:.2})");
    let mut lines = vec![fit(&item.name, TICK, true, width)];
    if text_width(&grades, TICK, false) <= width {
        lines.push(grades);
    } else {
        lines.push(fit(&format!("true {truth} /"), TICK, false, width));
        let second = format!("predicted {predicted} ({p:.2})");
        lines.push(fit(&second, TICK, false, width));
    }
    lines
}

fn cell_size(caption_lines: usize) -> (u32, u32) {
    let caption = 8 + LINE * caption_lines as u32;
    (TILE.0 + 2 * BORDER, TILE.1 + 2 * BORDER + caption)
}

fn gallery_size(n: usize, columns: usize, caption_lines: usize) -> (u32, u32) {
    if n == 0 {
        return (MIN_WIDTH, 200);
    }
    let cols = columns.clamp(1, n) as u32;
    let rows = n.div_ceil(cols as usize) as u32;
    let (cell_w, cell_h) = cell_size(caption_lines);
    let w = (cols * (cell_w + GAP) + GAP).max(MIN_WIDTH);
    (w, HEADER + rows * (cell_h + GAP))
}

fn render(
    path: &Path,
    mut canvas: RgbImage,
    draw: impl FnOnce(&Root) -> Drawn,
) -> Result<(), PlotError> {
    fonts(path)?;
    let size = canvas.dimensions();
    {
        let root = BitMapBackend::with_buffer(&mut canvas, size).into_drawing_area();
        draw(&root).map_err(err(path))?;
        root.present().map_err(err(path))?;
    }
    let saved = canvas.save_with_format(path, ImageFormat::Png);
    saved.map_err(err(path))
}

/// Registers the embedded DejaVu Sans (regular and bold) as plotters'
/// `sans-serif`, once per process; whether it loaded. The ab_glyph backend
/// knows no system fonts: every text draw fails without it.
pub fn embedded_fonts() -> bool {
    static READY: OnceLock<bool> = OnceLock::new();
    *READY.get_or_init(|| {
        register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular()).is_ok()
            && register_font("sans-serif", FontStyle::Bold, dejavu::sans::bold()).is_ok()
    })
}

fn fonts(path: &Path) -> Result<(), PlotError> {
    match embedded_fonts() {
        true => Ok(()),
        false => Err(err(path)("the embedded DejaVu font did not load")),
    }
}

fn err<E: std::fmt::Display>(path: &Path) -> impl Fn(E) -> PlotError {
    let path = path.display().to_string();
    move |e| PlotError {
        path: path.clone(),
        detail: e.to_string(),
    }
}

fn white(w: u32, h: u32) -> RgbImage {
    RgbImage::from_pixel(w, h, Rgb([255, 255, 255]))
}

fn font(size: f64, bold: bool) -> FontDesc<'static> {
    let weight = [FontStyle::Normal, FontStyle::Bold][bold as usize];
    FontDesc::new(FontFamily::SansSerif, size, weight)
}

fn style(size: f64, bold: bool, ink: RGBColor, h: HPos) -> TextStyle<'static> {
    font(size, bold).color(&ink).pos(Pos::new(h, VPos::Top))
}

fn text_width(text: &str, size: f64, bold: bool) -> i32 {
    font(size, bold).box_size(text).map_or(0, |(w, _)| w as i32)
}

/// Draws one line of text with its capitals centred vertically on `y`.
fn put(root: &Root, text: &str, (x, y): (i32, i32), look: &TextStyle) -> Drawn {
    // plotters' ab_glyph layout puts the baseline half a font size below the anchor
    // whatever vertical anchor is asked for, so centre the capitals by hand.
    let top = y - (look.font.get_size() * 0.19).round() as i32;
    root.draw(&Text::new(text, (x, top), look))?;
    Ok(())
}

/// `text`, cut with an ellipsis where it would be wider than `max` pixels.
fn fit(text: &str, size: f64, bold: bool, max: i32) -> String {
    let mut chars: Vec<char> = text.chars().collect();
    let mut cut = text.to_string();
    while text_width(&cut, size, bold) > max && !chars.is_empty() {
        chars.pop();
        cut = chars.iter().chain(['\u{2026}'].iter()).collect();
    }
    cut
}

/// White to dark blue (the end of matplotlib's "Blues") by a row fraction.
fn heat(v: f64) -> RGBColor {
    let mix = |dark: u8| (255.0 + (dark as f64 - 255.0) * v.clamp(0.0, 1.0)).round() as u8;
    RGBColor(mix(8), mix(48), mix(107))
}

const fn rgb(hex: u32) -> RGBColor {
    RGBColor((hex >> 16) as u8, (hex >> 8) as u8, hex as u8)
}

fn class_colour(i: usize) -> RGBColor {
    let (r, g, b) = match PALETTE.get(i) {
        Some(&hex) => rgb(hex).rgb(),
        None => Palette99::pick(i).rgb(),
    };
    RGBColor(r, g, b)
}

/// A learning rate as "1e-5" or "2.5e-4": `{:e}` alone shows 1.0000000000000002e-5
/// for a rate that was decayed by multiplication.
fn fmt_lr(lr: f64) -> String {
    let s = format!("{lr:.2e}");
    let (mantissa, exponent) = s.split_once('e').unwrap_or((&s, "0"));
    let mantissa = mantissa.trim_end_matches('0').trim_end_matches('.');
    format!("{mantissa}e{exponent}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::metrics::evaluate;
    use std::collections::HashSet;

    fn evaluation() -> Evaluation {
        let classes: Vec<String> = ["Normal", "CIN1", "CIN2", "CIN3"]
            .map(String::from)
            .to_vec();
        // Predicted class of five images per true class: every Normal right, no Normal called CIN3.
        let predicted = [
            [0, 0, 0, 0, 0],
            [1, 1, 0, 2, 1],
            [2, 1, 2, 3, 2],
            [3, 3, 2, 3, 3],
        ];
        let (mut truth, mut probs) = (vec![], vec![]);
        for (t, row) in predicted.iter().enumerate() {
            for (i, &p) in row.iter().enumerate() {
                let confidence = 0.55 + 0.08 * i as f64;
                let mut prob = vec![(1.0 - confidence) / 3.0; 4];
                prob[p] = confidence;
                prob[(p + 1) % 4] += 0.01 * (i % 3) as f64;
                truth.push(t);
                probs.push(prob);
            }
        }
        evaluate(&classes, &truth, &probs)
    }

    fn decoded(path: &Path, size: (u32, u32)) -> RgbImage {
        let img = image::open(path).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), size, "{}", path.display());
        let colours: HashSet<[u8; 3]> = img.pixels().map(|p| p.0).collect();
        assert!(
            colours.len() > 20,
            "{} looks blank: {} colours",
            path.display(),
            colours.len()
        );
        img
    }

    #[test]
    fn training_curves_show_both_panels() {
        let epochs = (1..=40)
            .map(|epoch| {
                let t = epoch as f64;
                EpochRecord {
                    epoch,
                    lr: 1e-4 * 0.1f64.powi((epoch as i32 - 1) / 15),
                    train_loss: 1.4 * (-t / 12.0).exp() + 0.2,
                    train_accuracy: 0.4 + 0.55 * (1.0 - (-t / 10.0).exp()),
                    val_loss: 1.3 * (-t / 10.0).exp() + 0.35 + 0.002 * t,
                    val_accuracy: 0.35 + 0.45 * (1.0 - (-t / 9.0).exp()),
                }
            })
            .collect();
        let stopped = "early stopping at epoch 40".into();
        let curve = TrainingCurve {
            epochs,
            best_epoch: 28,
            stopped,
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("training.png");
        training_curves(&curve, &path).unwrap();
        decoded(&path, TRAINING_SIZE);
        assert_eq!(
            (fmt_lr(1e-4 * 0.1), fmt_lr(2.5e-4)),
            ("1e-5".into(), "2.5e-4".into())
        );
    }

    #[test]
    fn roc_curves_draw_every_class() {
        let mut eval = evaluation();
        // As for a class without positives: no AUC and NaN rates, listed but not drawn.
        eval.roc[1].auc = None;
        eval.roc[1].tpr.iter_mut().for_each(|v| *v = f64::NAN);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("roc.png");
        roc_curves(&eval, "Test split", &path).unwrap();
        decoded(&path, ROC_SIZE);
    }

    #[test]
    fn confusion_matrix_shades_cells_by_row_fraction() {
        let eval = evaluation();
        assert_eq!(eval.confusion[0], vec![5, 0, 0, 0]);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("confusion.png");
        confusion_matrix(&eval, "Test split", &path).unwrap();
        let l = cm_layout(&eval, "Test split");
        let img = decoded(&path, l.size);
        // Near the corner of a cell, away from its text.
        let luma = |i: i32, j: i32| -> u32 {
            let (x, y) = (l.left + j * l.cell + 6, l.top + i * l.cell + 6);
            img.get_pixel(x as u32, y as u32)
                .0
                .iter()
                .map(|&c| c as u32)
                .sum()
        };
        assert!(
            luma(0, 0) < luma(1, 1) && luma(1, 1) < luma(1, 0),
            "darker with more"
        );
        assert_eq!(luma(0, 3), 3 * 255, "an empty cell is white");
    }

    #[test]
    fn gallery_tiles_every_item_and_says_when_empty() {
        let items: Vec<GalleryItem> = (0..5u32)
            .map(|k| GalleryItem {
                overlay: RgbImage::from_fn(400, 300, |x, y| {
                    Rgb([(x * 255 / 400) as u8, (y * 255 / 300) as u8, (k * 50) as u8])
                }),
                name: format!("biopsy_{k:03}_a_rather_long_file_name_from_the_scanner.jpg"),
                truth: "CIN2".into(),
                predicted: if k % 2 == 0 { "CIN2" } else { "CIN3" }.into(),
                probability: 0.5 + 0.1 * k as f32,
            })
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gallery.png");
        gallery(&items, 3, &path).unwrap();
        let img = decoded(&path, gallery_size(5, 3, 2));
        assert!(img.width() >= 3 * TILE.0 && img.height() >= 2 * TILE.1);
        // The first tile is correct, the second is not: green then red border.
        let border = |k: u32| {
            img.get_pixel(GAP + k * (TILE.0 + 2 * BORDER + GAP) + 2, HEADER + 2)
                .0
        };
        assert_eq!(
            (border(0), border(1)),
            ([0, 0x82, 0x3c], [0xc8, 0x1e, 0x1e])
        );
        let empty = dir.path().join("empty.png");
        gallery(&[], 3, &empty).unwrap();
        decoded(&empty, (MIN_WIDTH, 200));
    }

    #[test]
    fn an_unwritable_path_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing").join("roc.png");
        let e = roc_curves(&evaluation(), "Test split", &path).unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
    }
}
