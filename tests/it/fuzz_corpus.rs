//! The fuzz corpora (`fuzz/corpus/TARGET/`) replayed as ordinary tests, so
//! CI runs every input a fuzz session kept: each target must return on
//! each, never panic, and the seeds (valid encodings) must decode.

use std::path::Path;

#[test]
fn every_corpus_input_runs_without_a_panic_and_seeds_decode() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let mut ran = 0;
    for (target, run) in blocksnap::fuzzing::targets() {
        let dir = root.join(target);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            panic!("no corpus for {target} in {}", dir.display());
        };
        let mut seeds = 0;
        for entry in entries.flatten() {
            let bytes = std::fs::read(entry.path()).unwrap();
            let decoded = run(&bytes);
            let name = entry.file_name().to_string_lossy().to_string();
            if name.starts_with("seed-") {
                assert!(decoded, "{target}/{name} is a seed and must decode");
                seeds += 1;
            }
            ran += 1;
        }
        assert!(seeds > 0, "{target} has no seed");
    }
    println!("{ran} corpus inputs");
}

#[test]
fn truncations_and_bit_flips_of_every_seed_never_panic() {
    for (target, bytes) in blocksnap::fuzzing::seeds() {
        let run = blocksnap::fuzzing::targets()
            .into_iter()
            .find(|(t, _)| *t == target)
            .unwrap()
            .1;
        if target == "engine_ops" {
            continue; // slow per input; covered by its corpus and fuzzing
        }
        for cut in 0..bytes.len() {
            run(&bytes[..cut]);
        }
        for bit in 0..bytes.len() * 8 {
            let mut b = bytes.clone();
            b[bit / 8] ^= 1 << (bit % 8);
            run(&b);
        }
    }
}
