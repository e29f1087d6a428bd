//! How new chunks are compressed: the [`Compression`] setting.

use crate::error::{Error, Result};

/// zstd levels a store may use.
const LEVELS: std::ops::RangeInclusive<i32> = 1..=19;
/// Bytes of new chunks [`Compression::Compact`] compresses as one frame,
/// and the most any group may hold (a record's size limit).
pub(crate) const COMPACT_GROUP_LEN: u32 = 4 << 20;
const _: () = assert!(COMPACT_GROUP_LEN as usize <= crate::store::pack::MAX_CHUNK_LEN);

/// How new chunks are compressed: one store-wide setting, with one name in
/// the builder ([`EngineOptions::compression`]), the engine
/// ([`crate::Engine::compression`]), the command (`--compression`) and the
/// store's figures. Stored chunks keep how they were written (every record
/// says), so it can change at any time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Compression {
    /// zstd level 1, one frame per chunk (the default). On the benchmark
    /// disk it captures 14-17% faster than level 3 and stores 3% more
    /// (docs/BENCHMARKS.md).
    #[default]
    Fast,
    /// zstd level 3, one frame per chunk.
    Balanced,
    /// zstd level 3 over runs of new chunks of up to 4 MiB, each run one
    /// frame: more context, so fewer bytes, at the cost of decompressing a
    /// whole group to read one chunk of it. On the benchmark disk it stored
    /// 0.99 of borg's bytes in 2.6 s; level 9 with one frame per chunk
    /// stored 1.08 of them in 7.6 s (docs/BENCHMARKS.md).
    Compact,
    /// zstd at this level (1 to 19), one frame per chunk.
    Level(i32),
    /// zstd at `level` (1 to 19) over runs of new chunks of up to
    /// `group_len` bytes (two blocks to 4 MiB), each run one frame.
    Grouped { level: i32, group_len: u32 },
}

impl Compression {
    /// The zstd level.
    pub fn level(self) -> i32 {
        match self {
            Compression::Fast => 1,
            Compression::Balanced | Compression::Compact => 3,
            Compression::Level(level) | Compression::Grouped { level, .. } => level,
        }
    }

    /// Bytes of new chunks compressed as one frame; 0: one frame per chunk.
    pub fn group_len(self) -> u32 {
        match self {
            Compression::Compact => COMPACT_GROUP_LEN,
            Compression::Grouped { group_len, .. } => group_len,
            _ => 0,
        }
    }

    /// The setting of a level and group length: its named form when it
    /// has one (`Level(1)` reads back as `Fast`).
    pub fn new(level: i32, group_len: u32) -> Self {
        match (level, group_len) {
            (1, 0) => Compression::Fast,
            (3, 0) => Compression::Balanced,
            (3, COMPACT_GROUP_LEN) => Compression::Compact,
            (level, 0) => Compression::Level(level),
            (level, group_len) => Compression::Grouped { level, group_len },
        }
    }

    /// The same setting in its named form when it has one.
    pub fn canonical(self) -> Self {
        Compression::new(self.level(), self.group_len())
    }

    /// Refuses a level outside 1 to 19 and a group length outside two
    /// blocks (of `block_size` bytes) to 4 MiB.
    pub(crate) fn check(self, block_size: u32) -> Result<()> {
        let level = self.level();
        if !LEVELS.contains(&level) {
            return Err(Error::InvalidParameter(format!(
                "compression level {level} is not from 1 to 19"
            )));
        }
        let group = self.group_len();
        let min = block_size.saturating_mul(2);
        if group != 0 && !(min..=COMPACT_GROUP_LEN).contains(&group) {
            return Err(Error::InvalidParameter(format!(
                "a compression group of {group} bytes: use one from two blocks ({min}) to \
                 {COMPACT_GROUP_LEN} bytes"
            )));
        }
        Ok(())
    }

    /// The canonical name of the setting (`fast`, `balanced`, `compact`,
    /// `level-9`, `level-5-group-1048576`), as `--compression` and the
    /// figures show it.
    pub fn name(self) -> String {
        match self.canonical() {
            Compression::Fast => "fast".into(),
            Compression::Balanced => "balanced".into(),
            Compression::Compact => "compact".into(),
            c if c.group_len() == 0 => format!("level-{}", c.level()),
            c => format!("level-{}-group-{}", c.level(), c.group_len()),
        }
    }
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

impl std::str::FromStr for Compression {
    type Err = Error;

    /// `fast`, `balanced`, `compact`, a zstd level (`9`), or a name as
    /// [`Compression::name`] writes it.
    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            Error::InvalidParameter(format!(
                "unknown compression {s:?}: use fast, balanced, compact or a zstd level from 1 to 19"
            ))
        };
        let level = |l: &str| l.parse::<i32>().map_err(|_| bad());
        let c = match s {
            "fast" => Compression::Fast,
            "balanced" => Compression::Balanced,
            "compact" => Compression::Compact,
            _ => match s.strip_prefix("level-").unwrap_or(s).split_once("-group-") {
                Some((l, g)) => Compression::Grouped {
                    level: level(l)?,
                    group_len: g.parse().map_err(|_| bad())?,
                },
                None => Compression::Level(level(s.strip_prefix("level-").unwrap_or(s))?),
            },
        };
        if !LEVELS.contains(&c.level()) {
            return Err(bad());
        }
        Ok(c)
    }
}

impl serde::Serialize for Compression {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.name())
    }
}
