//! `corral-master`: serves the scheduler and agent gRPC APIs and the operator HTTP API on one port.

use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use corral_master::ha::HaConfig;
use corral_master::{Backend, MasterConfig, registry};

/// corral master: admits agents, allocates their resources to frameworks (DRF) and tracks tasks.
#[derive(Debug, Parser)]
#[command(name = "corral-master", version)]
struct Args {
    /// TOML file of settings, keyed by flag name (e.g. work-dir = "/var/lib/corral"); flags and CORRAL_* win.
    #[arg(long, env = "CORRAL_CONFIG")]
    config: Option<std::path::PathBuf>,
    /// Address to listen on.
    #[arg(long, env = "CORRAL_IP", default_value = "0.0.0.0")]
    ip: std::net::IpAddr,
    /// Port for gRPC and HTTP (both on one port).
    #[arg(long, env = "CORRAL_PORT", default_value_t = 5050)]
    port: u16,
    /// Host name or IP other components use to reach this master; followers send clients here when it leads
    /// (default: the listen IP, or this host's name when listening on all addresses).
    #[arg(long, env = "CORRAL_ADVERTISE_IP")]
    advertise_ip: Option<String>,
    /// Directory for the master's own files (the default file registry lives here).
    #[arg(long, env = "CORRAL_WORK_DIR")]
    work_dir: std::path::PathBuf,
    /// Registry backend: file:DIR (one master; default file:<work-dir>/registry) or etcd://HOST:PORT[,HOST:PORT…]
    /// (replicated masters electing a leader in etcd).
    #[arg(long, env = "CORRAL_REGISTRY")]
    registry: Option<String>,
    /// Key prefix in etcd for the election and the registry (default /corral, or the path of an etcd:// URL).
    #[arg(long, env = "CORRAL_ETCD_PREFIX")]
    etcd_prefix: Option<String>,
    /// TTL of the leader's etcd lease: a dead leader is replaced within about this long (whole seconds, ≥ 1s).
    #[arg(long, env = "CORRAL_LEADER_LEASE_TTL", default_value = "5s", value_parser = parse_lease_ttl)]
    leader_lease_ttl: Duration,
    /// An agent silent this long is marked UNREACHABLE (e.g. 15s, 500ms).
    #[arg(long, env = "CORRAL_AGENT_PING_TIMEOUT", default_value = "15s", value_parser = humantime::parse_duration)]
    agent_ping_timeout: Duration,
    /// After a restart or failover, how long agents from the registry have to re-register before they are marked
    /// unreachable.
    #[arg(long, env = "CORRAL_AGENT_REREGISTER_TIMEOUT", default_value = "2min", value_parser = humantime::parse_duration)]
    agent_reregister_timeout: Duration,
    /// Rescind offers not answered within this time ("0s" never rescinds).
    #[arg(long, env = "CORRAL_OFFER_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    offer_timeout: Duration,
    /// Interval of HEARTBEAT events to frameworks.
    #[arg(long, env = "CORRAL_FRAMEWORK_HEARTBEAT", default_value = "5s", value_parser = humantime::parse_duration)]
    framework_heartbeat_interval: Duration,
    /// Role weights, e.g. "analytics=3,web=1" (default weight 1).
    #[arg(long, env = "CORRAL_WEIGHTS", value_parser = parse_weights, default_value = "")]
    weights: Weights,
    /// Log format.
    #[arg(long, env = "CORRAL_LOG_FORMAT", default_value = "human", value_parser = ["human", "json"])]
    log_format: String,
}

#[derive(Debug, Clone)]
struct Weights(Vec<(String, f64)>);

fn parse_weights(text: &str) -> Result<Weights, String> {
    let mut out = Vec::new();
    for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (role, weight) = item.split_once('=').ok_or_else(|| format!("{item:?} is not ROLE=WEIGHT"))?;
        corral_proto::resources::validate_role(role.trim())?;
        let weight: f64 = weight.trim().parse().map_err(|_| format!("weight {weight:?} of role {role:?} is not a number"))?;
        if !(weight.is_finite() && weight > 0.0) {
            return Err(format!("weight of role {role:?} must be positive, got {weight}"));
        }
        out.push((role.trim().to_string(), weight));
    }
    Ok(Weights(out))
}

fn parse_lease_ttl(text: &str) -> Result<Duration, String> {
    let ttl = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if ttl < Duration::from_secs(1) || ttl.subsec_nanos() != 0 {
        return Err(format!("{text:?}: etcd leases are whole seconds, at least 1s"));
    }
    Ok(ttl)
}

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if format == "json" { builder.json().init() } else { builder.init() }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let known: Vec<String> = {
        use clap::CommandFactory;
        Args::command().get_arguments().filter_map(|a| a.get_long().map(str::to_string)).collect()
    };
    let args = Args::parse_from(corral_proto::config::expand_process_args(&known));
    init_logging(&args.log_format);
    std::fs::create_dir_all(&args.work_dir)
        .with_context(|| format!("cannot create --work-dir {}", args.work_dir.display()))?;
    let spec = args
        .registry
        .clone()
        .unwrap_or_else(|| format!("file:{}", args.work_dir.join("registry").display()));
    let backend = if spec.starts_with("etcd://") {
        let etcd = corral_discovery::EtcdSpec::parse(&spec).map_err(|e| anyhow::anyhow!("--registry: {e}"))?;
        let etcd = match &args.etcd_prefix {
            Some(prefix) => etcd.with_prefix(prefix).map_err(|e| anyhow::anyhow!("--etcd-prefix: {e}"))?,
            None => etcd,
        };
        Backend::Etcd(HaConfig { etcd, lease_ttl: args.leader_lease_ttl })
    } else {
        Backend::Alone(registry::open(&spec).context("--registry")?)
    };
    let advertise_host =
        args.advertise_ip.clone().unwrap_or_else(|| corral_proto::config::default_advertised_host(args.ip));
    let config = MasterConfig {
        advertise: format!("{advertise_host}:{}", args.port),
        agent_ping_timeout: args.agent_ping_timeout,
        agent_heartbeat_interval: (args.agent_ping_timeout / 5).clamp(Duration::from_millis(100), Duration::from_secs(5)),
        agent_reregister_timeout: args.agent_reregister_timeout,
        offer_timeout: (!args.offer_timeout.is_zero()).then_some(args.offer_timeout),
        framework_heartbeat_interval: args.framework_heartbeat_interval,
        weights: args.weights.0.clone(),
        ..MasterConfig::default()
    };
    let listener = tokio::net::TcpListener::bind((args.ip, args.port))
        .await
        .with_context(|| format!("cannot listen on {}:{}", args.ip, args.port))?;
    tracing::info!(address = %config.advertise, registry = %spec, "corral-master {} listening", corral_proto::VERSION);
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    corral_master::serve(config, backend, listener, shutdown_signal()).await
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("can install a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_parse_and_errors_name_the_role() {
        assert_eq!(parse_weights("a=1, b=3").unwrap().0, vec![("a".into(), 1.0), ("b".into(), 3.0)]);
        assert!(parse_weights("").unwrap().0.is_empty());
        assert!(parse_weights("a").unwrap_err().contains("ROLE=WEIGHT"));
        assert!(parse_weights("a=x").unwrap_err().contains("\"a\""));
        assert!(parse_weights("a=0").unwrap_err().contains("positive"));
        assert!(parse_weights("a/b=1").is_err());
    }

    #[test]
    fn lease_ttls_are_whole_seconds() {
        assert_eq!(parse_lease_ttl("2s").unwrap(), Duration::from_secs(2));
        for bad in ["500ms", "1.5s", "0s", "x"] {
            assert!(parse_lease_ttl(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Args::command().debug_assert();
    }
}
