//! Seeded sample disk images with the mix real server disks have:
//! compressible text, incompressible runs, zero regions and repeated data.
//! Used by `blocksnap demo`, the tests and the benchmarks; the same seed
//! always gives the same bytes.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

/// Sample content is laid out in regions of this many bytes.
pub const REGION_LEN: usize = 1 << 20;

pub use crate::rng::Rng;

/// What a region of a sample image holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegionKind {
    Zero,
    Text,
    Random,
    /// A copy of an earlier region: deduplicates.
    Repeat,
}

const WORDS: &[&str] = &[
    "the",
    "server",
    "disk",
    "block",
    "snapshot",
    "kernel",
    "error",
    "request",
    "GET",
    "POST",
    "/api/v1/",
    "200",
    "404",
    "user",
    "session",
    "config",
    "value",
    "true",
    "false",
    "null",
    "INFO",
    "WARN",
    "2026-11-28T10:15:00Z",
    "connection",
    "timeout",
    "database",
    "index",
    "=",
    "{",
    "}",
    ";",
    "return",
    "function",
    "import",
    "package",
    "version",
    "1.0.3",
    "ok",
];

/// The kind of region `r` of an image made with `seed`.
pub fn region_kind(seed: u64, r: u64) -> RegionKind {
    if r == 0 {
        return RegionKind::Text;
    }
    match Rng::new(seed ^ r.wrapping_mul(0x2545_f491_4f6c_dd1d)).below(100) {
        0..35 => RegionKind::Zero,
        35..65 => RegionKind::Text,
        65..85 => RegionKind::Random,
        _ => RegionKind::Repeat,
    }
}

/// Fills `buf` with region `r` of the image made with `seed`.
pub fn fill_region(seed: u64, r: u64, buf: &mut [u8]) {
    match region_kind(seed, r) {
        RegionKind::Zero => buf.fill(0),
        RegionKind::Random => Rng::new(seed ^ (r << 20) ^ 0xabcd).fill(buf),
        RegionKind::Text => fill_text(&mut Rng::new(seed ^ (r << 20)), buf),
        // Repeats of region 0 and of a handful of fixed text regions.
        RegionKind::Repeat => fill_text(&mut Rng::new(seed ^ ((r % 4) << 20)), buf),
    }
}

fn fill_text(rng: &mut Rng, buf: &mut [u8]) {
    let mut at = 0;
    while at < buf.len() {
        let w = WORDS[rng.below(WORDS.len() as u64) as usize].as_bytes();
        let sep: &[u8] = if rng.below(12) == 0 { b"\n" } else { b" " };
        for &b in w.iter().chain(sep) {
            if at == buf.len() {
                return;
            }
            buf[at] = b;
            at += 1;
        }
    }
}

/// Uniform synthetic data for benchmarks: `zero`, `text` (text regions of
/// varying seeds, so no two MiB are alike) or `random` (anything else).
pub fn synthetic(kind: &str, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    match kind {
        "zero" => {}
        "text" => v
            .chunks_mut(REGION_LEN)
            .enumerate()
            .for_each(|(r, c)| fill_region(r as u64 + 10, 0, c)),
        _ => Rng::new(1).fill(&mut v),
    }
    v
}

/// Writes a sample image of `len` bytes made with `seed` to `path`.
pub fn write_image(path: &Path, len: u64, seed: u64) -> std::io::Result<()> {
    let mut out = BufWriter::with_capacity(REGION_LEN, File::create(path)?);
    let mut buf = vec![0u8; REGION_LEN];
    let mut r = 0;
    let mut left = len;
    while left > 0 {
        let n = left.min(REGION_LEN as u64) as usize;
        fill_region(seed, r, &mut buf[..n]);
        out.write_all(&buf[..n])?;
        left -= n as u64;
        r += 1;
    }
    out.into_inner().map_err(|e| e.into_error())?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_bytes() {
        let mut a = vec![0u8; 5000];
        let mut b = vec![0u8; 5000];
        fill_region(7, 3, &mut a);
        fill_region(7, 3, &mut b);
        assert_eq!(a, b);
    }

    #[test]
    fn images_hold_every_kind() {
        let kinds: Vec<RegionKind> = (0..64).map(|r| region_kind(42, r)).collect();
        for k in [
            RegionKind::Zero,
            RegionKind::Text,
            RegionKind::Random,
            RegionKind::Repeat,
        ] {
            assert!(kinds.contains(&k), "{k:?}");
        }
    }
}
