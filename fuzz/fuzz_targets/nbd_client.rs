#![no_main]
//! Any bytes as an NBD server's side of a conversation:
//! `blocksnap::fuzzing::nbd_client` returns, never panics.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = blocksnap::fuzzing::nbd_client(data);
});
