#![no_main]
//! Any bytes: `blocksnap::fuzzing::group_payload` returns, never panics.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = blocksnap::fuzzing::group_payload(data);
});
