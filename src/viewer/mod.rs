//! The result viewer: one HTML page per graded slide (the worker's
//! `viewer.html` beside `result.json`) or image (`cinflow classify`'s
//! `<image>.html` beside `<image>.json`), with no external scripts or styles.
//!
//! The page shows each image with its probabilities, CIN2+ triage and quality
//! flags, the slide grade and the model version, and draws **any class's
//! overlay** (Grad-CAM or class-contrastive) in the browser from what the
//! record stores anyway: the preprocessed JPEG, which the page loads from
//! beside it by a relative link (`images/NNN/preprocessed.jpg` in a worker's
//! results, `<image>/preprocessed.jpg` in a classify folder), so every image is
//! stored once; and the raw class maps, small, embedded in the page. It opens
//! from the results folder on disk or downloaded from S3 with its `images/`,
//! from any web server or S3 gateway that serves the folder, and from a
//! presigned link ([`presigned_link`]).
//!
//! The drawing is the one of [`crate::cam::overlay`]: maps upsampled
//! bilinearly with half-pixel centres, `ReLU(map) / scale` in the jet colour
//! map blended 40% over the image, on the model version's fixed scale
//! ([`crate::cam::CamScale`]) or, for bundles without one, each map's maximum.
//! Where the page may read the image's pixels (served over HTTP, or a
//! presigned link: same origin) it blends them with the renderer's float32
//! arithmetic (`data-drawing="exact"`); opened from a file, browsers keep a
//! page from reading a neighbouring file's pixels, so it lays the same heat
//! colours over the image at 40% opacity and the browser blends them
//! (`data-drawing="composite"`, within a grey level or so). tests/viewer.rs
//! checks both in headless Chromium against an independent NumPy/OpenCV
//! drawing.

use base64::Engine as _;
use serde::Serialize;

use crate::cam::{CamScale, ClassMaps};
use crate::result::ResultRecord;

/// Name of a worker job's viewer page, beside `result.json`.
pub const VIEWER_NAME: &str = "viewer.html";

/// What the page needs of one graded image beyond its result.
#[derive(Debug, Clone)]
pub struct ViewerImage {
    /// Where the stored preprocessed JPEG is, relative to the page (a URL
    /// path of plain segments, such as `images/000/preprocessed.jpg`).
    pub src: String,
    /// The raw class maps (`cam.npy`'s values).
    pub maps: ClassMaps,
}

#[derive(Serialize)]
struct PageData<'a> {
    record: &'a ResultRecord,
    /// Overlay scales by map kind (absent: each map's maximum).
    scale: Option<&'a CamScale>,
    /// Per image of the record: its image link and maps (null when not graded).
    images: Vec<Option<PageImage<'a>>>,
}

#[derive(Serialize)]
struct PageImage<'a> {
    /// The preprocessed JPEG, relative to the page.
    src: &'a str,
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
                i.as_ref().map(|v| PageImage {
                    src: &v.src,
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

/// The link that opens a page presigned (SigV4 query authentication) with its
/// images: `page_url` is the page's presigned URL, `image_urls[i]` the
/// presigned URL of `record.images[i]`'s preprocessed JPEG, all signed at the
/// same instant for the same lifetime, so that their queries differ only in
/// `X-Amz-Signature`. The images' signatures ride in the fragment, which
/// browsers never send: `#sig=<hex>,<hex>,...` (empty for an image without
/// one); the page loads image `i` from its relative link with its own query,
/// signature `i` swapped in. URLs that are not SigV4-presigned come back as
/// they are.
pub fn presigned_link(page_url: &str, image_urls: &[Option<&str>]) -> String {
    let signatures: Vec<&str> = image_urls
        .iter()
        .map(|u| u.and_then(signature).unwrap_or(""))
        .collect();
    if signature(page_url).is_none() || signatures.iter().all(|s| s.is_empty()) {
        return page_url.to_string();
    }
    let page = page_url.split_once('#').map_or(page_url, |(p, _)| p);
    format!("{page}#sig={}", signatures.join(","))
}

/// The `X-Amz-Signature` of a presigned URL (64 lowercase hex digits).
fn signature(url: &str) -> Option<&str> {
    let query = url.split_once('?')?.1;
    let query = query.split_once('#').map_or(query, |(q, _)| q);
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix("X-Amz-Signature="))
        .filter(|s| {
            s.len() == 64
                && s.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        })
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

    #[test]
    fn a_presigned_link_carries_its_images_signatures_in_the_fragment() {
        let query = |sig: &str| {
            format!(
                "x-id=GetObject&X-Amz-Algorithm=AWS4-HMAC-SHA256\
                 &X-Amz-Credential=GK1%2F20261201%2Fgarage%2Fs3%2Faws4_request\
                 &X-Amz-Date=20261201T040000Z&X-Amz-Expires=3600\
                 &X-Amz-SignedHeaders=host&X-Amz-Signature={sig}"
            )
        };
        let (a, b, c) = ("a1".repeat(32), "b2".repeat(32), "c3".repeat(32));
        let page = format!("http://s3:3900/bkt/results/j/m/1/viewer.html?{}", query(&a));
        let image = |n: u8, sig: &str| {
            format!(
                "http://s3:3900/bkt/results/j/m/1/images/00{n}/preprocessed.jpg?{}",
                query(sig)
            )
        };
        let (i0, i2) = (image(0, &b), image(2, &c));
        assert_eq!(
            presigned_link(&page, &[Some(&i0), None, Some(&i2)]),
            format!("{page}#sig={b},,{c}")
        );
        // Nothing presigned: the link is the page's URL as it is.
        let plain = "https://lab.example/results/j/viewer.html";
        assert_eq!(presigned_link(plain, &[Some(&i0)]), plain);
        assert_eq!(presigned_link(&page, &[None]), page);
        // Not a SigV4 signature (length, case): not carried.
        let odd = image(0, &"A".repeat(64));
        assert_eq!(presigned_link(&page, &[Some(&odd)]), page);
    }
}
