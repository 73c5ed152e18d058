//! Expanding command-line paths into the list of images to grade.

use std::path::{Path, PathBuf};

/// Extensions picked up when a folder is given.
pub const IMAGE_EXTENSIONS: [&str; 5] = ["jpg", "jpeg", "png", "tif", "tiff"];

fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| x.eq_ignore_ascii_case(e)))
}

/// Whether an object key names an image (by its extension, any case).
pub fn is_image_key(key: &str) -> bool {
    key.rsplit_once('.')
        .filter(|(stem, _)| !stem.ends_with('/'))
        .is_some_and(|(_, e)| IMAGE_EXTENSIONS.iter().any(|x| x.eq_ignore_ascii_case(e)))
}

/// Files are taken as given (an unreadable one becomes an error entry later);
/// folders are searched recursively for image extensions, in sorted order.
pub fn expand(paths: &[PathBuf]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut found = Vec::new();
            walk(p, &mut found);
            found.sort();
            out.extend(found);
        } else {
            out.push(p.clone());
        }
    }
    out
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            walk(&path, out);
        } else if is_image(&path) {
            out.push(path);
        }
    }
}

/// A file-system-safe key for an image's outputs, unique within one run.
pub fn output_key(path: &Path, used: &mut std::collections::HashSet<String>) -> String {
    let stem: String = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("image")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    let mut key = stem.clone();
    let mut n = 2;
    while !used.insert(key.clone()) {
        key = format!("{stem}-{n}");
        n += 1;
    }
    key
}

/// `file://` URI of a local path (absolute when it can be resolved).
pub fn file_uri(path: &Path) -> String {
    let abs = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    format!("file://{}", abs.display())
}

/// Parses `WIDTHxHEIGHT`.
pub fn parse_size(s: &str) -> Result<(u32, u32), String> {
    let (w, h) = s
        .split_once(['x', 'X'])
        .ok_or_else(|| format!("{s:?} is not WIDTHxHEIGHT"))?;
    let p = |v: &str| v.trim().parse::<u32>().ok().filter(|v| *v > 0);
    match (p(w), p(h)) {
        (Some(w), Some(h)) => Ok((w, h)),
        _ => Err(format!("{s:?} is not WIDTHxHEIGHT with positive integers")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_unique_and_safe() {
        let mut used = Default::default();
        assert_eq!(output_key(Path::new("/a/x y.jpg"), &mut used), "x_y");
        assert_eq!(output_key(Path::new("/b/x y.png"), &mut used), "x_y-2");
    }

    #[test]
    fn folders_expand_to_sorted_images() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("sub")).unwrap();
        for f in ["b.JPG", "a.png", "notes.txt", "sub/c.tiff"] {
            std::fs::write(d.path().join(f), b"x").unwrap();
        }
        let names: Vec<String> = expand(&[d.path().to_path_buf()])
            .iter()
            .map(|p| p.strip_prefix(d.path()).unwrap().display().to_string())
            .collect();
        assert_eq!(names, ["a.png", "b.JPG", "sub/c.tiff"]);
    }
}
