#![no_main]
//! Any bytes as a QEMU monitor's side of a conversation:
//! `blocksnap::fuzzing::qmp_client` returns, never panics.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = blocksnap::fuzzing::qmp_client(data);
});
