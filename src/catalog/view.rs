//! Materialized views at run time: the feeds that carry table changes and barriers into
//! each view's dataflow, and the sink that applies each epoch's result and publishes it.
//!
//! Order is everything here. Table changes enter the feeds from the log committer's
//! publish callbacks, so every view sees changes in commit order; barriers and a new
//! view's initial snapshot enter the same way, through marker appends (see
//! [`crate::state::log::Log::enqueue`]). A view therefore starts from exactly the
//! committed contents of its tables and misses or repeats no change after that.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{Notify, mpsc, watch};

use super::table::{SnapshotCell, TableState, TableVersion};
use crate::dataflow::operators::{EpochSink, MaterializeOperator};
use crate::dataflow::runtime::{self, EdgeReceiver, FailureSlot};
use crate::dataflow::{Barrier, ChangeBatch, Message};
use crate::error::Result;
use crate::sql::view::Node;

/// Rows queued in feeds before writers wait for the views to catch up.
const MAX_QUEUED_ROWS: usize = 1 << 20;

/// The feeds of one table: (view id, sender) pairs.
type TableFeeds = Vec<(u64, mpsc::UnboundedSender<Message>)>;

/// The change streams of tables, one per (view, table input).
#[derive(Default)]
pub struct Feeds {
    senders: std::sync::Mutex<HashMap<String, TableFeeds>>,
    queued_rows: AtomicUsize,
    room: Notify,
}

impl Feeds {
    /// Sends a committed change of `table` to every view reading it.
    pub fn send_change(&self, table: &str, change: &ChangeBatch) {
        if let Ok(mut senders) = self.senders.lock()
            && let Some(list) = senders.get_mut(table)
        {
            list.retain(|(_, sender)| {
                self.queued_rows.fetch_add(change.num_rows(), Ordering::AcqRel);
                sender.send(Message::Data(change.clone())).is_ok()
            });
        }
    }

    /// Sends a barrier into every feed.
    pub fn send_barrier(&self, barrier: &Barrier) {
        if let Ok(mut senders) = self.senders.lock() {
            for list in senders.values_mut() {
                list.retain(|(_, sender)| sender.send(Message::Barrier(barrier.clone())).is_ok());
            }
        }
    }

    fn register(&self, view: u64, table: &str, sender: mpsc::UnboundedSender<Message>) {
        if let Ok(mut senders) = self.senders.lock() {
            senders.entry(table.to_string()).or_default().push((view, sender));
        }
    }

    /// Disconnects a view: its sources see their feeds close and the dataflow winds down.
    pub fn unregister(&self, view: u64) {
        if let Ok(mut senders) = self.senders.lock() {
            for list in senders.values_mut() {
                list.retain(|(id, _)| *id != view);
            }
        }
    }

    /// Waits while the views are far behind the writers (backpressure on writes).
    pub async fn wait_for_room(&self) {
        while self.queued_rows.load(Ordering::Acquire) > MAX_QUEUED_ROWS {
            let notified = self.room.notified();
            if self.queued_rows.load(Ordering::Acquire) <= MAX_QUEUED_ROWS {
                break;
            }
            notified.await;
        }
    }

    fn consumed(&self, rows: usize) {
        self.queued_rows.fetch_sub(rows, Ordering::AcqRel);
        self.room.notify_waiters();
    }
}

/// A view's feeds, created by [`spawn`] and connected by [`Pending::connect`].
pub struct Pending {
    view: u64,
    inputs: Vec<(String, mpsc::UnboundedSender<Message>)>,
    failures: Arc<FailureSlot>,
}

impl Pending {
    /// Sends each input's current rows as the view's starting point and connects the feeds.
    /// Must run in log order (from a marker's publish callback), so no change is missed or
    /// seen twice.
    pub fn connect(self, feeds: &Feeds, cell: &SnapshotCell) {
        let snapshot = cell.committed();
        for (table, sender) in self.inputs {
            if let Some(version) = snapshot.relation(&table) {
                match version.batches() {
                    Ok(batches) => {
                        for batch in batches {
                            feeds.queued_rows.fetch_add(batch.num_rows(), Ordering::AcqRel);
                            let _ = sender.send(Message::Data(ChangeBatch::inserts(batch)));
                        }
                    }
                    Err(e) => {
                        // Without its starting rows the view would be wrong: mark it failed
                        // (FLUSH and reads report it) and leave it disconnected.
                        self.failures.set(format!("reading the rows of \"{table}\" to start: {e}"));
                        continue;
                    }
                }
            }
            feeds.register(self.view, &table, sender);
        }
    }
}

/// Where a view's results go: its arrangement, published after each epoch.
pub struct ViewSink {
    name: String,
    state: TableState,
    cell: Arc<SnapshotCell>,
    epochs: watch::Sender<u64>,
}

impl EpochSink for ViewSink {
    fn commit(&mut self, barrier: &Barrier, change: ChangeBatch) -> Result<()> {
        self.state.apply(&change)?;
        self.cell.publish_view(&self.name, Some(self.state.version()));
        self.epochs.send_replace(barrier.epoch);
        Ok(())
    }
}

impl ViewSink {
    pub fn new(name: String, state: TableState, cell: Arc<SnapshotCell>, epochs: watch::Sender<u64>) -> Self {
        ViewSink { name, state, cell, epochs }
    }

    /// The view as published before its first epoch: empty.
    pub fn initial_version(&self) -> TableVersion {
        self.state.version()
    }
}

/// Starts the operators of `root` with `sink` at the end, and returns the feeds to connect.
pub fn spawn(view: u64, root: Node, sink: ViewSink, feeds: &Arc<Feeds>, failures: &Arc<FailureSlot>) -> Pending {
    let schema = sink.state.def().schema.clone();
    let mut pending = Pending { view, inputs: Vec::new(), failures: failures.clone() };
    let input = spawn_node(root, feeds, failures, &mut pending);
    let materialize = MaterializeOperator::new(schema, Box::new(sink));
    runtime::spawn(Box::new(materialize), vec![input], Vec::new(), failures.clone());
    pending
}

fn spawn_node(node: Node, feeds: &Arc<Feeds>, failures: &Arc<FailureSlot>, pending: &mut Pending) -> EdgeReceiver {
    match node {
        Node::Table(name) => {
            let (feed, mut from_feed) = mpsc::unbounded_channel();
            let (to_dataflow, receiver) = runtime::edge();
            let feeds = feeds.clone();
            // The table source: moves the feed into the bounded dataflow edge.
            tokio::spawn(async move {
                while let Some(message) = from_feed.recv().await {
                    let rows = match &message {
                        Message::Data(change) => change.num_rows(),
                        _ => 0,
                    };
                    let delivered = to_dataflow.send(message).await.is_ok();
                    feeds.consumed(rows);
                    if !delivered {
                        break;
                    }
                }
                // The dataflow is gone: keep the writers' budget right for what is left.
                while let Some(message) = from_feed.recv().await {
                    if let Message::Data(change) = message {
                        feeds.consumed(change.num_rows());
                    }
                }
            });
            pending.inputs.push((name, feed));
            receiver
        }
        Node::Operator(operator, inputs) => {
            let receivers = inputs.into_iter().map(|n| spawn_node(n, feeds, failures, pending)).collect();
            let (sender, receiver) = runtime::edge();
            runtime::spawn(operator, receivers, vec![sender], failures.clone());
            receiver
        }
    }
}
