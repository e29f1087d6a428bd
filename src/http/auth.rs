//! Bearer-token authentication. Tokens are kept only as BLAKE3 digests and
//! compared with `blake3::Hash`'s constant-time equality against every
//! configured token, so neither a token's bytes nor its length leak
//! through timing.

use std::path::Path;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::Response;

use super::handlers::ApiError;
use crate::error::{Error, IoContext, Result};

/// The API tokens a server accepts.
#[derive(Clone)]
pub struct Tokens(Vec<blake3::Hash>);

impl Tokens {
    /// Accepts these tokens; refuses an empty set (serving without auth is
    /// never allowed) and tokens with spaces or control characters.
    pub fn new<S: AsRef<str>>(tokens: impl IntoIterator<Item = S>) -> Result<Self> {
        let mut digests = Vec::new();
        for t in tokens {
            let t = t.as_ref();
            if t.is_empty() || t.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(Error::InvalidParameter(
                    "an API token must be non-empty, without spaces or control characters".into(),
                ));
            }
            digests.push(blake3::hash(t.as_bytes()));
        }
        if digests.is_empty() {
            return Err(Error::InvalidParameter(
                "no API token configured: pass --token-file FILE or set BLOCKSNAP_API_TOKEN".into(),
            ));
        }
        Ok(Tokens(digests))
    }

    /// The tokens of `env_token` (the value of BLOCKSNAP_API_TOKEN) and of
    /// `file` (one a line; blank lines and lines starting with `#` are
    /// skipped), together. Neither, or both empty, is an error.
    pub fn load(env_token: Option<&str>, file: Option<&Path>) -> Result<Self> {
        let text = match file {
            Some(path) => std::fs::read_to_string(path).at(path)?,
            None => String::new(),
        };
        let from_file = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'));
        Self::new(env_token.map(str::trim).into_iter().chain(from_file))
    }

    fn accepts(&self, presented: &str) -> bool {
        let h = blake3::hash(presented.as_bytes());
        // No early exit: every token is compared.
        self.0.iter().fold(false, |ok, t| ok | (*t == h))
    }
}

/// Middleware: 401 unless the request carries `Authorization: Bearer <token>`
/// with an accepted token.
pub async fn require_token(
    State(tokens): State<Arc<Tokens>>,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let Some(value) = req.headers().get(AUTHORIZATION) else {
        return Err(ApiError::unauthorized(
            "Authentication credentials were not provided.",
        ));
    };
    let value = value.to_str().unwrap_or("");
    let mut parts = value.split_whitespace();
    let (Some(scheme), Some(token), None) = (parts.next(), parts.next(), parts.next()) else {
        return Err(ApiError::unauthorized(
            "Invalid Authorization header: expected 'Bearer <token>'.",
        ));
    };
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(ApiError::unauthorized(
            "Invalid Authorization header: expected 'Bearer <token>'.",
        ));
    }
    if !tokens.accepts(token) {
        return Err(ApiError::unauthorized("Invalid token."));
    }
    Ok(next.run(req).await)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_match_exactly() {
        let t = Tokens::new(["alpha", "beta"]).unwrap();
        assert!(t.accepts("alpha"));
        assert!(t.accepts("beta"));
        assert!(!t.accepts("alph"));
        assert!(!t.accepts("alphaa"));
        assert!(!t.accepts(""));
    }

    #[test]
    fn serving_without_a_token_is_refused() {
        assert!(Tokens::new(Vec::<String>::new()).is_err());
        assert!(Tokens::new(["has space"]).is_err());
    }
}
