//! The command line: parsing, one function per command, and output (human
//! text, or the Snapshots API's JSON shapes with `--json`).
//!
//! Exit codes: 0 success; 2 a user error (bad name, unknown id, limit
//! reached, wrong state, bad arguments); 1 any other failure.

mod demo;
mod output;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

use blocksnap::{
    DirtyBitmap, Engine, EngineOptions, Error, ExportTarget, RestoreOptions, ServerId, SnapshotId,
    SnapshotStatus,
};
use clap::{Parser, Subcommand};

use output::{human_bytes, print_json};

#[derive(Parser)]
#[command(
    name = "blocksnap",
    version,
    about = "Point-in-time snapshots of server disks"
)]
struct Cli {
    /// The store: a directory, or a bucket, s3://BUCKET/PREFIX, shared by
    /// a fleet of hosts (or set BLOCKSNAP_STORE). A bucket is reached as
    /// AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID and
    /// AWS_SECRET_ACCESS_KEY say.
    #[arg(
        long,
        global = true,
        env = "BLOCKSNAP_STORE",
        value_name = "DIR|s3://BUCKET/PREFIX"
    )]
    store: Option<PathBuf>,
    /// With a bucket: this host's cache directory (or set BLOCKSNAP_CACHE).
    #[arg(long, global = true, env = "BLOCKSNAP_CACHE", value_name = "DIR")]
    cache: Option<PathBuf>,
    /// With a bucket: this host's name in the fleet (or set
    /// BLOCKSNAP_HOST; default: the machine's host name).
    #[arg(long, global = true, env = "BLOCKSNAP_HOST", value_name = "NAME")]
    host: Option<String>,
    /// With a bucket: keep the cache's packs within this size (e.g. 20G;
    /// or set BLOCKSNAP_CACHE_MAX): trimmed at every open, least recently
    /// fetched first; what is trimmed is fetched again when read.
    #[arg(long, global = true, env = "BLOCKSNAP_CACHE_MAX", value_name = "SIZE", value_parser = parse_size)]
    cache_max: Option<u64>,
    /// With a bucket: seal and upload packs at this size (default 32M; or
    /// set BLOCKSNAP_PACK_SIZE).
    #[arg(long, global = true, env = "BLOCKSNAP_PACK_SIZE", value_name = "SIZE", value_parser = parse_size)]
    pack_size: Option<u64>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a new store.
    Init {
        /// Block size: a power of two from 4K to 4M (suffixes K and M).
        #[arg(long, default_value = "64K", value_parser = parse_size)]
        block_size: u64,
        /// Compression of new chunks: fast (zstd 1, one frame per chunk,
        /// the default), balanced (zstd 3), compact (zstd 3 over runs of
        /// new chunks of up to 4 MiB together), or a zstd level 1-19.
        #[arg(long, default_value = "fast", value_parser = parse_compression)]
        compression: blocksnap::Compression,
    },
    /// Register and list servers.
    #[command(subcommand)]
    Server(ServerCmd),
    /// Create, list, restore and delete snapshots.
    #[command(subcommand)]
    Snapshot(SnapshotCmd),
    /// Give back the space of chunks no snapshot needs.
    Gc {
        /// Report what would be given back; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// With a bucket: how long condemned packs wait before a sweep may
        /// delete them, so that captures running meanwhile can take back
        /// what they use (e.g. 30m, 2h).
        #[arg(long, value_parser = humantime::parse_duration, default_value = "1h")]
        grace: std::time::Duration,
        /// With a bucket: a capture in progress this long counts as
        /// abandoned by a host that died, and a sweep waiting for it marks
        /// it failed.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "24h")]
        stale_capture: std::time::Duration,
        #[arg(long)]
        json: bool,
    },
    /// Sizes and ratios of the store: logical, stored, reclaimable.
    Stats {
        #[arg(long)]
        json: bool,
    },
    /// The chunk index (`index rebuild` makes its table again from the packs).
    #[command(subcommand)]
    Index(IndexCmd),
    /// Read every chunk of one snapshot (or all) and check its checksums.
    Verify {
        snapshot_id: Option<u64>,
        #[arg(long)]
        json: bool,
    },
    /// Serve the Snapshots REST API (holds the store's lock while it runs).
    #[cfg(feature = "server")]
    Serve {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: std::net::SocketAddr,
        /// File of operators' API tokens, one a line (or set
        /// BLOCKSNAP_API_TOKEN): they act for every account.
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
        /// File of scoped API tokens, as `blocksnap token new` prints them:
        /// each acts for one account (or all), read or read-write.
        #[arg(long, value_name = "FILE")]
        tokens: Option<PathBuf>,
        /// Requests a second each account token may make (bursts of twice
        /// as many); past it, 429 with Retry-After. 0: no limit. Operators'
        /// tokens are not limited.
        #[arg(long, default_value = "20")]
        rate_limit: f64,
        /// Captures and restores one account may have running at once.
        #[arg(long, default_value = "4")]
        account_jobs: usize,
        /// Append a JSON line for every request that changes something or
        /// is refused to this file, durably before answering.
        #[arg(long, value_name = "FILE")]
        audit_log: Option<PathBuf>,
        /// Serve HTTPS with this certificate chain (PEM).
        #[arg(long, value_name = "FILE", requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// The certificate's private key (PEM).
        #[arg(long, value_name = "FILE", requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// Serve plain HTTP on an address other than loopback all the same
        /// (a proxy in front terminates TLS).
        #[arg(long, conflicts_with = "tls_cert")]
        insecure_http: bool,
        /// Collect garbage in the background after every delete (the store
        /// is locked while serving, so `blocksnap gc` cannot run then).
        #[arg(long)]
        auto_gc: bool,
        /// With a bucket: how often to take in what other hosts did (their
        /// snapshots, their packs).
        #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
        fleet_refresh: std::time::Duration,
    },
    /// API tokens for `serve --tokens`.
    #[cfg(feature = "server")]
    #[command(subcommand)]
    Token(TokenCmd),
    /// Run the whole cycle on a sample disk in a temporary store.
    Demo {
        /// Size of the sample disk image.
        #[arg(long, default_value = "256M", value_parser = parse_size)]
        size: u64,
        /// Live snapshots of a running QEMU disk instead (needs
        /// qemu-storage-daemon and qemu-img): a guest keeps writing while
        /// two are taken, each restored and checked to be one point in time.
        #[arg(long)]
        live: bool,
    },
}

#[derive(Subcommand)]
enum IndexCmd {
    /// Rebuild the chunk index table from the packs, which stay the source
    /// of truth (open and look-ups do it by themselves when it is missing,
    /// stale or damaged; `verify` reports damage).
    Rebuild {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ServerCmd {
    /// Register a server and its disk: the path of an image file or block
    /// device (--disk), or an NBD export (--nbd).
    Add {
        #[arg(long)]
        id: u64,
        #[arg(long)]
        name: String,
        #[arg(long, required_unless_present_any = ["nbd", "qemu"], conflicts_with_all = ["nbd", "qemu"])]
        disk: Option<PathBuf>,
        /// An NBD export: nbd+unix:///EXPORT?socket=PATH or
        /// nbd://HOST[:PORT]/EXPORT (qemu-nbd, qemu-storage-daemon, a VM's
        /// NBD server). Captures skip what base:allocation calls zero.
        #[arg(long, value_name = "URI", conflicts_with = "qemu")]
        nbd: Option<String>,
        /// A disk of a running QEMU (VM or qemu-storage-daemon): the QMP
        /// monitor socket blocksnap may use (give it its own). Snapshots
        /// are then live, point in time and incremental from QEMU's
        /// dirty bitmaps.
        #[arg(long, value_name = "QMP_SOCKET", requires = "node")]
        qemu: Option<PathBuf>,
        /// With --qemu: the disk's block node name in that process.
        #[arg(long, requires = "qemu")]
        node: Option<String>,
        /// With --qemu: the socket of the NBD server the process already
        /// runs (one per process); without it blocksnap starts one on a
        /// private socket for each operation and stops it after.
        #[arg(long, value_name = "PATH", requires = "qemu")]
        nbd_socket: Option<PathBuf>,
        /// The account that owns it: the API acts on it only for that
        /// account's tokens (and operators').
        #[arg(long, default_value = "default")]
        account: String,
    },
    /// List registered servers.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Move a server to another account.
    SetAccount { id: u64, account: String },
}

#[cfg(feature = "server")]
#[derive(Subcommand)]
enum TokenCmd {
    /// Make a new random token: prints it on the first line (shown this
    /// once; the tokens file keeps only its digest), and on the second the
    /// line to append to the tokens file.
    New {
        /// The account it acts for.
        #[arg(
            long,
            required_unless_present = "operator",
            conflicts_with = "operator"
        )]
        account: Option<String>,
        /// An operator's token: it acts for every account.
        #[arg(long)]
        operator: bool,
        /// It may only read (list snapshots).
        #[arg(long)]
        read_only: bool,
        /// Its name in the audit log.
        #[arg(long, value_name = "LABEL")]
        name: Option<String>,
    },
}

#[derive(Subcommand)]
enum SnapshotCmd {
    /// Capture a server's disk.
    Create {
        #[arg(long)]
        server: u64,
        #[arg(long)]
        name: String,
        #[arg(long, default_value = "")]
        description: String,
        /// Incremental: the completed snapshot of this server that the
        /// disk equalled but for the blocks the dirty bitmap marks.
        #[arg(long)]
        parent: Option<u64>,
        /// A raw bitset, one bit per block of the store's block size: bit k
        /// (least significant first) of byte b marks block 8b+k as written
        /// since the parent.
        #[arg(long, requires = "parent", conflicts_with = "nbd_bitmap")]
        dirty_bitmap: Option<PathBuf>,
        /// For a server on NBD: the export's meta context that marks what
        /// changed since the parent, e.g. qemu:dirty-bitmap:cp3.
        #[arg(long, requires = "parent", value_name = "CONTEXT")]
        nbd_bitmap: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// List snapshots, newest first.
    List {
        #[arg(long)]
        server: Option<u64>,
        #[arg(long)]
        json: bool,
    },
    /// Rewrite a server's disk with a snapshot (only blocks that differ).
    Restore {
        snapshot_id: u64,
        /// The disk holds this snapshot (of the same server) but for the
        /// blocks in --dirty-bitmap: rewrite the blocks that differ between
        /// the two snapshots plus those, without reading the disk.
        #[arg(long)]
        current: Option<u64>,
        /// With --current: the blocks written since that snapshot, as for
        /// `snapshot create --dirty-bitmap`. Default: none.
        #[arg(long, requires = "current")]
        dirty_bitmap: Option<PathBuf>,
        /// Print what the restore would rewrite, and an estimate of the
        /// time; write nothing.
        #[arg(long)]
        dry_run: bool,
        /// Do not capture the disk first (the restore cannot be undone).
        #[arg(long)]
        no_safety_snapshot: bool,
        /// Do not read the written blocks back to check them.
        #[arg(long)]
        no_verify: bool,
        #[arg(long)]
        json: bool,
    },
    /// Undo the last restore of a server: restore its safety snapshot.
    UndoRestore {
        server_id: u64,
        #[arg(long)]
        json: bool,
    },
    /// Write a snapshot out whole as a raw disk image: a new file, or - for
    /// standard output (every chunk checked first; a failure leaves no
    /// file, and exits non-zero).
    Export {
        snapshot_id: u64,
        /// A new image file (its zero blocks left as holes), or - for
        /// standard output, e.g. `| qemu-img convert -O qcow2 /dev/stdin
        /// disk.qcow2` or `| ssh host dd of=...`.
        output: PathBuf,
        /// Replace OUTPUT if it is an existing file.
        #[arg(long)]
        force: bool,
        /// The report as JSON (on standard error when exporting to standard
        /// output).
        #[arg(long)]
        json: bool,
    },
    /// Delete a snapshot.
    Delete { snapshot_id: u64 },
}

/// Reads a `--dirty-bitmap` file for an incremental snapshot of `parent`:
/// one bit per block of the store's block size over the parent's disk.
fn read_dirty_bitmap(
    engine: &Engine,
    parent: SnapshotId,
    file: &Path,
) -> blocksnap::Result<DirtyBitmap> {
    let len = completed_len(engine, parent)?;
    let bytes = std::fs::read(file).map_err(|e| blocksnap::Error::io(file, e))?;
    DirtyBitmap::from_bytes(len, u64::from(engine.block_size()), &bytes)
}

/// The dirty bitmap meta context `context` of a server's NBD export marks,
/// for an incremental snapshot of `parent`.
fn nbd_dirty_bitmap(
    engine: &Engine,
    server: ServerId,
    parent: SnapshotId,
    context: &str,
) -> blocksnap::Result<DirtyBitmap> {
    let len = completed_len(engine, parent)?;
    let disk = engine.server(server)?.disk;
    let uri = disk
        .to_str()
        .filter(|s| blocksnap::nbd::is_uri(s))
        .ok_or_else(|| {
            blocksnap::Error::InvalidParameter(format!(
                "server {server}'s disk {} is not on NBD; --nbd-bitmap is for servers added with --nbd",
                disk.display()
            ))
        })?;
    blocksnap::nbd::dirty_bitmap(uri, context, len, u64::from(engine.block_size()))
}

/// The disk length of a completed snapshot, which a bitmap must cover.
fn completed_len(engine: &Engine, id: SnapshotId) -> blocksnap::Result<u64> {
    let snap = engine.snapshot(id)?;
    match snap.stats {
        Some(stats) if snap.status == SnapshotStatus::Completed => Ok(stats.image_len),
        _ => Err(blocksnap::Error::WrongState(format!(
            "snapshot {id} is {}; only a completed snapshot can describe the disk",
            snap.status.as_str()
        ))),
    }
}

/// Parses `fast`, `balanced`, `compact` or a zstd level.
fn parse_compression(s: &str) -> Result<blocksnap::Compression, String> {
    s.parse().map_err(|e: Error| e.to_string())
}

/// Parses `65536`, `64K`, `64KiB`, `4M`, `2G`.
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 65536, 64K or 4M"))?;
    let mult: u64 = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use K, M or G)")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// Runs the command line; returns the process exit code.
pub fn run() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { 2 } else { 0 };
        }
    };
    match dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            if e.is_user_error() { 2 } else { 1 }
        }
    }
}

fn dispatch(cli: Cli) -> blocksnap::Result<i32> {
    if let Command::Demo { size, live } = cli.command {
        return if live {
            demo::run_live(size)
        } else {
            demo::run(size)
        };
    }
    #[cfg(feature = "server")]
    if let Command::Token(TokenCmd::New {
        account,
        operator: _,
        read_only,
        name,
    }) = &cli.command
    {
        use blocksnap::http::Scope;
        let scope = if *read_only {
            Scope::Read
        } else {
            Scope::ReadWrite
        };
        let (token, line) = blocksnap::http::new_token(account.as_deref(), scope, name.as_deref())?;
        println!("{token}");
        println!("{line}");
        return Ok(0);
    }
    let Some(path) = cli.store else {
        return Err(Error::InvalidParameter(
            "no store given: pass --store DIR (or s3://BUCKET/PREFIX) or set BLOCKSNAP_STORE"
                .into(),
        ));
    };
    let store = Store::new(path, cli.cache, cli.host, cli.cache_max, cli.pack_size)?;
    match cli.command {
        Command::Init {
            block_size,
            compression,
        } => init(&store, block_size, compression),
        Command::Server(cmd) => {
            let engine = match cmd {
                ServerCmd::List { .. } => open_read_only(&store)?,
                _ => open(&store)?,
            };
            server(&engine, cmd)
        }
        Command::Snapshot(cmd @ (SnapshotCmd::List { .. } | SnapshotCmd::Export { .. })) => {
            snapshot(&open_read_only(&store)?, cmd)
        }
        Command::Snapshot(cmd) => {
            // Only a restore from known state hands change tracking over.
            let tracking = matches!(
                cmd,
                SnapshotCmd::Restore {
                    current: Some(_),
                    ..
                }
            );
            snapshot(&open_with(&store, tracking)?, cmd)
        }
        Command::Gc {
            dry_run,
            grace,
            stale_capture,
            json,
        } => {
            #[cfg(feature = "s3")]
            if store.fleet.is_some() {
                let options = blocksnap::fleet::gc::GcOptions::default()
                    .dry_run(dry_run)
                    .grace(grace)
                    .stale_capture(stale_capture);
                let report = blocksnap::fleet::collect(&open(&store)?, &options)?;
                output::fleet_gc(&report, json);
                return Ok(0);
            }
            let _ = (grace, stale_capture);
            let engine = if dry_run {
                open_read_only(&store)?
            } else {
                open(&store)?
            };
            let report = engine.gc(dry_run)?;
            output::gc(&report, json);
            Ok(0)
        }
        Command::Stats { json } => {
            output::stats(&open_read_only(&store)?.stats()?, json);
            Ok(0)
        }
        Command::Index(IndexCmd::Rebuild { json }) => {
            let started = std::time::Instant::now();
            let info = open(&store)?.rebuild_index()?;
            if !json {
                print!("rebuilt in {:.2} s: ", started.elapsed().as_secs_f64());
            }
            output::index(&info, json);
            Ok(0)
        }
        Command::Verify { snapshot_id, json } => {
            output::verify(&open(&store)?, snapshot_id.map(SnapshotId), json)
        }
        #[cfg(feature = "server")]
        Command::Serve {
            listen,
            token_file,
            tokens,
            rate_limit,
            account_jobs,
            audit_log,
            tls_cert,
            tls_key,
            insecure_http,
            auto_gc,
            fleet_refresh,
        } => serve(
            &store,
            listen,
            ServeGuard {
                token_file,
                tokens,
                rate_limit,
                account_jobs,
                audit_log,
                tls: tls_cert.zip(tls_key),
                insecure_http,
            },
            auto_gc,
            fleet_refresh,
        ),
        #[cfg(feature = "server")]
        Command::Token(_) => unreachable!("handled above"),
        Command::Demo { .. } => unreachable!("handled above"),
    }
}

/// Where the store is: a directory, or a bucket and this host's cache.
struct Store {
    path: PathBuf,
    #[cfg(feature = "s3")]
    fleet: Option<blocksnap::fleet::FleetOptions>,
}

impl Store {
    fn new(
        path: PathBuf,
        cache: Option<PathBuf>,
        host: Option<String>,
        cache_max: Option<u64>,
        pack_size: Option<u64>,
    ) -> blocksnap::Result<Self> {
        let url = path.to_str().filter(|p| p.starts_with("s3://"));
        let Some(url) = url else {
            if cache.is_some() || host.is_some() || cache_max.is_some() || pack_size.is_some() {
                return Err(Error::InvalidParameter(
                    "--cache, --host, --cache-max and --pack-size are for a store in a bucket \
                     (--store s3://BUCKET/PREFIX)"
                        .into(),
                ));
            }
            return Ok(Store {
                #[cfg(feature = "s3")]
                fleet: None,
                path,
            });
        };
        #[cfg(feature = "s3")]
        {
            let Some(cache) = cache else {
                return Err(Error::InvalidParameter(format!(
                    "{url} is a bucket: give this host's cache directory with --cache DIR \
                     (or BLOCKSNAP_CACHE)"
                )));
            };
            let mut fleet = blocksnap::fleet::FleetOptions::new(url, cache)?.cache_max(cache_max);
            if let Some(host) = host {
                fleet = fleet.host(&host);
            }
            if let Some(bytes) = pack_size {
                fleet = fleet.pack_len(bytes);
            }
            Ok(Store {
                fleet: Some(fleet),
                path,
            })
        }
        #[cfg(not(feature = "s3"))]
        {
            let _ = (cache, host, cache_max, pack_size);
            Err(Error::InvalidParameter(format!(
                "{url} is a bucket, and this blocksnap was built without the s3 feature"
            )))
        }
    }

    fn display(&self) -> std::path::Display<'_> {
        self.path.display()
    }
}

fn open(store: &Store) -> blocksnap::Result<Engine> {
    open_with(store, false)
}

/// For commands that only look: changes nothing on disk (an agent's
/// trackers, an unsealed pack, a crashed capture stay as they are). A
/// store a crash left unrecovered is opened for writing instead, which
/// recovers it, as before.
fn open_read_only(store: &Store) -> blocksnap::Result<Engine> {
    // A fleet host's cache is brought up to date at every open.
    #[cfg(feature = "s3")]
    if store.fleet.is_some() {
        return open(store);
    }
    match EngineOptions::new()
        .read_only(true)
        .create(false)
        .open(&store.path)
    {
        Err(Error::WrongState(why)) => {
            eprintln!("note: {why}; opening it for writing");
            open(store)
        }
        other => other,
    }
}

fn open_with(store: &Store, change_tracking: bool) -> blocksnap::Result<Engine> {
    open_options(store, EngineOptions::new().change_tracking(change_tracking))
}

fn open_options(store: &Store, options: EngineOptions) -> blocksnap::Result<Engine> {
    #[cfg(feature = "s3")]
    let engine = match &store.fleet {
        Some(fleet) => {
            let (engine, sync) = blocksnap::fleet::open(fleet, options)?;
            for why in &sync.packs_refused {
                eprintln!("warning: an object in the bucket is not used: {why}");
            }
            if sync.captures_failed > 0 {
                eprintln!(
                    "note: {} snapshot(s) this host was capturing when it stopped are now marked failed",
                    sync.captures_failed
                );
            }
            engine
        }
        None => options.create(false).open(&store.path)?,
    };
    #[cfg(not(feature = "s3"))]
    let engine = options.create(false).open(&store.path)?;
    let report = engine.open_report();
    for id in &report.failed_captures {
        eprintln!("note: snapshot {id} was interrupted by a crash and is now marked failed");
    }
    for (server, snap) in &report.interrupted_restores {
        eprintln!(
            "warning: server {server} was left half-restored from snapshot {snap}; \
             run `blocksnap snapshot restore {snap}` to finish"
        );
    }
    Ok(engine)
}

/// How `serve` guards the API (its flags).
#[cfg(feature = "server")]
struct ServeGuard {
    token_file: Option<PathBuf>,
    tokens: Option<PathBuf>,
    rate_limit: f64,
    account_jobs: usize,
    audit_log: Option<PathBuf>,
    tls: Option<(PathBuf, PathBuf)>,
    insecure_http: bool,
}

#[cfg(feature = "server")]
fn serve(
    store: &Store,
    listen: std::net::SocketAddr,
    guard: ServeGuard,
    auto_gc: bool,
    fleet_refresh: std::time::Duration,
) -> blocksnap::Result<i32> {
    use blocksnap::http::{Tokens, run_until_signal};
    use std::io::Write;
    let env_token = std::env::var("BLOCKSNAP_API_TOKEN").ok();
    let tokens = Tokens::load_all(
        env_token.as_deref(),
        guard.token_file.as_deref(),
        guard.tokens.as_deref(),
    )?;
    let config = blocksnap::http::ApiConfig::from(tokens)
        .rate_limit(guard.rate_limit)
        .account_jobs(guard.account_jobs)
        .audit_log(guard.audit_log)
        .insecure_http(guard.insecure_http);
    let scheme = if guard.tls.is_some() { "https" } else { "http" };
    let config = match guard.tls {
        Some((cert, key)) => config.tls(cert, key),
        None => config,
    };
    let engine = open_options(store, EngineOptions::new().auto_gc(auto_gc))?;
    // On a bucket: other hosts' snapshots and packs, taken in as they
    // come, until the server stops (`stop` goes: the thread ends, and with
    // it its handle on the store, which then closes cleanly).
    #[cfg(feature = "s3")]
    let (stop, refresher) = {
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let host = engine.clone();
        let refresher = store.fleet.is_some().then(|| {
            std::thread::Builder::new()
                .name("fleet-refresh".into())
                .spawn(move || {
                    while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                        stopped.recv_timeout(fleet_refresh)
                    {
                        if let Err(e) = blocksnap::fleet::refresh(&host) {
                            eprintln!("warning: bringing this host up to date with the fleet: {e}");
                        }
                    }
                })
        });
        (stop, refresher)
    };
    #[cfg(not(feature = "s3"))]
    let _ = fleet_refresh;
    let served = run_until_signal(engine, listen, config, |addr| {
        println!("listening on {scheme}://{addr}");
        eprintln!(
            "serving store {} (locked while serving); stop with Ctrl-C or SIGTERM",
            store.display()
        );
        let _ = std::io::stdout().flush();
    });
    #[cfg(feature = "s3")]
    {
        drop(stop);
        if let Some(Ok(t)) = refresher {
            let _ = t.join();
        }
    }
    served?;
    eprintln!("stopped: running captures and restores finished");
    Ok(0)
}

fn init(
    store: &Store,
    block_size: u64,
    compression: blocksnap::Compression,
) -> blocksnap::Result<i32> {
    let bs = u32::try_from(block_size).map_err(|_| {
        Error::InvalidParameter(format!("block size {block_size} is larger than 4 MiB"))
    })?;
    let options = EngineOptions::new().block_size(bs).compression(compression);
    #[cfg(feature = "s3")]
    let engine = match &store.fleet {
        Some(fleet) => blocksnap::fleet::init(fleet, options)?,
        None => init_dir(&store.path, options)?,
    };
    #[cfg(not(feature = "s3"))]
    let engine = init_dir(&store.path, options)?;
    let grouped = match engine.compression().group_len() {
        0 => String::new(),
        g => format!(
            ", new chunks compressed in groups of up to {}",
            human_bytes(u64::from(g))
        ),
    };
    println!(
        "initialized store {} with {} blocks, zstd level {}{grouped}",
        store.display(),
        human_bytes(u64::from(engine.block_size())),
        engine.compression().level()
    );
    Ok(0)
}

fn init_dir(store: &Path, options: EngineOptions) -> blocksnap::Result<Engine> {
    if store.join("catalog").exists() {
        return Err(Error::StoreExists {
            path: store.to_path_buf(),
        });
    }
    options.open(store)
}

fn server(engine: &Engine, cmd: ServerCmd) -> blocksnap::Result<i32> {
    match cmd {
        ServerCmd::Add {
            id,
            name,
            disk,
            nbd,
            qemu,
            node,
            nbd_socket,
            account,
        } => {
            let disk = match (disk, nbd, qemu) {
                (None, None, Some(qmp)) => {
                    let q = blocksnap::live::QemuDisk {
                        qmp,
                        node: node.unwrap_or_default(),
                        nbd_socket,
                    };
                    PathBuf::from(q.to_uri()?)
                }
                (Some(path), None, None) => path,
                (None, Some(uri), None) => {
                    if !blocksnap::nbd::is_uri(&uri) {
                        return Err(blocksnap::nbd::NbdUri::parse(&uri).err().unwrap_or_else(
                            || {
                                blocksnap::Error::InvalidParameter(format!(
                                    "{uri:?} is not an NBD URI"
                                ))
                            },
                        ));
                    }
                    PathBuf::from(uri)
                }
                _ => unreachable!("clap requires exactly one of --disk, --nbd and --qemu"),
            };
            let s = engine.add_server_for(ServerId(id), &name, &disk, &account)?;
            println!(
                "registered server {} ({}) of account {} with disk {}",
                s.id,
                s.name,
                s.account,
                s.disk.display()
            );
        }
        ServerCmd::List { json } => output::servers(&engine.servers(), json),
        ServerCmd::SetAccount { id, account } => {
            let s = engine.set_server_account(ServerId(id), &account)?;
            println!(
                "server {} ({}) belongs to account {}",
                s.id, s.name, s.account
            );
        }
    }
    Ok(0)
}

fn snapshot(engine: &Engine, cmd: SnapshotCmd) -> blocksnap::Result<i32> {
    match cmd {
        SnapshotCmd::Create {
            server,
            name,
            description,
            parent,
            dirty_bitmap,
            nbd_bitmap,
            json,
        } => {
            let server = ServerId(server);
            let job = match (parent, dirty_bitmap, nbd_bitmap) {
                (Some(parent), Some(file), None) => {
                    let parent = SnapshotId(parent);
                    let dirty = read_dirty_bitmap(engine, parent, &file)?;
                    engine.start_incremental(server, &name, &description, parent, dirty)?
                }
                (Some(parent), None, Some(context)) => {
                    let parent = SnapshotId(parent);
                    let dirty = nbd_dirty_bitmap(engine, server, parent, &context)?;
                    engine.start_incremental(server, &name, &description, parent, dirty)?
                }
                (Some(_), None, None) => {
                    return Err(blocksnap::Error::InvalidParameter(
                        "--parent needs --dirty-bitmap FILE or --nbd-bitmap CONTEXT: what \
                         changed since the parent"
                            .into(),
                    ));
                }
                _ => engine.start_snapshot(server, &name, &description)?,
            };
            let progress = job.progress_handle();
            let bar = ProgressBar::start("capturing", move || progress.get());
            let done = job.wait();
            bar.finish();
            let snap = done?;
            let summary = output::capture_summary(&snap);
            if json {
                eprintln!("{summary}");
                print_json(&output::created_json(&snap));
            } else {
                println!("{summary}");
            }
        }
        SnapshotCmd::List { server, json } => {
            engine.account_figures()?;
            let list = engine.snapshots(server.map(ServerId))?;
            output::snapshots(&list, json);
        }
        SnapshotCmd::Restore {
            snapshot_id,
            current,
            dirty_bitmap,
            dry_run,
            no_safety_snapshot,
            no_verify,
            json,
        } => {
            let id = SnapshotId(snapshot_id);
            if let Some(current) = current.map(SnapshotId) {
                let server = engine.snapshot(id)?.server.id;
                let dirty = match dirty_bitmap {
                    Some(file) => read_dirty_bitmap(engine, current, &file)?,
                    None => {
                        let len = completed_len(engine, current)?;
                        DirtyBitmap::new(len, u64::from(engine.block_size()))?
                    }
                };
                engine.adopt_dirty_bitmap(server, current, &dirty)?;
            }
            let options = RestoreOptions::default()
                .safety_snapshot(!no_safety_snapshot)
                .verify(!no_verify);
            if dry_run {
                output::restore_plan(&engine.plan_restore(id, options)?, json);
                return Ok(0);
            }
            let job = engine.start_restore_with(id, options)?;
            let progress = job.progress_handle();
            let bar = ProgressBar::start("restoring", move || progress.get());
            let done = job.wait();
            bar.finish();
            let report = done?;
            output::restore(engine, id, &report, json)?;
        }
        SnapshotCmd::UndoRestore { server_id, json } => {
            let report = engine.undo_restore(ServerId(server_id))?;
            output::restore(engine, report.snapshot_id, &report, json)?;
        }
        SnapshotCmd::Export {
            snapshot_id,
            output,
            force,
            json,
        } => {
            let to_stdout = output.as_os_str() == "-";
            if to_stdout && std::io::stdout().is_terminal() {
                return Err(Error::InvalidParameter(
                    "export - writes a disk image to standard output, which is a terminal; \
                     redirect it to a file or a pipe"
                        .into(),
                ));
            }
            let target = if to_stdout {
                ExportTarget::Stream(Box::new(std::io::BufWriter::with_capacity(
                    1 << 20,
                    std::io::stdout(),
                )))
            } else {
                ExportTarget::File {
                    path: output,
                    replace: force,
                }
            };
            let job = engine.start_export(SnapshotId(snapshot_id), target)?;
            let progress = job.progress_handle();
            let bar = ProgressBar::start("exporting", move || progress.get());
            let done = job.wait();
            bar.finish();
            output::export(&done?, json, to_stdout);
        }
        SnapshotCmd::Delete { snapshot_id } => {
            engine.delete_snapshot(SnapshotId(snapshot_id))?;
            println!("deleted snapshot {snapshot_id}");
        }
    }
    Ok(0)
}

/// An indicatif bar on stderr, drawn only when stderr is a terminal, fed by
/// polling a `(done, total)` source from a small thread.
pub(crate) struct ProgressBar {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ProgressBar {
    pub(crate) fn start(
        label: &'static str,
        source: impl Fn() -> (u64, u64) + Send + 'static,
    ) -> ProgressBar {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        if !std::io::stderr().is_terminal() {
            return ProgressBar { stop, thread: None };
        }
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{msg:>10} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar.set_message(label);
            while !flag.load(Ordering::Relaxed) {
                let (done, total) = source();
                bar.set_length(total);
                bar.set_position(done);
                std::thread::sleep(Duration::from_millis(100));
            }
            bar.finish_and_clear();
        });
        ProgressBar {
            stop,
            thread: Some(thread),
        }
    }

    pub(crate) fn finish(mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("65536"), Ok(65536));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("4M"), Ok(4 << 20));
        assert!(parse_size("64Q").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999999G").is_err());
    }
}
