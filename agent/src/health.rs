//! Health checks: the pure decision rules ([`HealthState`]) and the checks themselves ([`check`]).
//!
//! Rules (as in Mesos): the first check runs after `delay`; failures within the grace period (counted from the
//! task's start) are ignored until the task has been healthy once; a success resets the failure count; a change
//! of health is reported; `consecutive_failures` failures in a row kill the task.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use corral_proto::v1::{HealthCheck, health_check::Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A health check with its defaults filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub delay: Duration,
    pub interval: Duration,
    pub timeout: Duration,
    pub grace: Duration,
    pub max_failures: u32,
}

fn secs(v: f64, default: f64) -> Duration {
    Duration::from_secs_f64(if v.is_finite() && v > 0.0 { v.min(86_400.0) } else { default })
}

impl Policy {
    pub fn of(hc: &HealthCheck) -> Policy {
        Policy {
            delay: secs(hc.delay_seconds, 15.0),
            interval: secs(hc.interval_seconds, 10.0),
            timeout: secs(hc.timeout_seconds, 20.0),
            grace: secs(hc.grace_period_seconds, 10.0),
            max_failures: if hc.consecutive_failures == 0 { 3 } else { hc.consecutive_failures },
        }
    }
}

/// What a check result means for the task.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Nothing to report.
    Unchanged,
    /// Health changed: report an update with `healthy` set.
    Healthy(bool),
    /// Too many failures: report unhealthy (if not yet) and kill the task.
    Kill,
}

/// Health of one task. Pure: callers pass the time.
#[derive(Debug, Clone)]
pub struct HealthState {
    policy: Policy,
    started: Instant,
    failures: u32,
    healthy: Option<bool>,
    /// Once healthy, the grace period no longer applies.
    ever_healthy: bool,
}

impl HealthState {
    pub fn new(policy: Policy, started: Instant) -> Self {
        HealthState { policy, started, failures: 0, healthy: None, ever_healthy: false }
    }

    pub fn healthy(&self) -> Option<bool> {
        self.healthy
    }

    /// Applies one check result.
    pub fn record(&mut self, ok: bool, now: Instant) -> Verdict {
        if ok {
            self.failures = 0;
            self.ever_healthy = true;
            return if self.healthy == Some(true) {
                Verdict::Unchanged
            } else {
                self.healthy = Some(true);
                Verdict::Healthy(true)
            };
        }
        let in_grace = now.duration_since(self.started) < self.policy.grace && !self.ever_healthy;
        if in_grace {
            return Verdict::Unchanged;
        }
        self.failures += 1;
        if self.failures >= self.policy.max_failures {
            self.healthy = Some(false);
            return Verdict::Kill;
        }
        if self.healthy == Some(false) {
            Verdict::Unchanged
        } else {
            self.healthy = Some(false);
            Verdict::Healthy(false)
        }
    }
}

/// Where and how to check.
#[derive(Debug, Clone)]
pub struct Target {
    pub check: HealthCheck,
    pub port: Option<u16>,
    pub sandbox: PathBuf,
    pub env: Vec<(String, String)>,
}

/// Runs one check; `Err` says why it failed.
pub async fn check(target: &Target, timeout: Duration) -> Result<(), String> {
    match tokio::time::timeout(timeout, run(target)).await {
        Ok(result) => result,
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
}

async fn run(target: &Target) -> Result<(), String> {
    let addr = || target.port.map(|p| format!("127.0.0.1:{p}")).ok_or("the task has no port to check".to_string());
    match Type::try_from(target.check.r#type) {
        Ok(Type::Command) => {
            let status = tokio::process::Command::new("/bin/sh")
                .arg("-c")
                .arg(&target.check.command)
                .current_dir(&target.sandbox)
                .env_clear()
                .envs(target.env.iter().map(|(k, v)| (k, v)))
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .kill_on_drop(true)
                .status()
                .await
                .map_err(|e| format!("cannot run the check: {e}"))?;
            if status.success() { Ok(()) } else { Err(format!("check command {status}")) }
        }
        Ok(Type::Tcp) => {
            let addr = addr()?;
            tokio::net::TcpStream::connect(&addr).await.map(|_| ()).map_err(|e| format!("cannot connect to {addr}: {e}"))
        }
        Ok(Type::Http) => {
            let addr = addr()?;
            let path = if target.check.path.is_empty() { "/" } else { &target.check.path };
            let mut stream = tokio::net::TcpStream::connect(&addr).await.map_err(|e| format!("cannot connect to {addr}: {e}"))?;
            let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nUser-Agent: corral-health\r\n\r\n");
            stream.write_all(request.as_bytes()).await.map_err(|e| e.to_string())?;
            let mut head = vec![0u8; 64];
            let n = stream.read(&mut head).await.map_err(|e| e.to_string())?;
            let line = String::from_utf8_lossy(&head[..n]);
            let code: u16 = line.split_whitespace().nth(1).and_then(|c| c.parse().ok()).ok_or(format!("not an HTTP answer: {line:?}"))?;
            if (200..400).contains(&code) { Ok(()) } else { Err(format!("GET {path} answered {code}")) }
        }
        _ => Err("unknown health check type".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(grace: u64, max: u32) -> Policy {
        Policy {
            delay: Duration::ZERO,
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            grace: Duration::from_secs(grace),
            max_failures: max,
        }
    }

    #[test]
    fn reports_changes_and_kills_after_consecutive_failures() {
        let t0 = Instant::now();
        let mut h = HealthState::new(policy(0, 3), t0);
        let s = Duration::from_secs;
        assert_eq!(h.record(true, t0), Verdict::Healthy(true));
        assert_eq!(h.record(true, t0 + s(1)), Verdict::Unchanged);
        assert_eq!(h.record(false, t0 + s(2)), Verdict::Healthy(false));
        assert_eq!(h.record(false, t0 + s(3)), Verdict::Unchanged);
        assert_eq!(h.record(true, t0 + s(4)), Verdict::Healthy(true), "a success resets the count");
        assert_eq!(h.record(false, t0 + s(5)), Verdict::Healthy(false));
        assert_eq!(h.record(false, t0 + s(6)), Verdict::Unchanged);
        assert_eq!(h.record(false, t0 + s(7)), Verdict::Kill);
        assert_eq!(h.healthy(), Some(false));
    }

    #[test]
    fn failures_in_the_grace_period_do_not_count_until_healthy_once() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut h = HealthState::new(policy(10, 1), t0);
        for i in 0..9 {
            assert_eq!(h.record(false, t0 + s(i)), Verdict::Unchanged, "still starting up");
        }
        assert_eq!(h.record(false, t0 + s(10)), Verdict::Kill, "grace is over");

        let mut h = HealthState::new(policy(10, 2), t0);
        assert_eq!(h.record(true, t0), Verdict::Healthy(true));
        assert_eq!(h.record(false, t0 + s(1)), Verdict::Healthy(false), "once healthy, grace no longer applies");
        assert_eq!(h.record(false, t0 + s(2)), Verdict::Kill);
    }

    #[test]
    fn defaults() {
        let p = Policy::of(&HealthCheck::default());
        assert_eq!((p.delay, p.interval, p.timeout, p.grace, p.max_failures),
            (Duration::from_secs(15), Duration::from_secs(10), Duration::from_secs(20), Duration::from_secs(10), 3));
    }

    #[tokio::test]
    async fn checks_against_real_sockets_and_commands() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else { return };
                let mut buf = [0u8; 256];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let ok = String::from_utf8_lossy(&buf[..n]).starts_with("GET /ok ");
                let reply = if ok { "HTTP/1.0 200 OK\r\n\r\n" } else { "HTTP/1.0 503 Unavailable\r\n\r\n" };
                let _ = s.write_all(reply.as_bytes()).await;
            }
        });
        let dir = tempfile::tempdir().unwrap();
        let target = |check: HealthCheck| Target { check, port: Some(port), sandbox: dir.path().into(), env: vec![("X".into(), "1".into())] };
        let t = Duration::from_secs(5);
        let http = |path: &str| HealthCheck { r#type: Type::Http as i32, path: path.into(), ..Default::default() };
        assert_eq!(check(&target(http("/ok")), t).await, Ok(()));
        assert!(check(&target(http("/bad")), t).await.unwrap_err().contains("503"));
        assert_eq!(check(&target(HealthCheck { r#type: Type::Tcp as i32, ..Default::default() }), t).await, Ok(()));
        let cmd = |c: &str| HealthCheck { r#type: Type::Command as i32, command: c.into(), ..Default::default() };
        assert_eq!(check(&target(cmd("test \"$X\" = 1")), t).await, Ok(()));
        assert!(check(&target(cmd("exit 3")), t).await.is_err());
        assert!(check(&target(cmd("sleep 5")), Duration::from_millis(200)).await.unwrap_err().contains("no answer"));
        let closed = Target { port: Some(1), ..target(HealthCheck { r#type: Type::Tcp as i32, ..Default::default() }) };
        assert!(check(&closed, t).await.is_err());
    }
}
