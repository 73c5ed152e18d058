//! The legend burned into the bottom of every pre-drawn overlay, so an
//! overlay opened on its own (a LIS viewer, an e-mail) still says what it
//! shows: the colour bar from 0 to the map value drawn as full red, the
//! class whose evidence it is, and the image's P(CIN2+) and triage.

use image::RgbImage;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::jet;
use crate::model::{Triage, CIN2_PLUS};

/// What the legend of one overlay says.
#[derive(Debug, Clone, Copy)]
pub struct Legend<'a> {
    /// The class whose map the overlay shows.
    pub class: &'a str,
    /// Which map: the class's evidence or its evidence against the average.
    pub map: super::MapKind,
    /// Map value (logit units) drawn as full red.
    pub scale: f32,
    pub p_cin2_plus: Option<f32>,
    pub triage: Option<Triage>,
}

impl Legend<'_> {
    /// The legend's words, without the colour bar.
    pub fn text(&self) -> (String, Option<Triage>) {
        let mut t = match self.map {
            super::MapKind::GradCam => format!("{} evidence (Grad-CAM)", self.class),
            super::MapKind::Contrastive => format!("{} vs the average (contrastive)", self.class),
        };
        if let Some(p) = self.p_cin2_plus {
            t.push_str(&format!("  ·  P({CIN2_PLUS}) {p:.2}"));
        }
        if self.triage.is_some() {
            t.push_str("  ·  ");
        }
        (t, self.triage)
    }
}

/// Height of the legend band on an image `height` pixels tall.
pub fn band_height(height: u32) -> u32 {
    (height / 14).clamp(20, 64).min(height)
}

/// Darkens the bottom band of `image` and draws the legend on it. The rest of
/// the image is left as it is.
pub fn draw(image: &mut RgbImage, legend: &Legend) {
    let (w, h) = image.dimensions();
    let bh = band_height(h);
    let top = h - bh;
    for y in top..h {
        for x in 0..w {
            let px = image.get_pixel_mut(x, y);
            for v in px.0.iter_mut() {
                *v = (f32::from(*v) * 0.25).round() as u8;
            }
        }
    }
    let pad = (bh / 4).max(2);
    let size = f64::from(bh) * 0.42;
    let bar_w = (w / 5).clamp(16, 200);
    let zero_w = (size * 0.8) as u32;
    let bar_x = pad + zero_w;
    let (bar_top, bar_bottom) = (top + bh / 3, h - bh / 3);
    for x in bar_x..(bar_x + bar_w).min(w) {
        let c = jet((x - bar_x) as f32 / (bar_w - 1).max(1) as f32);
        for y in bar_top..bar_bottom {
            image.put_pixel(x, y, image::Rgb(c));
        }
    }
    if !crate::report::plots::embedded_fonts() {
        return;
    }
    let mid = (top + bh / 2) as i32;
    let root = BitMapBackend::with_buffer(image, (w, h)).into_drawing_area();
    let font = |ink: RGBColor| {
        FontDesc::new(FontFamily::SansSerif, size, FontStyle::Normal)
            .color(&ink)
            .pos(Pos::new(HPos::Left, VPos::Center))
    };
    let white = font(RGBColor(255, 255, 255));
    // Text failures only leave the band without words; the overlay stays usable.
    let _ = root.draw(&Text::new("0", (pad as i32, mid), &white));
    let scale = format!("{:.2}", legend.scale);
    let after_bar = (bar_x + bar_w + pad / 2) as i32;
    let _ = root.draw(&Text::new(scale.as_str(), (after_bar, mid), &white));
    let scale_w = width(&scale, size);
    let x = after_bar + scale_w + 2 * pad as i32;
    let (words, triage) = legend.text();
    let _ = root.draw(&Text::new(words.as_str(), (x, mid), &white));
    if let Some(t) = triage {
        let ink = match t {
            Triage::Likely => RGBColor(255, 110, 100),
            Triage::Refer => RGBColor(255, 200, 90),
            Triage::Unlikely => RGBColor(120, 215, 140),
        };
        let x = x + width(&words, size);
        let _ = root.draw(&Text::new(t.as_str(), (x, mid), font(ink)));
    }
    let _ = root.present();
}

fn width(text: &str, size: f64) -> i32 {
    FontDesc::new(FontFamily::SansSerif, size, FontStyle::Normal)
        .box_size(text)
        .map_or(0, |(w, _)| w as i32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_legend_band_holds_words_and_leaves_the_image_above_alone() {
        let mut img = RgbImage::from_pixel(800, 600, image::Rgb([200, 200, 200]));
        let legend = Legend {
            class: "CIN2",
            map: super::super::MapKind::GradCam,
            scale: 3.25,
            p_cin2_plus: Some(0.87),
            triage: Some(Triage::Likely),
        };
        draw(&mut img, &legend);
        let bh = band_height(600);
        assert_eq!(bh, 42);
        assert!((0..600 - bh).all(|y| img.get_pixel(400, y).0 == [200, 200, 200]));
        // The band is dark where nothing is drawn, and has light text and the
        // triage's colour where something is.
        assert_eq!(img.get_pixel(799, 599).0, [50, 50, 50]);
        let band: Vec<[u8; 3]> = (600 - bh..600)
            .flat_map(|y| (0..800).map(move |x| (x, y)))
            .map(|(x, y)| img.get_pixel(x, y).0)
            .collect();
        assert!(band.iter().any(|p| p[0] > 240 && p[1] > 240 && p[2] > 240));
        assert!(band.iter().any(|p| p[0] > 240 && p[1] < 130 && p[2] < 120));
        // The colour bar runs from jet(0) to jet(1).
        let y = 600 - bh / 2;
        let row: Vec<[u8; 3]> = (0..800).map(|x| img.get_pixel(x, y).0).collect();
        assert!(row.contains(&jet(0.0)) && row.contains(&jet(1.0)));
        assert_eq!(
            legend.text().0,
            format!("CIN2 evidence (Grad-CAM)  ·  P({CIN2_PLUS}) 0.87  ·  ")
        );
    }
}
