//! Bearer-token authentication. Tokens are kept only as BLAKE3 digests and
//! compared with `blake3::Hash`'s constant-time equality against every
//! configured token, so neither a token's bytes nor its length leak
//! through timing.

use std::path::Path;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::Method;
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::handlers::ApiError;
use crate::error::{Error, IoContext, Result};

/// What a request may do: read only, or read and change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    Read,
    ReadWrite,
}

/// Whom an accepted token acts for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    /// The account it acts for; `None`: an operator, for every account.
    pub account: Option<String>,
    pub scope: Scope,
    /// Its name, for the audit log.
    pub name: Option<String>,
    /// Which configured token it is (rate limits are per token).
    pub(crate) key: usize,
}

impl Principal {
    /// May it see and act on what `account` owns?
    pub fn owns(&self, account: &str) -> bool {
        self.account.as_deref().is_none_or(|a| a == account)
    }
}

struct Entry {
    digest: blake3::Hash,
    principal: Principal,
}

/// The API tokens a server accepts, and whom each acts for.
#[derive(Clone)]
pub struct Tokens(Arc<Vec<Entry>>);

/// The tokens file's prefix of a digest.
const DIGEST_PREFIX: &str = "blake3:";

impl Tokens {
    /// Accepts these tokens as operators' (every account, read-write);
    /// refuses an empty set (serving without auth is never allowed) and
    /// tokens with spaces or control characters.
    pub fn new<S: AsRef<str>>(tokens: impl IntoIterator<Item = S>) -> Result<Self> {
        let mut entries = Vec::new();
        for t in tokens {
            let t = t.as_ref();
            if t.is_empty() || t.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(Error::InvalidParameter(
                    "an API token must be non-empty, without spaces or control characters".into(),
                ));
            }
            entries.push(Entry {
                digest: blake3::hash(t.as_bytes()),
                principal: Principal {
                    account: None,
                    scope: Scope::ReadWrite,
                    name: None,
                    key: 0,
                },
            });
        }
        Self::checked(entries)
    }

    fn checked(mut entries: Vec<Entry>) -> Result<Self> {
        for (key, e) in entries.iter_mut().enumerate() {
            e.principal.key = key;
        }
        if entries.is_empty() {
            return Err(Error::InvalidParameter(
                "no API token configured: pass --tokens FILE or --token-file FILE, or set \
                 BLOCKSNAP_API_TOKEN"
                    .into(),
            ));
        }
        Ok(Tokens(Arc::new(entries)))
    }

    /// The tokens of `env_token` (the value of BLOCKSNAP_API_TOKEN) and of
    /// `file` (one a line; blank lines and lines starting with `#` are
    /// skipped), together, as operators'. Neither, or both empty, is an
    /// error.
    pub fn load(env_token: Option<&str>, file: Option<&Path>) -> Result<Self> {
        Self::load_all(env_token, file, None)
    }

    /// [`Tokens::load`], and the scoped tokens of a tokens file (see
    /// [`Tokens::parse_scoped`]).
    pub fn load_all(
        env_token: Option<&str>,
        file: Option<&Path>,
        scoped: Option<&Path>,
    ) -> Result<Self> {
        let text = match file {
            Some(path) => std::fs::read_to_string(path).at(path)?,
            None => String::new(),
        };
        let from_file = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'));
        let operators: Vec<&str> = env_token
            .map(str::trim)
            .into_iter()
            .chain(from_file)
            .collect();
        let mut entries = match operators.is_empty() {
            true => Vec::new(),
            false => Arc::try_unwrap(Self::new(operators)?.0).unwrap_or_default(),
        };
        if let Some(path) = scoped {
            let text = std::fs::read_to_string(path).at(path)?;
            entries.extend(
                Self::parse_scoped(&text)
                    .map_err(|e| Error::InvalidParameter(format!("{}: {e}", path.display())))?,
            );
        }
        Self::checked(entries)
    }

    /// A tokens file: one token a line, as
    /// `blake3:DIGEST account=NAME|* scope=read|read-write [name=LABEL]`
    /// (`blocksnap token new` prints such lines); `account=*` is an
    /// operator's. Blank lines and lines starting with `#` are skipped.
    fn parse_scoped(text: &str) -> std::result::Result<Vec<Entry>, String> {
        let mut out = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |why: &str| format!("line {}: {why}", n + 1);
            let mut fields = line.split_whitespace();
            let digest = fields
                .next()
                .and_then(|d| d.strip_prefix(DIGEST_PREFIX))
                .and_then(|hex| blake3::Hash::from_hex(hex).ok())
                .ok_or_else(|| bad("expected blake3:DIGEST (64 hex digits) first"))?;
            let (mut account, mut scope, mut name) = (None, None, None);
            for field in fields {
                match field.split_once('=') {
                    Some(("account", "*")) => account = Some(None),
                    Some(("account", a)) => {
                        crate::policy::check_account_name(a).map_err(|e| bad(&e.to_string()))?;
                        account = Some(Some(a.to_string()));
                    }
                    Some(("scope", "read")) => scope = Some(Scope::Read),
                    Some(("scope", "read-write")) => scope = Some(Scope::ReadWrite),
                    Some(("name", l)) if !l.is_empty() && l.len() <= 64 => {
                        name = Some(l.to_string());
                    }
                    _ => return Err(bad(&format!("unknown field {field:?}"))),
                }
            }
            let (Some(account), Some(scope)) = (account, scope) else {
                return Err(bad("account= and scope= are required"));
            };
            out.push(Entry {
                digest,
                principal: Principal {
                    account,
                    scope,
                    name,
                    key: 0,
                },
            });
        }
        Ok(out)
    }

    /// Whom `presented` acts for, if it is accepted: compared against
    /// every configured digest, with no early exit.
    fn accepts(&self, presented: &str) -> Option<&Principal> {
        let h = blake3::hash(presented.as_bytes());
        self.0.iter().fold(None, |found, e| {
            let hit = e.digest == h;
            found.or(hit.then_some(&e.principal))
        })
    }
}

/// A new random token (32 bytes from the OS, hex), and its tokens-file line.
pub fn new_token(
    account: Option<&str>,
    scope: Scope,
    name: Option<&str>,
) -> Result<(String, String)> {
    use std::io::Read;
    if let Some(a) = account {
        crate::policy::check_account_name(a)?;
    }
    if let Some(n) = name
        && (n.is_empty() || n.len() > 64 || n.chars().any(|c| c.is_whitespace() || c.is_control()))
    {
        return Err(Error::InvalidParameter(
            "a token's name has 1 to 64 characters, no spaces".into(),
        ));
    }
    let mut bytes = [0u8; 32];
    let urandom = Path::new("/dev/urandom");
    std::fs::File::open(urandom)
        .and_then(|mut f| f.read_exact(&mut bytes))
        .at(urandom)?;
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let token = format!("bst_{token}");
    let mut line = format!(
        "{DIGEST_PREFIX}{} account={} scope={}",
        blake3::hash(token.as_bytes()).to_hex(),
        account.unwrap_or("*"),
        match scope {
            Scope::Read => "read",
            Scope::ReadWrite => "read-write",
        }
    );
    if let Some(n) = name {
        line.push_str(&format!(" name={n}"));
    }
    Ok((token, line))
}

/// What the middleware checks requests against.
pub(crate) struct Guard {
    pub tokens: Tokens,
    pub rate: Option<super::guard::RateLimiter>,
    pub audit: Option<super::guard::AuditLog>,
}

/// Middleware: 401 unless the request carries `Authorization: Bearer
/// <token>` with an accepted token; 429 past the token's rate; 403 for a
/// read-only token's request to change something. Whom the token acts
/// for goes to the handlers. Every request that changes something, and
/// every refused one, is written to the audit log before it is answered.
pub(crate) async fn require_token(
    State(guard): State<Arc<Guard>>,
    req: Request,
    next: Next,
) -> Response {
    let started = std::time::Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let (who, outcome) = authorize(&guard, req, next).await;
    let response = outcome.unwrap_or_else(IntoResponse::into_response);
    let status = response.status();
    let reads = matches!(method, Method::GET | Method::HEAD);
    if let Some(log) = &guard.audit
        && (!reads || status.as_u16() >= 400)
    {
        let touched = response
            .extensions()
            .get::<super::guard::Touched>()
            .copied()
            .unwrap_or_default();
        let record = super::guard::AuditRecord {
            time: humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string(),
            token: who.as_ref().and_then(|p| p.name.clone()),
            account: who
                .as_ref()
                .map(|p| p.account.clone().unwrap_or_else(|| "*".into())),
            method: method.to_string(),
            path,
            server_id: touched.server,
            snapshot_id: touched.snapshot,
            status: status.as_u16(),
            micros: started.elapsed().as_micros() as u64,
        };
        // The request happened either way: its answer stays true, and
        // the failure goes to the server's log.
        if let Err(e) = log.append(record).await {
            eprintln!("blocksnap serve: AUDIT LOG FAILED, a request went unrecorded: {e}");
        }
    }
    response
}

async fn authorize(
    guard: &Guard,
    mut req: Request,
    next: Next,
) -> (Option<Principal>, Result<Response, ApiError>) {
    let Some(value) = req.headers().get(AUTHORIZATION) else {
        return (
            None,
            Err(ApiError::unauthorized(
                "Authentication credentials were not provided.",
            )),
        );
    };
    let value = value.to_str().unwrap_or("");
    let mut parts = value.split_whitespace();
    let malformed =
        || ApiError::unauthorized("Invalid Authorization header: expected 'Bearer <token>'.");
    let (Some(scheme), Some(token), None) = (parts.next(), parts.next(), parts.next()) else {
        return (None, Err(malformed()));
    };
    if !scheme.eq_ignore_ascii_case("bearer") {
        return (None, Err(malformed()));
    }
    let Some(principal) = guard.tokens.accepts(token).cloned() else {
        return (None, Err(ApiError::unauthorized("Invalid token.")));
    };
    // Accounts' tokens are rate-limited; operators' (the provider's own
    // tools) are not.
    if let (Some(rate), Some(_)) = (&guard.rate, &principal.account)
        && let Err(wait) = rate.take(principal.key)
    {
        return (Some(principal), Err(ApiError::throttled(wait)));
    }
    let reads = matches!(*req.method(), Method::GET | Method::HEAD);
    if principal.scope == Scope::Read && !reads {
        return (
            Some(principal),
            Err(ApiError::forbidden(
                "You do not have permission to perform this action.",
            )),
        );
    }
    req.extensions_mut().insert(principal.clone());
    (Some(principal), Ok(next.run(req).await))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_match_exactly() {
        let t = Tokens::new(["alpha", "beta"]).unwrap();
        assert!(t.accepts("alpha").is_some());
        assert!(t.accepts("beta").is_some());
        assert!(t.accepts("alph").is_none());
        assert!(t.accepts("alphaa").is_none());
        assert!(t.accepts("").is_none());
    }

    #[test]
    fn serving_without_a_token_is_refused() {
        assert!(Tokens::new(Vec::<String>::new()).is_err());
        assert!(Tokens::new(["has space"]).is_err());
    }

    #[test]
    fn a_tokens_file_gives_each_token_its_account_and_scope() {
        let (a, line_a) = new_token(Some("acme"), Scope::ReadWrite, Some("ci")).unwrap();
        let (r, line_r) = new_token(Some("acme"), Scope::Read, None).unwrap();
        let (o, line_o) = new_token(None, Scope::ReadWrite, Some("ops")).unwrap();
        assert_ne!(a, r);
        let text = format!("# tokens\n{line_a}\n\n{line_r}\n{line_o}\n");
        let t = Tokens(Arc::new(Tokens::parse_scoped(&text).unwrap()));
        let p = t.accepts(&a).unwrap();
        assert_eq!(p.account.as_deref(), Some("acme"));
        assert_eq!(p.scope, Scope::ReadWrite);
        assert_eq!(p.name.as_deref(), Some("ci"));
        assert!(p.owns("acme") && !p.owns("other"));
        assert_eq!(t.accepts(&r).unwrap().scope, Scope::Read);
        let op = t.accepts(&o).unwrap();
        assert!(op.account.is_none() && op.owns("anyone"));
        // The file holds digests, never a token.
        assert!(!text.contains(&a) && !text.contains(&r) && !text.contains(&o));
        for bad in [
            "acme",
            "blake3:zz account=a scope=read",
            &format!("{} scope=read", line_a.split(' ').next().unwrap()),
            &format!("{} account=a", line_a.split(' ').next().unwrap()),
            &format!(
                "{} account=a b scope=read",
                line_a.split(' ').next().unwrap()
            ),
            &format!(
                "{} account=a scope=write",
                line_a.split(' ').next().unwrap()
            ),
        ] {
            assert!(Tokens::parse_scoped(bad).is_err(), "{bad}");
        }
    }
}
