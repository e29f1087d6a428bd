#![no_main]
//! Any bytes as a chunk index table file: `blocksnap::fuzzing::chunk_index`
//! returns, never panics.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = blocksnap::fuzzing::chunk_index(data);
});
