#![no_main]
//! Random operations with injected disk faults against a model:
//! `blocksnap::fuzzing::engine_ops` panics on any disagreement.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() <= 3 * 64 {
        let _ = blocksnap::fuzzing::engine_ops(data);
    }
});
