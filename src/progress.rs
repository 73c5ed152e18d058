//! Progress bars of the long commands (classify, feature extraction, training,
//! model uploads and downloads), drawn on a terminal only.

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

/// A bar of bytes moved (a model upload or download) on a terminal; hidden
/// (and free) otherwise. Its length is set by whoever knows the total; until
/// then it shows the bytes so far and the rate.
pub fn transfer_bar(what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::no_length();
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{prefix:>10} [{elapsed_precise}] {bar:40} {bytes}/{total_bytes} ({bytes_per_sec}, eta {eta})",
        )
        .expect("static template"),
    );
    bar.set_prefix(what.to_string());
    bar
}

/// [`transfer_bar`] for a download whose size is not known in advance.
pub fn download_bar(what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::no_length();
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{prefix:>10} [{elapsed_precise}] {spinner} {bytes} ({bytes_per_sec})",
        )
        .expect("static template"),
    );
    bar.set_prefix(what.to_string());
    bar
}
