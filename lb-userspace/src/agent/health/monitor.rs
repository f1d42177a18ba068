//! The check tasks: one per checked backend, probing every interval and sending each result to
//! the serve loop. A task ends when its target is dropped or changed (`Monitor::sync` cancels
//! its token) or when the agent's token is cancelled.

use super::{
    CheckReport, HealthError, ProbeTarget,
    probe::{HttpClients, OwnClient, probe},
};
use crate::model::ServiceKey;
use std::{collections::HashMap, net::IpAddr, sync::Arc};
use tokio::sync::mpsc;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// Check results waiting for the controller; beyond this the check tasks wait (never the
/// controller).
const CHANNEL_CAPACITY: usize = 1024;

/// The check tasks: one per checked backend, following `HealthBook::targets`.
pub(crate) struct Monitor {
    tx: mpsc::Sender<CheckReport>,
    clients: Arc<HttpClients>,
    /// Parent of every check task's token.
    cancel: CancellationToken,
    tasks: TaskTracker,
    /// The running tasks: their target's generation and their token.
    running: HashMap<(ServiceKey, IpAddr), (u64, CancellationToken)>,
}

impl Monitor {
    /// A monitor with no tasks, and the receiving end of its results. Its tasks run on `tasks`
    /// under children of `cancel`.
    pub(crate) fn new(
        cancel: CancellationToken,
        tasks: TaskTracker,
    ) -> Result<(Monitor, mpsc::Receiver<CheckReport>), HealthError> {
        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
        Ok((
            Monitor {
                tx,
                clients: Arc::new(HttpClients::new()?),
                cancel,
                tasks,
                running: HashMap::new(),
            },
            rx,
        ))
    }

    /// Start tasks for new targets, restart those whose generation changed, stop the rest.
    pub(crate) fn sync(&mut self, targets: Vec<ProbeTarget>) {
        let wanted: HashMap<(ServiceKey, IpAddr), ProbeTarget> =
            targets.into_iter().map(|t| ((t.key, t.addr), t)).collect();
        self.running.retain(|id, (generation, token)| {
            let keep = wanted.get(id).is_some_and(|t| t.generation == *generation);
            if !keep {
                token.cancel();
            }
            keep
        });
        for (id, t) in wanted {
            if self.running.contains_key(&id) {
                continue;
            }
            let token = self.cancel.child_token();
            self.running.insert(id, (t.generation, token.clone()));
            self.tasks
                .spawn(run_checks(t, self.clients.clone(), self.tx.clone(), token));
        }
    }

    /// Number of running check tasks.
    pub(crate) fn len(&self) -> usize {
        self.running.len()
    }
}

/// Check `t` every interval (the first check at once) until `cancel` is cancelled or the
/// controller is gone.
async fn run_checks(
    t: ProbeTarget,
    clients: Arc<HttpClients>,
    tx: mpsc::Sender<CheckReport>,
    cancel: CancellationToken,
) {
    // Built once per task: it reads the CA file (which the check's configuration named).
    let own = OwnClient::for_target(&t);
    let mut ticker = tokio::time::interval(t.check.interval);
    // A late check is not made up for with a burst.
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let result = tokio::select! {
            () = cancel.cancelled() => return,
            result = async {
                ticker.tick().await;
                probe(&t, &clients, own.as_ref()).await
            } => result,
        };
        let report = CheckReport {
            key: t.key,
            addr: t.addr,
            generation: t.generation,
            result,
        };
        tokio::select! {
            () = cancel.cancelled() => return,
            sent = tx.send(report) => if sent.is_err() {
                return;
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{agent::health::probe::tests::target, model::check::CheckKind};
    use std::time::{Duration, Instant};
    use tokio::net::TcpListener;

    #[tokio::test]
    async fn monitor_runs_and_restarts_tasks() {
        let tasks = TaskTracker::new();
        let (mut monitor, mut rx) = Monitor::new(CancellationToken::new(), tasks.clone()).unwrap();
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let mut t = target(CheckKind::Tcp, port, |c| {
            c.interval = Duration::from_millis(20);
            c.timeout = Duration::from_millis(20);
        });
        monitor.sync(vec![t.clone()]);
        assert_eq!(monitor.len(), 1);
        let r = tokio::time::timeout(Duration::from_secs(2), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!((r.generation, r.result.ok), (1, true));
        t.generation = 2;
        monitor.sync(vec![t]);
        // Results of generation 1 may still be queued; generation 2 arrives soon.
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let r = tokio::time::timeout(Duration::from_secs(2), rx.recv())
                .await
                .unwrap()
                .unwrap();
            if r.generation == 2 {
                break;
            }
            assert!(Instant::now() < deadline);
        }
        monitor.sync(vec![]);
        assert_eq!(monitor.len(), 0);
        // Every task ended: dropped targets cancel their tasks.
        tasks.close();
        tokio::time::timeout(Duration::from_secs(2), tasks.wait())
            .await
            .expect("the stopped check tasks end");
    }
}
