//! The agent's HTTP endpoints: `/health`, `/state`, `/metrics`, and `/files/read` for sandbox files (task logs).
//! `/files/read` serves only regular files under `<work-dir>/sandboxes`, after resolving symlinks and `..`.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use axum::Json;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::{mpsc, oneshot};

use crate::agent::Event;

/// Largest chunk one `/files/read` returns.
pub const MAX_READ: u64 = 1024 * 1024;

#[derive(Clone)]
struct Ctx {
    events: mpsc::UnboundedSender<Event>,
    sandboxes: PathBuf,
}

pub fn router(events: mpsc::UnboundedSender<Event>, work_dir: &Path) -> axum::Router {
    axum::Router::new()
        .route("/health", axum::routing::get(|| async { Json(json!({"status": "ok", "version": corral_proto::VERSION})) }))
        .route("/state", axum::routing::get(state))
        .route("/metrics", axum::routing::get(metrics))
        .route("/files/read", axum::routing::get(read))
        .with_state(Ctx { events, sandboxes: work_dir.join("sandboxes") })
}

fn error(code: StatusCode, message: String, field: &str) -> Response {
    (code, Json(json!({"error": message, "field": field}))).into_response()
}

async fn state(State(ctx): State<Ctx>) -> Response {
    let (reply, rx) = oneshot::channel();
    if ctx.events.send(Event::State { reply }).is_err() {
        return error(StatusCode::SERVICE_UNAVAILABLE, "agent is shutting down".into(), "");
    }
    match rx.await {
        Ok(state) => Json(state).into_response(),
        Err(_) => error(StatusCode::SERVICE_UNAVAILABLE, "agent is shutting down".into(), ""),
    }
}

/// `GET /metrics`: Prometheus (OpenMetrics text).
async fn metrics(State(ctx): State<Ctx>) -> Response {
    let (reply, rx) = oneshot::channel();
    if ctx.events.send(Event::PublishMetrics { reply }).is_ok() {
        let _ = rx.await;
    }
    let content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8";
    ([(axum::http::header::CONTENT_TYPE, content_type)], crate::metrics::METRICS.encode()).into_response()
}

#[derive(Debug, Deserialize)]
struct ReadQuery {
    path: Option<String>,
    offset: Option<i64>,
    length: Option<u64>,
}

/// Mesos-style `/files/read`: `{"data": "...", "offset": N}`; `offset=-1` returns the file's size as `offset`.
async fn read(State(ctx): State<Ctx>, query: Result<Query<ReadQuery>, axum::extract::rejection::QueryRejection>) -> Response {
    let Query(q) = match query {
        Ok(q) => q,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("bad query: {e}"), "query"),
    };
    let Some(path) = q.path.filter(|p| !p.is_empty()) else {
        return error(StatusCode::BAD_REQUEST, "the path parameter is required".into(), "path");
    };
    let offset = q.offset.unwrap_or(0);
    if offset < -1 {
        return error(StatusCode::BAD_REQUEST, format!("offset {offset} is negative"), "offset");
    }
    let length = q.length.unwrap_or(MAX_READ).min(MAX_READ);
    let resolved = match resolve(&ctx.sandboxes, &path) {
        Ok(p) => p,
        Err((code, message)) => return error(code, message, "path"),
    };
    match read_chunk(&resolved, offset, length) {
        Ok((data, offset)) => Json(json!({"data": data, "offset": offset})).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("cannot read {path}: {e}"), "path"),
    }
}

/// The real path of `path`, if it is a regular file inside `sandboxes`.
fn resolve(sandboxes: &Path, path: &str) -> Result<PathBuf, (StatusCode, String)> {
    let outside = || (StatusCode::FORBIDDEN, format!("{path} is outside the agent's sandboxes"));
    let root = sandboxes.canonicalize().unwrap_or_else(|_| sandboxes.to_path_buf());
    let real = match Path::new(path).canonicalize() {
        Ok(real) => real,
        // A missing file is "not found" only where a sandbox file could be; elsewhere it is simply refused.
        Err(_) if Path::new(path).starts_with(&root) && !path.contains("..") => {
            return Err((StatusCode::NOT_FOUND, format!("no such file: {path}")));
        }
        Err(_) => return Err(outside()),
    };
    if !real.starts_with(&root) {
        return Err(outside());
    }
    if !real.is_file() {
        return Err((StatusCode::BAD_REQUEST, format!("{path} is not a regular file")));
    }
    Ok(real)
}

fn read_chunk(path: &Path, offset: i64, length: u64) -> std::io::Result<(String, u64)> {
    let mut f = std::fs::File::open(path)?;
    let size = f.metadata()?.len();
    if offset == -1 {
        return Ok((String::new(), size));
    }
    let start = (offset as u64).min(size);
    f.seek(SeekFrom::Start(start))?;
    let mut buf = Vec::new();
    f.take(length).read_to_end(&mut buf)?;
    Ok((String::from_utf8_lossy(&buf).into_owned(), start))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_confines_reads_to_sandboxes() {
        let dir = tempfile::tempdir().unwrap();
        let sandboxes = dir.path().join("sandboxes");
        std::fs::create_dir_all(sandboxes.join("fw/t")).unwrap();
        std::fs::write(sandboxes.join("fw/t/stdout"), "hello").unwrap();
        std::fs::write(dir.path().join("secret"), "x").unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret"), sandboxes.join("fw/t/link")).unwrap();
        let ok = resolve(&sandboxes, sandboxes.join("fw/t/stdout").to_str().unwrap()).unwrap();
        assert_eq!(read_chunk(&ok, 1, 3).unwrap(), ("ell".to_string(), 1));
        assert_eq!(read_chunk(&ok, -1, 3).unwrap(), (String::new(), 5));
        assert_eq!(read_chunk(&ok, 99, 3).unwrap(), (String::new(), 5));
        let escape = format!("{}/fw/t/../../../secret", sandboxes.display());
        assert_eq!(resolve(&sandboxes, &escape).unwrap_err().0, StatusCode::FORBIDDEN);
        assert_eq!(resolve(&sandboxes, sandboxes.join("fw/t/link").to_str().unwrap()).unwrap_err().0, StatusCode::FORBIDDEN);
        assert_eq!(resolve(&sandboxes, "/etc/passwd").unwrap_err().0, StatusCode::FORBIDDEN);
        assert_eq!(resolve(&sandboxes, sandboxes.join("fw/t").to_str().unwrap()).unwrap_err().0, StatusCode::BAD_REQUEST);
        assert_eq!(resolve(&sandboxes, "/nope").unwrap_err().0, StatusCode::FORBIDDEN);
        let missing = format!("{}/fw/t/nope", sandboxes.display());
        assert_eq!(resolve(&sandboxes, &missing).unwrap_err().0, StatusCode::NOT_FOUND);
        assert_eq!(resolve(&sandboxes, &format!("{}/../nope", sandboxes.display())).unwrap_err().0, StatusCode::FORBIDDEN);
    }
}
