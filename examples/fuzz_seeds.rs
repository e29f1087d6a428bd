//! Writes the seed inputs of every fuzz target into `fuzz/corpus/TARGET/`.
//! `cargo run --example fuzz_seeds`
fn main() -> std::io::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    for (i, (target, bytes)) in blocksnap::fuzzing::seeds().into_iter().enumerate() {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join(format!("seed-{i:02}")), bytes)?;
    }
    println!("seeds written under {}", root.display());
    Ok(())
}
