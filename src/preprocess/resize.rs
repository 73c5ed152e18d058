//! placeholder
use image::RgbImage;
/// placeholder
pub fn resize(img: &RgbImage, _w: u32, _h: u32) -> RgbImage { img.clone() }
