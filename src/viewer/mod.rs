//! The result viewer: one self-contained HTML page per graded slide (the
//! worker's `viewer.html` beside `result.json`) or image (`cinflow classify`'s
//! `<image>.html` beside `<image>.json`), readable from a file, an S3 download
//! or any web server, with no external scripts, styles or requests.
//!
//! The page shows each image with its probabilities, CIN2+ triage and quality
//! flags, the slide grade and the model version, and draws **any class's
//! overlay** (Grad-CAM or class-contrastive) in the browser from what the
//! record stores anyway: the preprocessed JPEG and the raw class maps, both
//! embedded (base64) in the page. The drawing is the one of
//! [`crate::cam::overlay`]: maps upsampled bilinearly with half-pixel centres,
//! `ReLU(map) / scale` in the jet colour map blended 40% over the image, on the
//! model version's fixed scale ([`crate::cam::CamScale`]) or, for bundles
//! without one, each map's maximum. tests/viewer.rs checks the page in headless
//! Chromium against an independent NumPy/OpenCV drawing.

use base64::Engine as _;
use bytes::Bytes;
use serde::Serialize;

use crate::cam::{CamScale, ClassMaps};
use crate::result::ResultRecord;

/// Name of a worker job's viewer page, beside `result.json`.
pub const VIEWER_NAME: &str = "viewer.html";

/// What the page needs of one graded image beyond its result.
#[derive(Debug, Clone)]
pub struct ViewerImage {
    /// The stored preprocessed image (JPEG).
    pub jpeg: Bytes,
    /// The raw class maps (`cam.npy`'s values).
    pub maps: ClassMaps,
}

#[derive(Serialize)]
struct PageData<'a> {
    record: &'a ResultRecord,
    /// Overlay scales by map kind (absent: each map's maximum).
    scale: Option<&'a CamScale>,
    /// Per image of the record: the embedded pixels and maps (null when not graded).
    images: Vec<Option<EmbeddedImage>>,
}

#[derive(Serialize)]
struct EmbeddedImage {
    jpeg_base64: String,
    /// `[classes, h, w]`.
    shape: [usize; 3],
    /// float32 little-endian, base64.
    maps_base64: String,
}

const TEMPLATE: &str = include_str!("viewer.html");

/// The page of `record`; `images[i]` belongs to `record.images[i]`.
pub fn page(
    record: &ResultRecord,
    images: &[Option<ViewerImage>],
    scale: Option<&CamScale>,
) -> String {
    let b64 = base64::engine::general_purpose::STANDARD;
    let data = PageData {
        record,
        scale,
        images: images
            .iter()
            .map(|i| {
                i.as_ref().map(|v| EmbeddedImage {
                    jpeg_base64: b64.encode(&v.jpeg),
                    shape: [v.maps.classes, v.maps.height, v.maps.width],
                    maps_base64: b64.encode(
                        v.maps
                            .data
                            .iter()
                            .flat_map(|f| f.to_le_bytes())
                            .collect::<Vec<u8>>(),
                    ),
                })
            })
            .collect(),
    };
    // Inside <script type="application/json">: "</" must not close the element.
    let json = serde_json::to_string(&data)
        .expect("page data serialises")
        .replace("</", "<\\/");
    let title = match (&record.slide_id, record.images.as_slice()) {
        (Some(s), _) => format!("slide {s}"),
        (None, [one]) => one.uri.rsplit('/').next().unwrap_or(&one.uri).to_string(),
        (None, _) => "images".to_string(),
    };
    TEMPLATE
        .replace("{{TITLE}}", &crate::report::html_escape(&title))
        .replace("{{DATA}}", &json)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_cannot_close_its_script_element() {
        let m = crate::model::Manifest::example();
        let img = crate::result::ImageResult::failed(
            "s3://b/x<b>.jpg".into(),
            None,
            "bad </script><b> file".into(),
        );
        let record = ResultRecord::new(None, None, &m, "cpu", vec![img]);
        let html = page(&record, &[None], None);
        let start = html.find("id=\"cinflow-data\"").unwrap();
        let end = html[start..].find("</script>").unwrap();
        assert!(html[start..start + end].contains("bad <\\/script><b> file"));
        assert!(html.contains("<title>cinflow result: x&lt;b&gt;.jpg</title>"));
        for external in ["src=\"http", "href=\"http", "@import", "url(http"] {
            assert!(!html.contains(external), "external resource: {external}");
        }
    }
}
