//! `JobMessage::parse` on arbitrary bytes: an error or a job, never a panic; an accepted
//! job survives a serialise/parse round trip unchanged.
#![no_main]

use cinflow::queue::messages::JobMessage;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(job) = JobMessage::parse(data) {
        let again = serde_json::to_vec(&job).expect("a parsed job serialises");
        assert_eq!(JobMessage::parse(&again).expect("round trip parses"), job);
    }
});
