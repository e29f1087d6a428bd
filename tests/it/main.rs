//! Integration tests, one binary (to keep link time down): each module a topic.

mod api;
mod blockdev;
mod bucket;
mod cli;
mod common;
mod concurrency;
mod corruption;
mod crash;
mod dense;
mod errors;
mod export;
mod faults;
mod full_disk;
mod fuzz_corpus;
mod gc;
mod incremental;
mod index;
mod live;
mod nbd;
mod persistence;
mod powercut;
mod read_only;
mod restore;
mod roundtrip;
mod space;
mod undo;
