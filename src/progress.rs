//! Progress bars of the long local commands (classify, feature extraction, training).

/// A progress bar on a terminal; hidden (and free) otherwise.
pub fn progress_bar(len: u64, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{prefix:>10} [{elapsed_precise}] {bar:40} {pos}/{len} ({per_sec}, eta {eta})",
        )
        .expect("static template"),
    );
    bar.set_prefix(what.to_string());
    bar
}
