//! Talking to masters and agents over HTTP, with errors that say which URL was tried.

use std::time::Duration;

use anyhow::{Context, anyhow};
use corral_discovery::{Attempt, Leader};
use serde_json::Value;

/// Where the user said the masters are.
#[derive(Debug, Clone)]
pub struct Masters {
    pub spec: corral_discovery::Masters,
}

impl Masters {
    pub fn parse(text: &str) -> Result<Masters, String> {
        corral_discovery::Masters::parse(text).map(|spec| Masters { spec })
    }

    /// GETs `path` from the leading master: tries each master (or the leader etcd names), follows a follower's
    /// answer naming the leader (HTTP redirects are followed by the client itself).
    pub async fn get(&self, path: &str) -> anyhow::Result<Value> {
        // No pauses: a command line tool tries each master once (twice with hints) and reports.
        let mut finder = corral_discovery::Finder::new(self.spec.clone());
        let tries = match &self.spec {
            corral_discovery::Masters::List(addrs) => addrs.len() * 2,
            corral_discovery::Masters::Etcd(_) => 2,
        };
        let mut errors = Vec::new();
        for _ in 0..tries {
            let addr = match finder.next().await {
                Ok(addr) => addr,
                Err(e) => {
                    errors.push(e);
                    break;
                }
            };
            match get_json(&format!("http://{addr}{path}")).await {
                Ok(v) if v.get("is_leader") == Some(&Value::Bool(false)) => {
                    let leader = v.get("leader").and_then(Value::as_str).map(|addr| Leader {
                        addr: addr.to_string(),
                        term: v.get("leader_term").and_then(Value::as_i64).unwrap_or(0),
                    });
                    if finder.after(&addr, Attempt::Refused { leader }).is_some() {
                        errors.push(format!("{addr} is not the leader and knows of no live one"));
                    }
                }
                Ok(v) => return Ok(v),
                Err(e) => {
                    finder.after(&addr, Attempt::Unreachable);
                    errors.push(format!("{e:#}"));
                }
            }
        }
        errors.dedup();
        Err(anyhow!(
            "no leading master answered ({}); is the cluster running? set --master or CORRAL_MASTER",
            errors.join("; ")
        ))
    }

    /// The leading master's `/state`.
    pub async fn state(&self) -> anyhow::Result<Value> {
        self.get("/state").await
    }

    /// Sends a write (`POST`, `PUT`, `DELETE`) with a JSON body to the leading master. The master's refusal comes
    /// back as [`Refused`] (its status code and message), so commands can map it to an exit code.
    pub async fn send(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let health = self.get("/health").await?;
        let leader = health.get("leader").and_then(Value::as_str).ok_or_else(|| anyhow!("the leading master did not name itself"))?;
        let url = format!("http://{leader}{path}");
        let mut request = http().request(method, &url);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.with_context(|| format!("cannot reach {url}"))?;
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        if status.is_success() {
            return Ok(body);
        }
        let message = body.get("error").and_then(Value::as_str).unwrap_or("no details").to_string();
        Err(Refused { status: status.as_u16(), message }.into())
    }
}

/// A master refused a request: its HTTP status and message.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Refused {
    pub status: u16,
    pub message: String,
}

/// Exit codes scripts can rely on.
pub mod exit {
    /// The command did what was asked.
    pub const OK: i32 = 0;
    /// The cluster refused or the operation failed (e.g. a task did not end well, a quota is invalid).
    pub const FAILED: i32 = 1;
    /// Bad command line (clap's own code for usage errors).
    pub const USAGE: i32 = 2;
    /// No leading master could be reached.
    pub const UNREACHABLE: i32 = 3;
    /// What was named (node, framework, task, role) does not exist.
    pub const NOT_FOUND: i32 = 4;
}

/// The exit code for an error: not found, unreachable, or failed.
pub fn exit_code(e: &anyhow::Error) -> i32 {
    if let Some(r) = e.downcast_ref::<Refused>() {
        return if r.status == 404 { exit::NOT_FOUND } else { exit::FAILED };
    }
    if e.downcast_ref::<NotFound>().is_some() {
        return exit::NOT_FOUND;
    }
    if format!("{e:#}").starts_with("no leading master answered") {
        return exit::UNREACHABLE;
    }
    exit::FAILED
}

/// Nothing matches what the user named.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NotFound(pub String);

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .connect_timeout(Duration::from_secs(3))
        .build()
        .expect("http client")
}

/// GETs a URL and parses JSON, naming the URL in every error.
pub async fn get_json(url: &str) -> anyhow::Result<Value> {
    let response = http().get(url).send().await.with_context(|| format!("cannot reach {url}"))?;
    let status = response.status();
    let body: Value = response.json().await.with_context(|| format!("{url} did not answer JSON"))?;
    if !status.is_success() {
        let message = body.get("error").and_then(Value::as_str).unwrap_or("no details");
        return Err(anyhow!("{url} answered {status}: {message}"));
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn master_specs_are_checked() {
        assert!(Masters::parse("http://127.0.0.1:5050/").is_ok());
        assert!(Masters::parse("etcd://127.0.0.1:2379").is_ok());
        for bad in ["", "nohost", "h:x", "https://h:1", "etcd://"] {
            assert!(Masters::parse(bad).is_err(), "{bad}");
        }
    }
}
