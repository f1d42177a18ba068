//! Which backends of a VIP may take new flows, beyond each one's own health: the two rules that
//! look at a VIP's backends together.
//!
//! - **Never two primaries** ([`elect`]): among the backends checked `postgres:primary`, at most
//!   one is served. If several report primary (an old primary came back without being demoted),
//!   new flows keep going to the one the VIP already used (the incumbent). Without an incumbent
//!   (agent start, or the incumbent went down) the higher timeline wins (the later promotion),
//!   then the lowest address; and while some of them have not answered their first check yet, no
//!   choice is made at all, so the choice at start does not depend on which answered first.
//! - **Backups** ([`plan`]): a backup backend takes new flows only while no regular backend of the
//!   VIP can (none up with a weight above 0); then all usable backups share them by weight.
//!   HAProxy, by default, uses only the first backup (all of them with `option allbackups`).
//!
//! Both are pure functions of the backends' health and the VIP's configuration, so the data path
//! always gets what they decide in one ring update.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
};

/// A backend's health as its own checks see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Health {
    Up,
    Down,
    /// Role-checked and not answered yet: takes no new flows until its first check decides.
    Pending,
}

/// One backend of a VIP, as the rules need it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Member {
    pub(crate) addr: IpAddr,
    pub(crate) weight: u32,
    pub(crate) backup: bool,
    pub(crate) health: Health,
    /// Checked `postgres:primary`: one of the backends the never-two-primaries rule chooses from.
    pub(crate) primary_check: bool,
    /// Its last check passed: a primary-checked backend reports primary right now (an up one
    /// whose last check failed is on its way down, not a second primary).
    pub(crate) reporting: bool,
    /// The timeline its last passed check read (primaries only).
    pub(crate) timeline: Option<u32>,
}

/// Why the elected primary was chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Rule {
    /// The only backend reporting primary.
    Only,
    /// Several report primary; this one already served the VIP.
    Incumbent,
    /// Several, no incumbent: the highest timeline.
    Timeline,
    /// Several, no incumbent, no timeline to tell them apart: the lowest address.
    LowestAddress,
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Rule::Only => "the only primary",
            Rule::Incumbent => "the primary the VIP already used",
            Rule::Timeline => "the highest timeline",
            Rule::LowestAddress => "the lowest address (no timeline tells them apart)",
        })
    }
}

/// The outcome of the never-two-primaries rule for one VIP.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub(crate) struct Election {
    /// The primary that gets new flows; `None` if no backend is (yet) an eligible primary.
    pub(crate) winner: Option<(IpAddr, Rule)>,
    /// The up primary-checked backends: the winner is one of them, the others are held down.
    pub(crate) candidates: Vec<IpAddr>,
    /// Those of them whose last check reported primary, with their timelines (more than one:
    /// a conflict).
    pub(crate) primaries: Vec<(IpAddr, Option<u32>)>,
    /// Some primary-checked backend has not answered yet and there is no incumbent: no choice.
    pub(crate) waiting: bool,
}

impl Election {
    /// More than one backend reports primary right now.
    pub(crate) fn conflict(&self) -> bool {
        self.primaries.len() > 1
    }
}

/// Applies the never-two-primaries rule to a VIP's `members` given the primary it served so far.
pub(crate) fn elect(members: &[Member], incumbent: Option<IpAddr>) -> Election {
    let checked: Vec<&Member> = members.iter().filter(|m| m.primary_check).collect();
    let up: Vec<&Member> = checked
        .iter()
        .copied()
        .filter(|m| m.health == Health::Up)
        .collect();
    let candidates: Vec<(IpAddr, Option<u32>)> = up.iter().map(|m| (m.addr, m.timeline)).collect();
    let waiting = checked.iter().any(|m| m.health == Health::Pending);
    let winner = if let Some(inc) = incumbent.filter(|i| candidates.iter().any(|(a, _)| a == i)) {
        let rule = if candidates.len() == 1 {
            Rule::Only
        } else {
            Rule::Incumbent
        };
        Some((inc, rule))
    } else if waiting {
        None
    } else {
        // Highest timeline first, then the lowest address: `max_by_key` keeps the last maximum,
        // so compare addresses reversed.
        candidates
            .iter()
            .max_by_key(|(addr, tl)| (*tl, std::cmp::Reverse(*addr)))
            .map(|(addr, tl)| {
                let rule = if candidates.len() == 1 {
                    Rule::Only
                } else if candidates.iter().all(|(a, other)| a == addr || other < tl) {
                    Rule::Timeline
                } else {
                    Rule::LowestAddress
                };
                (*addr, rule)
            })
    };
    Election {
        winner,
        primaries: up
            .iter()
            .filter(|m| m.reporting)
            .map(|m| (m.addr, m.timeline))
            .collect(),
        candidates: candidates.into_iter().map(|(a, _)| a).collect(),
        waiting: waiting && winner.is_none(),
    }
}

/// Why a backend that its own checks call up gets no new flows, or why a backup does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Note {
    /// It reports primary, and another primary serves the VIP.
    AnotherPrimary(IpAddr),
    /// Its first role check has not answered yet.
    WaitingFirstCheck,
    /// Several primaries and some not checked yet: no choice made.
    WaitingElection,
    /// A backup, unused while a regular backend can take new flows.
    BackupStandingBy,
    /// A backup, taking new flows because no regular backend can.
    BackupServing,
}

impl Note {
    /// The backend gets no new flows and its flows are re-steered, though its checks pass.
    pub(crate) fn holds_down(&self) -> bool {
        matches!(
            self,
            Note::AnotherPrimary(_) | Note::WaitingFirstCheck | Note::WaitingElection
        )
    }
}

impl fmt::Display for Note {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Note::AnotherPrimary(a) => write!(f, "another primary is serving: {a}"),
            Note::WaitingFirstCheck => f.write_str("waiting for its first check"),
            Note::WaitingElection => {
                f.write_str("several primaries; waiting for every first check to choose")
            }
            Note::BackupStandingBy => f.write_str("backup, standing by"),
            Note::BackupServing => f.write_str("backup, serving: no regular backend is up"),
        }
    }
}

/// What the data path gets for a VIP.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub(crate) struct Plan {
    /// Weight per backend for the ring: the configured one, or 0 for a backup standing by (like a
    /// drain: no new flows, its existing flows stay).
    pub(crate) weights: BTreeMap<IpAddr, u32>,
    /// Backends that get no new flows and whose flows are re-steered: down, not checked yet, or
    /// a primary that lost the election.
    pub(crate) down: BTreeSet<IpAddr>,
    pub(crate) notes: BTreeMap<IpAddr, Note>,
}

/// Applies both rules: the election's losers (and, while it waits, every primary-checked
/// backend) are down; backups stand by while a regular backend can take new flows.
pub(crate) fn plan(members: &[Member], election: &Election) -> Plan {
    let mut p = Plan::default();
    let winner = election.winner.map(|(a, _)| a);
    for m in members {
        p.weights.insert(m.addr, m.weight);
        let note = match m.health {
            Health::Down => {
                p.down.insert(m.addr);
                None
            }
            Health::Pending => Some(Note::WaitingFirstCheck),
            Health::Up if m.primary_check && winner.is_none() && election.waiting => {
                Some(Note::WaitingElection)
            }
            Health::Up if m.primary_check && winner.is_some_and(|w| w != m.addr) => {
                Some(Note::AnotherPrimary(winner.expect("checked")))
            }
            Health::Up => None,
        };
        if let Some(n) = note {
            p.down.insert(m.addr);
            p.notes.insert(m.addr, n);
        }
    }
    let usable = |m: &&Member| !p.down.contains(&m.addr) && m.weight > 0;
    let regular_usable = members.iter().filter(|m| !m.backup).any(|m| usable(&m));
    for m in members
        .iter()
        .filter(|m| m.backup && !p.down.contains(&m.addr))
    {
        if regular_usable {
            p.weights.insert(m.addr, 0);
            p.notes.insert(m.addr, Note::BackupStandingBy);
        } else {
            p.notes.insert(m.addr, Note::BackupServing);
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(last: u8) -> IpAddr {
        IpAddr::from([10, 111, 1, last])
    }

    fn primary(last: u8, health: Health, timeline: Option<u32>) -> Member {
        Member {
            addr: a(last),
            weight: 1,
            backup: false,
            health,
            primary_check: true,
            reporting: health == Health::Up,
            timeline,
        }
    }

    fn plain(last: u8, health: Health, backup: bool) -> Member {
        Member {
            addr: a(last),
            weight: 1,
            backup,
            health,
            primary_check: false,
            reporting: health == Health::Up,
            timeline: None,
        }
    }

    #[test]
    fn one_primary_is_simply_served() {
        let m = [
            primary(21, Health::Up, Some(1)),
            primary(22, Health::Down, None),
        ];
        let e = elect(&m, None);
        assert_eq!(e.winner, Some((a(21), Rule::Only)));
        assert!(!e.conflict());
        let p = plan(&m, &e);
        assert_eq!(p.down, BTreeSet::from([a(22)]));
        assert!(p.notes.is_empty());
    }

    #[test]
    fn the_incumbent_keeps_new_flows_whatever_the_timelines() {
        // db2 was promoted (timeline 2) and serves; the old primary comes back on timeline 1 —
        // and also the other way round: the incumbent wins even with the lower timeline.
        for (inc, other) in [(22, 21), (21, 22)] {
            let m = [
                primary(21, Health::Up, Some(1)),
                primary(22, Health::Up, Some(2)),
            ];
            let e = elect(&m, Some(a(inc)));
            assert_eq!(e.winner, Some((a(inc), Rule::Incumbent)));
            assert!(e.conflict());
            let p = plan(&m, &e);
            assert_eq!(p.down, BTreeSet::from([a(other)]));
            assert_eq!(p.notes[&a(other)], Note::AnotherPrimary(a(inc)));
            assert_eq!(
                p.notes[&a(other)].to_string(),
                format!("another primary is serving: {}", a(inc))
            );
        }
    }

    #[test]
    fn without_an_incumbent_the_higher_timeline_then_the_lower_address_wins() {
        let m = [
            primary(21, Health::Up, Some(1)),
            primary(22, Health::Up, Some(2)),
        ];
        assert_eq!(elect(&m, None).winner, Some((a(22), Rule::Timeline)));
        // An incumbent that is down no longer counts.
        let m2 = [
            primary(21, Health::Up, Some(1)),
            primary(22, Health::Up, Some(2)),
            primary(23, Health::Down, Some(3)),
        ];
        assert_eq!(
            elect(&m2, Some(a(23))).winner,
            Some((a(22), Rule::Timeline))
        );
        let same = [
            primary(22, Health::Up, Some(2)),
            primary(21, Health::Up, Some(2)),
            primary(20, Health::Up, Some(1)),
        ];
        assert_eq!(
            elect(&same, None).winner,
            Some((a(21), Rule::LowestAddress))
        );
        let unknown = [primary(23, Health::Up, None), primary(22, Health::Up, None)];
        assert_eq!(
            elect(&unknown, None).winner,
            Some((a(22), Rule::LowestAddress))
        );
    }

    #[test]
    fn a_failing_incumbent_keeps_the_flows_but_is_no_conflict() {
        // The old primary stopped: still up (fall not reached) but its last check failed; the
        // promoted one reports primary. New flows stay (on the dying one) until it is down, and
        // nobody warns about two primaries.
        let mut m = [
            primary(21, Health::Up, Some(1)),
            primary(22, Health::Up, Some(2)),
        ];
        m[0].reporting = false;
        let e = elect(&m, Some(a(21)));
        assert_eq!(e.winner, Some((a(21), Rule::Incumbent)));
        assert!(!e.conflict());
        assert_eq!(plan(&m, &e).down, BTreeSet::from([a(22)]));
        m[0].health = Health::Down;
        let e = elect(&m, Some(a(21)));
        assert_eq!(e.winner, Some((a(22), Rule::Only)));
    }

    #[test]
    fn no_choice_while_a_first_check_is_outstanding() {
        let m = [
            primary(21, Health::Up, Some(1)),
            primary(22, Health::Pending, None),
        ];
        let e = elect(&m, None);
        assert_eq!(e.winner, None);
        assert!(e.waiting);
        let p = plan(&m, &e);
        assert_eq!(p.down, BTreeSet::from([a(21), a(22)]));
        assert_eq!(p.notes[&a(21)], Note::WaitingElection);
        assert_eq!(p.notes[&a(22)], Note::WaitingFirstCheck);
        // With an incumbent serving, a newcomer's first check is not waited for.
        let e = elect(&m, Some(a(21)));
        assert_eq!(e.winner, Some((a(21), Rule::Only)));
        assert_eq!(plan(&m, &e).down, BTreeSet::from([a(22)]));
    }

    #[test]
    fn backups_serve_only_while_no_regular_backend_can() {
        let mut m = vec![
            plain(22, Health::Up, false),
            plain(23, Health::Up, false),
            plain(21, Health::Up, true),
        ];
        let p = plan(&m, &elect(&m, None));
        assert_eq!(p.weights[&a(21)], 0);
        assert_eq!(p.notes[&a(21)], Note::BackupStandingBy);
        assert!(p.down.is_empty());
        // One regular backend left: still no backup.
        m[0].health = Health::Down;
        let p = plan(&m, &elect(&m, None));
        assert_eq!(p.weights[&a(21)], 0);
        // Every regular one down (or drained): the backup takes new flows at its weight.
        m[1].weight = 0;
        let p = plan(&m, &elect(&m, None));
        assert_eq!(p.weights[&a(21)], 1);
        assert_eq!(p.notes[&a(21)], Note::BackupServing);
        m[1].health = Health::Down;
        m.push(Member {
            weight: 3,
            ..plain(24, Health::Up, true)
        });
        let p = plan(&m, &elect(&m, None));
        // All usable backups share the load by weight.
        assert_eq!((p.weights[&a(21)], p.weights[&a(24)]), (1, 3));
        // A regular backend back up: the backups stand by again (their flows stay).
        m[0].health = Health::Up;
        let p = plan(&m, &elect(&m, None));
        assert_eq!((p.weights[&a(21)], p.weights[&a(24)]), (0, 0));
        assert!(!p.down.contains(&a(21)));
    }

    #[test]
    fn a_primary_backup_of_a_read_vip() {
        // Read VIP: replicas db2, db3 regular; db1 the backup, checked postgres:primary.
        let mut m = vec![
            plain(22, Health::Up, false),
            plain(23, Health::Up, false),
            Member {
                backup: true,
                ..primary(21, Health::Up, Some(1))
            },
        ];
        let e = elect(&m, None);
        assert_eq!(e.winner, Some((a(21), Rule::Only)));
        assert_eq!(plan(&m, &e).weights[&a(21)], 0);
        m[0].health = Health::Down;
        m[1].health = Health::Down;
        let p = plan(&m, &elect(&m, Some(a(21))));
        assert_eq!(p.weights[&a(21)], 1);
        assert!(!p.down.contains(&a(21)));
    }
}
