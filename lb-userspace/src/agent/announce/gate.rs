//! The start-up gate: a (re)started agent announces nothing until it knows its backends' health
//! and holds its peers' flow tables, so it never attracts connections it cannot steer (a node
//! that announced at once would take over connections its peers carry without knowing their
//! backends: the failure behind keepalived #1966 and loxilb #565).
//!
//! It waits for:
//! - the first round of health checks: every backend checked at start has a first result, or the
//!   longest check timeout (plus a little) has passed since the checks began;
//! - the flow snapshot of every configured peer it can reach, at most [`PEER_SNAPSHOT_WAIT`]. A
//!   peer whose sync listener refuses or does not answer our connection is not waited for: nobody
//!   there can send a snapshot. Each peer it announces without is logged with the reason.

use super::decide::Starting;
use crate::{agent::health::ProbeTarget, model::ServiceKey, sync::PeerStartup};
use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

/// Longest wait for the peers' snapshots.
pub(crate) const PEER_SNAPSHOT_WAIT: Duration = Duration::from_secs(5);
/// Added to the longest check timeout: a first check finishes within its timeout, and its result
/// then travels to the serve loop.
const HEALTH_GRACE: Duration = Duration::from_millis(250);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PeerWait {
    Waiting,
    Received,
    Unreachable,
}

pub(crate) struct StartGate {
    began: Instant,
    /// Checked backends without a first result, with the generation of their check.
    health: BTreeMap<(ServiceKey, IpAddr), u64>,
    health_deadline: Instant,
    peers: BTreeMap<SocketAddr, PeerWait>,
    peer_deadline: Instant,
    finished: bool,
}

impl StartGate {
    /// A gate for the checks `targets` (begun at `now`) and the configured `peers`.
    pub(crate) fn new(now: Instant, targets: &[ProbeTarget], peers: &[SocketAddr]) -> Self {
        let longest = targets
            .iter()
            .map(|t| t.check.timeout)
            .max()
            .unwrap_or_default();
        StartGate {
            began: now,
            health: targets
                .iter()
                .map(|t| ((t.key, t.addr), t.generation))
                .collect(),
            health_deadline: now + longest + HEALTH_GRACE,
            peers: peers.iter().map(|p| (*p, PeerWait::Waiting)).collect(),
            peer_deadline: now + PEER_SNAPSHOT_WAIT,
            finished: false,
        }
    }

    pub(crate) fn is_finished(&self) -> bool {
        self.finished
    }

    /// A check result arrived.
    pub(crate) fn health_result(&mut self, key: ServiceKey, addr: IpAddr, generation: u64) {
        if self.health.get(&(key, addr)) == Some(&generation) {
            self.health.remove(&(key, addr));
        }
    }

    /// The sync's view of the peers changed.
    pub(crate) fn peers(&mut self, view: &[PeerStartup]) {
        for p in view {
            if let Some(w) = self.peers.get_mut(&p.address) {
                *w = if p.snapshots > 0 {
                    PeerWait::Received
                } else if p.unreachable {
                    PeerWait::Unreachable
                } else {
                    PeerWait::Waiting
                };
            }
        }
    }

    /// What the node still waits for at `now`; `None` when it may announce.
    pub(crate) fn waiting_for(&self, now: Instant) -> Option<Starting> {
        if self.finished {
            return None;
        }
        if !self.health.is_empty() && now < self.health_deadline {
            return Some(Starting::HealthChecks);
        }
        let waiting = self.peers.values().any(|w| *w == PeerWait::Waiting);
        if waiting && now < self.peer_deadline {
            return Some(Starting::PeerSnapshot);
        }
        None
    }

    /// When the gate may open by time alone (a deadline), while it is closed.
    pub(crate) fn next_deadline(&self, now: Instant) -> Option<Instant> {
        match self.waiting_for(now)? {
            Starting::HealthChecks => Some(self.health_deadline),
            Starting::PeerSnapshot => Some(self.peer_deadline),
        }
    }

    /// Open the gate if nothing is left to wait for at `now`: the log lines saying how the start
    /// ended, once; `None` while it waits (or after it opened).
    pub(crate) fn finish(&mut self, now: Instant) -> Option<Vec<String>> {
        if self.finished || self.waiting_for(now).is_some() {
            return None;
        }
        self.finished = true;
        let mut lines = vec![format!(
            "finished starting after {:.2} s",
            now.duration_since(self.began).as_secs_f64()
        )];
        if !self.health.is_empty() {
            lines.push(format!(
                "{} backends had no first health-check result within {:.2} s",
                self.health.len(),
                self.health_deadline
                    .duration_since(self.began)
                    .as_secs_f64()
            ));
        }
        for (peer, w) in &self.peers {
            lines.push(match w {
                PeerWait::Received => format!("holding peer {peer}'s snapshot"),
                PeerWait::Unreachable => {
                    format!("announcing without peer {peer}'s snapshot: not reachable")
                }
                PeerWait::Waiting => format!(
                    "announcing without peer {peer}'s snapshot: none within {PEER_SNAPSHOT_WAIT:?}"
                ),
            });
        }
        Some(lines)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Proto, check::CheckSpec};

    fn key() -> ServiceKey {
        ServiceKey {
            addr: IpAddr::from([10, 111, 100, 1]),
            port: 80,
            proto: Proto::Tcp,
        }
    }
    fn be(last: u8) -> IpAddr {
        IpAddr::from([10, 111, 1, last])
    }
    fn target(last: u8, timeout_ms: u64) -> ProbeTarget {
        let mut check = CheckSpec::default_for(Proto::Tcp);
        check.timeout = Duration::from_millis(timeout_ms);
        ProbeTarget {
            key: key(),
            addr: be(last),
            port: 80,
            check,
            generation: u64::from(last),
        }
    }
    fn peer(last: u8) -> SocketAddr {
        SocketAddr::from((be(last), 7946))
    }
    fn view(last: u8, snapshots: u64, unreachable: bool) -> PeerStartup {
        PeerStartup {
            address: peer(last),
            snapshots,
            unreachable,
        }
    }
    fn ms(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    #[test]
    fn nothing_to_wait_for_opens_at_once() {
        let t0 = Instant::now();
        let mut g = StartGate::new(t0, &[], &[]);
        assert_eq!(g.waiting_for(t0), None);
        assert_eq!(g.next_deadline(t0), None);
        let lines = g.finish(t0).unwrap();
        assert_eq!(lines, ["finished starting after 0.00 s"]);
        assert!(g.is_finished());
        assert_eq!(g.finish(t0), None, "only once");
    }

    #[test]
    fn health_first_round_or_the_longest_timeout() {
        let t0 = Instant::now();
        let targets = [target(11, 150), target(12, 300)];
        let mut g = StartGate::new(t0, &targets, &[]);
        assert_eq!(g.waiting_for(t0), Some(Starting::HealthChecks));
        assert_eq!(g.next_deadline(t0), Some(ms(t0, 550)));
        // A result of another generation (an older check) does not count.
        g.health_result(key(), be(11), 99);
        g.health_result(key(), be(11), 11);
        assert_eq!(g.finish(ms(t0, 100)), None);
        g.health_result(key(), be(12), 12);
        assert!(g.finish(ms(t0, 120)).is_some());

        // Without every result: open at the deadline, saying so.
        let mut g = StartGate::new(t0, &targets, &[]);
        g.health_result(key(), be(11), 11);
        assert_eq!(g.finish(ms(t0, 549)), None);
        let lines = g.finish(ms(t0, 550)).unwrap();
        assert!(
            lines[1].starts_with("1 backends had no first health-check result"),
            "{lines:?}"
        );
    }

    #[test]
    fn reachable_peers_are_waited_for_until_their_snapshot_or_the_bound() {
        let t0 = Instant::now();
        let peers = [peer(2), peer(3)];
        let mut g = StartGate::new(t0, &[], &peers);
        assert_eq!(g.waiting_for(t0), Some(Starting::PeerSnapshot));
        assert_eq!(g.next_deadline(t0), Some(t0 + PEER_SNAPSHOT_WAIT));
        g.peers(&[view(2, 1, false), view(3, 0, false)]);
        assert_eq!(g.finish(ms(t0, 300)), None, "peer 3 is reachable: wait");
        // Peer 3 does not answer: nobody will send its snapshot.
        g.peers(&[view(2, 1, false), view(3, 0, true)]);
        let lines = g.finish(ms(t0, 400)).unwrap();
        assert!(lines.contains(&"holding peer 10.111.1.2:7946's snapshot".to_string()));
        assert!(lines.contains(
            &"announcing without peer 10.111.1.3:7946's snapshot: not reachable".to_string()
        ));

        // A peer that answers but sends nothing: the bound.
        let mut g = StartGate::new(t0, &[], &peers);
        g.peers(&[view(2, 0, false), view(3, 2, true)]);
        assert_eq!(
            g.finish(t0 + PEER_SNAPSHOT_WAIT - Duration::from_millis(1)),
            None
        );
        let lines = g.finish(t0 + PEER_SNAPSHOT_WAIT).unwrap();
        assert!(lines.contains(&format!(
            "announcing without peer 10.111.1.2:7946's snapshot: none within {PEER_SNAPSHOT_WAIT:?}"
        )));
        // A snapshot counts even if the peer became unreachable afterwards.
        assert!(lines.contains(&"holding peer 10.111.1.3:7946's snapshot".to_string()));
    }

    #[test]
    fn health_is_named_first_while_both_are_awaited() {
        let t0 = Instant::now();
        let mut g = StartGate::new(t0, &[target(11, 1000)], &[peer(2)]);
        assert_eq!(g.waiting_for(t0), Some(Starting::HealthChecks));
        g.health_result(key(), be(11), 11);
        assert_eq!(g.waiting_for(t0), Some(Starting::PeerSnapshot));
        // A peer unknown to the configuration changes nothing.
        g.peers(&[view(9, 1, false)]);
        assert_eq!(g.waiting_for(t0), Some(Starting::PeerSnapshot));
        g.peers(&[view(2, 1, false)]);
        assert_eq!(g.waiting_for(t0), None);
    }
}
