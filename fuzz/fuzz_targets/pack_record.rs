#![no_main]
//! Any bytes: `blocksnap::fuzzing::pack_record` returns, never panics.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = blocksnap::fuzzing::pack_record(data);
});
