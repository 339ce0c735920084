//! Arbitrary upstream catalogs: the merge never panics and keeps its promises.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    brokerage::fuzzing::catalog_merge(data);
});
