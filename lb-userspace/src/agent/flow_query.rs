//! `xlb flows`: list, count and flush the flows of the table, each answered by one walk on a
//! blocking thread with the agent's own handle to the table (`agent::flows::FlowWalker`), never in
//! the serve loop. The connection task that got the request runs it: it asks the loop for the
//! configured VIPs (to check the filter), then waits for the walk while the loop goes on serving
//! health results, peer sync and other requests.
//!
//! - A list keeps the `limit` most recent matching flows in a bounded min-heap while it walks
//!   (`TopN`): a million entries cost a million comparisons and no sort of the table.
//! - A count adds up in the walking thread, per group if asked (`--by`).
//! - A flush collects the matching keys, then deletes them in batches. A flow whose entry is gone
//!   takes a backend as a new flow at its next packet.
//!
//! One walk for a query at a time: a second `xlb flows` waits for the first rather than share
//! the machine's cores with it (a walk of a million entries takes about a quarter of a second).

use crate::{
    agent::flows::FlowWalker,
    api::{
        FlowCountReport, FlowEntry, FlowFlushReport, FlowGroup, FlowListReport, Request, Response,
        VipSummary, WalkReport, vip_string,
    },
    dataplane::DataplaneError,
    model::{
        Proto, ServiceKey,
        flows::{CountBy, FlowFilter, Origin, proto_of, vip_of},
    },
};
use lb_common::{Addr, FlowKey, FlowValue};
use std::{
    cmp::{Ordering as CmpOrdering, Reverse},
    collections::{BinaryHeap, HashMap},
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};
use tokio_util::task::TaskTracker;

/// Most flows one `xlb flows` lists: the answer is one line of JSON, which the CLI reads up to
/// `api::MAX_LINE` (4 MiB; a flow is about 150 bytes of it).
pub(crate) const MAX_LIMIT: u32 = 10_000;

#[derive(Debug, thiserror::Error)]
pub(crate) enum FlowQueryError {
    #[error("unknown VIP {0}")]
    UnknownVip(ServiceKey),
    #[error("{backend} is not a backend of VIP {vip}")]
    NotABackend { vip: ServiceKey, backend: IpAddr },
    #[error("{0} is not a backend of any VIP")]
    NoSuchBackend(IpAddr),
    #[error("{backend} is not a backend of any {proto} VIP")]
    NoSuchBackendOf { backend: IpAddr, proto: Proto },
    #[error("--limit {0} is out of range (1-{MAX_LIMIT})")]
    Limit(u32),
    #[error("flushing needs a filter (VIP, --backend, --client, --proto) or --all for every flow")]
    FlushNeedsFilter,
    #[error("walking the flow table: {0}")]
    Walk(#[source] DataplaneError),
    #[error("a walk of the flow table failed: {0}")]
    Task(#[source] tokio::task::JoinError),
}

/// The flow queries of one agent: its handle to the table and what they counted.
pub(crate) struct FlowQueries {
    walker: Arc<dyn FlowWalker>,
    tasks: TaskTracker,
    one: tokio::sync::Mutex<()>,
    flushed: AtomicU64,
}

impl FlowQueries {
    /// Walks run on `tasks`' blocking threads.
    pub(crate) fn new(walker: Arc<dyn FlowWalker>, tasks: TaskTracker) -> Arc<Self> {
        Arc::new(FlowQueries {
            walker,
            tasks,
            one: tokio::sync::Mutex::new(()),
            flushed: AtomicU64::new(0),
        })
    }

    /// Flows deleted by flushes since the agent started (`xlb_flows_flushed_total`).
    pub(crate) fn flushed(&self) -> u64 {
        self.flushed.load(Ordering::Relaxed)
    }

    /// Whether `req` is one of the flow queries `answer` takes.
    pub(crate) fn handles(req: &Request) -> bool {
        matches!(
            req,
            Request::FlowList { .. } | Request::FlowCount { .. } | Request::FlowFlush { .. }
        )
    }

    /// Answer a flow query, its filter checked against the configured `vips`.
    pub(crate) async fn answer(&self, req: Request, vips: &[VipSummary]) -> Response {
        self.run(req, vips)
            .await
            .unwrap_or_else(|e| Response::Error {
                message: e.to_string(),
            })
    }

    async fn run(&self, req: Request, vips: &[VipSummary]) -> Result<Response, FlowQueryError> {
        let query = Query::of(req).expect("only flow queries are handed to FlowQueries");
        check_filter(query.filter(), vips)?;
        query.check()?;
        let _one = self.one.lock().await;
        let walker = self.walker.clone();
        let resp = self
            .tasks
            .spawn_blocking(move || query.run(walker.as_ref()))
            .await
            .map_err(FlowQueryError::Task)?
            .map_err(FlowQueryError::Walk)?;
        if let Response::FlowFlush { flush } = &resp {
            self.flushed.fetch_add(flush.flushed, Ordering::Relaxed);
            log::info!(
                "flushed {} flows ({}; {} matched in {} entries)",
                flush.flushed,
                query.filter(),
                flush.walk.matched,
                flush.walk.entries
            );
        }
        Ok(resp)
    }
}

/// A flow request, taken apart.
#[derive(Clone, Copy, Debug)]
enum Query {
    List {
        filter: FlowFilter,
        limit: u32,
    },
    Count {
        filter: FlowFilter,
        by: Option<CountBy>,
    },
    Flush {
        filter: FlowFilter,
    },
    FlushAll,
}

impl Query {
    fn of(req: Request) -> Option<Query> {
        Some(match req {
            Request::FlowList { filter, limit } => Query::List { filter, limit },
            Request::FlowCount { filter, by } => Query::Count { filter, by },
            Request::FlowFlush { filter, all } if all && filter.is_empty() => Query::FlushAll,
            Request::FlowFlush { filter, .. } => Query::Flush { filter },
            _ => return None,
        })
    }

    fn filter(&self) -> &FlowFilter {
        static EVERY: FlowFilter = FlowFilter {
            vip: None,
            proto: None,
            backend: None,
            client: None,
        };
        match self {
            Query::List { filter, .. } | Query::Count { filter, .. } | Query::Flush { filter } => {
                filter
            }
            Query::FlushAll => &EVERY,
        }
    }

    /// What is wrong with the query itself, before any walk.
    fn check(&self) -> Result<(), FlowQueryError> {
        match *self {
            Query::List { limit, .. } if limit == 0 || limit > MAX_LIMIT => {
                Err(FlowQueryError::Limit(limit))
            }
            // A slip of the keyboard must not reset every connection of the node.
            Query::Flush { filter } if filter.is_empty() => Err(FlowQueryError::FlushNeedsFilter),
            _ => Ok(()),
        }
    }

    fn run(&self, walker: &dyn FlowWalker) -> Result<Response, DataplaneError> {
        Ok(match *self {
            Query::List { filter, limit } => Response::FlowList {
                flows: list(walker, &filter, limit as usize)?,
            },
            Query::Count { filter, by } => Response::FlowCount {
                count: count(walker, &filter, by)?,
            },
            Query::Flush { filter } => Response::FlowFlush {
                flush: flush(walker, &filter)?,
            },
            Query::FlushAll => Response::FlowFlush {
                flush: flush(walker, &FlowFilter::default())?,
            },
        })
    }
}

/// A filter's VIP must be configured, and its backend a backend of that VIP (or, without a VIP,
/// of some VIP of the filter's protocol): a typo is an error, not an empty answer. Flows of a
/// backend that is no longer configured need no flush: their next packet re-steers them.
pub(crate) fn check_filter(filter: &FlowFilter, vips: &[VipSummary]) -> Result<(), FlowQueryError> {
    let key = |v: &VipSummary| ServiceKey {
        addr: v.address,
        port: v.port,
        proto: v.proto,
    };
    if let Some(vip) = filter.vip {
        let Some(summary) = vips.iter().find(|v| key(v) == vip) else {
            return Err(FlowQueryError::UnknownVip(vip));
        };
        if let Some(backend) = filter.backend
            && !summary.backends.iter().any(|b| b.address == backend)
        {
            return Err(FlowQueryError::NotABackend { vip, backend });
        }
        return Ok(());
    }
    if let Some(backend) = filter.backend {
        let known = vips
            .iter()
            .filter(|v| filter.proto.is_none_or(|p| p == v.proto))
            .any(|v| v.backends.iter().any(|b| b.address == backend));
        if !known {
            return Err(match filter.proto {
                Some(proto) => FlowQueryError::NoSuchBackendOf { backend, proto },
                None => FlowQueryError::NoSuchBackend(backend),
            });
        }
    }
    Ok(())
}

/// The `cap` greatest items pushed into it, kept in a min-heap of at most `cap` items: each push
/// is one comparison with the least kept item (plus a sift when it enters).
pub(crate) struct TopN<T: Ord> {
    cap: usize,
    heap: BinaryHeap<Reverse<T>>,
}

impl<T: Ord> TopN<T> {
    pub(crate) fn new(cap: usize) -> Self {
        TopN {
            cap,
            heap: BinaryHeap::with_capacity(cap.min(MAX_LIMIT as usize)),
        }
    }

    pub(crate) fn push(&mut self, item: T) {
        if self.heap.len() < self.cap {
            self.heap.push(Reverse(item));
        } else if let Some(mut least) = self.heap.peek_mut()
            && item > least.0
        {
            // Dropping the `PeekMut` sifts the new item down to its place.
            *least = Reverse(item);
        }
    }

    /// The kept items, greatest first.
    pub(crate) fn into_sorted(self) -> Vec<T> {
        // Ascending `Reverse<T>` is descending `T`.
        self.heap
            .into_sorted_vec()
            .into_iter()
            .map(|r| r.0)
            .collect()
    }
}

/// A flow ordered by its last packet (then by its key, so equal times still order the same way
/// every time).
struct Recent {
    key: FlowKey,
    value: FlowValue,
}

impl Recent {
    fn rank(&self) -> (u64, [u8; 16], u16, [u8; 16], u16, u8) {
        let k = &self.key;
        (
            self.value.last_seen_ns,
            k.src_addr.octets(),
            k.src_port,
            k.dst_addr.octets(),
            k.dst_port,
            k.proto,
        )
    }
}

impl PartialEq for Recent {
    fn eq(&self, other: &Self) -> bool {
        self.rank() == other.rank()
    }
}
impl Eq for Recent {}
impl PartialOrd for Recent {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}
impl Ord for Recent {
    fn cmp(&self, other: &Self) -> CmpOrdering {
        self.rank().cmp(&other.rank())
    }
}

/// Walk the table, calling `hit` for each entry that matches `filter`.
fn walk_matching(
    walker: &dyn FlowWalker,
    filter: &FlowFilter,
    mut hit: impl FnMut(&FlowKey, &FlowValue),
) -> Result<WalkReport, DataplaneError> {
    let m = filter.matcher();
    let started = Instant::now();
    let (mut entries, mut matched) = (0u64, 0u64);
    walker.walk(&mut |key, value| {
        entries += 1;
        if m.matches(key, value) {
            matched += 1;
            hit(key, value);
        }
    })?;
    Ok(WalkReport {
        entries,
        matched,
        walk_ms: started.elapsed().as_secs_f64() * 1e3,
    })
}

/// The `limit` most recent flows that match `filter`.
pub(crate) fn list(
    walker: &dyn FlowWalker,
    filter: &FlowFilter,
    limit: usize,
) -> Result<FlowListReport, DataplaneError> {
    let mut top = TopN::new(limit);
    let walk = walk_matching(walker, filter, |key, value| {
        top.push(Recent {
            key: *key,
            value: *value,
        });
    })?;
    let now = walker.now_ns();
    let flows: Vec<FlowEntry> = top
        .into_sorted()
        .iter()
        .filter_map(|r| entry(&r.key, &r.value, now))
        .collect();
    Ok(FlowListReport {
        walk,
        left_out: walk.matched.saturating_sub(flows.len() as u64),
        flows,
    })
}

fn entry(key: &FlowKey, value: &FlowValue, now_ns: u64) -> Option<FlowEntry> {
    let vip = vip_of(key)?;
    Some(FlowEntry {
        client: IpAddr::from(key.src_addr),
        client_port: u16::from_be(key.src_port),
        vip: vip_string(&vip),
        proto: vip.proto,
        backend: IpAddr::from(value.backend_addr),
        // The coarse clock of another CPU may be a tick ahead of ours.
        age_ms: now_ns.saturating_sub(value.last_seen_ns) / 1_000_000,
        origin: Origin::of(value),
    })
}

/// What a count groups by, as read from an entry (formatted once per group, not per entry).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum GroupKey {
    /// Address, port in network order, IP protocol.
    Vip(Addr, u16, u8),
    Backend(Addr),
    Origin(Origin),
}

impl GroupKey {
    fn of(by: CountBy, key: &FlowKey, value: &FlowValue) -> Self {
        match by {
            CountBy::Vip => GroupKey::Vip(key.dst_addr, key.dst_port, key.proto),
            CountBy::Backend => GroupKey::Backend(value.backend_addr),
            CountBy::Origin => GroupKey::Origin(Origin::of(value)),
        }
    }

    fn name(self) -> String {
        match self {
            GroupKey::Vip(addr, port, proto) => {
                let vip = SocketAddr::new(IpAddr::from(addr), u16::from_be(port));
                match proto_of(proto) {
                    Some(p) => format!("{vip}/{p}"),
                    None => format!("{vip}/{proto}"),
                }
            }
            GroupKey::Backend(addr) => IpAddr::from(addr).to_string(),
            GroupKey::Origin(o) => o.to_string(),
        }
    }
}

/// How many flows match `filter`, per group of `by` if given (most flows first).
pub(crate) fn count(
    walker: &dyn FlowWalker,
    filter: &FlowFilter,
    by: Option<CountBy>,
) -> Result<FlowCountReport, DataplaneError> {
    let mut groups: HashMap<GroupKey, u64> = HashMap::new();
    let walk = walk_matching(walker, filter, |key, value| {
        if let Some(by) = by {
            *groups.entry(GroupKey::of(by, key, value)).or_insert(0) += 1;
        }
    })?;
    let mut groups: Vec<FlowGroup> = groups
        .into_iter()
        .map(|(k, flows)| FlowGroup {
            key: k.name(),
            flows,
        })
        .collect();
    groups.sort_by(|a, b| b.flows.cmp(&a.flows).then_with(|| a.key.cmp(&b.key)));
    Ok(FlowCountReport { walk, by, groups })
}

/// Delete the flows that match `filter`. A flow that changes between the walk and the deletion
/// (re-steered meanwhile) is deleted all the same: its next packet takes a backend anew.
pub(crate) fn flush(
    walker: &dyn FlowWalker,
    filter: &FlowFilter,
) -> Result<FlowFlushReport, DataplaneError> {
    let mut keys = Vec::new();
    let walk = walk_matching(walker, filter, |key, _| keys.push(*key))?;
    let started = Instant::now();
    let flushed = walker.delete(&keys)?;
    Ok(FlowFlushReport {
        walk,
        flushed,
        delete_ms: started.elapsed().as_secs_f64() * 1e3,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        api::BackendSummary,
        model::{
            Forward,
            check::CheckSpec,
            flows::{ClientPrefix, tests::flow},
        },
    };
    use lb_common::{FLOW_F_PEER, FlowEvent};
    use std::{sync::Mutex, time::Duration};

    /// A flow table in memory.
    struct VecTable {
        flows: Mutex<Vec<(FlowKey, FlowValue)>>,
        now: u64,
    }

    impl FlowWalker for VecTable {
        fn counts(&self) -> Result<crate::dataplane::FlowCounts, DataplaneError> {
            unreachable!("not used by flow queries")
        }
        fn snapshot(&self, _: Duration) -> Result<Vec<FlowEvent>, DataplaneError> {
            unreachable!("not used by flow queries")
        }
        fn walk(&self, f: &mut dyn FnMut(&FlowKey, &FlowValue)) -> Result<(), DataplaneError> {
            for (k, v) in self.flows.lock().unwrap().iter() {
                f(k, v);
            }
            Ok(())
        }
        fn delete(&self, keys: &[FlowKey]) -> Result<u64, DataplaneError> {
            let mut flows = self.flows.lock().unwrap();
            let before = flows.len();
            flows.retain(|(k, _)| !keys.contains(k));
            Ok((before - flows.len()) as u64)
        }
        fn now_ns(&self) -> u64 {
            self.now
        }
    }

    const MS: u64 = 1_000_000;
    const VIP: &str = "10.111.100.1";

    /// 30 TCP flows from 10.111.0.2 (ports 40000..) round robin over three backends, flow i seen
    /// i ms ago; every third of be1's is a peer's. Two UDP flows from 10.111.9.9 to be3.
    fn table() -> VecTable {
        let mut flows = Vec::new();
        for i in 0..30u16 {
            let be = format!("10.111.1.{}", 11 + i % 3);
            let flags = if i % 9 == 0 { FLOW_F_PEER } else { 0 };
            let seen = 1000 * MS - u64::from(i) * MS;
            flows.push(flow(
                "10.111.0.2",
                40000 + i,
                VIP,
                Proto::Tcp,
                &be,
                seen,
                flags,
            ));
        }
        for i in 0..2 {
            flows.push(flow(
                "10.111.9.9",
                5000 + i,
                VIP,
                Proto::Udp,
                "10.111.1.13",
                0,
                0,
            ));
        }
        VecTable {
            flows: Mutex::new(flows),
            now: 1000 * MS,
        }
    }

    fn a(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn tcp_vip() -> ServiceKey {
        ServiceKey {
            addr: a(VIP),
            port: 80,
            proto: Proto::Tcp,
        }
    }

    fn backend(s: &str) -> FlowFilter {
        FlowFilter {
            backend: Some(a(s)),
            ..Default::default()
        }
    }

    #[test]
    fn top_n_keeps_the_greatest_in_order() {
        let mut top = TopN::new(3);
        for x in [5, 1, 9, 3, 7, 9, 2, 8] {
            top.push(x);
        }
        assert_eq!(top.into_sorted(), vec![9, 9, 8]);
        let mut few = TopN::new(10);
        for x in [2, 1, 3] {
            few.push(x);
        }
        assert_eq!(few.into_sorted(), vec![3, 2, 1]);
        let mut none = TopN::new(0);
        none.push(1);
        assert!(none.into_sorted().is_empty());
        // The same as sorting everything, on a larger input with repeats.
        let input: Vec<u32> = (0..10_000u32)
            .map(|i| i.wrapping_mul(2_654_435_761) % 997)
            .collect();
        let mut top = TopN::new(100);
        for x in &input {
            top.push(*x);
        }
        let mut all = input.clone();
        all.sort_unstable_by(|a, b| b.cmp(a));
        assert_eq!(top.into_sorted(), all[..100].to_vec());
    }

    #[test]
    fn a_list_is_the_most_recent_matching_flows() {
        let t = table();
        let r = list(&t, &FlowFilter::default(), 5).unwrap();
        assert_eq!((r.walk.entries, r.walk.matched, r.left_out), (32, 32, 27));
        // Newest first: the UDP flows were seen 1000 ms ago, TCP flow i i ms ago.
        let ports: Vec<u16> = r.flows.iter().map(|f| f.client_port).collect();
        assert_eq!(ports, vec![40000, 40001, 40002, 40003, 40004]);
        let first = &r.flows[0];
        assert_eq!(first.client, a("10.111.0.2"));
        assert_eq!(first.vip, "10.111.100.1:80");
        assert_eq!(first.proto, Proto::Tcp);
        assert_eq!(first.backend, a("10.111.1.11"));
        assert_eq!(first.origin, Origin::Peer);
        assert_eq!((first.age_ms, r.flows[4].age_ms), (0, 4));
        assert_eq!(r.flows[1].origin, Origin::Local);

        let be2 = list(&t, &backend("10.111.1.12"), 50).unwrap();
        assert_eq!(
            (be2.walk.matched, be2.flows.len(), be2.left_out),
            (10, 10, 0)
        );
        assert!(be2.flows.iter().all(|f| f.backend == a("10.111.1.12")));
        let udp = FlowFilter {
            proto: Some(Proto::Udp),
            ..Default::default()
        };
        let r = list(&t, &udp, 50).unwrap();
        assert_eq!(r.flows.len(), 2);
        assert!(
            r.flows
                .iter()
                .all(|f| f.proto == Proto::Udp && f.age_ms == 1000)
        );
    }

    #[test]
    fn counts_group_by_vip_backend_and_origin() {
        let t = table();
        let total = count(&t, &FlowFilter::default(), None).unwrap();
        assert_eq!((total.walk.matched, total.groups.len()), (32, 0));
        let groups = |by, filter: &FlowFilter| -> Vec<(String, u64)> {
            count(&t, filter, Some(by))
                .unwrap()
                .groups
                .into_iter()
                .map(|g| (g.key, g.flows))
                .collect()
        };
        let every = FlowFilter::default();
        assert_eq!(
            groups(CountBy::Backend, &every),
            vec![
                ("10.111.1.13".to_string(), 12),
                ("10.111.1.11".to_string(), 10),
                ("10.111.1.12".to_string(), 10),
            ]
        );
        assert_eq!(
            groups(CountBy::Vip, &every),
            vec![
                ("10.111.100.1:80/tcp".to_string(), 30),
                ("10.111.100.1:80/udp".to_string(), 2),
            ]
        );
        assert_eq!(
            groups(CountBy::Origin, &every),
            vec![("local".to_string(), 28), ("peer".to_string(), 4)]
        );
        let tcp = FlowFilter {
            vip: Some(tcp_vip()),
            ..Default::default()
        };
        assert_eq!(
            groups(CountBy::Backend, &tcp),
            vec![
                ("10.111.1.11".to_string(), 10),
                ("10.111.1.12".to_string(), 10),
                ("10.111.1.13".to_string(), 10),
            ]
        );
    }

    #[test]
    fn a_flush_deletes_exactly_the_matching_flows() {
        let t = table();
        let client = FlowFilter {
            client: Some(ClientPrefix {
                addr: std::net::IpAddr::from([10, 111, 9, 0]),
                len: 24,
            }),
            ..backend("10.111.1.13")
        };
        let r = flush(&t, &client).unwrap();
        assert_eq!((r.walk.matched, r.flushed), (2, 2));
        let r = flush(&t, &backend("10.111.1.11")).unwrap();
        assert_eq!((r.walk.entries, r.walk.matched, r.flushed), (30, 10, 10));
        let left = count(&t, &FlowFilter::default(), Some(CountBy::Backend)).unwrap();
        let keys: Vec<&str> = left.groups.iter().map(|g| g.key.as_str()).collect();
        assert_eq!(keys, vec!["10.111.1.12", "10.111.1.13"]);
        assert_eq!(left.walk.matched, 20);
    }

    fn vips() -> Vec<VipSummary> {
        let summary = |port, proto, backends: &[&str]| VipSummary {
            vip: format!("{VIP}:{port}"),
            address: a(VIP),
            port,
            proto,
            forward: Forward::Ipip,
            check: CheckSpec::default_for(proto),
            backends: backends
                .iter()
                .map(|b| BackendSummary {
                    address: a(b),
                    weight: 1,
                    check: None,
                    backup: false,
                })
                .collect(),
            icmp_echo: true,
            allow_src: vec![],
            deny_src: vec![],
            src_rate: None,
            src_burst: None,
            vip_rate: None,
            vip_burst: None,
        };
        vec![
            summary(80, Proto::Tcp, &["10.111.1.11", "10.111.1.12"]),
            summary(53, Proto::Udp, &["10.111.1.13"]),
        ]
    }

    #[test]
    fn filters_name_only_configured_vips_and_backends() {
        let vips = vips();
        let check = |f: FlowFilter| check_filter(&f, &vips).map_err(|e| e.to_string());
        assert_eq!(check(FlowFilter::default()), Ok(()));
        let vip = FlowFilter {
            vip: Some(tcp_vip()),
            ..backend("10.111.1.12")
        };
        assert_eq!(check(vip), Ok(()));
        assert_eq!(check(backend("10.111.1.13")), Ok(()));
        assert_eq!(
            check(FlowFilter {
                vip: Some(ServiceKey {
                    port: 81,
                    ..tcp_vip()
                }),
                ..Default::default()
            }),
            Err("unknown VIP 10.111.100.1:81/tcp".into())
        );
        assert_eq!(
            check(FlowFilter {
                vip: Some(tcp_vip()),
                ..backend("10.111.1.13")
            }),
            Err("10.111.1.13 is not a backend of VIP 10.111.100.1:80/tcp".into())
        );
        assert_eq!(
            check(backend("10.111.1.99")),
            Err("10.111.1.99 is not a backend of any VIP".into())
        );
        assert_eq!(
            check(FlowFilter {
                proto: Some(Proto::Tcp),
                ..backend("10.111.1.13")
            }),
            Err("10.111.1.13 is not a backend of any tcp VIP".into())
        );
    }

    #[test]
    fn queries_are_checked_before_any_walk() {
        let of = |req| Query::of(req).unwrap().check().map_err(|e| e.to_string());
        let list = |limit| Request::FlowList {
            filter: FlowFilter::default(),
            limit,
        };
        assert!(of(list(1)).is_ok());
        assert!(of(list(MAX_LIMIT)).is_ok());
        assert_eq!(
            of(list(0)),
            Err("--limit 0 is out of range (1-10000)".into())
        );
        assert!(of(list(MAX_LIMIT + 1)).is_err());
        let flush = |filter, all| Request::FlowFlush { filter, all };
        assert!(
            of(flush(FlowFilter::default(), false))
                .unwrap_err()
                .contains("--all")
        );
        assert!(of(flush(FlowFilter::default(), true)).is_ok());
        assert!(of(flush(backend("10.111.1.11"), false)).is_ok());
        // --all with a filter flushes what the filter matches, not everything.
        assert!(matches!(
            Query::of(flush(backend("10.111.1.11"), true)),
            Some(Query::Flush { .. })
        ));
        assert!(Query::of(Request::Stats).is_none());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn answers_count_what_they_flushed() {
        let queries = FlowQueries::new(Arc::new(table()), TaskTracker::new());
        let resp = queries
            .answer(
                Request::FlowFlush {
                    filter: backend("10.111.1.12"),
                    all: false,
                },
                &vips(),
            )
            .await;
        let Response::FlowFlush { flush } = resp else {
            panic!("{resp:?}")
        };
        assert_eq!(flush.flushed, 10);
        assert_eq!(queries.flushed(), 10);
        let resp = queries
            .answer(
                Request::FlowCount {
                    filter: backend("10.111.1.99"),
                    by: None,
                },
                &vips(),
            )
            .await;
        assert_eq!(
            resp,
            Response::Error {
                message: "10.111.1.99 is not a backend of any VIP".into()
            }
        );
    }
}
