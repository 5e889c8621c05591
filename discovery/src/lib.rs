//! Finding the leading master.
//!
//! Agents, frameworks (through the SDK) and the CLI are given `--master` either as a list of `host:port` addresses
//! or as `etcd://host:port[,host:port…][/prefix]`. A [`Finder`] turns that into the next address to try: the leader
//! named by the last master that refused us first, then the listed masters in turn, or — with etcd — the address
//! the elected master published under `<prefix>/leader`.
//!
//! Masters that do not lead answer gRPC calls with `UNAVAILABLE` and the leader's address in the
//! [`LEADER_METADATA`] header, and REST calls with a 307 redirect.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// gRPC metadata key carrying the leader's `host:port` on a follower's refusal.
pub const LEADER_METADATA: &str = "corral-leader";
/// gRPC metadata key carrying the leader's term (see [`Leader::term`]) beside [`LEADER_METADATA`].
pub const LEADER_TERM_METADATA: &str = "corral-leader-term";

/// A leader as etcd names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leader {
    /// Its advertised `host:port`.
    pub addr: String,
    /// The etcd revision that created its leader key: a new value for every term, even of the same master
    /// (0: unknown).
    pub term: i64,
}
/// Key prefix used when an `etcd://` spec names none.
pub const DEFAULT_ETCD_PREFIX: &str = "/corral";

/// Where the masters are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Masters {
    /// `host:port` of every master.
    List(Vec<String>),
    /// The etcd cluster the masters elect their leader in.
    Etcd(EtcdSpec),
}

/// An etcd cluster and the key prefix corral uses in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdSpec {
    /// `http://host:port` of each etcd member.
    pub endpoints: Vec<String>,
    /// Key prefix, e.g. `/corral` (leading slash, no trailing slash).
    pub prefix: String,
}

impl Masters {
    /// Parses `h1:5050,h2:5050` (an optional `http://` and trailing `/` are accepted) or `etcd://…`.
    pub fn parse(text: &str) -> Result<Masters, String> {
        let text = text.trim();
        if text.starts_with("etcd://") {
            return EtcdSpec::parse(text).map(Masters::Etcd);
        }
        let mut addrs = Vec::new();
        for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let addr = item.strip_prefix("http://").unwrap_or(item).trim_end_matches('/');
            if addr.starts_with("https://") {
                return Err(format!("{item:?}: https is not supported yet; use http://host:port"));
            }
            addrs.push(host_port(addr).map_err(|e| format!("{item:?} {e}"))?);
        }
        if addrs.is_empty() {
            return Err("no master address given (expected host:port[,host:port…] or etcd://host:port[/prefix])".into());
        }
        Ok(Masters::List(addrs))
    }

}

impl std::fmt::Display for Masters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Masters::List(addrs) => f.write_str(&addrs.join(",")),
            Masters::Etcd(spec) => spec.fmt(f),
        }
    }
}

fn host_port(addr: &str) -> Result<String, String> {
    let (host, port) = addr.rsplit_once(':').ok_or("is not host:port")?;
    if host.is_empty() || host.contains(['/', ' ']) {
        return Err("is not host:port (bad host)".into());
    }
    port.parse::<u16>().ok().filter(|p| *p != 0).ok_or("is not host:port (bad port)")?;
    Ok(addr.to_string())
}

impl EtcdSpec {
    /// Parses `etcd://h1:2379,h2:2379[/prefix]`; the prefix defaults to [`DEFAULT_ETCD_PREFIX`].
    pub fn parse(text: &str) -> Result<EtcdSpec, String> {
        let rest = text
            .trim()
            .strip_prefix("etcd://")
            .ok_or_else(|| format!("{text:?} is not etcd://host:port[,host:port…][/prefix]"))?;
        let (hosts, prefix) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, DEFAULT_ETCD_PREFIX),
        };
        let mut endpoints = Vec::new();
        for host in hosts.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let addr = host_port(host).map_err(|e| format!("etcd endpoint {host:?} {e}"))?;
            endpoints.push(format!("http://{addr}"));
        }
        if endpoints.is_empty() {
            return Err(format!("{text:?} names no etcd endpoint"));
        }
        Ok(EtcdSpec { endpoints, prefix: validate_prefix(prefix)? })
    }

    /// The same cluster under another prefix (checked).
    pub fn with_prefix(mut self, prefix: &str) -> Result<EtcdSpec, String> {
        self.prefix = validate_prefix(prefix)?;
        Ok(self)
    }

    /// Name of the election the masters campaign in; the leader's value is its advertised `host:port`.
    pub fn election_name(&self) -> String {
        format!("{}/leader", self.prefix)
    }

    /// Prefix of every registry key.
    pub fn registry_prefix(&self) -> String {
        format!("{}/registry/", self.prefix)
    }

    /// A client for this cluster. Connections are made lazily, so this succeeds while etcd is down. Requests give
    /// up after `request_timeout` (None: never, for calls that wait by design such as a campaign); a dead etcd
    /// connection is noticed by HTTP/2 pings either way.
    pub async fn connect(&self, request_timeout: Option<Duration>) -> Result<etcd_client::Client, etcd_client::Error> {
        let mut options = etcd_client::ConnectOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_keep_alive(Duration::from_secs(1), Duration::from_secs(3))
            .with_keep_alive_while_idle(true);
        if let Some(timeout) = request_timeout {
            options = options.with_timeout(timeout);
        }
        etcd_client::Client::connect(&self.endpoints, Some(options)).await
    }

    /// The elected master, or `None` while no master leads.
    pub async fn leader(&self, client: &mut etcd_client::Client) -> Result<Option<Leader>, etcd_client::Error> {
        match client.leader(self.election_name()).await {
            Ok(r) => Ok(r.kv().and_then(leader_of)),
            // etcd answers "election: no leader" as an error.
            Err(etcd_client::Error::GRpcStatus(s)) if s.message().contains("no leader") => Ok(None),
            Err(e) => Err(e),
        }
    }
}

impl std::fmt::Display for EtcdSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hosts: Vec<&str> = self.endpoints.iter().map(|e| e.trim_start_matches("http://")).collect();
        write!(f, "etcd://{}{}", hosts.join(","), self.prefix)
    }
}

fn validate_prefix(prefix: &str) -> Result<String, String> {
    let trimmed = prefix.trim_end_matches('/');
    if !trimmed.starts_with('/') || trimmed.len() < 2 || trimmed.contains(char::is_whitespace) || trimmed.contains("//")
    {
        return Err(format!("etcd prefix {prefix:?} must be a path like /corral"));
    }
    Ok(trimmed.to_string())
}

/// The leader an election key-value names (its value is the address, its creation revision the term).
pub fn leader_of(kv: &etcd_client::KeyValue) -> Option<Leader> {
    let addr = kv.value_str().ok().filter(|v| host_port(v).is_ok())?;
    Some(Leader { addr: addr.to_string(), term: kv.create_revision() })
}

/// The leader a follower named when it refused a call.
pub fn leader_hint(status: &tonic::Status) -> Option<Leader> {
    let get = |key| status.metadata().get(key).and_then(|v| v.to_str().ok());
    let addr = get(LEADER_METADATA).filter(|v| host_port(v).is_ok())?;
    let term = get(LEADER_TERM_METADATA).and_then(|t| t.parse().ok()).unwrap_or(0);
    Some(Leader { addr: addr.to_string(), term })
}

/// A gRPC endpoint for a master, tuned to notice a dead or frozen master within seconds: TCP connect timeout and
/// HTTP/2 keep-alive pings (a stopped process keeps its TCP connections open, but answers no ping).
pub fn endpoint(addr: &str) -> Result<tonic::transport::Endpoint, String> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| format!("master address {addr:?}: {e}"))?;
    Ok(endpoint
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(Duration::from_secs(2))
        .keep_alive_timeout(Duration::from_secs(4))
        .keep_alive_while_idle(true)
        .tcp_nodelay(true))
}

/// How long a client waits for a master to accept a connection and answer the first call.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// How long a master that could not be reached is passed over (while others remain), and hints naming it for the
/// same term ignored. During a failover, followers keep naming the dead leader until its lease expires; without this
/// a client would bounce between a follower and the dead master. A hint with another term (the master was restarted
/// and won again) is followed.
pub const SUSPECT_FOR: Duration = Duration::from_secs(3);

/// How an attempt to reach the leader through one master ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// No connection, or no answer in time.
    Unreachable,
    /// The master answered but would not serve us (a follower), naming `leader` if it knows one.
    Refused { leader: Option<Leader> },
    /// A session was established, served, and has now ended.
    Ended,
    /// Anything else: etcd names no leader or cannot be asked, or a session ended before it served.
    Failed,
}

/// Shortest and longest pause after failures (doubling in between), and the pause after a follower's refusal.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(1);
const REFUSED_PAUSE: Duration = Duration::from_millis(300);

/// Picks the master to try next, and how long to wait before trying.
pub struct Finder {
    masters: Masters,
    next: usize,
    hint: Option<String>,
    etcd: Option<etcd_client::Client>,
    /// When each master was last unreachable, and the term it was followed for then (0: none).
    unreachable: HashMap<String, (Instant, i64)>,
    /// The term each master was last followed for.
    followed: HashMap<String, i64>,
    backoff: Duration,
}

impl Finder {
    pub fn new(masters: Masters) -> Finder {
        Finder {
            masters,
            next: 0,
            hint: None,
            etcd: None,
            unreachable: HashMap::new(),
            followed: HashMap::new(),
            backoff: FIRST_BACKOFF,
        }
    }

    /// Records how the attempt through `addr` ended; returns how long to wait before the next one (None: at once).
    ///
    /// A followed leader hint is tried at once. A follower's refusal without a usable hint (an election is under
    /// way) pauses briefly without growing the backoff, so the new leader is found soon after it is elected.
    /// Unreachable masters double the backoff up to 1 s and are passed over for [`SUSPECT_FOR`]. Pauses carry up
    /// to 100 ms of jitter, so thousands of agents do not retry in step.
    pub fn after(&mut self, addr: &str, attempt: Attempt) -> Option<Duration> {
        let jitter = || Duration::from_millis(rand::random::<u64>() % 100);
        match attempt {
            Attempt::Refused { leader } => {
                self.unreachable.remove(addr);
                if leader.is_some_and(|leader| self.follow(addr, leader)) {
                    return None;
                }
                Some(REFUSED_PAUSE + jitter())
            }
            Attempt::Ended => {
                // The session served: look for the (maybe new) leader at once, jitter aside.
                self.unreachable.remove(addr);
                self.backoff = FIRST_BACKOFF;
                Some(jitter())
            }
            Attempt::Unreachable | Attempt::Failed => {
                if attempt == Attempt::Unreachable {
                    let term = self.followed.get(addr).copied().unwrap_or(0);
                    self.unreachable.insert(addr.to_string(), (Instant::now(), term));
                }
                let pause = self.backoff + jitter();
                self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
                Some(pause)
            }
        }
    }

    fn suspect(&self, addr: &str) -> bool {
        self.unreachable.get(addr).is_some_and(|(t, _)| t.elapsed() < SUSPECT_FOR)
    }

    /// Remembers the leader a master at `from` named; it is tried next. A master naming itself (it just failed
    /// us), or one unreachable lately when we followed it for this same term, is not followed, so a stale hint
    /// cannot make a client spin.
    fn follow(&mut self, from: &str, leader: Leader) -> bool {
        let stale = self.unreachable.get(&leader.addr).is_some_and(|(t, term)| {
            t.elapsed() < SUSPECT_FOR && (*term == leader.term || leader.term == 0)
        });
        if leader.addr == from || stale {
            return false;
        }
        self.followed.insert(leader.addr.clone(), leader.term);
        self.hint = Some(leader.addr);
        true
    }

    /// The next master to try. With etcd, asks it for the elected leader; the error says why none is known.
    pub async fn next(&mut self) -> Result<String, String> {
        if let Some(hint) = self.hint.take() {
            return Ok(hint);
        }
        match &self.masters {
            Masters::List(addrs) => {
                // The next master in turn that was not unreachable lately (or simply the next, if none).
                let start = self.next;
                let pick = (start..start + addrs.len())
                    .find(|i| !self.suspect(&addrs[i % addrs.len()]))
                    .unwrap_or(start);
                self.next = pick + 1;
                Ok(addrs[pick % addrs.len()].clone())
            }
            Masters::Etcd(spec) => {
                if self.etcd.is_none() {
                    self.etcd = Some(spec.connect(Some(CONNECT_TIMEOUT)).await.map_err(|e| format!("etcd {spec}: {e}"))?);
                }
                let client = self.etcd.as_mut().expect("connected above");
                match spec.leader(client).await {
                    Ok(Some(leader)) => {
                        self.followed.insert(leader.addr.clone(), leader.term);
                        Ok(leader.addr)
                    }
                    Ok(None) => Err(format!("no master leads in {spec} yet")),
                    Err(e) => Err(format!("cannot ask {spec} for the leader: {e}")),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn master_lists() {
        assert_eq!(Masters::parse("http://127.0.0.1:5050/").unwrap(), Masters::List(vec!["127.0.0.1:5050".into()]));
        assert_eq!(Masters::parse("a:1, b:2").unwrap(), Masters::List(vec!["a:1".into(), "b:2".into()]));
        for bad in ["", ",", "nohost", "h:x", ":5050", "h:0", "https://h:1", "a b:1", "a:1,etcd://e:2379"] {
            assert!(Masters::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn etcd_specs() {
        let spec = EtcdSpec::parse("etcd://127.0.0.1:2379,e2:2379").unwrap();
        assert_eq!(spec.endpoints, vec!["http://127.0.0.1:2379", "http://e2:2379"]);
        assert_eq!(spec.prefix, "/corral");
        assert_eq!(spec.election_name(), "/corral/leader");
        assert_eq!(spec.registry_prefix(), "/corral/registry/");
        assert_eq!(spec.to_string(), "etcd://127.0.0.1:2379,e2:2379/corral");
        let spec = Masters::parse("etcd://e:1/prod/corral/").unwrap();
        assert_eq!(spec, Masters::Etcd(EtcdSpec { endpoints: vec!["http://e:1".into()], prefix: "/prod/corral".into() }));
        for bad in ["etcd://", "etcd:///x", "etcd://e", "etcd://e:1/", "etcd://e:1//x", "etcd://e:1/a b", "etc://e:1"] {
            assert!(EtcdSpec::parse(bad).is_err(), "{bad}");
        }
        assert!(EtcdSpec::parse("etcd://e:1").unwrap().with_prefix("x").is_err());
    }

    fn refused(leader: &str) -> Attempt {
        refused_term(leader, 7)
    }

    fn refused_term(leader: &str, term: i64) -> Attempt {
        Attempt::Refused { leader: Some(Leader { addr: leader.to_string(), term }) }
    }

    #[tokio::test]
    async fn finder_rotates_and_follows_hints_at_once() {
        let mut f = Finder::new(Masters::parse("a:1,b:1,c:1").unwrap());
        assert_eq!(f.next().await.unwrap(), "a:1");
        assert_eq!(f.after("a:1", refused("c:1")), None, "a hint is followed at once");
        assert_eq!(f.next().await.unwrap(), "c:1");
        assert_eq!(f.next().await.unwrap(), "b:1");
        assert!(f.after("c:1", refused("c:1")).is_some(), "a master naming itself is not followed");
        assert_eq!(f.next().await.unwrap(), "c:1");
        assert_eq!(f.next().await.unwrap(), "a:1");
    }

    #[tokio::test]
    async fn unreachable_masters_are_passed_over_and_not_followed() {
        let mut f = Finder::new(Masters::parse("a:1,b:1,c:1").unwrap());
        assert_eq!(f.after("c:1", refused("a:1")), None);
        assert_eq!(f.next().await.unwrap(), "a:1");
        assert!(f.after("a:1", Attempt::Unreachable).is_some());
        assert!(f.after("b:1", refused("a:1")).is_some(), "a dead leader named by a follower is not followed");
        assert_eq!(f.next().await.unwrap(), "b:1");
        assert_eq!(f.next().await.unwrap(), "c:1");
        assert_eq!(f.next().await.unwrap(), "b:1", "a:1 is skipped while others remain");
        f.after("a:1", Attempt::Ended);
        assert_eq!(f.next().await.unwrap(), "c:1");
        assert_eq!(f.next().await.unwrap(), "a:1");
        for m in ["a:1", "b:1", "c:1"] {
            f.after(m, Attempt::Unreachable);
        }
        assert_eq!(f.next().await.unwrap(), "b:1", "all unreachable: still try them in turn");
    }

    #[tokio::test]
    async fn a_new_term_of_an_unreachable_master_is_followed() {
        let mut f = Finder::new(Masters::parse("a:1,b:1").unwrap());
        assert_eq!(f.after("b:1", refused_term("a:1", 7)), None);
        assert_eq!(f.next().await.unwrap(), "a:1");
        f.after("a:1", Attempt::Unreachable);
        assert!(f.after("b:1", refused_term("a:1", 7)).is_some(), "the dead term is not followed again");
        assert!(f.after("b:1", refused_term("a:1", 0)).is_some(), "nor a hint without a term");
        assert_eq!(f.after("b:1", refused_term("a:1", 9)), None, "a:1 restarted and leads a new term");
        assert_eq!(f.next().await.unwrap(), "a:1");
    }

    #[test]
    fn pauses_grow_on_failures_only() {
        let mut f = Finder::new(Masters::parse("a:1").unwrap());
        let within = |d: Option<Duration>, lo: u64, hi: u64| {
            let d = d.unwrap();
            assert!(d >= Duration::from_millis(lo) && d < Duration::from_millis(hi), "{d:?} not in [{lo}, {hi})");
        };
        within(f.after("a:1", Attempt::Unreachable), 100, 200);
        within(f.after("a:1", Attempt::Failed), 200, 300);
        within(f.after("a:1", Attempt::Refused { leader: None }), 300, 400);
        within(f.after("a:1", Attempt::Unreachable), 400, 500);
        for _ in 0..5 {
            f.after("a:1", Attempt::Unreachable);
        }
        within(f.after("a:1", Attempt::Unreachable), 1000, 1100);
        within(f.after("a:1", Attempt::Ended), 0, 100);
        within(f.after("a:1", Attempt::Unreachable), 100, 200);
    }

    #[test]
    fn hints_must_be_addresses() {
        let mut s = tonic::Status::unavailable("not the leader");
        assert_eq!(leader_hint(&s), None);
        s.metadata_mut().insert(LEADER_METADATA, "m2:5050".parse().unwrap());
        assert_eq!(leader_hint(&s), Some(Leader { addr: "m2:5050".into(), term: 0 }));
        s.metadata_mut().insert(LEADER_TERM_METADATA, "42".parse().unwrap());
        assert_eq!(leader_hint(&s), Some(Leader { addr: "m2:5050".into(), term: 42 }));
        s.metadata_mut().insert(LEADER_METADATA, "garbage".parse().unwrap());
        assert_eq!(leader_hint(&s), None);
    }
}
