//! Runs operators as tokio tasks connected by bounded channels, and aligns barriers.
//!
//! Each node reads all its inputs; when a barrier arrives on one input, that input is not
//! read again until the same barrier has arrived on every open input. Only then does the
//! node call [`Operator::on_barrier`] and pass the barrier on. Full channels make a fast
//! upstream wait (backpressure): memory between operators stays bounded.

use std::sync::Arc;

use std::task::Poll;

use futures::FutureExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::checkpoint::{Checkpointing, OperatorState};
use super::operator::{Barrier, Message, Mutation, Operator, Output};
use crate::error::{Error, Result};

/// Messages that may wait on one edge before the sender blocks.
pub const EDGE_CAPACITY: usize = 64;

/// The sending end of an edge.
pub type EdgeSender = mpsc::Sender<Message>;
/// The receiving end of an edge.
pub type EdgeReceiver = mpsc::Receiver<Message>;

/// A new bounded edge.
pub fn edge() -> (EdgeSender, EdgeReceiver) {
    mpsc::channel(EDGE_CAPACITY)
}

/// Records the first failure of any operator in a graph, so the view can report it.
#[derive(Debug, Default)]
pub struct FailureSlot {
    failure: std::sync::Mutex<Option<String>>,
}

impl FailureSlot {
    pub fn set(&self, message: String) {
        if let Ok(mut slot) = self.failure.lock()
            && slot.is_none()
        {
            *slot = Some(message);
        }
    }

    pub fn get(&self) -> Option<String> {
        self.failure.lock().ok().and_then(|slot| slot.clone())
    }
}

/// Starts `operator` on its own task, reading `inputs` and writing to every `outputs`.
/// At each checkpoint barrier its state goes to `checkpointing`.
pub fn spawn(
    mut operator: Box<dyn Operator>,
    inputs: Vec<EdgeReceiver>,
    outputs: Vec<EdgeSender>,
    failures: Arc<FailureSlot>,
    checkpointing: Option<Checkpointing>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let name = operator.name().to_string();
        // A panic is a bug, but it must still mark the view failed rather than stall it.
        // Inside an epoch scope, so model functions score with the version of its epoch.
        let running = crate::ml::epoch::scope(run(operator.as_mut(), inputs, &outputs, checkpointing));
        let outcome = std::panic::AssertUnwindSafe(running).catch_unwind().await;
        let failure = match outcome {
            Ok(Ok(())) => return,
            Ok(Err(e)) => e.to_string(),
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned());
                format!("internal error (panic): {}", what.unwrap_or_default())
            }
        };
        tracing::error!(operator = %name, "dataflow operator failed: {failure}");
        failures.set(format!("{name}: {failure}"));
    })
}

async fn run(
    operator: &mut dyn Operator,
    mut inputs: Vec<EdgeReceiver>,
    outputs: &[EdgeSender],
    checkpointing: Option<Checkpointing>,
) -> Result<()> {
    let ports = inputs.len();
    let mut closed = vec![false; ports];
    let mut waiting = vec![false; ports]; // reached the pending barrier
    let mut pending: Option<Barrier> = None;
    let mut out = Output::default();
    let mut start = 0;
    loop {
        let readable: Vec<usize> = (0..ports).filter(|&p| !closed[p] && !waiting[p]).collect();
        if readable.is_empty() {
            if closed.iter().all(|c| *c) {
                return Ok(());
            }
        } else {
            // Poll the readable inputs, starting at a rotating port so no input starves.
            start = (start + 1) % ports;
            let (port, message) = std::future::poll_fn(|cx| {
                for offset in 0..ports {
                    let p = (start + offset) % ports;
                    if readable.contains(&p)
                        && let Poll::Ready(message) = inputs[p].poll_recv(cx)
                    {
                        return Poll::Ready((p, message));
                    }
                }
                Poll::Pending
            })
            .await;
            match message {
                None => closed[port] = true,
                Some(Message::Data(batch)) => operator.process(port, batch, &mut out).await?,
                Some(Message::Watermark(watermark)) => operator.on_watermark(port, watermark, &mut out).await?,
                Some(Message::Barrier(barrier)) => {
                    if let Some(p) = &pending
                        && p.epoch != barrier.epoch
                    {
                        return Err(Error::Internal(format!(
                            "barrier {} arrived while aligning barrier {}",
                            barrier.epoch, p.epoch
                        )));
                    }
                    waiting[port] = true;
                    pending = Some(barrier);
                }
            }
            send_all(outputs, out.take_messages()).await;
        }
        let aligned = (0..ports).all(|p| closed[p] || waiting[p]);
        if aligned && let Some(barrier) = pending.take() {
            operator.on_barrier(&barrier, &mut out).await?;
            if barrier.checkpoint
                && let Some(c) = &checkpointing
            {
                // A failed state fails the checkpoint, not the view: it keeps running.
                let state = operator
                    .checkpoint()
                    .map(|state| state.map(|bytes| OperatorState { bytes, files: operator.checkpoint_files() }));
                (c.report)(barrier.epoch, c.operator, state);
            }
            crate::ml::epoch::passed(barrier.epoch);
            let stop = barrier.mutation == Some(Mutation::Stop);
            let mut messages = out.take_messages();
            messages.push(Message::Barrier(barrier));
            send_all(outputs, messages).await;
            waiting.iter_mut().for_each(|w| *w = false);
            if stop {
                return Ok(());
            }
        }
    }
}

/// Sends to every downstream edge; a closed edge (a dropped consumer) is skipped.
async fn send_all(outputs: &[EdgeSender], messages: Vec<Message>) {
    for message in messages {
        for output in outputs {
            let _ = output.send(message.clone()).await;
        }
    }
}
