//! Peer-sync throughput end to end (issue 6, part 4): node A streams new flows to node B over
//! TCP on loopback, with the real Noise handshake and encrypted records, and B's requests are served
//! as the agent serves them: `Dataplane::install_flows` into B's kernel flow table. The figure is
//! flows/s from A's first event to the last flow installed in B's kernel.

use super::packets::fill_events;
use anyhow::{Context, Result, bail, ensure};
use lb_common::FlowEvent;
use std::{
    borrow::Cow,
    net::SocketAddr,
    time::{Duration, Instant},
};
use tokio::sync::mpsc;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use xlb::{
    dataplane::Dataplane,
    sync::{
        self, ChannelSource, SyncConfig, SyncKey, SyncRequest,
        noise::{self, Initiator},
        wire::{self, MAX_FLOWS_PER_FRAME, Message},
    },
};

/// Serve one sync request the way the agent's serve loop does; returns the flows installed.
fn serve(dp: &mut Dataplane, req: SyncRequest) -> u64 {
    match req {
        SyncRequest::Install { flows, reply } => {
            let result = dp.install_flows(flows).map_err(Into::into);
            let installed = result.as_ref().map_or(0, |r| r.installed);
            let _ = reply.send(result);
            installed
        }
        // A (re)connecting peer gets our table; B's is what it received, A's is empty.
        SyncRequest::Snapshot { reply, .. } => {
            let _ = reply.send(Ok(Vec::new()));
            0
        }
    }
}

/// Send `flows` from A to B, where `dp` (B's data path, with the flows' VIP and backends
/// configured) installs them; returns flows/s and the time taken. Runs on the calling thread's
/// network namespace (its loopback must be up), bounded by `limit`.
pub fn throughput(
    dp: &mut Dataplane,
    flows: Vec<FlowEvent>,
    limit: Duration,
) -> Result<(f64, Duration)> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("tokio runtime")?;
    rt.block_on(async move {
        let key = || SyncKey::from_bytes(b"xlb-bench-sync-key-not-a-secret-0123456789");
        let any: SocketAddr = "127.0.0.1:0".parse()?;
        let (stop, tasks) = (CancellationToken::new(), TaskTracker::new());

        let (b_req_tx, mut b_req) = mpsc::channel(sync::SYNC_REQUEST_QUEUE);
        let (_b_events_tx, b_events) = mpsc::channel(1);
        let b = sync::spawn(
            SyncConfig::new(any, vec![], key()?)?,
            ChannelSource(b_events),
            b_req_tx,
            stop.clone(),
            &tasks,
        )
        .await?;
        let (a_req_tx, mut a_req) = mpsc::channel(sync::SYNC_REQUEST_QUEUE);
        let (a_events_tx, a_events) = mpsc::channel(65_536);
        let a = sync::spawn(
            SyncConfig::new(any, vec![b.local_addr()], key()?)?,
            ChannelSource(a_events),
            a_req_tx,
            stop.clone(),
            &tasks,
        )
        .await?;

        let deadline = Instant::now() + limit;
        // Connected before the clock starts (A's empty snapshot may still be on its way: a few
        // frames, nothing next to the figure).
        while !a.report().peers.iter().all(|p| p.connected) {
            ensure!(Instant::now() < deadline, "sync peers did not connect");
            tokio::select! {
                Some(r) = a_req.recv() => { serve(dp, r); }
                Some(r) = b_req.recv() => { serve(dp, r); }
                _ = tokio::time::sleep(Duration::from_millis(5)) => {}
            }
        }
        let n = flows.len() as u64;
        let started = Instant::now();
        let feeder = tokio::spawn(async move {
            for f in flows {
                if a_events_tx.send(f).await.is_err() {
                    break;
                }
            }
        });
        let mut installed = 0;
        while installed < n {
            xlb_tests::interrupt::check()?;
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("{installed} of {n} flows installed within {limit:?}");
            }
            tokio::select! {
                Some(r) = b_req.recv() => installed += serve(dp, r),
                Some(r) = a_req.recv() => { serve(dp, r); }
                // Wake at least every 100 ms to notice Ctrl-C.
                _ = tokio::time::sleep(left.min(Duration::from_millis(100))) => {}
            }
        }
        let took = started.elapsed();
        stop.cancel();
        feeder.abort();
        tasks.close();
        tasks.wait().await;
        Ok((n as f64 / took.as_secs_f64(), took))
    })
}

/// The record layer alone, on the calling thread: full Flows frames ([`MAX_FLOWS_PER_FRAME`]
/// flows each) sealed by one session and opened by its peer, `frames` times; flows/s. What the
/// encryption costs a flow, next to the end-to-end figure above (which includes TCP, the tasks
/// and the kernel install).
pub fn record_layer(frames: usize) -> Result<f64> {
    let key = SyncKey::from_bytes(b"xlb-bench-sync-key-not-a-secret-0123456789")?;
    let challenge = [7u8; wire::CHALLENGE_LEN];
    let mut m1 = Vec::new();
    let initiator = Initiator::start(&key, &challenge, &mut m1)?;
    let (h1, b1) = wire::split_record(&m1)?;
    let mut m2 = Vec::new();
    let mut receiver = noise::respond(&key, &challenge, &h1, b1, &mut m2)?;
    let (h2, b2) = wire::split_record(&m2)?;
    let mut sender = initiator.finish(&h2, b2)?;
    let flows: Vec<FlowEvent> = fill_events(MAX_FLOWS_PER_FRAME as u32, 80, 3).collect();
    let msg = Message::Flows(Cow::Borrowed(&flows));
    let mut record = Vec::with_capacity(wire::MAX_RECORD_LEN);
    let started = Instant::now();
    for _ in 0..frames {
        record.clear();
        sender.seal(&msg, 0, &mut record)?;
        let (header, body) = wire::split_record(&record)?;
        let frame = receiver.open(&header, body)?;
        ensure!(
            matches!(&frame.msg, Message::Flows(f) if f.len() == flows.len()),
            "the opened frame is not the sealed one"
        );
    }
    Ok((frames * MAX_FLOWS_PER_FRAME) as f64 / started.elapsed().as_secs_f64())
}
