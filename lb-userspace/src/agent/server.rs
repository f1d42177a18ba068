//! The serve loop: the one task that owns the `Controller` (and with it the data path), so every
//! change is applied strictly one at a time and the data path needs no lock. Everything else
//! reaches it over channels and gets its answer on a oneshot: CLI requests from the connection
//! tasks, results from the health-check tasks, installs and snapshots from peer sync, reports
//! for `/metrics` scrapes. Nothing served here waits on the network or walks the flow table.

use crate::{
    agent::{
        announce::Announcer,
        config_file::Config,
        controller::{Controller, DataplaneOps},
        deny::{DenyError, DenyList, Switch},
        flow_query::FlowQueries,
        flows::FlowCounter,
        health::{CheckReport, Monitor},
        metrics::StatsReply,
        neighbours::warm_neighbours,
        socket::{Job, serve_connection},
    },
    api::{DenyReport, Request, Response},
    dataplane::DenyCount,
    sync::{SyncRequest, SyncStatus},
};
use lb_common::MAX_DENY_PREFIXES;
use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};
use tokio::{
    net::UnixListener,
    signal::unix::Signal,
    sync::{mpsc, oneshot},
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

/// The deny list's thread asks the loop to make a half live (the loop owns the data path).
pub(crate) struct SwitchRequest {
    live: u32,
    count: DenyCount,
    reply: oneshot::Sender<Result<(), String>>,
}

/// The serve loop's side of the deny list: the list (changed on blocking threads, one change at
/// a time) and its switch requests.
pub(crate) struct DenyLink {
    list: Arc<Mutex<DenyList>>,
    switch_tx: mpsc::Sender<SwitchRequest>,
    switches: mpsc::Receiver<SwitchRequest>,
}

impl DenyLink {
    pub(crate) fn new(list: DenyList) -> Self {
        let (switch_tx, switches) = mpsc::channel(1);
        DenyLink {
            list: Arc::new(Mutex::new(list)),
            switch_tx,
            switches,
        }
    }
}

/// `Switch` for the deny list's thread: a request to the loop, and its answer.
struct LoopSwitch(mpsc::Sender<SwitchRequest>);

impl Switch for LoopSwitch {
    fn switch(&self, live: u32, count: DenyCount) -> Result<(), DenyError> {
        let gone = || DenyError::Switch("the agent is shutting down".to_string());
        let (reply, answer) = oneshot::channel();
        self.0
            .blocking_send(SwitchRequest { live, count, reply })
            .map_err(|_| gone())?;
        answer
            .blocking_recv()
            .map_err(|_| gone())?
            .map_err(DenyError::Switch)
    }
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
    /// The global deny list (absent in tests that run without a data path).
    pub(crate) deny: Option<DenyLink>,
    /// The `--config` file that `xlb reload` and SIGHUP re-read, if the agent has one.
    pub(crate) config: Option<PathBuf>,
    /// SIGHUP: reload.
    pub(crate) hangups: Option<Signal>,
    /// The name of the data path's directory in bpffs (what `xlb detach` must name).
    pub(crate) pin_dir: Option<String>,
    /// systemd's watchdog period (`WATCHDOG_USEC`), if it watches this agent.
    pub(crate) watchdog: Option<Duration>,
    /// Cancelled when `xlb detach` is accepted: the agent withdraws its routes, then stops the
    /// loop.
    pub(crate) detach: CancellationToken,
    /// Route announcement, with `--announce-table`.
    pub(crate) announce: Option<Announcer>,
}

/// How the serve loop ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Stop {
    /// Cancelled (a signal, or a failure elsewhere): the data path stays.
    Cancelled,
    /// `xlb detach` asked for the data path to be removed.
    Detach,
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
    deny: Option<DenyLink>,
    warm: Interval,
    config: Option<PathBuf>,
    hangups: Option<Signal>,
    pin_dir: Option<String>,
    detach: CancellationToken,
    /// Ticks at half the watchdog period while the loop runs.
    watchdog: Option<Interval>,
    stop: Stop,
    announce: Option<Announcer>,
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
        let watchdog = inputs.watchdog.map(|period| {
            let mut tick = tokio::time::interval(period / 2);
            tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
            tick
        });
        Server {
            config: inputs.config,
            hangups: inputs.hangups,
            pin_dir: inputs.pin_dir,
            detach: inputs.detach,
            watchdog,
            stop: Stop::Cancelled,
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
            deny: inputs.deny,
            warm,
            announce: inputs.announce,
            cancel,
            tasks,
        }
    }

    /// Serve until the token is cancelled; then hand the controller back with why the loop
    /// ended (the caller decides what happens to the data path, after the other tasks ended).
    pub(crate) async fn run(mut self) -> (Controller<D>, Stop) {
        self.monitor.sync(self.controller.probe_targets());
        log::info!("health checks running for {} backends", self.monitor.len());
        self.reannounce();
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
                Some(req) = next(self.deny.as_mut().map(|d| &mut d.switches)) => {
                    let result = self.controller.deny_switch(req.live, req.count);
                    let _ = req.reply.send(result.map_err(|e| e.to_string()));
                }
                Some(job) = self.jobs.recv() => self.job(job),
                Some(report) = self.health.recv() => {
                    if let Some(a) = &mut self.announce {
                        a.health_result(&report);
                    }
                    self.controller.health_result(report);
                    self.reannounce();
                }
                Some(reply) = next(self.scrapes.as_mut()) => {
                    self.controller.set_flow_counts(self.flows.latest(), self.queries.flushed());
                    let stats = self.controller.stats().map(|mut s| {
                        s.node = self.announce.as_ref().map(Announcer::report);
                        s
                    });
                    // The scraper may have timed out; nothing to undo either way.
                    let _ = reply.send(stats);
                }
                // While the node starts: its peers' snapshots, and the start-up's deadlines.
                () = peers_changed(self.announce.as_ref()) => {
                    if let Some(a) = &mut self.announce {
                        a.peers_update();
                    }
                    self.reannounce();
                }
                () = until(self.announce.as_ref().and_then(Announcer::next_deadline)) => {
                    self.reannounce();
                }
                _ = self.warm.tick() => warm_neighbours(&self.controller.state().backend_addrs()),
                Some(()) = hangup(self.hangups.as_mut()) => {
                    log::info!("SIGHUP received");
                    match self.reload() {
                        Ok(summary) => log::info!("{summary}"),
                        Err(e) => log::error!("reload failed, nothing changed: {e}"),
                    }
                }
                // Alive as long as this loop turns: a loop stuck anywhere stops the pings, and
                // systemd restarts the agent (which takes over the running data path).
                _ = tick(self.watchdog.as_mut()) => {
                    let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
                }
            }
        }
        log::info!("shutting down");
        (self.controller, self.stop)
    }

    /// Re-read the config file and apply what changed; the one-line summary.
    fn reload(&mut self) -> Result<String, String> {
        let path = self.config.clone().ok_or(
            "this agent was started without --config: there is no file to reload (change it with the CLI)",
        )?;
        let config = Config::load(&path).map_err(|e| e.to_string())?;
        let summary = self
            .controller
            .reload(&config.state)
            .map_err(|e| e.to_string())?;
        self.monitor.sync(self.controller.probe_targets());
        warm_neighbours(&self.controller.state().backend_addrs());
        self.reannounce();
        let vips = self.controller.state().vip_count();
        let _ = sd_notify::notify(&[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status(&format!("serving {vips} VIPs; {summary}")),
        ]);
        Ok(summary)
    }

    /// One CLI request: answered by the controller, except `peers` (the sync's own counters),
    /// `reload` and `detach` (this loop's own business), the deny list's (on a blocking
    /// thread) and `node` (the announcer's).
    fn job(&mut self, job: Job) {
        if job.req.is_deny()
            && let Some(deny) = &self.deny
        {
            let (list, switch) = (deny.list.clone(), LoopSwitch(deny.switch_tx.clone()));
            self.tasks
                .spawn_blocking(move || deny_job(job, &list, &switch));
            return;
        }
        log::debug!("request {:?}", job.req);
        match &job.req {
            Request::Reload => {
                let resp = match self.reload() {
                    Ok(message) => {
                        log::info!("{message}");
                        Response::Done { message }
                    }
                    Err(message) => {
                        log::warn!("reload refused, nothing changed: {message}");
                        Response::Error { message }
                    }
                };
                let _ = job.reply.send(resp);
                return;
            }
            Request::Detach { dir } => {
                let resp = if self.pin_dir.as_deref() == Some(dir.as_str()) {
                    log::info!("detach requested: removing the data path and exiting");
                    self.stop = Stop::Detach;
                    // The agent withdraws its routes (if any), lets the answer reach the CLI,
                    // then ends this loop.
                    self.detach.cancel();
                    Response::Done {
                        message: if self.announce.is_some() {
                            "the agent withdraws its VIP routes, removes the data path and exits"
                        } else {
                            "the agent removes the data path and exits"
                        }
                        .into(),
                    }
                } else {
                    Response::Error {
                        message: format!(
                            "this agent manages {}, not {dir}",
                            self.pin_dir.as_deref().unwrap_or("no pinned data path")
                        ),
                    }
                };
                let _ = job.reply.send(resp);
                return;
            }
            _ => {}
        }
        if let (Request::Peers, Some(sync)) = (&job.req, &self.sync) {
            let _ = job.reply.send(Response::Peers {
                peers: sync.status.report(),
            });
            return;
        }
        if let (Request::NodeDrain | Request::NodeUndrain | Request::NodeStatus, Some(a)) =
            (&job.req, &mut self.announce)
        {
            let resp = match job.req {
                Request::NodeDrain => a.drain(),
                Request::NodeUndrain => a.undrain(),
                _ => Ok(String::new()),
            };
            self.reannounce();
            let resp = match (resp, &self.announce) {
                (Err(e), _) => Response::Error {
                    message: e.to_string(),
                },
                (Ok(_), Some(a)) if matches!(job.req, Request::NodeStatus) => {
                    Response::Node { node: a.report() }
                }
                (Ok(message), _) => {
                    log::warn!("{message}");
                    Response::Done { message }
                }
            };
            let _ = job.reply.send(resp);
            return;
        }
        let mutation = job.req.is_mutation();
        // The counts of the walk the connection task waited for (or the last one).
        self.controller
            .set_flow_counts(self.flows.latest(), self.queries.flushed());
        let mut resp = self.controller.handle(job.req);
        if let (Response::Stats { stats }, Some(a)) = (&mut resp, &self.announce) {
            stats.node = Some(a.report());
        }
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
            self.reannounce();
        }
    }

    /// Decide the announcement again from the controller's view (after anything that may
    /// change it: a health result, a change of the desired state, the start-up's progress).
    fn reannounce(&mut self) {
        if let Some(a) = &mut self.announce {
            a.try_finish_start();
            a.refresh(self.controller.node_view());
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

/// The next SIGHUP, if the loop listens for it; never otherwise.
async fn hangup(signal: Option<&mut Signal>) -> Option<()> {
    match signal {
        Some(s) => s.recv().await,
        None => std::future::pending().await,
    }
}

/// The sync's peer news while the node starts; never otherwise.
async fn peers_changed(announce: Option<&Announcer>) {
    match announce {
        Some(a) => a.peers_changed().await,
        None => std::future::pending().await,
    }
}

/// The next tick of an optional interval; never without one.
async fn tick(interval: Option<&mut Interval>) {
    match interval {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// A deny-list request, on a blocking thread: changes wait for the one before them.
fn deny_job(job: Job, list: &Mutex<DenyList>, switch: &LoopSwitch) {
    let mut list = list.lock().unwrap_or_else(|e| e.into_inner());
    let done = |r: Result<String, DenyError>| match r {
        Ok(message) => {
            log::info!("{message}");
            Response::Done { message }
        }
        Err(e) => {
            log::info!("request refused: {e}");
            Response::Error {
                message: e.to_string(),
            }
        }
    };
    let resp = match job.req {
        Request::DenyAdd { prefixes } => done(list.add(&prefixes, switch)),
        Request::DenyDel { prefixes } => done(list.del(&prefixes, switch)),
        Request::DenyLoad { prefixes, source } => done(list.load(&prefixes, &source, switch)),
        _ => Response::DenyList {
            deny: DenyReport {
                count: list.len(),
                capacity: MAX_DENY_PREFIXES,
                prefixes: list.list(),
            },
        },
    };
    let _ = job.reply.send(resp);
}

/// Resolves at `deadline`; never without one.
async fn until(deadline: Option<std::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
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
