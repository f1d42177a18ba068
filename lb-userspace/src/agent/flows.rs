//! Walks of the flow table, off the serve loop: the active-flow and entry counts of `xlb stats`,
//! `backend list` and `/metrics`, and the snapshots peers get. A walk runs on a blocking thread
//! with a handle of its own to the table; the serve loop only ever reads the last walk's counts.
//!
//! How fresh the counts are depends on what a walk costs (a walk of a million entries takes about
//! a quarter of a second in batches; `cargo xtask bench --only control-plane`):
//! - while a walk takes at most `EXACT_WALK`, each report that asks gets a walk that began after
//!   it asked (the request waits for it, the loop does not), so counts are exact as before;
//! - longer walks are made at most once per `MAX_AGE`, in the background, when a report asks
//!   and the last walk began more than `MAX_AGE` before; the report takes the last walk's counts,
//!   which are then at most `MAX_AGE` plus one walk old.

use crate::dataplane::{DataplaneError, FlowCounts, FlowTable, monotonic_ns};
use lb_common::{FlowEvent, FlowKey, FlowValue};
use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};
use tokio_util::task::TaskTracker;

/// Walks that take at most this long are made for every report that asks.
pub(crate) const EXACT_WALK: Duration = Duration::from_millis(20);
/// Longer walks begin at most this often; reports are then up to this (plus one walk) old.
pub(crate) const MAX_AGE: Duration = Duration::from_secs(1);

/// What walks the table: the data path's `FlowTable`, or a stand-in in tests.
pub(crate) trait FlowWalker: Send + Sync + 'static {
    fn counts(&self) -> Result<FlowCounts, DataplaneError>;
    fn snapshot(&self, max_age: Duration) -> Result<Vec<FlowEvent>, DataplaneError>;
    /// Call `f` for every entry (`xlb flows`: `agent::flow_query`).
    fn walk(&self, f: &mut dyn FnMut(&FlowKey, &FlowValue)) -> Result<(), DataplaneError>;
    /// Delete these entries; how many were there to delete.
    fn delete(&self, keys: &[FlowKey]) -> Result<u64, DataplaneError>;
    /// The data path's flow clock now (`FlowValue::last_seen_ns` is on it).
    fn now_ns(&self) -> u64;
}

impl FlowWalker for FlowTable {
    fn counts(&self) -> Result<FlowCounts, DataplaneError> {
        FlowTable::counts(self)
    }
    fn snapshot(&self, max_age: Duration) -> Result<Vec<FlowEvent>, DataplaneError> {
        FlowTable::snapshot(self, max_age)
    }
    fn walk(&self, f: &mut dyn FnMut(&FlowKey, &FlowValue)) -> Result<(), DataplaneError> {
        self.for_each(f)
    }
    fn delete(&self, keys: &[FlowKey]) -> Result<u64, DataplaneError> {
        FlowTable::delete(self, keys)
    }
    fn now_ns(&self) -> u64 {
        monotonic_ns()
    }
}

/// The last walk: its counts, when it began and how long it took (`None`: no walk yet).
#[derive(Clone, Default)]
struct Walked {
    counts: Arc<FlowCounts>,
    began: Option<Instant>,
    took: Duration,
}

/// The flow counts of reports, and the walks that make them.
pub(crate) struct FlowCounter {
    walker: Arc<dyn FlowWalker>,
    last: Mutex<Walked>,
    /// One counting walk at a time; a report waiting for a walk waits here.
    walking: tokio::sync::Mutex<()>,
    /// A background walk is on its way.
    refreshing: AtomicBool,
    tasks: TaskTracker,
}

impl FlowCounter {
    /// Walks run on `tasks`' blocking threads.
    pub(crate) fn new(walker: Arc<dyn FlowWalker>, tasks: TaskTracker) -> Arc<Self> {
        Arc::new(FlowCounter {
            walker,
            last: Mutex::new(Walked::default()),
            walking: tokio::sync::Mutex::new(()),
            refreshing: AtomicBool::new(false),
            tasks,
        })
    }

    /// The last walk's counts (empty before the first): what the serve loop reports.
    pub(crate) fn latest(&self) -> Arc<FlowCounts> {
        self.last().counts
    }

    fn last(&self) -> Walked {
        self.last.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Make `latest` fit for a report asked for now (see the module docs). Called by the task
    /// that asks (a CLI connection, a scrape), never by the serve loop.
    pub(crate) async fn prepare(self: &Arc<Self>) {
        let asked = Instant::now();
        let last = self.last();
        if last.took <= EXACT_WALK {
            self.walk_after(asked).await;
        } else if last
            .began
            .is_none_or(|b| asked.duration_since(b) >= MAX_AGE)
            && !self.refreshing.swap(true, Ordering::AcqRel)
        {
            let counter = self.clone();
            self.tasks.spawn(async move {
                counter.walk_after(asked).await;
                counter.refreshing.store(false, Ordering::Release);
            });
        }
    }

    /// Make sure a walk that began at or after `asked` has been published: wait for the one
    /// running (it may have begun after `asked`), else walk.
    async fn walk_after(&self, asked: Instant) {
        let _one = self.walking.lock().await;
        if self.last().began.is_some_and(|b| b >= asked) {
            return;
        }
        let began = Instant::now();
        let walker = self.walker.clone();
        match self.tasks.spawn_blocking(move || walker.counts()).await {
            Ok(Ok(counts)) => {
                *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Walked {
                    counts: Arc::new(counts),
                    began: Some(began),
                    took: began.elapsed(),
                };
            }
            // The last counts stay: a report a little older beats no report.
            Ok(Err(e)) => log::warn!("counting the flow table's entries: {e}"),
            Err(e) => log::error!("a walk of the flow table failed: {e}"),
        }
    }

    /// The flows seen within `max_age` (a peer's snapshot), from a walk on a blocking thread.
    pub(crate) async fn snapshot(
        &self,
        max_age: Duration,
    ) -> Result<Vec<FlowEvent>, DataplaneError> {
        let walker = self.walker.clone();
        self.tasks
            .spawn_blocking(move || walker.snapshot(max_age))
            .await
            .map_err(|e| DataplaneError::Io {
                what: "walking the flow table".into(),
                source: std::io::Error::other(e),
            })?
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// A table whose walks count themselves and take `cost`.
    pub(crate) struct FakeTable {
        pub(crate) counts: FlowCounts,
        pub(crate) cost: Duration,
        pub(crate) walks: AtomicUsize,
    }

    impl FakeTable {
        pub(crate) fn new(entries: u64, cost: Duration) -> Arc<Self> {
            Arc::new(FakeTable {
                counts: FlowCounts {
                    entries,
                    ..Default::default()
                },
                cost,
                walks: AtomicUsize::new(0),
            })
        }
    }

    impl FlowWalker for FakeTable {
        fn counts(&self) -> Result<FlowCounts, DataplaneError> {
            self.walks.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(self.cost);
            Ok(self.counts.clone())
        }
        fn snapshot(&self, _max_age: Duration) -> Result<Vec<FlowEvent>, DataplaneError> {
            Ok(Vec::new())
        }
        fn walk(&self, _: &mut dyn FnMut(&FlowKey, &FlowValue)) -> Result<(), DataplaneError> {
            Ok(())
        }
        fn delete(&self, _: &[FlowKey]) -> Result<u64, DataplaneError> {
            Ok(0)
        }
        fn now_ns(&self) -> u64 {
            0
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cheap_walks_are_made_for_every_report() {
        let table = FakeTable::new(5, Duration::ZERO);
        let counter = FlowCounter::new(table.clone(), TaskTracker::new());
        assert_eq!(counter.latest().entries, 0, "nothing before the first walk");
        counter.prepare().await;
        assert_eq!(counter.latest().entries, 5);
        counter.prepare().await;
        counter.prepare().await;
        assert_eq!(table.walks.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn costly_walks_are_made_at_most_once_per_max_age_off_the_askers_path() {
        let table = FakeTable::new(7, EXACT_WALK * 3);
        let tasks = TaskTracker::new();
        let counter = FlowCounter::new(table.clone(), tasks.clone());
        // The first report waits for the first walk, which shows the cost.
        counter.prepare().await;
        assert_eq!(counter.latest().entries, 7);
        // Within MAX_AGE: the last counts, no walk, no wait.
        let asked = Instant::now();
        for _ in 0..5 {
            counter.prepare().await;
        }
        assert!(asked.elapsed() < EXACT_WALK, "{:?}", asked.elapsed());
        assert_eq!(table.walks.load(Ordering::SeqCst), 1);
        // After MAX_AGE: one walk in the background, however many reports ask.
        tokio::time::sleep(MAX_AGE).await;
        let asked = Instant::now();
        for _ in 0..5 {
            counter.prepare().await;
        }
        assert!(asked.elapsed() < EXACT_WALK, "{:?}", asked.elapsed());
        tasks.close();
        tasks.wait().await;
        assert_eq!(table.walks.load(Ordering::SeqCst), 2);
    }
}
