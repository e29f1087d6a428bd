//! Integration tests, one binary (see STYLE.md): each module a topic.

mod api;
mod blockdev;
mod cli;
mod common;
mod concurrency;
mod crash;
mod corruption;
mod errors;
mod gc;
mod incremental;
mod persistence;
mod restore;
mod roundtrip;
mod undo;
