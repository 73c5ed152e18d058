//! `decode_with_limit` on mutated JPEG files (seeds: fuzz/seeds/decode_jpeg) with a small
//! pixel limit, so that a header declaring a huge image must be refused before the
//! decoder allocates for it (libFuzzer's -rss_limit_mb catches one that does not).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    cinflow_fuzz::decode(data);
});
