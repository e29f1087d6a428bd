//! Writes a sample disk image: `sample_image PATH GIB [SEED]`.
fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(path), Some(gib)) = (args.get(1), args.get(2).and_then(|g| g.parse::<u64>().ok()))
    else {
        eprintln!("usage: sample_image PATH GIB [SEED]");
        std::process::exit(2);
    };
    let seed = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(7);
    if let Err(e) = blocksnap::sample::write_image(std::path::Path::new(path), gib << 30, seed) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
