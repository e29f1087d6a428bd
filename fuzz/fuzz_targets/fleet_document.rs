#![no_main]
//! Any bytes as an object of a fleet's catalog in a bucket:
//! `blocksnap::fuzzing::fleet_document` returns, never panics.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = blocksnap::fuzzing::fleet_document(data);
});
