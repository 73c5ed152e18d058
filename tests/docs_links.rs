//! Every link in the project's Markdown resolves: README.md and the Markdown
//! under docs/, helm/, deploy/, fuzz/ and tools/ are read, their inline links
//! `[text](target)` and reference definitions `[label]: target` are taken
//! (outside code spans and fenced code blocks), and each relative target must
//! exist inside the repository, each `#anchor` must name a heading of the target
//! (GitHub's slugs). README.md must link every docs/*.md directly and stay short.
//! Only std: no build of the project is needed to check the documentation.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::path::{Component, Path, PathBuf};

/// The README is the page a new user reads top to bottom.
const README_MAX_BYTES: u64 = 16_000;

/// Folders searched (recursively) for Markdown besides README.md.
const DOC_DIRS: &[&str] = &["docs", "helm", "deploy", "fuzz", "tools"];

/// Folders never searched: build outputs, environments, dependencies.
const SKIP_DIRS: &[&str] = &["target", ".venv", "node_modules", "__pycache__"];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// README.md and every `*.md` under [`DOC_DIRS`], sorted.
fn markdown_files(root: &Path) -> Vec<PathBuf> {
    let mut files = vec![root.join("README.md")];
    for dir in DOC_DIRS {
        walk(&root.join(dir), &mut files);
    }
    files.sort();
    files
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        // symlink_metadata: a linked folder (a venv, a cache) is not followed.
        let Ok(meta) = fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            if !name.starts_with('.') && !SKIP_DIRS.contains(&name.as_ref()) {
                walk(&path, out);
            }
        } else if meta.is_file() && name.ends_with(".md") {
            out.push(path);
        }
    }
}

/// A link found in a Markdown file.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Link {
    /// 1-based line of the link's opening bracket.
    line: usize,
    target: String,
}

/// The lines of `text` that are not part of a fenced code block, as
/// (1-based line number, line); fence lines themselves are dropped.
fn lines_outside_fences(text: &str) -> Vec<(usize, &str)> {
    let mut out = Vec::new();
    // The open fence: its character and length.
    let mut fence: Option<(u8, usize)> = None;
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        let run = |c: u8| trimmed.bytes().take_while(|&b| b == c).count();
        match fence {
            Some((c, n)) => {
                // A closing fence: at least as long, nothing after it.
                if run(c) >= n && trimmed[run(c)..].trim().is_empty() {
                    fence = None;
                }
            }
            None => {
                let opening = [b'`', b'~'].into_iter().find(|&c| run(c) >= 3);
                match opening {
                    Some(c) => fence = Some((c, run(c))),
                    None => out.push((i + 1, line)),
                }
            }
        }
    }
    out
}

/// Blanks out code spans (backtick runs and everything between an opening run
/// and the next run of the same length), keeping every byte offset and newline.
/// An opening run without a closing one is literal text.
fn blank_code_spans(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = bytes.to_vec();
    let run_at = |i: usize| bytes[i..].iter().take_while(|&&b| b == b'`').count();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' {
            i += 2;
            continue;
        }
        if bytes[i] != b'`' {
            i += 1;
            continue;
        }
        let n = run_at(i);
        let mut j = i + n;
        let mut close = None;
        while j < bytes.len() {
            if bytes[j] == b'`' {
                let m = run_at(j);
                if m == n {
                    close = Some(j + m);
                    break;
                }
                j += m;
            } else {
                j += 1;
            }
        }
        match close {
            Some(end) => {
                for b in &mut out[i..end] {
                    if *b != b'\n' {
                        *b = b' ';
                    }
                }
                i = end;
            }
            None => i += n,
        }
    }
    // Only ASCII bytes were replaced, each by an ASCII space: still UTF-8.
    String::from_utf8(out).expect("blanking code spans keeps UTF-8")
}

/// Every inline link and image target and every reference definition of a
/// Markdown document, outside code spans and fenced code blocks.
fn extract_links(text: &str) -> Vec<Link> {
    let mut links = Vec::new();
    // Paragraphs: runs of non-blank lines outside fences. A code span or a
    // link never crosses a blank line or a fence.
    let mut para: Vec<(usize, &str)> = Vec::new();
    let mut prev_line = 0;
    let flush = |para: &mut Vec<(usize, &str)>, links: &mut Vec<Link>| {
        if para.is_empty() {
            return;
        }
        let first = para[0].0;
        let joined: String = para.iter().map(|(_, l)| *l).collect::<Vec<_>>().join("\n");
        links_in_paragraph(&blank_code_spans(&joined), first, links);
        para.clear();
    };
    for (n, line) in lines_outside_fences(text) {
        if line.trim().is_empty() || n != prev_line + 1 {
            flush(&mut para, &mut links);
        }
        if !line.trim().is_empty() {
            para.push((n, line));
        }
        prev_line = n;
    }
    flush(&mut para, &mut links);
    links
}

/// The links of one paragraph (code spans already blanked) whose first line is
/// `first_line`.
fn links_in_paragraph(text: &str, first_line: usize, links: &mut Vec<Link>) {
    let bytes = text.as_bytes();
    let line_of = |pos: usize| first_line + bytes[..pos].iter().filter(|&&b| b == b'\n').count();

    // Reference definitions: `[label]: target` at the start of a line.
    let mut offset = 0;
    for line in text.split('\n') {
        let indent = line.len() - line.trim_start_matches(' ').len();
        let rest = &line[indent..];
        if indent <= 3 && rest.starts_with('[') && !rest.starts_with("[^") {
            if let Some(close) = rest.find("]:") {
                let label = &rest[1..close];
                let target = rest[close + 2..].split_whitespace().next();
                let plain_label = !label.trim().is_empty() && !label.contains(['[', ']']);
                if let (true, Some(target)) = (plain_label, target) {
                    let target = target.trim_start_matches('<').trim_end_matches('>');
                    links.push(Link {
                        line: line_of(offset),
                        target: target.to_string(),
                    });
                }
            }
        }
        offset += line.len() + 1;
    }

    // Inline links and images: `[text](target "title")`.
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => {
                i += 2;
                continue;
            }
            b'[' => {}
            _ => {
                i += 1;
                continue;
            }
        }
        if let Some(close) = matching_bracket(bytes, i) {
            if bytes.get(close + 1) == Some(&b'(') {
                if let Some(target) = destination(&text[close + 2..]) {
                    links.push(Link {
                        line: line_of(i),
                        target,
                    });
                }
            }
        }
        // Go on inside the brackets: an image inside a link is a link too.
        i += 1;
    }
}

/// The `]` that closes the `[` at `open`, with nesting and escapes.
fn matching_bracket(bytes: &[u8], open: usize) -> Option<usize> {
    let mut depth = 0usize;
    let mut i = open;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => i += 1,
            b'[' => depth += 1,
            b']' => {
                depth -= 1;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => {}
        }
        i += 1;
    }
    None
}

/// The destination at the start of `rest` (what follows `](`): `<...>`, or up
/// to whitespace or the `)` that balances, with backslash escapes.
fn destination(rest: &str) -> Option<String> {
    let rest = rest.trim_start_matches([' ', '\t', '\n']);
    if let Some(inner) = rest.strip_prefix('<') {
        let end = inner.find(['>', '\n'])?;
        return (inner.as_bytes()[end] == b'>').then(|| inner[..end].to_string());
    }
    let mut depth = 0usize;
    let mut out = String::new();
    let mut chars = rest.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(next) = chars.next() {
                    out.push(next);
                }
            }
            '(' => {
                depth += 1;
                out.push(c);
            }
            ')' if depth == 0 => return Some(out),
            ')' => {
                depth -= 1;
                out.push(c);
            }
            c if c.is_whitespace() => return Some(out),
            c => out.push(c),
        }
    }
    None
}

/// GitHub's anchor for a heading: the heading's text (inline code without its
/// backticks, links by their text), lower-cased, every character that is not a
/// letter, a digit, a space, `-` or `_` dropped, spaces turned into `-`.
fn slug(heading: &str) -> String {
    plain_heading_text(heading)
        .trim()
        .to_lowercase()
        .chars()
        .filter(|&c| c.is_alphanumeric() || c == ' ' || c == '-' || c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// The text a heading renders to, for its slug: links and images become their
/// text, backticks go.
fn plain_heading_text(heading: &str) -> String {
    let mut out = String::new();
    let mut rest = heading;
    while let Some(open) = rest.find('[') {
        let bytes = rest.as_bytes();
        let Some(close) = matching_bracket(bytes, open) else {
            break;
        };
        let after = &rest[close + 1..];
        let Some(dest_len) = after
            .strip_prefix('(')
            .and_then(|a| a.find(')').map(|p| p + 2))
        else {
            out.push_str(&rest[..=close]);
            rest = after;
            continue;
        };
        let mut before = &rest[..open];
        before = before.strip_suffix('!').unwrap_or(before);
        out.push_str(before);
        out.push_str(&plain_heading_text(&rest[open + 1..close]));
        rest = &after[dest_len..];
    }
    out.push_str(rest);
    out.replace('`', "")
}

/// The anchors of a Markdown document: its headings' slugs (ATX and setext;
/// repeated slugs get `-1`, `-2`, …) and explicit `<a name>` / `id` anchors.
fn anchors(text: &str) -> BTreeSet<String> {
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut out = BTreeSet::new();
    let mut add = |heading: &str, out: &mut BTreeSet<String>| {
        let base = slug(heading);
        let n = seen.entry(base.clone()).or_insert(0);
        let anchor = if *n == 0 {
            base.clone()
        } else {
            format!("{base}-{n}")
        };
        *n += 1;
        out.insert(anchor);
    };
    let lines = lines_outside_fences(text);
    for (k, &(n, line)) in lines.iter().enumerate() {
        let indent = line.len() - line.trim_start_matches(' ').len();
        let trimmed = &line[indent..];
        let hashes = trimmed.bytes().take_while(|&b| b == b'#').count();
        if indent <= 3
            && (1..=6).contains(&hashes)
            && (trimmed.len() == hashes || trimmed.as_bytes()[hashes] == b' ')
        {
            // ATX heading; a closing run of `#` after a space is not text.
            let mut text = trimmed[hashes..].trim();
            let stripped = text.trim_end_matches('#');
            if stripped.is_empty() || stripped.ends_with(' ') {
                text = stripped.trim_end();
            }
            add(text, &mut out);
        } else if let Some(&(next_n, next)) = lines.get(k + 1) {
            // Setext heading: a paragraph line underlined with `=` or `-`.
            let under = next.trim();
            let is_underline = !under.is_empty()
                && (under.bytes().all(|b| b == b'=') || under.bytes().all(|b| b == b'-'));
            let prev_blank = k == 0 || lines[k - 1].1.trim().is_empty() || lines[k - 1].0 + 1 != n;
            if next_n == n + 1
                && is_underline
                && indent <= 3
                && !trimmed.is_empty()
                && prev_blank
                && !trimmed.starts_with(['-', '*', '+', '>', '|'])
            {
                add(trimmed.trim(), &mut out);
            }
        }
        for key in ["name=\"", "id=\""] {
            let mut rest = line;
            while let Some(p) = rest.find(key) {
                let after = &rest[p + key.len()..];
                if let Some(end) = after.find('"') {
                    out.insert(after[..end].to_string());
                }
                rest = after;
            }
        }
    }
    out
}

/// `%XX` escapes decoded (a target like `my%20file.md`).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `path` with `.` and `..` resolved lexically; `None` when it climbs out of `root`.
fn normalize(root: &Path, path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::ParentDir => {
                if !out.pop() {
                    return None;
                }
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out.starts_with(root).then_some(out)
}

fn is_external(target: &str) -> bool {
    let lower = target.to_ascii_lowercase();
    lower.starts_with("http://") || lower.starts_with("https://") || lower.starts_with("mailto:")
}

fn rel(root: &Path, path: &Path) -> String {
    path.strip_prefix(root)
        .unwrap_or(path)
        .display()
        .to_string()
}

/// Everything wrong with one link, or `None` when it resolves.
fn check_link(
    root: &Path,
    from: &Path,
    target: &str,
    cache: &mut BTreeMap<PathBuf, Option<BTreeSet<String>>>,
) -> Option<String> {
    if target.is_empty() {
        return Some("empty link target".into());
    }
    if is_external(target) {
        return None;
    }
    let (path_part, anchor) = match target.split_once('#') {
        Some((p, a)) => (p, Some(a)),
        None => (target, None),
    };
    // A query string means nothing to a file in the repository.
    let path_part = path_part.split('?').next().unwrap_or("");
    let file = if path_part.is_empty() {
        from.to_path_buf()
    } else {
        let decoded = percent_decode(path_part);
        let joined = match decoded.strip_prefix('/') {
            Some(from_root) => root.join(from_root),
            None => from.parent().unwrap_or(root).join(&decoded),
        };
        match normalize(root, &joined) {
            Some(p) => p,
            None => return Some(format!("`{target}` points outside the repository")),
        }
    };
    let Ok(meta) = fs::metadata(&file) else {
        return Some(format!("`{target}`: {} does not exist", rel(root, &file)));
    };
    let anchor = anchor?;
    let anchor = percent_decode(anchor);
    if anchor.is_empty() {
        return None;
    }
    if meta.is_dir() {
        return Some(format!("`{target}`: an anchor into a folder"));
    }
    if file.extension().and_then(|e| e.to_str()) != Some("md") {
        // GitHub's line anchors into other files: #L10 or #L10-L20.
        let is_line = |s: &str| {
            s.strip_prefix('L')
                .is_some_and(|n| n.parse::<u32>().is_ok())
        };
        let ok = match anchor.split_once('-') {
            Some((a, b)) => is_line(a) && is_line(b),
            None => is_line(&anchor),
        };
        return (!ok).then(|| format!("`{target}`: an anchor into a file that is not Markdown"));
    }
    let known = cache
        .entry(file.clone())
        .or_insert_with(|| fs::read_to_string(&file).ok().map(|t| anchors(&t)));
    match known {
        Some(set) if set.contains(&anchor) => None,
        Some(set) => {
            let similar: Vec<&String> = set
                .iter()
                .filter(|a| {
                    let head = anchor.split('-').next().unwrap_or("");
                    !head.is_empty() && a.contains(head)
                })
                .take(5)
                .collect();
            Some(format!(
                "`{target}`: no heading with the anchor #{anchor} in {} (similar: {similar:?})",
                rel(root, &file)
            ))
        }
        None => Some(format!("`{target}`: {} is not readable", rel(root, &file))),
    }
}

#[test]
fn every_markdown_link_resolves() {
    let root = root();
    let files = markdown_files(&root);
    assert!(
        files.iter().any(|f| f.ends_with("docs/delivery.md")),
        "no Markdown found under {}",
        root.display()
    );
    let mut cache = BTreeMap::new();
    let mut broken = Vec::new();
    let mut checked = 0;
    for file in &files {
        let text = match fs::read_to_string(file) {
            Ok(t) => t,
            Err(e) => {
                broken.push(format!("{}: cannot read: {e}", rel(&root, file)));
                continue;
            }
        };
        for link in extract_links(&text) {
            checked += 1;
            if let Some(why) = check_link(&root, file, &link.target, &mut cache) {
                broken.push(format!("{}:{}: {why}", rel(&root, file), link.line));
            }
        }
    }
    assert!(checked > 0, "no links found in {} files", files.len());
    assert!(
        broken.is_empty(),
        "{} broken Markdown link(s) of {checked}:\n{}",
        broken.len(),
        broken.join("\n")
    );
}

#[test]
fn readme_links_every_doc() {
    let root = root();
    let readme = root.join("README.md");
    let text = fs::read_to_string(&readme).expect("README.md");
    let linked: BTreeSet<PathBuf> = extract_links(&text)
        .iter()
        .filter(|l| !is_external(&l.target))
        .filter_map(|l| {
            let path = l.target.split('#').next().unwrap_or("");
            (!path.is_empty()).then(|| normalize(&root, &root.join(percent_decode(path))))?
        })
        .collect();
    let mut docs: Vec<PathBuf> = fs::read_dir(root.join("docs"))
        .expect("docs/")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file() && p.extension().and_then(|e| e.to_str()) == Some("md"))
        .collect();
    docs.sort();
    let missing: Vec<String> = docs
        .iter()
        .filter(|d| !linked.contains(*d))
        .map(|d| rel(&root, d))
        .collect();
    assert!(
        missing.is_empty(),
        "README.md does not link these docs (add each to \"Where to read more\"):\n{}",
        missing.join("\n")
    );
}

#[test]
fn readme_is_short() {
    let size = fs::metadata(root().join("README.md"))
        .expect("README.md")
        .len();
    assert!(
        size < README_MAX_BYTES,
        "README.md is {size} bytes, the limit is {README_MAX_BYTES}: move reference material into docs/"
    );
}

#[test]
fn slug_follows_github() {
    assert_eq!(slug("The two commands"), "the-two-commands");
    assert_eq!(
        slug("Object store (S3) and Garage"),
        "object-store-s3-and-garage"
    );
    assert_eq!(
        slug("Result record (`cinflow.result/v2`)"),
        "result-record-cinflowresultv2"
    );
    assert_eq!(slug("What `make demo` leaves"), "what-make-demo-leaves");
    assert_eq!(
        slug("Set-up: what `make` does first"),
        "set-up-what-make-does-first"
    );
    assert_eq!(slug("The demo's figures"), "the-demos-figures");
    assert_eq!(slug("cinflow worker infer"), "cinflow-worker-infer");
    assert_eq!(slug("Exit codes"), "exit-codes");
    assert_eq!(slug("snake_case stays"), "snake_case-stays");
    // Punctuation goes, the spaces around it stay: two hyphens.
    assert_eq!(slug("CIN2-3 / CIN1"), "cin2-3--cin1");
    assert_eq!(slug("A — B"), "a--b");
    // Non-ASCII letters stay, lower-cased.
    assert_eq!(slug("Über Größe"), "über-größe");
    // A link in a heading counts by its text.
    assert_eq!(
        slug("See [the chart](../helm/README.md) here"),
        "see-the-chart-here"
    );
    assert_eq!(slug("  Padded  "), "padded");
}

#[test]
fn repeated_headings_get_numbered_anchors() {
    let doc = "# Setup\n\n## Settings\n\ntext\n\n## Settings\n\n### Settings\n\nTitle\n=====\n";
    let a = anchors(doc);
    for want in ["setup", "settings", "settings-1", "settings-2", "title"] {
        assert!(a.contains(want), "{want} missing from {a:?}");
    }
    assert!(!a.contains("settings-3"));
}

#[test]
fn headings_in_code_blocks_are_not_anchors() {
    let doc = "# Real\n\n```sh\n# not a heading\n```\n\n   ~~~\n# nor this\n   ~~~\n";
    let a = anchors(doc);
    assert!(a.contains("real"));
    assert!(
        !a.contains("not-a-heading") && !a.contains("nor-this"),
        "{a:?}"
    );
}

#[test]
fn links_outside_code_only() {
    let doc = "\
See [one](a.md) and ![img](b.png \"title\").
`[not](c.md)` nor ``[this](d.md)``, but [two](e.md#x).
A link [split
over lines](f.md) and [<g h.md>](<g h.md>).

```md
[fenced](g.md)
```

[ref]: h.md
[paren](i_(1).md) \\[escaped](j.md)
";
    let links = extract_links(doc);
    let got: Vec<(usize, &str)> = links.iter().map(|l| (l.line, l.target.as_str())).collect();
    assert_eq!(
        got,
        vec![
            (1, "a.md"),
            (1, "b.png"),
            (2, "e.md#x"),
            (3, "f.md"),
            (4, "g h.md"),
            (10, "h.md"),
            (11, "i_(1).md"),
        ]
    );
}

#[test]
fn code_span_crossing_a_line_break() {
    let doc = "the `cinflow\nworker [x](y.md)` span, then [z](z.md)\n";
    let targets: Vec<String> = extract_links(doc).into_iter().map(|l| l.target).collect();
    assert_eq!(targets, vec!["z.md".to_string()]);
}

#[test]
fn targets_resolve_relative_to_the_linking_file() {
    let root = root();
    let from = root.join("docs").join("delivery.md");
    let mut cache = BTreeMap::new();
    assert_eq!(check_link(&root, &from, "../README.md", &mut cache), None);
    assert_eq!(
        check_link(&root, &from, "https://example.org/x", &mut cache),
        None
    );
    assert!(check_link(&root, &from, "README.md", &mut cache).is_some());
    assert!(check_link(&root, &from, "../../outside.md", &mut cache)
        .is_some_and(|why| why.contains("outside the repository")));
    assert_eq!(
        check_link(&root, &from, "#delivery-guarantees", &mut cache),
        None
    );
    assert!(check_link(&root, &from, "#no-such-heading", &mut cache).is_some());
}

#[test]
fn percent_escapes_decode() {
    assert_eq!(percent_decode("my%20file.md"), "my file.md");
    assert_eq!(percent_decode("100%"), "100%");
    assert_eq!(percent_decode("a%2"), "a%2");
}
