//! Talking to masters and agents over HTTP, with errors that say which URL was tried.

use std::time::Duration;

use anyhow::{Context, anyhow};
use serde_json::Value;

/// The master addresses the user gave.
#[derive(Debug, Clone)]
pub struct Masters {
    /// `host:port` for each master.
    pub addrs: Vec<String>,
}

impl Masters {
    pub fn parse(text: &str) -> Result<Masters, String> {
        let mut addrs = Vec::new();
        for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let addr = item.strip_prefix("http://").unwrap_or(item).trim_end_matches('/');
            if addr.starts_with("https://") {
                return Err(format!("{item:?}: https is not supported yet; use http://host:port"));
            }
            let (host, port) = addr.rsplit_once(':').ok_or_else(|| format!("{item:?} is not host:port"))?;
            if host.is_empty() || port.parse::<u16>().is_err() {
                return Err(format!("{item:?} is not host:port"));
            }
            addrs.push(addr.to_string());
        }
        if addrs.is_empty() {
            return Err("no master address given".into());
        }
        Ok(Masters { addrs })
    }

    /// GETs `path` from the first master that answers.
    pub async fn get(&self, path: &str) -> anyhow::Result<Value> {
        let mut errors = Vec::new();
        for addr in &self.addrs {
            match get_json(&format!("http://{addr}{path}")).await {
                Ok(v) => return Ok(v),
                Err(e) => errors.push(format!("{e:#}")),
            }
        }
        Err(anyhow!("no master answered ({}); is the cluster running? set --master or CORRAL_MASTER", errors.join("; ")))
    }

    /// The master's `/state`.
    pub async fn state(&self) -> anyhow::Result<Value> {
        self.get("/state").await
    }
}

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
    fn master_urls() {
        assert_eq!(Masters::parse("http://127.0.0.1:5050/").unwrap().addrs, vec!["127.0.0.1:5050"]);
        assert_eq!(Masters::parse("a:1,b:2").unwrap().addrs, vec!["a:1", "b:2"]);
        for bad in ["", "nohost", "h:x", ":5050", "https://h:1"] {
            assert!(Masters::parse(bad).is_err(), "{bad}");
        }
    }
}
