//! Leader election as a plain state machine, and the lease guard the leading master checks before it acts.
//!
//! A master contends for leadership with a lease of `ttl` seconds: it is granted a lease, campaigns in etcd's
//! election with it, and leads once the campaign returns. It keeps leading only while its lease is provably alive:
//! each keep-alive answered by etcd extends validity to *the moment the keep-alive was sent* plus the TTL etcd
//! reported, which is never later than etcd's own expiry. Any doubt — a keep-alive answered with TTL 0, validity
//! running out because etcd is unreachable or the process was frozen, a registry write refused by the fencing
//! compare — ends the term at once; the master then revokes the old lease and contends again with a new one.
//!
//! [`Contender`] does no I/O: `crate::ha` feeds it [`Input`]s from etcd and timers and performs the [`Action`]s it
//! returns. [`Leadership`] is the lock-free flag the master actor consults before each step, so even a master that
//! was stopped for longer than its lease notices on its first instruction after waking, before sending anything.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub use corral_discovery::Leader;

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// etcd granted lease `id` with `ttl`; the grant request was sent at `sent`.
    Granted { id: i64, ttl: Duration, sent: Instant },
    /// Granting failed (etcd unreachable); try again.
    GrantFailed,
    /// A keep-alive for lease `id`, sent at `sent`, was answered with `ttl` (zero: the lease is gone).
    KeptAlive { id: i64, ttl: Duration, sent: Instant },
    /// The campaign with lease `id` returned: this master holds `key` (created at revision `rev`).
    Won { id: i64, key: Vec<u8>, rev: i64 },
    /// The campaign failed (etcd unreachable or the lease vanished); campaign again while the lease lives.
    CampaignFailed { id: i64 },
    /// etcd names this leader (None: nobody leads).
    LeaderSeen(Option<Leader>),
    /// The leading master's registry write was refused by the fencing compare, or its actor stopped.
    Deposed,
    /// Time passes.
    Tick(Instant),
    /// The process is shutting down.
    Shutdown,
}

/// What to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Ask etcd for a lease of the configured TTL.
    GrantLease,
    /// Keep lease `id` alive (start its keep-alive loop).
    KeepAlive { id: i64 },
    /// Campaign with lease `id` (again, after a failure).
    Campaign { id: i64 },
    /// Become the leader: recover from the registry, fence every write on `key`@`rev`, serve.
    Lead { key: Vec<u8>, rev: i64 },
    /// Stop leading now: drop every framework and agent stream, stop offering.
    StopLeading,
    /// Resign the election (delete `key`) so a follower takes over without waiting for the lease. Leadership must
    /// be revoked first; the term's streams are dropped after (by StopLeading), so clients that reconnect find
    /// followers already naming the new leader.
    Resign { key: Vec<u8> },
    /// Stop lease `id`'s keep-alives and campaign, and revoke it (best effort).
    Abandon { id: i64 },
    /// Tell clients who leads (None: unknown).
    Follow { leader: Option<Leader> },
    /// Shut down.
    Exit,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// No lease: waiting for a grant.
    Granting,
    /// Lease held, campaign running: a follower.
    Campaigning { id: i64 },
    /// Leading with `key`.
    Leading { id: i64, key: Vec<u8> },
    /// Shut down.
    Stopped,
}

/// One master's side of the election.
#[derive(Debug)]
pub struct Contender {
    state: State,
    /// The instant until which the current lease is known to be alive.
    valid_until: Option<Instant>,
    leader: Option<Leader>,
    me: String,
}

impl Contender {
    /// A contender that publishes `me` (its advertised `host:port`) when it leads. Returns the first actions.
    pub fn new(me: &str) -> (Contender, Vec<Action>) {
        let c = Contender { state: State::Granting, valid_until: None, leader: None, me: me.to_string() };
        (c, vec![Action::Follow { leader: None }, Action::GrantLease])
    }

    /// Whether this master leads.
    pub fn is_leading(&self) -> bool {
        matches!(self.state, State::Leading { .. })
    }

    /// Until when the lease is known to be alive (None: no lease).
    pub fn valid_until(&self) -> Option<Instant> {
        self.valid_until
    }

    fn lease_id(&self) -> Option<i64> {
        match self.state {
            State::Campaigning { id } | State::Leading { id, .. } => Some(id),
            State::Granting | State::Stopped => None,
        }
    }

    /// Gives up the current lease (and leadership) and asks for a new one.
    fn lose_lease(&mut self, why_leader: Option<Leader>) -> Vec<Action> {
        let mut actions = Vec::new();
        if self.is_leading() {
            actions.push(Action::StopLeading);
        }
        if let Some(id) = self.lease_id() {
            actions.push(Action::Abandon { id });
        }
        self.state = State::Granting;
        self.valid_until = None;
        self.leader = why_leader;
        actions.push(Action::Follow { leader: self.leader.clone() });
        actions.push(Action::GrantLease);
        actions
    }

    /// Applies one input.
    pub fn handle(&mut self, input: Input) -> Vec<Action> {
        if self.state == State::Stopped {
            return Vec::new();
        }
        match input {
            Input::Granted { id, ttl, sent } => {
                if self.state != State::Granting {
                    // A grant we no longer need (e.g. one that raced a shutdown): give it back.
                    return vec![Action::Abandon { id }];
                }
                self.state = State::Campaigning { id };
                self.valid_until = Some(sent + ttl);
                vec![Action::KeepAlive { id }, Action::Campaign { id }]
            }
            Input::GrantFailed => match self.state {
                State::Granting => vec![Action::GrantLease],
                _ => Vec::new(),
            },
            Input::KeptAlive { id, ttl, sent } => {
                if self.lease_id() != Some(id) {
                    return Vec::new();
                }
                if ttl.is_zero() {
                    return self.lose_lease(None);
                }
                let until = sent + ttl;
                self.valid_until = Some(self.valid_until.map_or(until, |v| v.max(until)));
                Vec::new()
            }
            Input::Won { id, key, rev } => {
                if self.state != (State::Campaigning { id }) {
                    // A stale campaign: its lease was abandoned already.
                    return Vec::new();
                }
                self.state = State::Leading { id, key: key.clone() };
                self.leader = Some(Leader { addr: self.me.clone(), term: rev });
                vec![Action::Lead { key, rev }]
            }
            Input::CampaignFailed { id } => match self.state {
                State::Campaigning { id: current } if current == id => vec![Action::Campaign { id }],
                _ => Vec::new(),
            },
            Input::LeaderSeen(leader) => {
                if self.is_leading() || leader == self.leader {
                    return Vec::new();
                }
                // Our own address while not leading is a key of ours from an earlier term, about to expire.
                let leader = leader.filter(|l| l.addr != self.me);
                self.leader = leader.clone();
                vec![Action::Follow { leader }]
            }
            Input::Deposed => {
                if self.is_leading() {
                    self.lose_lease(None)
                } else {
                    Vec::new()
                }
            }
            Input::Tick(now) => match self.valid_until {
                Some(until) if now >= until => self.lose_lease(None),
                _ => Vec::new(),
            },
            Input::Shutdown => {
                let mut actions = Vec::new();
                if let State::Leading { key, .. } = &self.state {
                    actions.push(Action::Resign { key: key.clone() });
                    actions.push(Action::StopLeading);
                }
                if let Some(id) = self.lease_id() {
                    actions.push(Action::Abandon { id });
                }
                actions.push(Action::Exit);
                self.state = State::Stopped;
                self.valid_until = None;
                actions
            }
        }
    }
}

/// The leading master's right to act, checked before every step of its actor: valid until an instant, shared
/// lock-free between the election driver (which extends it) and the actor (which reads it).
#[derive(Clone, Debug)]
pub struct Leadership(Arc<LeadershipInner>);

#[derive(Debug)]
struct LeadershipInner {
    base: Instant,
    /// Nanoseconds after `base` until which leadership holds; 0 = revoked, u64::MAX = forever.
    until: AtomicU64,
}

impl Leadership {
    /// Leadership that never lapses (the single-master file registry).
    pub fn forever() -> Leadership {
        Leadership(Arc::new(LeadershipInner { base: Instant::now(), until: AtomicU64::new(u64::MAX) }))
    }

    /// Leadership valid until `until` (extend it with [`Leadership::extend`]).
    pub fn until(until: Instant) -> Leadership {
        let base = Instant::now();
        Leadership(Arc::new(LeadershipInner { base, until: AtomicU64::new(Self::nanos(base, until)) }))
    }

    fn nanos(base: Instant, until: Instant) -> u64 {
        (until.saturating_duration_since(base).as_nanos() as u64).clamp(1, u64::MAX - 1)
    }

    /// Moves the deadline to `until`: never backwards, and a revoked leadership stays revoked.
    pub fn extend(&self, until: Instant) {
        let nanos = Self::nanos(self.0.base, until);
        let _ = self.0.until.fetch_update(Ordering::AcqRel, Ordering::Acquire, |current| {
            (current != 0 && current != u64::MAX && nanos > current).then_some(nanos)
        });
    }

    /// Ends leadership now; it cannot be extended again.
    pub fn revoke(&self) {
        self.0.until.store(0, Ordering::Release);
    }

    /// Whether this master may act as leader at `now`.
    pub fn holds(&self, now: Instant) -> bool {
        match self.0.until.load(Ordering::Acquire) {
            0 => false,
            u64::MAX => true,
            nanos => now < self.0.base + Duration::from_nanos(nanos),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(5);

    fn granted(c: &mut Contender, id: i64, at: Instant) -> Vec<Action> {
        c.handle(Input::Granted { id, ttl: TTL, sent: at })
    }

    fn leading(at: Instant) -> Contender {
        let (mut c, _) = Contender::new("m1:5050");
        granted(&mut c, 7, at);
        assert_eq!(c.handle(Input::Won { id: 7, key: b"k7".to_vec(), rev: 3 }), vec![Action::Lead {
            key: b"k7".to_vec(),
            rev: 3
        }]);
        c
    }

    #[test]
    fn starts_following_nobody_and_asks_for_a_lease() {
        let (c, actions) = Contender::new("m1:5050");
        assert_eq!(actions, vec![Action::Follow { leader: None }, Action::GrantLease]);
        assert!(!c.is_leading());
        assert_eq!(c.valid_until(), None);
    }

    #[test]
    fn grant_starts_keepalive_and_campaign_and_a_win_leads() {
        let t = Instant::now();
        let (mut c, _) = Contender::new("m1:5050");
        assert_eq!(granted(&mut c, 7, t), vec![Action::KeepAlive { id: 7 }, Action::Campaign { id: 7 }]);
        assert_eq!(c.valid_until(), Some(t + TTL));
        let c = leading(t);
        assert!(c.is_leading());
    }

    #[test]
    fn failed_grants_and_campaigns_are_retried() {
        let (mut c, _) = Contender::new("m1:5050");
        assert_eq!(c.handle(Input::GrantFailed), vec![Action::GrantLease]);
        granted(&mut c, 7, Instant::now());
        assert_eq!(c.handle(Input::CampaignFailed { id: 7 }), vec![Action::Campaign { id: 7 }]);
        assert_eq!(c.handle(Input::CampaignFailed { id: 6 }), vec![], "stale campaign");
        assert_eq!(c.handle(Input::GrantFailed), vec![], "not granting");
    }

    #[test]
    fn keepalives_extend_validity_from_their_send_time_only_forward() {
        let t = Instant::now();
        let mut c = leading(t);
        c.handle(Input::KeptAlive { id: 7, ttl: TTL, sent: t + Duration::from_secs(2) });
        assert_eq!(c.valid_until(), Some(t + Duration::from_secs(7)));
        // A late answer to an older keep-alive does not move validity back.
        c.handle(Input::KeptAlive { id: 7, ttl: TTL, sent: t + Duration::from_secs(1) });
        assert_eq!(c.valid_until(), Some(t + Duration::from_secs(7)));
        // Another lease's keep-alive is ignored.
        c.handle(Input::KeptAlive { id: 8, ttl: TTL, sent: t + Duration::from_secs(4) });
        assert_eq!(c.valid_until(), Some(t + Duration::from_secs(7)));
        assert!(c.handle(Input::Tick(t + Duration::from_millis(6999))).is_empty());
        assert!(c.is_leading());
    }

    #[test]
    fn lease_running_out_stops_leading_at_once() {
        let t = Instant::now();
        let mut c = leading(t);
        assert_eq!(c.handle(Input::Tick(t + TTL)), vec![
            Action::StopLeading,
            Action::Abandon { id: 7 },
            Action::Follow { leader: None },
            Action::GrantLease
        ]);
        assert!(!c.is_leading());
        assert_eq!(c.valid_until(), None);
    }

    #[test]
    fn keepalive_with_ttl_zero_means_the_lease_is_gone() {
        let t = Instant::now();
        let mut c = leading(t);
        let actions = c.handle(Input::KeptAlive { id: 7, ttl: Duration::ZERO, sent: t });
        assert_eq!(actions[0], Action::StopLeading);
        assert!(actions.contains(&Action::GrantLease));
        // While campaigning, too: abandon and start over, nothing to stop.
        let (mut c, _) = Contender::new("m1:5050");
        granted(&mut c, 7, t);
        let actions = c.handle(Input::KeptAlive { id: 7, ttl: Duration::ZERO, sent: t });
        assert_eq!(actions, vec![Action::Abandon { id: 7 }, Action::Follow { leader: None }, Action::GrantLease]);
    }

    #[test]
    fn fenced_write_deposes_a_leader_only() {
        let t = Instant::now();
        let mut c = leading(t);
        assert_eq!(c.handle(Input::Deposed)[0], Action::StopLeading);
        assert!(!c.is_leading());
        assert_eq!(c.handle(Input::Deposed), vec![]);
    }

    #[test]
    fn a_win_for_an_abandoned_lease_is_ignored() {
        let t = Instant::now();
        let (mut c, _) = Contender::new("m1:5050");
        granted(&mut c, 7, t);
        c.handle(Input::Tick(t + TTL));
        assert_eq!(c.handle(Input::Won { id: 7, key: b"k7".to_vec(), rev: 3 }), vec![]);
        assert!(!c.is_leading());
        // And a grant that arrives when none is wanted is returned.
        granted(&mut c, 8, t + TTL);
        assert_eq!(granted(&mut c, 9, t + TTL), vec![Action::Abandon { id: 9 }]);
    }

    fn seen(addr: &str, term: i64) -> Input {
        Input::LeaderSeen(Some(Leader { addr: addr.into(), term }))
    }

    #[test]
    fn followers_publish_the_leader_they_see_but_never_themselves() {
        let (mut c, _) = Contender::new("m1:5050");
        let m2 = Leader { addr: "m2:5050".into(), term: 4 };
        assert_eq!(c.handle(seen("m2:5050", 4)), vec![Action::Follow { leader: Some(m2) }]);
        assert_eq!(c.handle(seen("m2:5050", 4)), vec![], "no change, no action");
        let again = Leader { addr: "m2:5050".into(), term: 9 };
        assert_eq!(c.handle(seen("m2:5050", 9)), vec![Action::Follow { leader: Some(again) }], "a new term");
        assert_eq!(c.handle(seen("m1:5050", 3)), vec![Action::Follow { leader: None }]);
        let mut c = leading(Instant::now());
        assert_eq!(c.handle(seen("m2:5050", 4)), vec![], "a leader trusts its own lease");
    }

    #[test]
    fn shutdown_resigns_a_leader_and_then_ignores_everything() {
        let t = Instant::now();
        let mut c = leading(t);
        assert_eq!(c.handle(Input::Shutdown), vec![
            Action::Resign { key: b"k7".to_vec() },
            Action::StopLeading,
            Action::Abandon { id: 7 },
            Action::Exit
        ]);
        assert_eq!(c.handle(Input::Granted { id: 9, ttl: TTL, sent: t }), vec![]);
        assert_eq!(c.handle(Input::Tick(t + TTL * 2)), vec![]);
        let (mut c, _) = Contender::new("m1:5050");
        assert_eq!(c.handle(Input::Shutdown), vec![Action::Exit]);
    }

    #[test]
    fn leadership_guard_holds_until_its_deadline_and_revocation_is_final() {
        let t = Instant::now();
        let l = Leadership::until(t + TTL);
        assert!(l.holds(t));
        assert!(!l.holds(t + TTL));
        l.extend(t + TTL * 2);
        assert!(l.holds(t + TTL));
        l.extend(t + TTL);
        assert!(l.holds(t + TTL), "never moves backwards");
        l.revoke();
        assert!(!l.holds(t));
        l.extend(t + TTL * 3);
        assert!(!l.holds(t), "revoked stays revoked");
        assert!(Leadership::forever().holds(t + TTL * 1000));
    }
}
