//! The serve loop: the one task that owns the `Controller` (and with it the data path), so every
//! change is applied strictly one at a time and the data path needs no lock. Everything else
//! reaches it over channels and gets its answer on a oneshot: CLI requests from the connection
//! tasks, results from the health-check tasks, installs and snapshots from peer sync, reports
//! for `/metrics` scrapes. Nothing served here waits on the network or walks the flow table.

use crate::{
    agent::{
        controller::{Controller, DataplaneOps},
        flow_query::FlowQueries,
        flows::FlowCounter,
        health::{CheckReport, Monitor},
        metrics::StatsReply,
        neighbours::warm_neighbours,
        socket::{Job, serve_connection},
    },
    api::{Request, Response},
    sync::{SyncRequest, SyncStatus},
};
use std::{sync::Arc, time::Duration};
use tokio::{
    net::UnixListener,
    sync::mpsc,
    time::{Interval, MissedTickBehavior},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// Requests from connection tasks waiting for the loop.
const JOB_QUEUE: usize = 64;

/// The serve loop's side of peer sync: the sync tasks' requests, and their status for
/// `xlb peers`.
pub(crate) struct SyncLink {
    pub(crate) requests: mpsc::Receiver<SyncRequest>,
    pub(crate) status: SyncStatus,
}

/// Where the loop's work comes from, besides its own socket.
pub(crate) struct Inputs {
    /// The health-check tasks and their results.
    pub(crate) health: (Monitor, mpsc::Receiver<CheckReport>),
    /// Peer sync, when it runs.
    pub(crate) sync: Option<SyncLink>,
    /// `/metrics` scrapes, when metrics are served.
    pub(crate) scrapes: Option<mpsc::Receiver<StatsReply>>,
    /// The flow table's counts (walked off the loop) and its snapshots for peers.
    pub(crate) flows: Arc<FlowCounter>,
    /// `xlb flows` queries (walked off the loop, by the connection tasks).
    pub(crate) queries: Arc<FlowQueries>,
    /// How often backend neighbour entries are refreshed.
    pub(crate) warm_interval: Duration,
}

pub(crate) struct Server<D: DataplaneOps> {
    controller: Controller<D>,
    listener: UnixListener,
    monitor: Monitor,
    health: mpsc::Receiver<CheckReport>,
    jobs: mpsc::Receiver<Job>,
    /// Handed to every connection task (the loop keeps one so the queue never closes under it).
    job_tx: mpsc::Sender<Job>,
    sync: Option<SyncLink>,
    scrapes: Option<mpsc::Receiver<StatsReply>>,
    flows: Arc<FlowCounter>,
    queries: Arc<FlowQueries>,
    warm: Interval,
    cancel: CancellationToken,
    tasks: TaskTracker,
}

impl<D: DataplaneOps> Server<D> {
    /// A loop serving `listener` with `controller`; connection tasks run on `tasks` and end with
    /// `cancel`, which also ends the loop.
    pub(crate) fn new(
        controller: Controller<D>,
        listener: UnixListener,
        inputs: Inputs,
        cancel: CancellationToken,
        tasks: TaskTracker,
    ) -> Self {
        let (job_tx, jobs) = mpsc::channel(JOB_QUEUE);
        // The first tick fires at once: that is the warm-up at start.
        let mut warm = tokio::time::interval(inputs.warm_interval);
        warm.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let (monitor, health) = inputs.health;
        Server {
            controller,
            listener,
            monitor,
            health,
            jobs,
            job_tx,
            sync: inputs.sync,
            scrapes: inputs.scrapes,
            flows: inputs.flows,
            queries: inputs.queries,
            warm,
            cancel,
            tasks,
        }
    }

    /// Serve until the token is cancelled; then hand the controller back (the caller decides
    /// when the data path goes, after the other tasks ended).
    pub(crate) async fn run(mut self) -> Controller<D> {
        self.monitor.sync(self.controller.probe_targets());
        log::info!("health checks running for {} backends", self.monitor.len());
        loop {
            tokio::select! {
                () = self.cancel.cancelled() => break,
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let (jobs, cancel) = (self.job_tx.clone(), self.cancel.clone());
                        let (flows, queries) = (self.flows.clone(), self.queries.clone());
                        self.tasks.spawn(serve_connection(stream, jobs, flows, queries, cancel));
                    }
                    Err(e) => log::warn!("accepting a CLI connection: {e}"),
                },
                Some(req) = next(self.sync.as_mut().map(|s| &mut s.requests)) => self.sync(req),
                Some(job) = self.jobs.recv() => self.job(job),
                Some(report) = self.health.recv() => self.controller.health_result(report),
                Some(reply) = next(self.scrapes.as_mut()) => {
                    self.controller.set_flow_counts(self.flows.latest(), self.queries.flushed());
                    // The scraper may have timed out; nothing to undo either way.
                    let _ = reply.send(self.controller.stats());
                }
                _ = self.warm.tick() => warm_neighbours(&self.controller.state().backend_addrs()),
            }
        }
        log::info!("shutting down");
        self.controller
    }

    /// One CLI request: answered by the controller, except `peers` (the sync's own counters).
    fn job(&mut self, job: Job) {
        log::debug!("request {:?}", job.req);
        if let (Request::Peers, Some(sync)) = (&job.req, &self.sync) {
            let _ = job.reply.send(Response::Peers {
                peers: sync.status.report(),
            });
            return;
        }
        let mutation = job.req.is_mutation();
        // The counts of the walk the connection task waited for (or the last one).
        self.controller
            .set_flow_counts(self.flows.latest(), self.queries.flushed());
        let resp = self.controller.handle(job.req);
        match &resp {
            Response::Done { message } => log::info!("{message}"),
            Response::Error { message } => log::info!("request refused: {message}"),
            _ => {}
        }
        // The CLI may have given up waiting; the change stands either way.
        let _ = job.reply.send(resp);
        if mutation {
            self.monitor.sync(self.controller.probe_targets());
            warm_neighbours(&self.controller.state().backend_addrs());
        }
    }
}

impl<D: DataplaneOps> Server<D> {
    /// A peer-sync request: an install is a frame's worth of map updates, done here; a snapshot
    /// walks the whole table, so it runs as a task of its own on a blocking thread.
    fn sync(&mut self, req: SyncRequest) {
        match req {
            SyncRequest::Install { flows, reply } => {
                let _ = reply.send(self.controller.install_flows(flows).map_err(Into::into));
            }
            SyncRequest::Snapshot { max_age, reply } => {
                let flows = self.flows.clone();
                self.tasks.spawn(async move {
                    let _ = reply.send(flows.snapshot(max_age).await.map_err(Into::into));
                });
            }
        }
    }
}

/// The next message of an optional receiver; never, without one (so `select!` can always poll
/// it) or once every sender is gone (the tasks ended at shutdown).
async fn next<T>(rx: Option<&mut mpsc::Receiver<T>>) -> Option<T> {
    match rx {
        Some(rx) => match rx.recv().await {
            Some(item) => Some(item),
            None => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}
