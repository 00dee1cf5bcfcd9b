//! Materialized views at run time: the feeds that carry table changes and barriers into
//! each view's dataflow, and the sink that applies each epoch's result and publishes it.
//!
//! Order is everything here. Table changes enter the feeds from the log committer's
//! publish callbacks, so every view sees changes in commit order; barriers and a new
//! view's initial snapshot enter the same way, through marker appends (see
//! [`crate::state::log::Log::enqueue`]). A view therefore starts from exactly the
//! committed contents of its tables and misses or repeats no change after that.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use datafusion::arrow::compute::concat_batches;
use datafusion::arrow::record_batch::RecordBatch;
use tokio::sync::{Notify, mpsc, watch};

use super::outbox::{self, Outbox};
use super::table::{Snapshot, SnapshotCell, TableState, TableVersion};
use crate::dataflow::checkpoint::{self, Checkpointing, StateReport};
use crate::dataflow::exchange;
use crate::dataflow::operators::{EpochSink, EventTimeOperator, LateCounter, MaterializeOperator, MergeOperator};
use crate::dataflow::runtime::{self, EdgeReceiver, FailureSlot};
use crate::dataflow::{Barrier, ChangeBatch, Message, Operator};
use crate::error::Result;
use crate::sql::view::Node;
use crate::state::spill::{LocalState, MemoryPool};

/// The feed name under which a view's constant inputs receive barriers: no table has it.
const CONSTANT_FEED: &str = "\0constant";

/// Rows queued in feeds before writers wait for the views to catch up.
const MAX_QUEUED_ROWS: usize = 1 << 20;

/// The feeds of one table: (view id, sender).
type TableFeeds = Vec<(u64, mpsc::UnboundedSender<Message>)>;

/// The change streams of tables, one per (view, table input), and the views connected to
/// them.
#[derive(Default)]
pub struct Feeds {
    inner: std::sync::Mutex<FeedsInner>,
    queued_rows: AtomicUsize,
    room: Notify,
}

#[derive(Default)]
struct FeedsInner {
    tables: HashMap<String, TableFeeds>,
    /// Every connected view by id: each receives every barrier, from a table feed or from
    /// the materialized views it reads.
    views: BTreeMap<u64, String>,
}

impl Feeds {
    /// The feeds by table. A poisoned lock is taken over: dropping a change instead would
    /// silently make a view wrong.
    fn lock(&self) -> std::sync::MutexGuard<'_, FeedsInner> {
        match self.inner.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Sends a committed change of `table` to every view reading it.
    pub fn send_change(&self, table: &str, change: &ChangeBatch) {
        if let Some(list) = self.lock().tables.get_mut(table) {
            list.retain(|(_, sender)| self.send_data(sender, change.clone()));
        }
    }

    /// Sends a barrier into every table feed; returns the names of the connected views,
    /// which all commit it.
    fn send_barrier(&self, barrier: &Barrier) -> HashSet<String> {
        let mut inner = self.lock();
        for list in inner.tables.values_mut() {
            list.retain(|(_, sender)| sender.send(Message::Barrier(barrier.clone())).is_ok());
        }
        inner.views.values().cloned().collect()
    }

    fn register(&self, view: u64, table: &str, sender: mpsc::UnboundedSender<Message>) {
        self.lock().tables.entry(table.to_string()).or_default().push((view, sender));
    }

    /// The ids of the views connected so far: those the next barrier reaches.
    pub fn connected_views(&self) -> HashSet<u64> {
        self.lock().views.keys().copied().collect()
    }

    fn connected(&self, view: u64, name: &str) {
        self.lock().views.insert(view, name.to_string());
    }

    /// Disconnects a view: its sources see their feeds close and the dataflow winds down.
    fn unregister(&self, view: u64) {
        let mut inner = self.lock();
        inner.views.remove(&view);
        for list in inner.tables.values_mut() {
            list.retain(|(id, _)| *id != view);
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

    /// Counts the rows before sending (the source may consume them at once) and takes
    /// them back if the feed is closed.
    fn send_data(&self, sender: &mpsc::UnboundedSender<Message>, change: ChangeBatch) -> bool {
        let rows = change.num_rows();
        self.queued_rows.fetch_add(rows, Ordering::AcqRel);
        let sent = sender.send(Message::Data(change)).is_ok();
        if !sent {
            self.consumed(rows);
        }
        sent
    }

    fn consumed(&self, rows: usize) {
        self.queued_rows.fetch_sub(rows, Ordering::AcqRel);
        self.room.notify_waiters();
    }
}

/// A view's feeds, created by [`spawn`] and connected by [`Pending::connect`].
pub struct Pending {
    view: u64,
    name: String,
    inputs: Vec<(String, mpsc::UnboundedSender<Message>)>,
    /// Inputs that never change, with their rows.
    constants: Vec<(Vec<RecordBatch>, mpsc::UnboundedSender<Message>)>,
    /// The materialized views among the inputs, by name.
    upstream: HashMap<String, Arc<Subscribers>>,
    failures: Arc<FailureSlot>,
    /// The late rows its inputs with watermarks dropped.
    pub late: Vec<Arc<LateCounter>>,
    /// The names of the operators spawned so far; each is numbered by its place here. A
    /// checkpoint is restored only into the same layout (a different `--workers` count
    /// changes it).
    pub layout: Vec<String>,
    /// Where operator states go at checkpoints.
    report: Option<StateReport>,
    /// Restored from a checkpoint: the operators' states by number, and the table changes
    /// committed after it (which replace the tables' rows as the starting point).
    restore: Option<Restore>,
    /// The task at the top of each shared subtree started so far, by the subtree's number.
    shared: HashMap<usize, usize>,
}

/// What a view restored from a checkpoint starts from.
pub struct Restore {
    /// Operator states by operator number.
    pub states: BTreeMap<usize, Vec<u8>>,
    /// Where each operator's spilled-state files were downloaded, by operator number.
    pub files: BTreeMap<usize, std::path::PathBuf>,
    /// Changes committed after the checkpoint, in log order, by table.
    pub tail: HashMap<String, Vec<ChangeBatch>>,
    /// The operator layout the states were taken from ([`Pending::layout`], joined).
    pub layout: String,
}

impl Pending {
    /// Marks `name` as a materialized view whose committed epochs feed this view.
    pub fn reads_view(&mut self, name: &str, subscribers: Arc<Subscribers>) {
        self.upstream.insert(name.to_string(), subscribers);
    }

    /// Sends each input's current rows as the view's starting point and connects the feeds.
    /// Must run in log order (from a marker's publish callback), so no change is missed or
    /// seen twice.
    ///
    /// A view restored from a checkpoint starts from its operators' states instead: it is
    /// sent only the changes committed after the checkpoint (its constants are in its state).
    pub fn connect(mut self, feeds: &Feeds, epochs: &Epochs, cell: &SnapshotCell) {
        let snapshot = cell.committed();
        let last_barrier = epochs.last_barrier();
        let tail = self.restore.take().map(|r| r.tail);
        for (rows, sender) in self.constants {
            if tail.is_none() {
                for batch in rows {
                    feeds.send_data(&sender, ChangeBatch::inserts(batch));
                }
            }
            // Barriers reach it as they reach every table feed; no change ever will.
            feeds.register(self.view, CONSTANT_FEED, sender);
        }
        for (input, sender) in self.inputs {
            if let Some(upstream) = self.upstream.get(&input) {
                if let Err(e) = upstream.follow(&input, self.view, sender, last_barrier, feeds, cell) {
                    self.failures.set(format!("reading the rows of \"{input}\" to start: {e}"));
                }
                continue;
            }
            if let Some(tail) = &tail {
                // A table read twice (a self-join) has a feed per read; each gets the tail.
                for change in tail.get(&input).into_iter().flatten() {
                    feeds.send_data(&sender, change.clone());
                }
            } else if let Some(version) = snapshot.relation(&input) {
                match version.batches() {
                    Ok(batches) => {
                        for batch in batches {
                            feeds.send_data(&sender, ChangeBatch::inserts(batch));
                        }
                    }
                    Err(e) => {
                        // Without its starting rows the view would be wrong: mark it failed
                        // (FLUSH and reads report it) and leave it disconnected.
                        self.failures.set(format!("reading the rows of \"{input}\" to start: {e}"));
                        continue;
                    }
                }
            }
            feeds.register(self.view, &input, sender);
        }
        feeds.connected(self.view, &self.name);
    }
}

/// Where a view's results go: its arrangement, published after each epoch.
pub struct ViewSink {
    name: String,
    feeds: Arc<Feeds>,
    state: TableState,
    cell: Arc<SnapshotCell>,
    epochs: Arc<Epochs>,
    subscribers: Arc<Subscribers>,
}

impl EpochSink for ViewSink {
    fn commit(&mut self, barrier: &Barrier, parts: Vec<ChangeBatch>) -> Result<()> {
        self.state.apply_all(&parts)?;
        let version = self.state.version();
        {
            // Publishing under the subscribers' lock: a new subscriber's starting rows and
            // the changes it is sent afterwards never overlap or leave a gap.
            let mut subscribers = self.subscribers.lock();
            if subscribers.dropped {
                return Ok(());
            }
            self.cell.publish_view(&self.name, Some(version.clone()));
            subscribers.epoch = barrier.epoch;
            for outbox in subscribers.outboxes.values_mut() {
                outbox.record(&version.def.schema, barrier.epoch, barrier.checkpoint, &parts)?;
            }
            // Views reading this one: the epoch's change, then its barrier (barriers up to
            // the one before a view connected are already behind its other inputs).
            let feeds = &self.feeds;
            subscribers.downstream.retain(|d| {
                parts.iter().all(|part| feeds.send_data(&d.sender, part.clone()))
                    && (barrier.epoch <= d.after || d.sender.send(Message::Barrier(barrier.clone())).is_ok())
            });
            // A subscriber is sent each epoch as one change.
            if !parts.is_empty() && !subscribers.list.is_empty() {
                let change = ChangeBatch::concat(&version.def.schema, &parts)?;
                subscribers.list.retain(|s| match s.sender.try_send((barrier.epoch, change.clone())) {
                    Ok(()) => true,
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        s.lagged.store(true, Ordering::Release);
                        false
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => false,
                });
            }
        }
        self.epochs.deliver(barrier.epoch, &self.name, version, &self.cell);
        Ok(())
    }

    fn checkpoint(&mut self) -> Result<Option<Vec<u8>>> {
        let version = self.state.version();
        Ok(Some(checkpoint::rows_to_bytes(&version.def.schema, &version.batches()?)?))
    }

    fn restore(&mut self, state: &[u8]) -> Result<()> {
        let rows = checkpoint::rows_from_bytes(state, &format!("materialized view \"{}\"", self.name))?;
        self.restore_rows(rows)
    }

    fn rows(&self) -> Result<Option<Vec<RecordBatch>>> {
        Ok(Some(self.state.version().batches()?))
    }

    fn outbox_state(&mut self) -> Result<Option<Vec<u8>>> {
        let subscribers = self.subscribers.lock();
        if subscribers.outboxes.is_empty() {
            return Ok(None);
        }
        let mut w = checkpoint::StateWriter::default();
        outbox::write(&mut w, &subscribers.outboxes)?;
        Ok(Some(w.finish()))
    }

    fn restore_outbox(&mut self, state: &[u8]) -> Result<()> {
        let mut r = checkpoint::StateReader::new(state, "the outboxes of exactly-once sinks");
        let outboxes = outbox::read(&mut r, &self.state.version().def.schema)?;
        r.finish()?;
        self.subscribers.lock().outboxes = outboxes;
        Ok(())
    }

    fn memory_bytes(&self) -> usize {
        self.state.version().memory_bytes()
    }

    fn append_only(&self) -> bool {
        self.state.version().def.append_only
    }

    /// The view's rows come back and are published at once, so views that read this one
    /// start from them.
    fn restore_rows(&mut self, rows: Vec<RecordBatch>) -> Result<()> {
        for batch in rows {
            self.state.apply(&ChangeBatch::inserts(batch))?;
        }
        let _subscribers = self.subscribers.lock();
        self.cell.publish_view(&self.name, Some(self.state.version()));
        Ok(())
    }
}

impl ViewSink {
    pub fn new(
        name: String,
        state: TableState,
        cell: Arc<SnapshotCell>,
        epochs: Arc<Epochs>,
        subscribers: Arc<Subscribers>,
        feeds: Arc<Feeds>,
    ) -> Self {
        ViewSink { name, feeds, state, cell, epochs, subscribers }
    }
}

/// Epochs of changes a subscriber may have waiting before it is cut off as too slow.
const SUBSCRIBER_BACKLOG: usize = 1024;

/// The clients following one view with SUBSCRIBE.
#[derive(Default)]
pub struct Subscribers {
    inner: std::sync::Mutex<SubscribersInner>,
}

#[derive(Default)]
pub struct SubscribersInner {
    list: Vec<Subscriber>,
    /// Materialized views reading this one.
    downstream: Vec<Downstream>,
    /// The last epoch the view committed.
    epoch: u64,
    /// The view was dropped: its last epochs are not published any more.
    dropped: bool,
    /// The undelivered changes of each exactly-once sink writing this view, by sink name.
    outboxes: BTreeMap<String, Outbox>,
}

/// The feed of a materialized view reading another.
struct Downstream {
    sender: mpsc::UnboundedSender<Message>,
    /// The last barrier injected before the reading view connected; it receives the
    /// barriers after it.
    after: u64,
}

struct Subscriber {
    sender: mpsc::Sender<(u64, ChangeBatch)>,
    lagged: Arc<std::sync::atomic::AtomicBool>,
}

/// One subscription: the view's changes per epoch, in order.
pub struct Subscription {
    pub changes: mpsc::Receiver<(u64, ChangeBatch)>,
    /// Set when the subscriber fell so far behind that it was cut off.
    pub lagged: Arc<std::sync::atomic::AtomicBool>,
}

impl Subscribers {
    fn lock(&self) -> std::sync::MutexGuard<'_, SubscribersInner> {
        match self.inner.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// The view is being dropped: an epoch it commits from now on is not published, so it
    /// cannot reappear after the drop removed it (call before removing it from the cell).
    pub fn close_view(&self) {
        self.lock().dropped = true;
    }

    /// Connects a materialized view reading this one (`view`): its committed rows first,
    /// then every epoch's change and barrier. Runs in log order, after barrier
    /// `last_barrier`: epochs up to it arrive as data only, since the reading view's other
    /// inputs start after that barrier.
    fn follow(
        &self,
        view: &str,
        reader: u64,
        sender: mpsc::UnboundedSender<Message>,
        last_barrier: u64,
        feeds: &Feeds,
        cell: &SnapshotCell,
    ) -> Result<()> {
        let mut inner = self.lock();
        if let Some(version) = cell.committed().views.get(view) {
            for batch in version.batches()? {
                feeds.send_data(&sender, ChangeBatch::inserts(batch));
            }
        }
        tracing::debug!(view, reader, last_barrier, "a materialized view follows another");
        inner.downstream.push(Downstream { sender, after: last_barrier });
        Ok(())
    }

    /// Gives exactly-once sink `sink` an outbox of the view's changes. Returns true if its
    /// outbox came back from a checkpoint (delivery goes on where it stopped); otherwise a
    /// new outbox starts with the view's current rows.
    pub fn attach_outbox(&self, sink: &str, view: &str, cell: &SnapshotCell) -> Result<bool> {
        let mut inner = self.lock();
        if inner.outboxes.contains_key(sink) {
            return Ok(true);
        }
        let rows = match cell.committed().views.get(view) {
            Some(version) => Some(ChangeBatch::inserts(concat_batches(&version.def.schema, &version.batches()?)?)),
            None => None,
        };
        inner.outboxes.insert(sink.to_string(), Outbox::starting_with(rows));
        Ok(false)
    }

    /// The sink is gone: its outbox is dropped.
    pub fn detach_outbox(&self, sink: &str) {
        self.lock().outboxes.remove(sink);
    }

    /// Drops the outboxes of sinks not in `sinks` (dropped since the checkpoint that
    /// brought them back).
    pub fn keep_outboxes(&self, sinks: &HashSet<&str>) {
        self.lock().outboxes.retain(|name, _| sinks.contains(name.as_str()));
    }

    /// Sink `sink`'s sealed segments up to checkpoint `epoch`, oldest first.
    pub fn outbox_through(&self, sink: &str, epoch: u64) -> Vec<(u64, ChangeBatch)> {
        self.lock().outboxes.get(sink).map(|o| o.sealed_through(epoch)).unwrap_or_default()
    }

    /// Sink `sink` delivered everything up to checkpoint `epoch`.
    pub fn outbox_delivered(&self, sink: &str, epoch: u64) {
        if let Some(outbox) = self.lock().outboxes.get_mut(sink) {
            outbox.delivered(epoch);
        }
    }

    /// Rows waiting in sink `sink`'s outbox.
    pub fn outbox_rows(&self, sink: &str) -> usize {
        self.lock().outboxes.get(sink).map_or(0, Outbox::rows)
    }

    /// Follows the view from now on; with `snapshot`, its current rows come first.
    pub fn subscribe(&self, view: &str, cell: &SnapshotCell, snapshot: bool) -> Result<Subscription> {
        let mut inner = self.lock();
        let (sender, changes) = mpsc::channel(SUBSCRIBER_BACKLOG);
        if snapshot && let Some(version) = cell.committed().views.get(view) {
            // One message, so the snapshot always fits the new, empty channel.
            let rows = concat_batches(&version.def.schema, &version.batches()?)?;
            if rows.num_rows() > 0 && sender.try_send((inner.epoch, ChangeBatch::inserts(rows))).is_err() {
                return Err(crate::error::Error::Internal("a new subscription's channel is full".into()));
            }
        }
        let lagged = Arc::new(std::sync::atomic::AtomicBool::new(false));
        inner.list.push(Subscriber { sender, lagged: lagged.clone() });
        Ok(Subscription { changes, lagged })
    }
}

/// Tracks open epochs until every view has committed them, then publishes the serving
/// snapshot: the tables as of the barrier and every view at that epoch.
pub struct Epochs {
    inner: std::sync::Mutex<EpochsInner>,
    /// The last epoch published for serving.
    complete: watch::Sender<u64>,
}

#[derive(Default)]
struct EpochsInner {
    open: BTreeMap<u64, OpenEpoch>,
    /// The last barrier sent into the feeds.
    last_barrier: u64,
    /// Every view at the last complete epoch.
    views: BTreeMap<String, TableVersion>,
}

struct OpenEpoch {
    tables: BTreeMap<String, TableVersion>,
    waiting: HashSet<String>,
    delivered: Vec<(String, TableVersion)>,
}

impl Default for Epochs {
    fn default() -> Self {
        Epochs { inner: std::sync::Mutex::default(), complete: watch::channel(0).0 }
    }
}

impl Epochs {
    fn lock(&self) -> std::sync::MutexGuard<'_, EpochsInner> {
        match self.inner.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Opens `epoch` with the committed tables and sends its barrier into every feed.
    /// Runs in log order (from a marker's publish callback).
    pub fn barrier(&self, barrier: &Barrier, feeds: &Feeds, cell: &SnapshotCell) {
        let mut inner = self.lock();
        let waiting = feeds.send_barrier(barrier);
        inner.last_barrier = barrier.epoch;
        let tables = cell.committed().tables.clone();
        inner.open.insert(barrier.epoch, OpenEpoch { tables, waiting, delivered: Vec::new() });
        self.complete_ready(&mut inner, cell);
    }

    /// The epoch of the last barrier sent into the feeds.
    pub fn last_barrier(&self) -> u64 {
        self.lock().last_barrier
    }

    fn deliver(&self, epoch: u64, view: &str, version: TableVersion, cell: &SnapshotCell) {
        let mut inner = self.lock();
        if let Some(open) = inner.open.get_mut(&epoch)
            && open.waiting.remove(view)
        {
            open.delivered.push((view.to_string(), version));
        }
        self.complete_ready(&mut inner, cell);
    }

    /// Stops waiting for `view` (dropped or failed) and disconnects its feeds.
    pub fn remove_view(&self, view: &str, id: u64, feeds: &Feeds, cell: &SnapshotCell) {
        let mut inner = self.lock();
        feeds.unregister(id);
        for open in inner.open.values_mut() {
            open.waiting.remove(view);
            open.delivered.retain(|(name, _)| name != view);
        }
        inner.views.remove(view);
        let current = cell.serving();
        let mut views = current.views.clone();
        views.remove(view);
        cell.publish_serving(Arc::new(Snapshot { views, ..current.as_ref().clone() }));
        self.complete_ready(&mut inner, cell);
    }

    /// A receiver of the last complete epoch.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.complete.subscribe()
    }

    fn complete_ready(&self, inner: &mut EpochsInner, cell: &SnapshotCell) {
        while let Some(entry) = inner.open.first_entry() {
            if !entry.get().waiting.is_empty() {
                return;
            }
            let (epoch, open) = entry.remove_entry();
            for (name, version) in open.delivered {
                inner.views.insert(name, version);
            }
            cell.publish_serving(Arc::new(Snapshot {
                tables: open.tables,
                views: inner.views.clone(),
                plain_views: BTreeMap::new(),
                seq: epoch,
            }));
            self.complete.send_replace(epoch);
        }
    }
}

/// Starts the operators of `root` with `sink` at the end, and returns the feeds to connect.
/// Operator states go to `report` at checkpoints; with `restore`, every operator first
/// loads its state from it (an operator without one there is an error, and nothing is
/// started).
pub fn spawn(
    view: u64,
    root: Node,
    sink: ViewSink,
    feeds: &Arc<Feeds>,
    failures: &Arc<FailureSlot>,
    state: StateOptions,
) -> Result<Pending> {
    let StateOptions { report, restore, spill } = state;
    let spill = &spill;
    let schema = sink.state.def().schema.clone();
    let mut pending = Pending {
        view,
        name: sink.name.clone(),
        inputs: Vec::new(),
        constants: Vec::new(),
        upstream: HashMap::new(),
        failures: failures.clone(),
        late: Vec::new(),
        layout: Vec::new(),
        report,
        restore,
        shared: HashMap::new(),
    };
    // Built and restored whole before any task starts, so a state that fails to load
    // leaves nothing running.
    let mut tasks = Vec::new();
    let input = spawn_node(root, feeds, failures, &mut pending, &mut tasks)?;
    let materialize: Box<dyn Operator> = Box::new(MaterializeOperator::new(schema, Box::new(sink)));
    let checkpointing = pending.number(materialize.as_ref());
    tasks.push(Task { operator: materialize, inputs: vec![input], outputs: Vec::new(), checkpointing });
    let dir = spill.root.join(format!("view-{view}-{}", SPAWNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)));
    for (number, task) in tasks.iter_mut().enumerate() {
        let owner = (view, number);
        let local = LocalState { dir: dir.join(format!("op-{number}")), pool: spill.pool.clone(), owner };
        task.operator.set_local_state(local);
    }
    if let Some(restore) = &pending.restore {
        // Checked before any state is loaded: the view's rows are published as they load.
        if restore.layout != pending.layout.join(",") || restore.states.len() != tasks.len() {
            return Err(crate::error::Error::Internal(format!(
                "the view's operators ({}) are not those its checkpoint was taken from ({})",
                pending.layout.join(","),
                restore.layout
            )));
        }
        // Tasks are in operator-number order (each is pushed right after it is numbered).
        for (number, task) in tasks.iter_mut().enumerate() {
            let state = restore.states.get(&number).ok_or_else(|| {
                crate::error::Error::Internal(format!("the checkpoint has no state for operator {number}"))
            })?;
            if let Some(files) = restore.files.get(&number) {
                task.operator.restore_files(files.clone())?;
            }
            task.operator.restore(state)?;
        }
    }
    for task in tasks {
        runtime::spawn(task.operator, task.inputs, task.outputs, failures.clone(), task.checkpointing);
    }
    Ok(pending)
}

/// Where a view's operator states go, where they come from, and where they spill.
pub struct StateOptions {
    /// Where operator states go at checkpoints (`None`: the view is not checkpointed).
    pub report: Option<StateReport>,
    /// The checkpoint to start from (`None`: from the inputs).
    pub restore: Option<Restore>,
    pub spill: Spill,
}

/// Where the operators of every view spill state beyond memory: a local directory (each
/// view's operators get one below it) and the pool their memory counts against.
#[derive(Debug, Clone)]
pub struct Spill {
    pub root: std::path::PathBuf,
    pub pool: Arc<MemoryPool>,
}

/// Numbers each spawn, so a view rebuilt after a failed restore gets fresh directories.
static SPAWNS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// An operator ready to run.
struct Task {
    operator: Box<dyn Operator>,
    inputs: Vec<EdgeReceiver>,
    outputs: Vec<runtime::EdgeSender>,
    checkpointing: Option<Checkpointing>,
}

impl Pending {
    /// Numbers the next operator and says where its checkpoints go.
    fn number(&mut self, operator: &dyn Operator) -> Option<Checkpointing> {
        let number = self.layout.len();
        self.layout.push(operator.name().to_string());
        self.report.clone().map(|report| Checkpointing { operator: number, report })
    }
}

fn spawn_node(
    node: Node,
    feeds: &Arc<Feeds>,
    failures: &Arc<FailureSlot>,
    pending: &mut Pending,
    tasks: &mut Vec<Task>,
) -> Result<EdgeReceiver> {
    Ok(match node {
        Node::Table(name) => {
            let (feed, receiver) = spawn_feed(feeds);
            pending.inputs.push((name, feed));
            receiver
        }
        Node::Constant { rows, .. } => {
            let (feed, receiver) = spawn_feed(feeds);
            pending.constants.push((rows, feed));
            receiver
        }
        Node::EventTime { table, column, delay_ms, units_per_ms } => {
            let input = spawn_node(Node::Table(table.clone()), feeds, failures, pending, tasks)?;
            let late = Arc::new(LateCounter::new(table, pending.name.clone(), units_per_ms));
            pending.late.push(late.clone());
            let operator: Box<dyn Operator> =
                Box::new(EventTimeOperator::new(column, delay_ms.saturating_mul(units_per_ms), late));
            let checkpointing = pending.number(operator.as_ref());
            let (sender, receiver) = runtime::edge();
            tasks.push(Task { operator, inputs: vec![input], outputs: vec![sender], checkpointing });
            receiver
        }
        Node::Operator(operator, inputs) => {
            let receivers =
                inputs.into_iter().map(|n| spawn_node(n, feeds, failures, pending, tasks)).collect::<Result<_>>()?;
            let checkpointing = pending.number(operator.as_ref());
            let (sender, receiver) = runtime::edge();
            tasks.push(Task { operator, inputs: receivers, outputs: vec![sender], checkpointing });
            receiver
        }
        Node::Shared(shared) => match shared.take() {
            Some(node) => {
                if !matches!(node, Node::Operator(..) | Node::Parallel { .. } | Node::EventTime { .. }) {
                    return Err(crate::error::Error::Internal(
                        "a shared subtree without an operator at its top".into(),
                    ));
                }
                let receiver = spawn_node(node, feeds, failures, pending, tasks)?;
                // The subtree's top operator is the task pushed last.
                pending.shared.insert(shared.id, tasks.len() - 1);
                receiver
            }
            None => {
                let top = pending.shared.get(&shared.id).and_then(|&t| tasks.get_mut(t)).ok_or_else(|| {
                    crate::error::Error::Internal(format!("shared subtree #{} read before it started", shared.id))
                })?;
                let (sender, receiver) = runtime::edge();
                top.outputs.push(sender);
                receiver
            }
        },
        Node::Parallel { instances, keys, inputs } => {
            // instance_inputs[i][port]: instance i's edge from input `port`'s exchange.
            let mut instance_inputs: Vec<Vec<EdgeReceiver>> = instances.iter().map(|_| Vec::new()).collect();
            for (input, key) in inputs.into_iter().zip(keys) {
                let upstream = spawn_node(input, feeds, failures, pending, tasks)?;
                let mut senders = Vec::new();
                for receivers in &mut instance_inputs {
                    let (sender, receiver) = runtime::edge();
                    senders.push(sender);
                    receivers.push(receiver);
                }
                exchange::spawn(key, upstream, senders, failures.clone());
            }
            let mut merge_inputs = Vec::new();
            for (operator, receivers) in instances.into_iter().zip(instance_inputs) {
                let checkpointing = pending.number(operator.as_ref());
                let (sender, receiver) = runtime::edge();
                tasks.push(Task { operator, inputs: receivers, outputs: vec![sender], checkpointing });
                merge_inputs.push(receiver);
            }
            let merge: Box<dyn Operator> = Box::new(MergeOperator::new(merge_inputs.len()));
            let checkpointing = pending.number(merge.as_ref());
            let (sender, receiver) = runtime::edge();
            tasks.push(Task { operator: merge, inputs: merge_inputs, outputs: vec![sender], checkpointing });
            receiver
        }
    })
}

/// A feed for one input of a view and the dataflow edge it moves into (bounded, so a slow
/// view holds its writers back through [`Feeds::wait_for_room`]).
fn spawn_feed(feeds: &Arc<Feeds>) -> (mpsc::UnboundedSender<Message>, EdgeReceiver) {
    let (feed, mut from_feed) = mpsc::unbounded_channel();
    let (to_dataflow, receiver) = runtime::edge();
    let feeds = feeds.clone();
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
    (feed, receiver)
}
