//! An S3 bucket (Ceph's RADOS Gateway, AWS S3, any S3-compatible store):
//! the objects a store shared by several hosts lives in.
//!
//! A small blocking facade over the `object_store` crate: whole-object
//! put and get, ranged get, list, delete, and the two conditional writes
//! the fleet's catalog relies on: create-if-absent (`If-None-Match: *`)
//! and replace-if-unchanged (`If-Match: ETAG`). Every reply is the other
//! program's word: errors carry the endpoint and key, and nothing here
//! panics on what a server says.
//!
//! A conditional write that fails without an answer (a timeout, a reset
//! connection) may still have landed. It is reported as
//! [`Error::Remote`] with `in_doubt` set; the caller reads the object back
//! to learn the truth (each of its writes carries content only it
//! writes, so reading tells whose write won).
//!
//! Servers differ: some ignore conditional headers altogether (both
//! writes "succeed"), and Ceph RGW (16.2) accepts an `If-Match` ETag only
//! without the quotes S3 returns it in. [`Bucket::open`] probes the bucket
//! and refuses one whose conditional writes cannot be trusted; the form
//! of ETag it accepts is remembered for every later replace.

pub mod catalog;

use std::ops::Range;
use std::sync::Arc;

use futures_util::TryStreamExt;
use object_store::aws::{AmazonS3Builder, S3ConditionalPut};
use object_store::path::Path as Key;
use object_store::{
    ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, RetryConfig, UpdateVersion,
};

use crate::error::{Error, Result};

/// Where a bucket is and how to reach it: the usual AWS variables, or
/// set by an embedder.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct BucketConfig {
    /// `http://127.0.0.1:7480` for a local RGW; `None`: AWS itself.
    pub endpoint: Option<String>,
    pub region: String,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
}

impl BucketConfig {
    /// From `AWS_ENDPOINT_URL` (or `AWS_ENDPOINT`), `AWS_REGION` (or
    /// `AWS_DEFAULT_REGION`, else `us-east-1`), `AWS_ACCESS_KEY_ID` and
    /// `AWS_SECRET_ACCESS_KEY`.
    pub fn from_env() -> Self {
        let var = |names: &[&str]| {
            names
                .iter()
                .find_map(|n| std::env::var(n).ok().filter(|v| !v.is_empty()))
        };
        BucketConfig {
            endpoint: var(&["AWS_ENDPOINT_URL", "AWS_ENDPOINT"]),
            region: var(&["AWS_REGION", "AWS_DEFAULT_REGION"])
                .unwrap_or_else(|| "us-east-1".into()),
            access_key_id: var(&["AWS_ACCESS_KEY_ID"]),
            secret_access_key: var(&["AWS_SECRET_ACCESS_KEY"]),
        }
    }

    /// The endpoint, e.g. `http://127.0.0.1:7480`.
    pub fn endpoint(mut self, url: &str) -> Self {
        self.endpoint = Some(url.to_string());
        self
    }

    pub fn region(mut self, region: &str) -> Self {
        self.region = region.to_string();
        self
    }

    pub fn credentials(mut self, access_key_id: &str, secret_access_key: &str) -> Self {
        self.access_key_id = Some(access_key_id.to_string());
        self.secret_access_key = Some(secret_access_key.to_string());
        self
    }
}

/// Age past which a probe object is a killed process's leftover.
const STALE_PROBE: std::time::Duration = std::time::Duration::from_secs(3600);

/// Creates tried when the server says "exists" but the object is not.
const CONFLICT_TRIES: usize = 3;

/// The version of an object a replace must find: its ETag, as the server
/// gave it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Version(String);

/// How the bucket wants an `If-Match` ETag (found by the probe).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EtagForm {
    /// As S3 returns it, in quotes (AWS S3, MinIO).
    Quoted,
    /// Without its quotes (Ceph RGW 16).
    Bare,
}

/// One bucket, under a prefix.
pub struct Bucket {
    store: Arc<dyn ObjectStore>,
    /// The same bucket for conditional writes, which are never sent
    /// twice: a repeat of one that landed would be refused (412) as if
    /// another writer had won.
    once: Arc<dyn ObjectStore>,
    prefix: String,
    /// `s3://BUCKET/PREFIX`, for messages.
    url: String,
    etag_form: EtagForm,
    runtime: tokio::runtime::Runtime,
}

/// Splits `s3://BUCKET[/PREFIX]` into the bucket and the prefix (without
/// slashes at its ends).
pub fn parse_url(url: &str) -> Result<(String, String)> {
    let bad = |why: &str| {
        Err(Error::InvalidParameter(format!(
            "{url} is not a bucket address: {why} (expected s3://BUCKET/PREFIX)"
        )))
    };
    let Some(rest) = url.strip_prefix("s3://") else {
        return bad("it does not start with s3://");
    };
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    // S3's bucket name rules: 3-63 lowercase letters, digits, dots and
    // hyphens, starting and ending with a letter or a digit.
    let edge_ok = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if !(3..=63).contains(&bucket.len())
        || !bucket
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-')
        || !edge_ok(bucket.chars().next())
        || !edge_ok(bucket.chars().last())
    {
        return bad("a bucket name has 3-63 lowercase letters, digits, dots and hyphens");
    }
    let prefix = prefix.trim_matches('/');
    if prefix.split('/').any(|part| part == "." || part == "..")
        || prefix.contains("//")
        || prefix.chars().any(|c| c.is_control())
    {
        return bad("its prefix has an empty, '.' or '..' part, or a control character");
    }
    if Key::from(prefix).as_ref() != prefix {
        return bad(
            "its prefix has characters object keys would encode (use letters, digits, '-', '_', '.', '/')",
        );
    }
    Ok((bucket.to_string(), prefix.to_string()))
}

/// Nanoseconds since the Unix epoch by this host's clock: what names
/// probe objects and stamps writes.
pub(crate) fn unix_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

/// The runtime a bucket's requests run on: one thread, the caller's.
fn runtime() -> Result<tokio::runtime::Runtime> {
    // Two workers: pack uploads and ranged reads from several threads
    // at once make progress together.
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("blocksnap-s3")
        .enable_all()
        .build()
        .map_err(|e| Error::Internal(format!("cannot start an I/O runtime: {e}")))
}

impl Bucket {
    /// Connects to the bucket at `url` (`s3://BUCKET/PREFIX`) and probes
    /// that its conditional writes hold (see the module doc); refuses it
    /// otherwise, saying why.
    pub fn open(url: &str, config: &BucketConfig) -> Result<Bucket> {
        let bucket = Self::connect(url, config)?;
        bucket.probed()
    }

    /// A bucket over any object store (`object_store`'s in-memory one,
    /// or a wrapper that injects faults), probed as [`Bucket::open`]
    /// probes: for tests.
    #[cfg(feature = "testing")]
    pub fn over(url: &str, store: Arc<dyn ObjectStore>) -> Result<Bucket> {
        let (_, prefix) = parse_url(url)?;
        Bucket {
            store: store.clone(),
            once: store,
            prefix,
            url: url.to_string(),
            etag_form: EtagForm::Quoted,
            runtime: runtime()?,
        }
        .probed()
    }

    /// Connects without probing.
    fn connect(url: &str, config: &BucketConfig) -> Result<Bucket> {
        let (name, prefix) = parse_url(url)?;
        let mut builder = AmazonS3Builder::new()
            .with_bucket_name(&name)
            .with_region(&config.region)
            .with_virtual_hosted_style_request(false)
            .with_conditional_put(S3ConditionalPut::ETagMatch);
        if let Some(endpoint) = &config.endpoint {
            builder = builder
                .with_endpoint(endpoint)
                .with_allow_http(endpoint.starts_with("http://"));
        }
        if let (Some(key), Some(secret)) = (&config.access_key_id, &config.secret_access_key) {
            builder = builder
                .with_access_key_id(key)
                .with_secret_access_key(secret);
        }
        let built = |b: AmazonS3Builder| {
            b.build().map_err(|e| Error::Remote {
                peer: url.to_string(),
                what: format!("cannot configure the bucket: {e}"),
                in_doubt: false,
            })
        };
        let once = RetryConfig {
            max_retries: 0,
            ..RetryConfig::default()
        };
        let (store, once) = (built(builder.clone())?, built(builder.with_retry(once))?);
        let runtime = runtime()?;
        Ok(Bucket {
            store: Arc::new(store),
            once: Arc::new(once),
            prefix,
            url: url.to_string(),
            etag_form: EtagForm::Quoted,
            runtime,
        })
    }

    /// `s3://BUCKET/PREFIX`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The ETag form the probe found the bucket to accept.
    pub fn etag_form(&self) -> EtagForm {
        self.etag_form
    }

    fn key(&self, name: &str) -> Key {
        if self.prefix.is_empty() {
            Key::from(name)
        } else {
            Key::from(format!("{}/{name}", self.prefix))
        }
    }

    fn failed(&self, what: &str, name: &str, e: object_store::Error) -> Error {
        Error::Remote {
            peer: self.url.clone(),
            what: format!("{what} {name}: {e}"),
            in_doubt: false,
        }
    }

    /// Writes `bytes` at `name`, whatever is there.
    pub fn put(&self, name: &str, bytes: impl Into<bytes::Bytes>) -> Result<Version> {
        let key = self.key(name);
        let put = self.store.put(&key, PutPayload::from(bytes.into()));
        let done = self
            .runtime
            .block_on(put)
            .map_err(|e| self.failed("cannot write", name, e))?;
        Ok(Version(done.e_tag.unwrap_or_default()))
    }

    /// Creates `name` holding `bytes` unless it exists: `None` if it does
    /// (someone else's write won).
    pub fn create(&self, name: &str, bytes: Vec<u8>) -> Result<Option<Version>> {
        let key = self.key(name);
        let payload = PutPayload::from(bytes);
        // A 409 (concurrent conditional writes, on AWS) also reads as
        // "exists": believed only when the object is there.
        for _ in 0..CONFLICT_TRIES {
            let put = self
                .once
                .put_opts(&key, payload.clone(), PutOptions::from(PutMode::Create));
            match self.runtime.block_on(put) {
                Ok(done) => return Ok(Some(Version(done.e_tag.unwrap_or_default()))),
                Err(object_store::Error::AlreadyExists { .. }) => {
                    if self.exists(name)? {
                        return Ok(None);
                    }
                }
                Err(e) => return Err(self.in_doubt("cannot create", name, e)),
            }
        }
        Err(Error::Remote {
            peer: self.url.clone(),
            what: format!("cannot create {name}: refused as existing, yet it does not exist"),
            in_doubt: false,
        })
    }

    /// True when object `name` exists.
    pub fn exists(&self, name: &str) -> Result<bool> {
        let key = self.key(name);
        match self.runtime.block_on(self.store.head(&key)) {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.failed("cannot look at", name, e)),
        }
    }

    /// Replaces `name` with `bytes` if it is still at `version`: `None` if
    /// it changed (or went) meanwhile.
    pub fn replace(
        &self,
        name: &str,
        bytes: Vec<u8>,
        version: &Version,
    ) -> Result<Option<Version>> {
        self.replace_as(name, bytes, version, self.etag_form)
    }

    fn replace_as(
        &self,
        name: &str,
        bytes: Vec<u8>,
        version: &Version,
        form: EtagForm,
    ) -> Result<Option<Version>> {
        let e_tag = match form {
            EtagForm::Quoted => version.0.clone(),
            EtagForm::Bare => version.0.trim_matches('"').to_string(),
        };
        let mode = PutMode::Update(UpdateVersion {
            e_tag: Some(e_tag),
            version: None,
        });
        let key = self.key(name);
        let put = self
            .once
            .put_opts(&key, PutPayload::from(bytes), PutOptions::from(mode));
        match self.runtime.block_on(put) {
            Ok(done) => Ok(Some(Version(done.e_tag.unwrap_or_default()))),
            Err(object_store::Error::Precondition { .. }) => Ok(None),
            Err(e) => Err(self.in_doubt("cannot replace", name, e)),
        }
    }

    /// A conditional write that failed: refused (nothing written), or
    /// without a clear answer (a timeout, a lost connection, a server
    /// error), when it may have landed.
    fn in_doubt(&self, what: &str, name: &str, e: object_store::Error) -> Error {
        use object_store::Error as E;
        let refused = matches!(
            e,
            E::NotFound { .. }
                | E::PermissionDenied { .. }
                | E::Unauthenticated { .. }
                | E::InvalidPath { .. }
                | E::NotSupported { .. }
                | E::NotImplemented { .. }
        );
        if refused {
            return self.failed(what, name, e);
        }
        Error::Remote {
            peer: self.url.clone(),
            what: format!("{what} {name} (it may have been written): {e}"),
            in_doubt: true,
        }
    }

    /// The object `name` and its version; `None` when there is none.
    pub fn get(&self, name: &str) -> Result<Option<(Vec<u8>, Version)>> {
        let key = self.key(name);
        let got = self.runtime.block_on(async {
            let r = self.store.get(&key).await?;
            let version = Version(r.meta.e_tag.clone().unwrap_or_default());
            Ok((r.bytes().await?, version))
        });
        match got {
            Ok((bytes, version)) => Ok(Some((bytes.to_vec(), version))),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.failed("cannot read", name, e)),
        }
    }

    /// Bytes `range` of object `name`: exactly those, or an error.
    pub fn get_range(&self, name: &str, range: Range<u64>) -> Result<Vec<u8>> {
        let key = self.key(name);
        let want = range.end.saturating_sub(range.start);
        // S3 has no empty range (a pack with no records has an empty
        // index): nothing to ask for.
        if want == 0 {
            return Ok(Vec::new());
        }
        let got = self
            .runtime
            .block_on(self.store.get_range(&key, range.clone()))
            .map_err(|e| self.failed("cannot read", name, e))?;
        if got.len() as u64 != want {
            return Err(Error::Remote {
                peer: self.url.clone(),
                what: format!(
                    "asked for bytes {}..{} of {name}, got {} bytes",
                    range.start,
                    range.end,
                    got.len()
                ),
                in_doubt: false,
            });
        }
        Ok(got.to_vec())
    }

    /// The objects whose names start with `dir/` (names relative to the
    /// bucket's prefix) and their sizes, in name order.
    pub fn list(&self, dir: &str) -> Result<Vec<(String, u64)>> {
        let key = self.key(dir);
        let found: Vec<object_store::ObjectMeta> = self
            .runtime
            .block_on(self.store.list(Some(&key)).try_collect())
            .map_err(|e| self.failed("cannot list", dir, e))?;
        let strip = if self.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.prefix)
        };
        let mut names: Vec<(String, u64)> = found
            .into_iter()
            .filter_map(|m| {
                let full = m.location.to_string();
                full.strip_prefix(&strip).map(|n| (n.to_string(), m.size))
            })
            .collect();
        names.sort();
        Ok(names)
    }

    /// Deletes `name`; one that is already gone is no error.
    pub fn delete(&self, name: &str) -> Result<()> {
        let key = self.key(name);
        match self.runtime.block_on(self.store.delete(&key)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.failed("cannot delete", name, e)),
        }
    }

    /// Probes the conditional writes with an object of its own (removed
    /// after, whatever the outcome) and returns the bucket ready for use,
    /// or an error that says what the server does wrong.
    fn probed(mut self) -> Result<Bucket> {
        let nanos = unix_nanos();
        let name = format!("probe/{}-{nanos}", std::process::id());
        let outcome = self.probe(&name).map_err(|e| match e {
            Error::Remote {
                peer,
                what,
                in_doubt,
            } => Error::Remote {
                peer,
                what: format!("probing its conditional writes: {what}"),
                in_doubt,
            },
            e => e,
        });
        let removed = self.delete(&name);
        self.etag_form = outcome?;
        removed?;
        self.remove_stale_probes(nanos)?;
        Ok(self)
    }

    /// Deletes the probe objects of processes killed mid-probe: those
    /// named over [`STALE_PROBE`] before `now` (by their writer's clock;
    /// hosts' clocks are assumed within that of each other). A probe
    /// running elsewhere is younger and stays.
    fn remove_stale_probes(&self, now: u128) -> Result<()> {
        for (name, _) in self.list("probe")? {
            let born = name
                .rsplit_once('-')
                .and_then(|(_, nanos)| nanos.parse::<u128>().ok());
            if born.is_some_and(|born| born + STALE_PROBE.as_nanos() < now) {
                self.delete(&name)?;
            }
        }
        Ok(())
    }

    fn probe(&self, name: &str) -> Result<EtagForm> {
        let refuse = |what: &str| {
            Err(Error::Remote {
                peer: self.url.clone(),
                what: format!(
                    "{what}: blocksnap needs an object store whose conditional writes \
                     hold (If-None-Match and If-Match), as Ceph RGW, AWS S3 and MinIO do"
                ),
                in_doubt: false,
            })
        };
        let Some(first) = self.create(name, b"1".to_vec())? else {
            return refuse(&format!(
                "a new probe object {name} was reported to exist already"
            ));
        };
        if self.create(name, b"2".to_vec())?.is_some() {
            return refuse("it accepted a second create of one object (it ignores If-None-Match)");
        }
        // The ETag form the server takes: as S3 gives it, else bare.
        let mut form = None;
        let mut now = first.clone();
        for candidate in [EtagForm::Quoted, EtagForm::Bare] {
            if let Some(next) = self.replace_as(name, b"3".to_vec(), &first, candidate)? {
                form = Some(candidate);
                now = next;
                break;
            }
        }
        let Some(form) = form else {
            return refuse("it refused a replace with the object's own ETag, in either form");
        };
        if first.0.trim_matches('"') == now.0.trim_matches('"') {
            return refuse("an object's ETag did not change when its content did");
        }
        if self
            .replace_as(name, b"4".to_vec(), &first, form)?
            .is_some()
        {
            return refuse("it accepted a replace with a stale ETag (it ignores If-Match)");
        }
        match self.get(name)? {
            Some((bytes, _)) if bytes == b"3" => Ok(form),
            other => refuse(&format!(
                "the probe object read back as {:?}, not what was written",
                other.map(|(b, _)| String::from_utf8_lossy(&b).into_owned())
            )),
        }
    }
}
