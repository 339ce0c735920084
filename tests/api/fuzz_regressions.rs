//! Replays every input in fuzz/regressions through the fuzz targets' own checks: what broke
//! once (or was chosen as a hard case) stays fixed. `./scripts/fuzz` finds new ones.

use std::path::Path;

use brokerage::fuzzing::{catalog_merge, RequestHarness};

fn inputs(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/regressions")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|f| std::fs::read(f).unwrap())
        .collect()
}

#[test]
fn fuzz_regressions_stay_fixed() {
    let requests = inputs("osb_request");
    assert!(!requests.is_empty());
    let harness = RequestHarness::new();
    for input in &requests {
        harness.run(input);
    }
    let catalogs = inputs("catalog_merge");
    assert!(!catalogs.is_empty());
    for input in &catalogs {
        catalog_merge(input);
    }
}
