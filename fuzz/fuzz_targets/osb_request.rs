//! Whole OSB requests (method, path, query, body) against a broker: never a 5xx, always a
//! JSON object.
#![no_main]

use std::sync::OnceLock;

use brokerage::fuzzing::RequestHarness;
use libfuzzer_sys::fuzz_target;

static HARNESS: OnceLock<RequestHarness> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    HARNESS.get_or_init(RequestHarness::new).run(data);
});
