//! Bytes -> 8-bit RGB, refusing oversized and truncated images with a clear reason.

use std::io::Cursor;

use image::{
    ColorType, DynamicImage, ImageDecoder, ImageError, ImageFormat, ImageReader, RgbImage,
};

use super::PreprocessError;

/// Largest pixel count [`decode`] accepts (100 megapixels, a 10000 x 10000 slide region).
pub const MAX_PIXELS: u64 = 100_000_000;

/// Decodes JPEG, PNG or TIFF bytes to 8-bit RGB with the [`MAX_PIXELS`] limit.
pub fn decode(bytes: &[u8]) -> Result<RgbImage, PreprocessError> {
    decode_with_limit(bytes, MAX_PIXELS)
}

/// Decodes JPEG, PNG or TIFF bytes to 8-bit RGB, refusing images over `max_pixels` pixels.
///
/// Grey is replicated to three channels, alpha is dropped (not composited, as `cv2.imdecode`
/// does), 16-bit samples become `round(v / 257)`, and an EXIF orientation is applied like
/// `cv2.imdecode` does. The size is checked on the header, before the pixel buffer exists.
pub fn decode_with_limit(bytes: &[u8], max_pixels: u64) -> Result<RgbImage, PreprocessError> {
    let format = image::guess_format(bytes).map_err(|_| {
        PreprocessError::UnsupportedFormat(format!("unrecognised signature {}", signature(bytes)))
    })?;
    if !matches!(
        format,
        ImageFormat::Jpeg | ImageFormat::Png | ImageFormat::Tiff
    ) {
        return Err(PreprocessError::UnsupportedFormat(format!("{format:?}")));
    }
    if format == ImageFormat::Jpeg && jpeg_missing_eoi(bytes) {
        return Err(PreprocessError::Truncated(
            "JPEG data ends before its end-of-image marker".into(),
        ));
    }

    if format == ImageFormat::Png {
        if let Some(reason) = png_bad_palette(bytes) {
            return Err(PreprocessError::Undecodable(reason));
        }
    }

    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    reader.limits(limits(max_pixels));
    let mut decoder = reader.into_decoder().map_err(|e| classify(e, max_pixels))?;
    let (width, height) = decoder.dimensions();
    if width == 0 || height == 0 {
        return Err(PreprocessError::Empty { width, height });
    }
    if u64::from(width) * u64::from(height) > max_pixels {
        return Err(PreprocessError::TooLarge {
            width,
            height,
            max_pixels,
        });
    }
    let color = decoder.color_type();
    if !matches!(
        color,
        ColorType::L8
            | ColorType::La8
            | ColorType::Rgb8
            | ColorType::Rgba8
            | ColorType::L16
            | ColorType::La16
            | ColorType::Rgb16
            | ColorType::Rgba16
    ) {
        return Err(PreprocessError::UnsupportedPixelType(format!(
            "{:?}",
            decoder.original_color_type()
        )));
    }
    // A broken EXIF block should not cost the image; OpenCV ignores it too.
    let orientation = decoder
        .orientation()
        .unwrap_or(image::metadata::Orientation::NoTransforms);

    let mut img = if format == ImageFormat::Jpeg {
        drop(decoder);
        DynamicImage::ImageRgb8(decode_jpeg_libjpeg(bytes, width, height)?)
    } else {
        // A decoder bug that panics on some input is a property of those bytes: refuse the
        // image instead of taking the worker thread down.
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            DynamicImage::from_decoder(decoder)
        }))
        .map_err(|panic| {
            PreprocessError::Undecodable(format!(
                "{format:?} decoder failed: {}",
                panic_text(&*panic)
            ))
        })?
        .map_err(|e| classify(e, max_pixels))?
    };
    img.apply_orientation(orientation);
    Ok(img.into_rgb8())
}

/// JPEG pixels through libjpeg-turbo (vendored by mozjpeg-sys): the same IDCT and
/// chroma upsampling as `cv2.imdecode`, so the output is bit-identical to OpenCV's.
/// The header was already read and size-checked by the `image` decoder.
///
/// Four-component JPEGs (CMYK, and YCCK, which libjpeg turns into CMYK) follow OpenCV's
/// `JpegDecoder::readData` for `IMREAD_COLOR`: libjpeg outputs CMYK as stored (no Adobe
/// inversion) and [`cmyk_to_rgb`] applies OpenCV's `icvCvt_CMYK2BGR_8u_C4C3R`.
fn decode_jpeg_libjpeg(bytes: &[u8], width: u32, height: u32) -> Result<RgbImage, PreprocessError> {
    // libjpeg reports fatal errors by unwinding through the wrapper; keep them as errors.
    let decoded = std::panic::catch_unwind(|| -> std::io::Result<Vec<u8>> {
        let d = mozjpeg::Decompress::new_mem(bytes)?;
        // The size check read the header with another parser: refuse a file whose
        // headers the two read differently before libjpeg allocates anything.
        if (d.width(), d.height()) != (width as usize, height as usize) {
            return Err(std::io::Error::other(format!(
                "libjpeg reads the size as {}x{}, the header check as {width}x{height}",
                d.width(),
                d.height()
            )));
        }
        if d.components().len() == 4 {
            let mut d = d.to_colorspace(mozjpeg::ColorSpace::JCS_CMYK)?;
            let pixels: Vec<[u8; 4]> = d.read_scanlines()?;
            d.finish()?;
            return Ok(pixels.into_iter().flat_map(cmyk_to_rgb).collect());
        }
        let mut d = d.rgb()?;
        // Straight into the image's buffer: one row of bytes per scanline, no copy.
        let pixels: Vec<u8> = d.read_scanlines()?;
        d.finish()?;
        Ok(pixels)
    });
    let detail = match decoded {
        Ok(Ok(raw)) => match RgbImage::from_raw(width, height, raw) {
            Some(img) => return Ok(img),
            None => "libjpeg returned fewer pixels than the header declares".to_string(),
        },
        Ok(Err(e)) => e.to_string(),
        Err(panic) => panic_text(&*panic),
    };
    Err(PreprocessError::Undecodable(format!("JPEG: {detail}")))
}

/// The message of a caught panic (libjpeg's errors arrive this way).
fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "the decoder panicked".into())
}

/// A palette PNG whose PLTE chunk is not 1 to 256 whole RGB entries: libpng (and so
/// `cv2.imdecode`) refuses it, and the `png` crate (0.18.1) panics on a length that is
/// not a multiple of 3 (found by fuzzing, docs/fuzzing.md). Walks the chunks before the
/// first IDAT; a layout it does not understand is left to the decoder.
fn png_bad_palette(bytes: &[u8]) -> Option<String> {
    const PALETTE: u8 = 3;
    // Signature (8), IHDR length and type (8), width, height, bit depth; colour type.
    if bytes.get(12..16) != Some(b"IHDR") || bytes.get(25) != Some(&PALETTE) {
        return None;
    }
    let mut i = 8usize;
    while let (Some(len), Some(kind)) = (bytes.get(i..i + 4), bytes.get(i + 4..i + 8)) {
        let len = u32::from_be_bytes(len.try_into().expect("4 bytes")) as usize;
        match kind {
            b"PLTE" if len == 0 || len % 3 != 0 || len > 3 * 256 => {
                return Some(format!(
                    "PNG palette of {len} bytes is not 1 to 256 RGB entries"
                ));
            }
            b"IDAT" | b"IEND" => return None,
            _ => i = i.saturating_add(12).saturating_add(len),
        }
    }
    None
}

/// OpenCV's CMYK -> RGB for JPEG (`icvCvt_CMYK2BGR_8u_C4C3R` in imgcodecs' `utils.cpp`):
/// each of C, M, Y becomes `k - ((255 - v) * k >> 8)`, and C, M, Y are R, G, B.
fn cmyk_to_rgb([c, m, y, k]: [u8; 4]) -> [u8; 3] {
    let k = u32::from(k);
    // (255 - v) * k >> 8 <= 254 * k / 256 < k, so the difference stays in 0..=k.
    [c, m, y].map(|v| (k - (((255 - u32::from(v)) * k) >> 8)) as u8)
}

/// Decoder limits: room for the largest accepted image at 16-bit RGBA plus working memory.
fn limits(max_pixels: u64) -> image::Limits {
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(max_pixels.saturating_mul(8).saturating_add(64 << 20));
    limits
}

/// Maps a decoder error to the permanent reason a pathologist or operator can act on.
fn classify(err: ImageError, max_pixels: u64) -> PreprocessError {
    match err {
        ImageError::IoError(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            PreprocessError::Truncated(e.to_string())
        }
        ImageError::Unsupported(e) => match e.kind() {
            image::error::UnsupportedErrorKind::Color(c) => {
                PreprocessError::UnsupportedPixelType(format!("{c:?}"))
            }
            _ => PreprocessError::Undecodable(e.to_string()),
        },
        ImageError::Limits(e) => {
            PreprocessError::Undecodable(format!("{e} (the limit is {max_pixels} pixels)"))
        }
        other => {
            let detail = other.to_string().trim().to_string();
            let lower = detail.to_ascii_lowercase();
            let truncation = ["eof", "end of file", "truncat", "not enough bytes"];
            if truncation.iter().any(|t| lower.contains(t)) {
                PreprocessError::Truncated(detail)
            } else {
                PreprocessError::Undecodable(detail)
            }
        }
    }
}

/// First bytes in hex, for the "unsupported format" message.
fn signature(bytes: &[u8]) -> String {
    if bytes.is_empty() {
        return "(empty input)".into();
    }
    let head: Vec<String> = bytes.iter().take(8).map(|b| format!("{b:02x}")).collect();
    head.join(" ")
}

/// The JPEG decoder, like libjpeg, fills a scan that stops early with grey and reports
/// success; a partial upload must be refused instead. True when the marker walk reaches the
/// first scan and no end-of-image marker (FF D9) follows it. Segments before the scan are
/// skipped by length because an EXIF thumbnail carries its own FF D9.
fn jpeg_missing_eoi(bytes: &[u8]) -> bool {
    let mut i = 2; // after SOI
    loop {
        if i + 1 >= bytes.len() {
            return true;
        }
        if bytes[i] != 0xFF {
            return false; // not a layout we understand; the decoder accepted it
        }
        let marker = bytes[i + 1];
        match marker {
            0xFF => i += 1, // fill byte
            0xD9 => return false,
            0x01 | 0xD0..=0xD7 => i += 2,
            0xDA => {
                // Entropy-coded data stuffs every literal FF as FF 00, so FF D9 is the marker.
                return !bytes[i..].windows(2).rev().any(|w| w == [0xFF, 0xD9]);
            }
            _ => {
                if i + 3 >= bytes.len() {
                    return true;
                }
                let len = usize::from(u16::from_be_bytes([bytes[i + 2], bytes[i + 3]]));
                i += 2 + len;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{ImageBuffer, ImageEncoder, Luma, LumaA, Rgb, Rgba};
    use std::time::{Duration, Instant};

    fn png<P: image::PixelWithColorType>(img: &ImageBuffer<P, Vec<P::Subpixel>>) -> Vec<u8>
    where
        [P::Subpixel]: image::EncodableLayout,
    {
        let mut out = Vec::new();
        image::codecs::png::PngEncoder::new(&mut out)
            .write_image(
                image::EncodableLayout::as_bytes(img.as_raw().as_slice()),
                img.width(),
                img.height(),
                P::COLOR_TYPE,
            )
            .unwrap();
        out
    }

    fn gradient(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            Rgb([(x * 7) as u8, (y * 5) as u8, (x + y) as u8])
        })
    }

    fn jpeg(img: &RgbImage) -> Vec<u8> {
        crate::synth::encode(img, crate::synth::SynthFormat::Jpeg)
    }

    #[test]
    fn corrupt_jpeg_data_is_an_error_or_an_image_never_a_crash() {
        let mut bytes = jpeg(&gradient(320, 240));
        // Overwrite entropy-coded data after the headers, keeping the end marker.
        let n = bytes.len();
        for (i, b) in bytes[n / 2..n - 2].iter_mut().enumerate() {
            *b = (i * 37 % 251) as u8;
        }
        match decode(&bytes) {
            Ok(img) => assert_eq!(img.dimensions(), (320, 240)),
            Err(e) => assert!(matches!(e, PreprocessError::Undecodable(_)), "{e}"),
        }
    }

    #[test]
    fn rgb_png_round_trips() {
        let img = gradient(37, 21);
        assert_eq!(decode(&png(&img)).unwrap(), img);
    }

    #[test]
    fn grey_png_is_replicated() {
        let grey = ImageBuffer::from_fn(5, 3, |x, y| Luma([(10 * x + 50 * y) as u8]));
        let rgb = decode(&png(&grey)).unwrap();
        for (x, y, p) in rgb.enumerate_pixels() {
            let v = grey.get_pixel(x, y)[0];
            assert_eq!(p.0, [v, v, v]);
        }
    }

    #[test]
    fn grey_alpha_and_rgba_drop_alpha() {
        let la = ImageBuffer::from_fn(4, 4, |x, _| LumaA([(x * 60) as u8, 0]));
        let rgb = decode(&png(&la)).unwrap();
        assert_eq!(rgb.get_pixel(3, 0).0, [180, 180, 180]);

        let rgba = ImageBuffer::from_fn(4, 4, |x, y| Rgba([x as u8, y as u8, 9, (x * 80) as u8]));
        let rgb = decode(&png(&rgba)).unwrap();
        assert_eq!(rgb.get_pixel(2, 3).0, [2, 3, 9]);
        assert_eq!(rgb.get_pixel(0, 0).0, [0, 0, 9]);
    }

    #[test]
    fn sixteen_bit_png_is_rounded_to_eight_bits() {
        // round(v / 257): 128 -> 0 (0.498), 129 -> 1 (0.502), 65535 -> 255, 32896 -> 128.
        let vals = [0u16, 128, 129, 385, 32896, 65535];
        let img = ImageBuffer::from_fn(vals.len() as u32, 1, |x, _| Luma([vals[x as usize]]));
        let rgb = decode(&png(&img)).unwrap();
        let got: Vec<u8> = rgb.pixels().map(|p| p[0]).collect();
        assert_eq!(got, [0, 0, 1, 1, 128, 255]);

        let img16 = ImageBuffer::from_fn(2, 1, |x, _| Rgb([x as u16 * 1000, 514, 65535]));
        let rgb = decode(&png(&img16)).unwrap();
        assert_eq!(rgb.get_pixel(1, 0).0, [4, 2, 255]);
    }

    #[test]
    fn tiff_decodes() {
        let img = gradient(19, 11);
        let mut out = Cursor::new(Vec::new());
        image::codecs::tiff::TiffEncoder::new(&mut out)
            .write_image(img.as_raw(), 19, 11, image::ExtendedColorType::Rgb8)
            .unwrap();
        assert_eq!(decode(out.get_ref()).unwrap(), img);
    }

    #[test]
    fn jpeg_decodes_close_to_source() {
        let img = gradient(64, 48);
        let rgb = decode(&jpeg(&img)).unwrap();
        assert_eq!(rgb.dimensions(), (64, 48));
    }

    /// A four-component JPEG through libjpeg: CMYK stored as CMYK, or converted to YCCK.
    fn cmyk_jpeg(w: u32, h: u32, cmyk: &[u8], space: mozjpeg::ColorSpace) -> Vec<u8> {
        let mut c = mozjpeg::Compress::new(mozjpeg::ColorSpace::JCS_CMYK);
        c.set_color_space(space);
        c.set_size(w as usize, h as usize);
        c.set_quality(95.0);
        let mut c = c.start_compress(Vec::new()).unwrap();
        c.write_scanlines(cmyk).unwrap();
        c.finish().unwrap()
    }

    #[test]
    fn cmyk_conversion_is_opencvs() {
        // k - ((255 - v) * k >> 8): with k = 255, v = 255 stays 255, v = 0 gives
        // 255 - 254 = 1, and k = 0 is black whatever the ink.
        assert_eq!(cmyk_to_rgb([255, 0, 128, 255]), [255, 1, 129]);
        assert_eq!(cmyk_to_rgb([10, 200, 255, 0]), [0, 0, 0]);
        assert_eq!(cmyk_to_rgb([0, 100, 200, 100]), [1, 40, 79]);
    }

    #[test]
    fn cmyk_and_ycck_jpegs_decode() {
        let (w, h) = (40, 24);
        // Flat colours so that the lossy round trip stays close to the conversion.
        let cmyk: Vec<u8> = (0..w * h)
            .flat_map(|i| {
                if i % w < w / 2 {
                    [255, 128, 0, 255]
                } else {
                    [200, 200, 200, 100]
                }
            })
            .collect();
        for space in [mozjpeg::ColorSpace::JCS_CMYK, mozjpeg::ColorSpace::JCS_YCCK] {
            let bytes = cmyk_jpeg(w, h, &cmyk, space);
            let img = decode(&bytes).unwrap_or_else(|e| panic!("{space:?}: {e}"));
            assert_eq!(img.dimensions(), (w, h));
            for (x, expected) in [
                (2, cmyk_to_rgb([255, 128, 0, 255])),
                (37, cmyk_to_rgb([200, 200, 200, 100])),
            ] {
                let got = img.get_pixel(x, 12).0;
                let worst = got.iter().zip(expected).map(|(a, b)| a.abs_diff(b)).max();
                assert!(worst <= Some(3), "{space:?} x={x}: {got:?} vs {expected:?}");
            }
            // The pixel limit is checked on the header, before libjpeg runs.
            let err = decode_with_limit(&bytes, u64::from(w * h) - 1).unwrap_err();
            assert!(matches!(err, PreprocessError::TooLarge { .. }), "{err}");
        }
    }

    #[test]
    fn grey_jpeg_is_replicated() {
        let grey = image::GrayImage::from_fn(33, 17, |x, y| Luma([(x * 7 + y * 3) as u8]));
        let mut bytes = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, 95)
            .write_image(grey.as_raw(), 33, 17, image::ExtendedColorType::L8)
            .unwrap();
        let rgb = decode(&bytes).unwrap();
        assert_eq!(rgb.dimensions(), (33, 17));
        assert!(rgb.pixels().all(|p| p[0] == p[1] && p[1] == p[2]));
    }

    #[test]
    fn garbage_is_refused() {
        let err = decode(b"this is certainly not an image").unwrap_err();
        assert!(
            matches!(err, PreprocessError::UnsupportedFormat(_)),
            "{err}"
        );
        assert!(matches!(
            decode(&[]).unwrap_err(),
            PreprocessError::UnsupportedFormat(_)
        ));
        // A PNG signature followed by garbage.
        let mut bad = b"\x89PNG\r\n\x1a\n".to_vec();
        bad.extend_from_slice(&[0x42; 64]);
        let err = decode(&bad).unwrap_err();
        assert!(
            matches!(
                err,
                PreprocessError::Undecodable(_) | PreprocessError::Truncated(_)
            ),
            "{err}"
        );
        assert!(!crate::retry::Transient::is_transient(&err));
    }

    #[test]
    fn truncated_jpeg_is_refused() {
        let noisy = RgbImage::from_fn(256, 256, |x, y| {
            Rgb([((x * 31) ^ (y * 17)) as u8, (x * y) as u8, (x ^ y) as u8])
        });
        let bytes = jpeg(&noisy);
        for cut in [bytes.len() / 2, bytes.len() - 2, 400] {
            let err = decode(&bytes[..cut]).unwrap_err();
            assert!(
                matches!(
                    err,
                    PreprocessError::Truncated(_) | PreprocessError::Undecodable(_)
                ),
                "cut {cut}: {err}"
            );
        }
        assert!(matches!(
            decode(&bytes[..bytes.len() / 2]).unwrap_err(),
            PreprocessError::Truncated(_)
        ));
    }

    #[test]
    fn truncated_png_is_refused() {
        let noisy = RgbImage::from_fn(128, 128, |x, y| Rgb([((x * 31) ^ (y * 17)) as u8, 0, 1]));
        let bytes = png(&noisy);
        let err = decode(&bytes[..bytes.len() / 2]).unwrap_err();
        assert!(matches!(err, PreprocessError::Truncated(_)), "{err}");
    }

    /// CRC-32 (IEEE) for hand-made PNG chunks.
    fn crc32(data: &[u8]) -> u32 {
        let mut crc = 0xFFFF_FFFFu32;
        for &b in data {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    fn png_header(width: u32, height: u32) -> Vec<u8> {
        let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut ihdr = b"IHDR".to_vec();
        ihdr.extend_from_slice(&width.to_be_bytes());
        ihdr.extend_from_slice(&height.to_be_bytes());
        ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit RGB, deflate, no filter, no interlace
        out.extend_from_slice(&13u32.to_be_bytes());
        out.extend_from_slice(&ihdr);
        out.extend_from_slice(&crc32(&ihdr).to_be_bytes());
        // A tiny IDAT so that a decoder that ignored the size would start allocating.
        let idat = b"IDAT\x78\x9c\x03\x00\x00\x00\x00\x01";
        out.extend_from_slice(&8u32.to_be_bytes());
        out.extend_from_slice(idat);
        out.extend_from_slice(&crc32(idat).to_be_bytes());
        out
    }

    fn png_chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut body = kind.to_vec();
        body.extend_from_slice(data);
        out.extend_from_slice(&body);
        out.extend_from_slice(&crc32(&body).to_be_bytes());
    }

    /// A 10x10 8-bit palette PNG (every pixel index 0) with `palette` as its PLTE data.
    fn palette_png(palette: &[u8]) -> Vec<u8> {
        let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut ihdr = Vec::new();
        ihdr.extend_from_slice(&10u32.to_be_bytes());
        ihdr.extend_from_slice(&10u32.to_be_bytes());
        ihdr.extend_from_slice(&[8, 3, 0, 0, 0]);
        png_chunk(&mut out, b"IHDR", &ihdr);
        png_chunk(&mut out, b"PLTE", palette);
        // zlib stream with one stored block: 10 rows of filter byte 0 and 10 zero indices.
        let raw = [0u8; 110];
        let mut idat = vec![0x78, 0x01, 0x01];
        idat.extend_from_slice(&(raw.len() as u16).to_le_bytes());
        idat.extend_from_slice(&(!(raw.len() as u16)).to_le_bytes());
        idat.extend_from_slice(&raw);
        let (a, b) = raw.iter().fold((1u32, 0u32), |(a, b), &x| {
            let a = (a + u32::from(x)) % 65521;
            (a, (b + a) % 65521)
        });
        idat.extend_from_slice(&((b << 16) | a).to_be_bytes());
        png_chunk(&mut out, b"IDAT", &idat);
        png_chunk(&mut out, b"IEND", &[]);
        out
    }

    #[test]
    fn palette_png_decodes() {
        let palette: Vec<u8> = (0..48).collect();
        let rgb = decode(&palette_png(&palette)).unwrap();
        assert_eq!(rgb.dimensions(), (10, 10));
        assert!(rgb.pixels().all(|p| p.0 == [0, 1, 2]));
    }

    /// Regression (fuzzing, decode_png): a 49-byte PLTE made the png crate panic with
    /// "range end index 3 out of range for slice of length 1" while building its palette
    /// lookup; libpng refuses such a palette, so the image is refused as undecodable.
    #[test]
    fn palette_png_with_partial_entry_is_refused_not_a_panic() {
        for len in [49, 0, 770, 771] {
            let palette: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let err = decode(&palette_png(&palette)).unwrap_err();
            match err {
                PreprocessError::Undecodable(reason) => {
                    assert!(reason.contains("palette"), "{len}: {reason}")
                }
                other => panic!("{len}: expected Undecodable, got {other}"),
            }
        }
    }

    #[test]
    fn huge_png_header_fails_fast() {
        let start = Instant::now();
        let err = decode(&png_header(100_000, 100_000)).unwrap_err();
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "took {:?}",
            start.elapsed()
        );
        match err {
            PreprocessError::TooLarge {
                width,
                height,
                max_pixels,
            } => {
                assert_eq!((width, height, max_pixels), (100_000, 100_000, MAX_PIXELS));
            }
            other => panic!("expected TooLarge, got {other}"),
        }
        assert!(err_text(&png_header(100_000, 100_000)).contains("100000x100000"));
    }

    fn err_text(bytes: &[u8]) -> String {
        decode(bytes).unwrap_err().to_string()
    }

    #[test]
    fn limit_is_configurable() {
        let bytes = png(&gradient(20, 10));
        assert!(decode_with_limit(&bytes, 200).is_ok());
        let err = decode_with_limit(&bytes, 199).unwrap_err();
        assert!(matches!(err, PreprocessError::TooLarge { .. }), "{err}");
    }

    #[test]
    fn other_formats_are_named() {
        let err = decode(b"GIF89a\x01\x00\x01\x00\x00\x00\x00").unwrap_err();
        assert!(err.to_string().contains("Gif"), "{err}");
    }
}
