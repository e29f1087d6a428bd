//! The four endpoints, and the one place engine errors become statuses.

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use super::auth::Principal;
use super::guard::Touched;
use super::{App, MAX_BODY_LEN};
use crate::error::{Error, ErrorClass};
use crate::ids::{ServerId, SnapshotId};
use crate::types::SnapshotKind;

/// The provider's words, verbatim: clients may show or match them.
const CREATE_MESSAGE: &str =
    "Snapshot is being created. This may take 3-10 minutes depending on server size.";
const RESTORE_MESSAGE: &str = "Server is being restored from snapshot. This may take 5-15 minutes.";

/// An error response: a status and `{"detail": "..."}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    detail: String,
}

impl ApiError {
    fn new(status: StatusCode, detail: impl Into<String>) -> Self {
        ApiError {
            status,
            detail: detail.into(),
        }
    }

    pub fn unauthorized(detail: &str) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, detail)
    }

    pub fn forbidden(detail: &str) -> Self {
        Self::new(StatusCode::FORBIDDEN, detail)
    }

    /// 429: come back in `seconds` (said in `Retry-After` too).
    pub fn throttled(seconds: u64) -> Self {
        ApiError {
            status: StatusCode::TOO_MANY_REQUESTS,
            detail: format!("Request was throttled. Expected available in {seconds} seconds."),
        }
    }

    fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, detail)
    }

    fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, detail)
    }

    /// A fault on our side: a generic body, the details in the log.
    fn internal() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal error; the server's log has the details",
        )
    }
}

impl From<Error> for ApiError {
    /// Engine errors as HTTP answers, by [`Error::class`]. A fault's
    /// details (paths, causes) go to the server's log, not to the client.
    fn from(e: Error) -> Self {
        match e.class() {
            ErrorClass::NotFound => ApiError::not_found(e.to_string()),
            ErrorClass::Request => ApiError::bad_request(e.to_string()),
            _ => {
                eprintln!("blocksnap serve: {e}");
                ApiError::internal()
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let retry_after = (self.status == StatusCode::TOO_MANY_REQUESTS).then(|| {
            self.detail
                .split_whitespace()
                .find_map(|w| w.parse::<u64>().ok())
                .unwrap_or(1)
        });
        let mut resp = (self.status, Json(json!({ "detail": self.detail }))).into_response();
        if let Some(secs) = retry_after
            && let Ok(v) = header::HeaderValue::from_str(&secs.to_string())
        {
            resp.headers_mut().insert(header::RETRY_AFTER, v);
        }
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        resp
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

/// Runs a blocking engine call on tokio's blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> crate::Result<T> + Send + 'static,
) -> ApiResult<T> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(ApiError::from),
        Err(e) => {
            eprintln!("blocksnap serve: a request's task failed: {e}");
            Err(ApiError::internal())
        }
    }
}

/// `GET /api/v1/snapshots/?server_id=N`
pub async fn list(
    State(app): State<App>,
    Extension(who): Extension<Principal>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> ApiResult<Json<Value>> {
    let Ok(Query(pairs)) = query else {
        return Err(ApiError::bad_request("malformed query string"));
    };
    let server = parse_server_filter(&pairs)?;
    let include_safety = parse_include_safety(&pairs)?;
    let engine = app.engine.clone();
    let (all, servers) = blocking(move || Ok((engine.snapshots(None)?, engine.servers()))).await?;
    // Only the caller's servers' snapshots: another account's server
    // lists nothing, as an unknown one does.
    let mine: std::collections::HashSet<ServerId> = servers
        .iter()
        .filter(|s| who.owns(&s.account))
        .map(|s| s.id)
        .collect();
    let all = all.into_iter().filter(|s| mine.contains(&s.server.id));
    // A server keeps at most five snapshots, as documented: the safety
    // snapshots restores take are listed only when asked for, with a
    // `kind` on every snapshot to tell them apart.
    let results: Vec<Value> = all
        .filter(|s| server.is_none_or(|id| s.server.id == id))
        .filter(|s| include_safety || s.kind == SnapshotKind::Regular)
        .map(|s| {
            let mut v = serde_json::to_value(&s).unwrap_or_default();
            if let (true, Value::Object(m)) = (include_safety, &mut v) {
                m.insert("kind".into(), Value::String(s.kind.as_str().into()));
            }
            v
        })
        .collect();
    Ok(Json(json!({ "count": results.len(), "results": results })))
}

/// `server_id` from the query string: absent, or a non-negative integer.
fn parse_server_filter(pairs: &[(String, String)]) -> ApiResult<Option<ServerId>> {
    let mut found = None;
    for (key, value) in pairs {
        if key != "server_id" {
            continue;
        }
        let id = value.parse::<u64>().map_err(|_| {
            ApiError::bad_request(format!(
                "server_id must be a non-negative integer, not {value:?}"
            ))
        })?;
        found = Some(ServerId(id));
    }
    Ok(found)
}

/// The `include_safety` query parameter: `true` or `false` (the default).
fn parse_include_safety(pairs: &[(String, String)]) -> ApiResult<bool> {
    let mut include = false;
    for (key, value) in pairs.iter().filter(|(k, _)| k == "include_safety") {
        include = match value.as_str() {
            "true" => true,
            "false" => false,
            _ => {
                return Err(ApiError::bad_request(format!(
                    "{key} must be true or false, not {value:?}"
                )));
            }
        };
    }
    Ok(include)
}

/// `POST /api/v1/snapshots/`
pub async fn create(
    State(app): State<App>,
    Extension(who): Extension<Principal>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    check_json_content_type(&headers)?;
    let bytes = read_body(body).await?;
    let (server_id, name, description) = create_request(&bytes)?;
    let engine = app.engine.clone();
    let (jobs, limit) = (app.jobs.clone(), app.account_jobs);
    let snapshot = blocking(move || {
        let account = owned_server(&engine, &who, server_id)?;
        // Counted and started under one lock: racing requests of one
        // account cannot pass the cap together.
        let mut jobs = jobs.lock();
        if who.account.is_some() && jobs.running_for(&account) >= limit {
            return Ok(None);
        }
        let job = engine.start_snapshot(server_id, &name, &description)?;
        let snapshot = job.snapshot.clone();
        jobs.captures.push((account, job));
        Ok(Some(snapshot))
    })
    .await?
    .ok_or_else(|| too_many(limit))?;
    let id = snapshot.id.0;
    let mut body = serde_json::to_value(&snapshot).unwrap_or_default();
    if let Value::Object(m) = &mut body {
        m.insert("message".into(), Value::String(CREATE_MESSAGE.into()));
    }
    let mut resp = (StatusCode::CREATED, Json(body)).into_response();
    resp.extensions_mut().insert(Touched {
        server: Some(server_id.0),
        snapshot: Some(id),
    });
    Ok(resp)
}

/// The server, name and description of a create request's body: a JSON
/// object with `server_id` (required), `name` (required), `description`.
pub fn create_request(bytes: &[u8]) -> ApiResult<(ServerId, String, String)> {
    let obj = json_object(bytes)?;
    let server_id = match obj.get("server_id") {
        None | Some(Value::Null) => return Err(ApiError::bad_request("server_id is required")),
        Some(v) => v
            .as_u64()
            .map(ServerId)
            .ok_or_else(|| ApiError::bad_request("server_id must be a non-negative integer"))?,
    };
    let name = match obj.get("name") {
        None | Some(Value::Null) => return Err(ApiError::bad_request("name is required")),
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err(ApiError::bad_request("name must be a string")),
    };
    let description = match obj.get("description") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err(ApiError::bad_request("description must be a string")),
    };
    Ok((server_id, name, description))
}

/// Refuses a body declared as something other than JSON (415); a request
/// without a Content-Type is read as JSON.
fn check_json_content_type(headers: &HeaderMap) -> ApiResult<()> {
    let Some(ct) = headers.get(header::CONTENT_TYPE) else {
        return Ok(());
    };
    let mime = ct
        .to_str()
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim();
    if mime.eq_ignore_ascii_case("application/json") {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("unsupported media type {mime:?}: send application/json"),
        ))
    }
}

/// Reads a body of at most 64 KiB.
async fn read_body(body: Body) -> ApiResult<axum::body::Bytes> {
    axum::body::to_bytes(body, MAX_BODY_LEN).await.map_err(|_| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body is larger than {MAX_BODY_LEN} bytes"),
        )
    })
}

/// A body holding a JSON object.
fn json_object(bytes: &[u8]) -> ApiResult<Map<String, Value>> {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(ApiError::bad_request(
            "the request body must be a JSON object",
        )),
        Err(e) => Err(ApiError::bad_request(format!("malformed JSON: {e}"))),
    }
}

/// Server `id`, if the caller may act on it. Another account's server is
/// answered exactly as one that does not exist (the same error, after the
/// same look-up), so ids cannot be probed.
fn owned_server(engine: &crate::Engine, who: &Principal, id: ServerId) -> crate::Result<String> {
    match engine.server(id) {
        Ok(s) if who.owns(&s.account) => Ok(s.account),
        Ok(_) => Err(Error::ServerNotFound(id)),
        Err(e) => Err(e),
    }
}

/// Snapshot `id`'s server and its account, if the caller may act on it;
/// another account's is answered exactly as one that does not exist.
fn owned_snapshot(
    engine: &crate::Engine,
    who: &Principal,
    id: SnapshotId,
) -> crate::Result<(ServerId, String)> {
    let snap = engine.snapshot(id)?;
    match engine.server(snap.server.id) {
        Ok(s) if who.owns(&s.account) => Ok((s.id, s.account)),
        _ => Err(Error::SnapshotNotFound(id)),
    }
}

/// 429 for an account at its cap of running captures and restores.
fn too_many(limit: usize) -> ApiError {
    ApiError {
        status: StatusCode::TOO_MANY_REQUESTS,
        detail: format!(
            "This account already runs {limit} captures and restores; retry in 5 seconds, \
             when one may have ended."
        ),
    }
}

/// A snapshot id from the path; anything but a non-negative integer names
/// no snapshot.
fn snapshot_id(raw: &str) -> ApiResult<SnapshotId> {
    raw.parse::<u64>()
        .map(SnapshotId)
        .map_err(|_| ApiError::not_found(format!("snapshot {raw:?} does not exist")))
}

/// `POST /api/v1/snapshots/{id}/restore/`
pub async fn restore(
    State(app): State<App>,
    Extension(who): Extension<Principal>,
    Path(raw): Path<String>,
) -> ApiResult<Response> {
    let id = snapshot_id(&raw)?;
    let engine = app.engine.clone();
    let (jobs, limit) = (app.jobs.clone(), app.account_jobs);
    let (snap, server) = blocking(move || {
        let (_, account) = owned_snapshot(&engine, &who, id)?;
        let mut jobs = jobs.lock();
        if who.account.is_some() && jobs.running_for(&account) >= limit {
            return Ok(None);
        }
        let job = engine.start_restore(id)?;
        jobs.restores.push((account, job));
        let snap = engine.snapshot(id)?;
        let server = engine.server(snap.server.id)?;
        Ok(Some((snap, server)))
    })
    .await?
    .ok_or_else(|| too_many(limit))?;
    let mut resp = Json(json!({
        "status": "success",
        "message": RESTORE_MESSAGE,
        "snapshot": { "id": snap.id, "name": snap.name, "created_at": snap.created_at },
        // The restore was accepted and is under way.
        "server": { "id": server.id, "name": server.name, "status": "restoring" },
    }))
    .into_response();
    resp.extensions_mut().insert(Touched {
        server: Some(server.id.0),
        snapshot: Some(id.0),
    });
    Ok(resp)
}

/// `DELETE /api/v1/snapshots/{id}/`
pub async fn delete(
    State(app): State<App>,
    Extension(who): Extension<Principal>,
    Path(raw): Path<String>,
) -> ApiResult<Response> {
    let id = snapshot_id(&raw)?;
    let engine = app.engine.clone();
    let server = blocking(move || {
        let (server, _) = owned_snapshot(&engine, &who, id)?;
        engine.delete_snapshot(id)?;
        Ok(server)
    })
    .await?;
    let mut resp = StatusCode::NO_CONTENT.into_response();
    resp.extensions_mut().insert(Touched {
        server: Some(server.0),
        snapshot: Some(id.0),
    });
    Ok(resp)
}

pub async fn not_found() -> ApiError {
    ApiError::not_found("Not found.")
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "Method not allowed on this path.",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(kv: &[(&str, &str)]) -> Vec<(String, String)> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn server_filter_parses_integers_only() {
        assert_eq!(parse_server_filter(&[]).unwrap(), None);
        let one = pairs(&[("server_id", "12345")]);
        assert_eq!(parse_server_filter(&one).unwrap(), Some(ServerId(12345)));
        let other = pairs(&[("x", "1"), ("server_id", "7")]);
        assert_eq!(parse_server_filter(&other).unwrap(), Some(ServerId(7)));
        for bad in ["abc", "-1", "", "1.5", "99999999999999999999999"] {
            assert!(
                parse_server_filter(&pairs(&[("server_id", bad)])).is_err(),
                "{bad}"
            );
        }
    }
}
