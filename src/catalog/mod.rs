//! The catalog: every object freshet knows about, and the [`Database`] that runs statements
//! against them.
//!
//! `Database` owns the DataFusion session (planning and batch queries), the tables and
//! sources, the running materialized views (`view`), the ingest tasks of sources
//! (`source`, with their connector positions and dead letters), the sinks writing views
//! out (`sink`), the models and their versions (`model`), the system catalog clients
//! introspect (`system`, with primary keys and defaults in `keys` and scalar subqueries
//! in `subqueries`), the connector status relations of `freshet_catalog` (`status`),
//! point lookups by key answered from an index instead of a plan (`lookup`), the
//! checkpoints of views' operator states (`checkpoint`), and the durable log. Statement execution follows one rule: a change is applied in memory
//! under the writer lock, queued to the log in that same order, and becomes visible to
//! readers only when the log has stored it (the log's committer publishes the snapshot).
//! A statement that fails changes nothing.
//!
//! It does not speak any wire protocol; `server` turns its [`Outcome`]s into messages.

pub mod checkpoint;
mod keys;
mod lookup;
mod model;
mod outbox;
mod retention;
pub mod session_window;
mod sink;
mod source;
mod status;
mod subqueries;
pub mod system;
pub mod table;
pub mod view;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use datafusion::arrow::array::{RecordBatch, StringArray};
use datafusion::arrow::compute::concat_batches;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::catalog::{CatalogProvider, MemoryCatalogProvider};
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::common::{Column, DFSchema};
use datafusion::execution::SendableRecordBatchStream;
use datafusion::execution::context::SessionState;
use datafusion::logical_expr::{DmlStatement, Expr, LogicalPlan, LogicalPlanBuilder, WriteOp};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::prelude::{SessionConfig, SessionContext};
use object_store::ObjectStore;
use serde::{Deserialize, Serialize};

use crate::dataflow::Barrier;
use crate::dataflow::ChangeBatch;
use crate::dataflow::runtime::FailureSlot;
use crate::error::{Error, Result};
use crate::sql::{self, CreateTable, CreateView, Planned, Statement};
use crate::state::log::{Ack, Log, LogEntry, LogStats};
use table::{FreshetSchema, Snapshot, SnapshotCell, TableDef, TableState};
use view::{Feeds, ViewSink};

/// The catalog name clients see (`current_database()`), and the one schema in it.
pub const CATALOG_NAME: &str = "freshet";
pub const SCHEMA_NAME: &str = "public";
/// Log segments written after the last snapshot before a new snapshot is taken.
pub const SNAPSHOT_EVERY_SEGMENTS: u64 = 2048;
/// The wait after a failed snapshot, doubled after each further failure up to the maximum.
const SNAPSHOT_RETRY_FIRST: Duration = Duration::from_secs(1);
const SNAPSHOT_RETRY_MAX: Duration = Duration::from_secs(60);

/// What a statement produced.
pub enum Outcome {
    /// Rows to send to the client.
    Rows { schema: SchemaRef, stream: SendableRecordBatchStream },
    /// A command tag such as `INSERT 0 3` (`rows` is the count, if the tag has one).
    Command { tag: &'static str, rows: Option<usize> },
}

/// What a log entry's header says it is.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Record {
    /// The batch is empty and carries the table's schema.
    CreateTable {
        id: u64,
        name: String,
        primary_key: Vec<usize>,
        defaults: Vec<(String, String)>,
    },
    DropTable {
        name: String,
    },
    /// The batch is a flattened [`ChangeBatch`].
    Change {
        table: String,
    },
    /// Snapshots only: the batch holds rows of the table.
    Rows {
        table: String,
    },
    /// A materialized view and the SQL text of its query.
    CreateView {
        name: String,
        query: String,
    },
    DropView {
        name: String,
    },
    /// A source: its relation's rows come from the connector its options describe. The
    /// batch is empty and carries the relation's schema.
    CreateSource {
        id: u64,
        name: String,
        options: BTreeMap<String, String>,
    },
    /// A plain (inlined) view and the SQL text of its query.
    CreatePlainView {
        name: String,
        query: String,
    },
    DropPlainView {
        name: String,
    },
    /// A source's ledger after the change before it: the connector's offsets and the
    /// count of records that did not decode; the batch holds the new dead letters.
    Ledger {
        table: String,
        /// (partition, next offset); a list, since JSON object keys cannot be numbers.
        offsets: Vec<(i32, i64)>,
        dead_letter_count: u64,
    },
    /// A sink writing the changes of materialized view `from`.
    CreateSink {
        name: String,
        from: String,
        options: BTreeMap<String, String>,
    },
    DropSink {
        name: String,
    },
    /// A model version, stored at `model::model_path(name, version)`, became active.
    ModelVersion {
        name: String,
        version: u32,
    },
    /// A stored model version became active again (rollback).
    ActivateModel {
        name: String,
        version: u32,
    },
    DropModel {
        name: String,
    },
    /// Checkpoint barrier `epoch` passed here: the views' states stored under this epoch
    /// hold every change before this entry and none after it.
    Checkpoint {
        epoch: u64,
    },
    /// Source `table` (with `retention = 'none'`) forgets its rows numbered below `before`
    /// (counting every row it ever appended from 0): a checkpoint holds them for every view
    /// that reads it.
    Trim {
        table: String,
        before: u64,
    },
}

impl Record {
    fn entry(&self, batch: Option<RecordBatch>) -> Result<LogEntry> {
        let header = serde_json::to_vec(self).map_err(|e| Error::Internal(format!("encoding log record: {e}")))?;
        Ok(LogEntry { header, batch })
    }
}

/// The single writer's view: every table's rows and the snapshot they form.
#[derive(Default)]
struct Writer {
    tables: BTreeMap<String, TableState>,
    next_id: u64,
    /// The snapshot including every applied change, durable or not.
    working: Arc<Snapshot>,
}

impl Writer {
    fn create(&mut self, def: Arc<TableDef>) -> Result<()> {
        self.next_id = self.next_id.max(def.id + 1);
        let state = TableState::new(def.clone())?;
        self.replace_version(&def.name, Some(state.version()));
        self.tables.insert(def.name.clone(), state);
        Ok(())
    }

    fn drop_table(&mut self, name: &str) {
        self.tables.remove(name);
        self.replace_version(name, None);
    }

    fn apply(&mut self, table: &str, change: &ChangeBatch) -> Result<()> {
        self.update(table, |state| state.apply(change))
    }

    /// Changes table `table` with `change` and makes its new version the working one.
    fn update<T>(&mut self, table: &str, change: impl FnOnce(&mut TableState) -> Result<T>) -> Result<T> {
        let state =
            self.tables.get_mut(table).ok_or_else(|| Error::UndefinedTable { name: table.into(), position: None })?;
        let changed = change(state)?;
        let version = state.version();
        self.replace_version(table, Some(version));
        Ok(changed)
    }

    /// Moves source `table`'s ledger to `offsets`, with `dead` letters added; `count` sets
    /// the dead-letter count (when replaying) instead of adding to it.
    fn advance_ledger(
        &mut self,
        table: &str,
        offsets: BTreeMap<i32, i64>,
        dead: &[crate::connectors::DeadLetter],
        count: Option<u64>,
    ) -> Result<Arc<source::Ledger>> {
        self.update(table, |state| {
            let ledger = Arc::new(
                state
                    .ledger()
                    .map_or_else(source::Ledger::default, |l| l.as_ref().clone())
                    .advanced(offsets, dead, count),
            );
            state.set_ledger(ledger.clone());
            Ok(ledger)
        })
    }

    /// Source `table` forgets its rows numbered below `before`.
    fn trim(&mut self, table: &str, before: u64) -> Result<()> {
        self.update(table, |state| state.trim(before))
    }

    fn replace_version(&mut self, table: &str, version: Option<table::TableVersion>) {
        let mut tables = self.working.tables.clone();
        match version {
            Some(v) => tables.insert(table.to_string(), v),
            None => tables.remove(table),
        };
        self.working = Arc::new(Snapshot { tables, ..Snapshot::default() });
    }
}

struct Shared {
    cell: Arc<SnapshotCell>,
    writer: tokio::sync::Mutex<Writer>,
    log: Log,
    snapshot_running: AtomicBool,
    /// After failed snapshots: how many in a row, and when the next may start.
    snapshot_backoff: std::sync::Mutex<(u32, Option<std::time::Instant>)>,
    /// The snapshots written or attempted since the server started, newest last.
    snapshots: std::sync::Mutex<std::collections::VecDeque<status::SnapshotRecord>>,
    feeds: Arc<Feeds>,
    epochs: Arc<view::Epochs>,
    /// Plain views: query text, relations read, and creation order (for the log snapshot).
    plain_views: std::sync::Mutex<BTreeMap<String, PlainViewHandle>>,
    views: std::sync::Mutex<BTreeMap<String, ViewHandle>>,
    /// The last barrier epoch injected.
    epoch: AtomicU64,
    /// Sources: their options and ingest tasks.
    sources: std::sync::Mutex<BTreeMap<String, source::SourceHandle>>,
    /// Sinks: their options and tasks.
    sinks: std::sync::Mutex<BTreeMap<String, sink::SinkHandle>>,
    /// Models: the registry the scoring functions read, and where model files live.
    models: model::Models,
    checkpoints: Arc<checkpoint::Checkpoints>,
    /// How often checkpoints are taken; `None` turns them off.
    checkpoint_interval: Option<Duration>,
    /// When the last checkpoint barrier was injected, and the log position then.
    last_checkpoint: std::sync::Mutex<(std::time::Instant, u64)>,
    /// While the views of the log are being started: the checkpoint they restore from.
    restoring: std::sync::Mutex<Option<RestorePoint>>,
    /// Where operators spill state beyond `--memory-limit`.
    spill: view::Spill,
    /// Log segments between two state snapshots.
    snapshot_every: u64,
    /// The last stored checkpoint's cut: where log snapshots are cut.
    stored_cut: std::sync::Mutex<Option<retention::StoredCut>>,
}

/// The checkpoint views are restored from at start, and what the log holds after it.
struct RestorePoint {
    manifest: crate::state::checkpoint::Manifest,
    /// Changes committed after the checkpoint, by table, in log order.
    tail: HashMap<String, Vec<ChangeBatch>>,
    /// Relations created or dropped after the checkpoint: views reading them are rebuilt.
    touched: HashSet<String>,
}

/// A plain view's definition.
#[derive(Clone)]
struct PlainViewHandle {
    query: String,
    reads: Vec<String>,
    created: u64,
}

/// A running materialized view.
#[derive(Clone)]
struct ViewHandle {
    id: u64,
    query: String,
    /// Relations the view reads.
    inputs: Vec<String>,
    failures: Arc<FailureSlot>,
    subscribers: Arc<view::Subscribers>,
    /// Late rows dropped by its inputs with watermarks.
    late: Vec<Arc<crate::dataflow::operators::LateCounter>>,
    /// Its operators' names, when they report their states at checkpoints (`None`: it reads a
    /// materialized view, and is always rebuilt after a restart).
    checkpointed: Option<Vec<String>>,
    /// The checkpoint epoch it was restored from at start.
    restored_from: Option<u64>,
}

impl Shared {
    fn plain_views(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, PlainViewHandle>> {
        match self.plain_views.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Whether `name` is taken by a table, a materialized view or a plain view.
    fn name_taken(&self, writer: &Writer, name: &str) -> bool {
        writer.tables.contains_key(name)
            || self.views().contains_key(name)
            || self.plain_views().contains_key(name)
            || self.sinks().contains_key(name)
    }

    /// What `name` is, if it exists.
    fn kind_of(&self, writer: &Writer, name: &str) -> Option<sql::RelationKind> {
        if self.sources().contains_key(name) {
            Some(sql::RelationKind::Source)
        } else if writer.tables.contains_key(name) {
            Some(sql::RelationKind::Table)
        } else if self.views().contains_key(name) {
            Some(sql::RelationKind::MaterializedView)
        } else if self.plain_views().contains_key(name) {
            Some(sql::RelationKind::View)
        } else if self.sinks().contains_key(name) {
            Some(sql::RelationKind::Sink)
        } else {
            None
        }
    }

    /// The views (materialized or plain) that read `name` directly.
    fn dependents(&self, name: &str) -> Vec<String> {
        let reads = |inputs: &[String]| inputs.iter().any(|i| i == name);
        let mut dependents: Vec<String> =
            self.views().iter().filter(|(_, v)| reads(&v.inputs)).map(|(n, _)| n.clone()).collect();
        dependents.extend(self.plain_views().iter().filter(|(_, v)| reads(&v.reads)).map(|(n, _)| n.clone()));
        dependents.extend(self.sinks().iter().filter(|(_, s)| s.from == name).map(|(n, _)| n.clone()));
        dependents
    }

    /// For CREATE: whether `name` is taken and the statement said IF NOT EXISTS (so it does
    /// nothing); a taken name without IF NOT EXISTS is an error (42P07).
    fn exists_already(&self, writer: &Writer, name: &str, if_not_exists: bool) -> Result<bool> {
        match (self.name_taken(writer, name), if_not_exists) {
            (false, _) => Ok(false),
            (true, true) => Ok(true),
            (true, false) => Err(Error::DuplicateTable { name: name.to_string() }),
        }
    }

    /// Refuses to drop the `kind` named `name` while a view outside `dropping` reads it.
    fn check_no_dependents(&self, kind: &str, name: &str, dropping: &[String]) -> Result<()> {
        match self.dependents(name).into_iter().find(|d| !dropping.contains(d)) {
            Some(view) => Err(Error::Plan {
                code: "2BP01",
                message: format!(
                    "cannot drop {kind} \"{name}\" because {} \"{view}\" depends on it; drop it first, or add CASCADE to drop it too",
                    if self.sinks().contains_key(&view) { "sink" } else { "view" }
                ),
                position: None,
            }),
            None => Ok(()),
        }
    }

    fn sinks(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, sink::SinkHandle>> {
        match self.sinks.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    fn sources(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, source::SourceHandle>> {
        match self.sources.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    fn views(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, ViewHandle>> {
        match self.views.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Injects the next barrier into every feed, in log order, and returns its epoch.
    /// Stops waiting for views whose dataflow failed, so the other views keep publishing.
    /// Reads of a failed view are refused (see `Database::check_views_healthy`).
    fn abandon_failed_views(&self) -> Vec<(String, String)> {
        // A view reading a failed view gets no more epochs: it fails too.
        loop {
            let views = self.views();
            let failed: HashSet<&String> =
                views.iter().filter(|(_, v)| v.failures.get().is_some()).map(|(n, _)| n).collect();
            let mut spread = false;
            for (name, view) in views.iter().filter(|(n, _)| !failed.contains(n)) {
                if let Some(input) = view.inputs.iter().find(|i| failed.contains(i)) {
                    tracing::error!(view = %name, "materialized view \"{input}\" that it reads failed");
                    view.failures.set(format!("materialized view \"{input}\" that it reads failed"));
                    spread = true;
                }
            }
            if !spread {
                break;
            }
        }
        let failed: Vec<(String, u64, String)> =
            self.views().iter().filter_map(|(name, v)| v.failures.get().map(|f| (name.clone(), v.id, f))).collect();
        for (name, id, _) in &failed {
            self.epochs.remove_view(name, *id, &self.feeds, &self.cell);
            self.checkpoints.forget_view(*id);
        }
        failed.into_iter().map(|(name, _, failure)| (name, failure)).collect()
    }

    /// With `checkpoint`, the views also store their operator states at this barrier, and
    /// the log records where it passed.
    async fn inject_barrier(&self, checkpoint: bool) -> Result<u64> {
        // A checkpoint barrier is logged under the writer lock, so the tables it cuts are
        // exactly those before its entry.
        let writer = match checkpoint {
            true => Some(self.writer.lock().await),
            false => None,
        };
        let tables = writer.as_ref().map(|w| w.working.clone());
        let epoch = self.epoch.fetch_add(1, Ordering::AcqRel) + 1;
        let (feeds, epochs, cell) = (self.feeds.clone(), self.epochs.clone(), self.cell.clone());
        let barrier = Barrier { epoch, checkpoint, mutation: None };
        let mut entries = Vec::new();
        let mut begin = None;
        if checkpoint {
            entries.push(Record::Checkpoint { epoch }.entry(None)?);
            let views: Vec<checkpoint::CheckpointedView> = self
                .views()
                .iter()
                .filter_map(|(name, v)| {
                    Some(checkpoint::CheckpointedView {
                        id: v.id,
                        name: name.clone(),
                        query: v.query.clone(),
                        layout: v.checkpointed.clone()?,
                    })
                })
                .collect();
            begin = Some((self.checkpoints.clone(), views));
        }
        let publish = Box::new(move |seq| {
            if let Some((checkpoints, mut views)) = begin {
                // Only views connected before this barrier receive it.
                let connected = feeds.connected_views();
                views.retain(|v| connected.contains(&v.id));
                let cut = tables.map(|tables| Arc::new(checkpoint::Cut { epoch, seq, tables }));
                checkpoints.begin(epoch, views, cut);
            }
            epochs.barrier(&barrier, &feeds, &cell)
        });
        let stored = async {
            // A snapshot may be cut right after a checkpoint's entry: nothing shares its segment.
            let ack = match checkpoint {
                true => self.log.enqueue_sealed(entries, publish).await?,
                false => self.log.enqueue(entries, publish).await?,
            };
            drop(writer);
            ack.durable().await
        }
        .await;
        if checkpoint && stored.is_err() {
            self.checkpoints.release();
        }
        let seq = stored?;
        if checkpoint {
            // Its own entry is a write; only writes after it call for the next checkpoint.
            self.last_checkpoint.lock().unwrap_or_else(|p| p.into_inner()).1 = seq;
        }
        Ok(epoch)
    }

    /// Whether the next barrier should be a checkpoint: the interval passed (and enough
    /// time for checkpoints to take a small share, see [`checkpoint::SPACING_FACTOR`]),
    /// something was written since the last one, and no checkpoint is still in progress.
    fn checkpoint_due(&self) -> bool {
        let Some(interval) = self.checkpoint_interval else { return false };
        let interval = interval.max(self.checkpoints.last_duration() * checkpoint::SPACING_FACTOR);
        let mut last = self.last_checkpoint.lock().unwrap_or_else(|p| p.into_inner());
        let seq = self.log.stats().last_seq.load(Ordering::Relaxed);
        if last.0.elapsed() < interval || seq <= last.1 || !self.checkpoints.reserve(false) {
            return false;
        }
        last.0 = std::time::Instant::now();
        true
    }
}

/// How often barriers close an epoch and views publish their changes. Short enough that a
/// change is visible within 100 ms (benches/freshness.rs); a barrier that finds nothing
/// changed costs a marker in the log queue (nothing is written) and a pass through idle
/// operators.
pub const DEFAULT_BARRIER_INTERVAL: Duration = Duration::from_millis(50);
/// How long FLUSH and CREATE MATERIALIZED VIEW wait for views to catch up.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(120);

/// How a database runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// How often barriers close an epoch.
    pub barrier_interval: Duration,
    /// How often views checkpoint their operator states; `None` turns checkpoints off (a
    /// restart then rebuilds every view from its inputs).
    pub checkpoint_interval: Option<Duration>,
    /// Complete checkpoints kept in the store.
    pub checkpoints_kept: usize,
    /// Parallel instances of each stateful view operator, and the parallelism of batch
    /// queries.
    pub workers: usize,
    /// Bytes of operator state kept in memory before it spills to local disk (`None`: no
    /// limit).
    pub memory_limit: Option<usize>,
    /// The local directory operators spill into; emptied at start (`None`: a directory
    /// of this process under the system's temporary directory).
    pub spill_dir: Option<std::path::PathBuf>,
    /// Log segments written between two state snapshots.
    pub snapshot_every: u64,
    /// The directory the store keeps its objects in, when it is a local one (the data
    /// directory): checkpoints then link operators' state files instead of copying them.
    pub local_store_dir: Option<std::path::PathBuf>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            barrier_interval: DEFAULT_BARRIER_INTERVAL,
            checkpoint_interval: Some(checkpoint::DEFAULT_CHECKPOINT_INTERVAL),
            checkpoints_kept: checkpoint::DEFAULT_CHECKPOINTS_KEPT,
            workers: default_workers(),
            memory_limit: None,
            spill_dir: None,
            snapshot_every: SNAPSHOT_EVERY_SEGMENTS,
            local_store_dir: None,
        }
    }
}

/// Numbers the downloads of spilled state at start.
static DOWNLOADS: AtomicU64 = AtomicU64::new(0);

/// Empties the directory operators spill into: nothing left there by an earlier run is
/// trusted; checkpoints bring back what is needed.
fn open_spill(options: &Options) -> Result<view::Spill> {
    let root = options.spill_dir.clone().unwrap_or_else(|| {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        std::env::temp_dir().join(format!("freshet-spill-{}-{n}", std::process::id()))
    });
    // Created when something first spills (or a checkpoint's files are downloaded).
    if root.exists() {
        std::fs::remove_dir_all(&root)
            .map_err(|e| Error::Storage(format!("cannot empty the spill directory {}: {e}", root.display())))?;
    }
    Ok(view::Spill { root, pool: crate::state::spill::MemoryPool::new(options.memory_limit) })
}

/// One worker per core.
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// A running freshet database: tables, their log, and the DataFusion session that plans
/// and runs queries over them. Cheap to clone; clones share everything.
#[derive(Clone)]
pub struct Database {
    ctx: SessionContext,
    shared: Arc<Shared>,
}

impl Database {
    /// Opens the database stored in `store` with the default options.
    pub async fn open(store: Arc<dyn ObjectStore>) -> Result<Database> {
        Database::open_with(store, Options::default()).await
    }

    /// Opens the database stored in `store`, replaying its snapshot and log, and restarts
    /// its materialized views.
    pub async fn open_with(store: Arc<dyn ObjectStore>, options: Options) -> Result<Database> {
        let cell = Arc::new(SnapshotCell::default());
        let ctx = new_session(cell.clone(), options.workers)?;
        let models = model::Models::new(store.clone());
        model::register_functions(&ctx, &models.registry);
        let (log, recovered) = Log::open(store.clone()).await?;
        let mut writer = Writer::default();
        let mut last_seq = 0;
        let replayed_segments = recovered.segments.len();
        let mut manifests = checkpoints_to_restore(&store).await;
        let mut views = RecoveredViews { checkpoints: manifests.keys().copied().collect(), ..Default::default() };
        if let Some((seq, entries)) = recovered.snapshot {
            replay(&ctx, &mut writer, &mut views, entries)?;
            last_seq = seq;
        }
        for (seq, entries) in recovered.segments {
            replay(&ctx, &mut writer, &mut views, entries)?;
            last_seq = seq;
        }
        cell.publish_tables(writer.working.tables.clone(), last_seq);
        let tables = writer.tables.len();
        let restoring = views.tail.take().and_then(|tail| {
            Some(RestorePoint { manifest: manifests.remove(&tail.epoch)?, tail: tail.changes, touched: tail.touched })
        });
        if restoring.is_none() && !manifests.is_empty() {
            tracing::info!(
                "the log no longer reaches back to a checkpoint (a snapshot replaced it); views are rebuilt"
            );
        }
        // Epochs go on from the last checkpoint's, so a new checkpoint never reuses its name.
        let stored = crate::state::checkpoint::epochs(&store).await.unwrap_or_default();
        let spill = open_spill(&options)?;
        let first_epoch = stored.last().copied().unwrap_or(0).max(views.last_checkpoint);
        let db = Database {
            ctx,
            shared: Arc::new(Shared {
                cell,
                writer: tokio::sync::Mutex::new(writer),
                log,
                snapshot_running: AtomicBool::new(false),
                snapshot_backoff: std::sync::Mutex::new((0, None)),
                snapshots: std::sync::Mutex::new(std::collections::VecDeque::new()),
                feeds: Arc::new(Feeds::default()),
                epochs: Arc::new(view::Epochs::default()),
                plain_views: std::sync::Mutex::new(BTreeMap::new()),
                views: std::sync::Mutex::new(BTreeMap::new()),
                epoch: AtomicU64::new(first_epoch),
                sources: std::sync::Mutex::new(BTreeMap::new()),
                sinks: std::sync::Mutex::new(BTreeMap::new()),
                models,
                checkpoints: checkpoint::Checkpoints::new(
                    store,
                    options.local_store_dir.clone(),
                    options.checkpoints_kept,
                ),
                checkpoint_interval: options.checkpoint_interval,
                last_checkpoint: std::sync::Mutex::new((std::time::Instant::now(), 0)),
                restoring: std::sync::Mutex::new(restoring),
                spill,
                stored_cut: std::sync::Mutex::new(None),
                snapshot_every: options.snapshot_every.max(1),
            }),
        };
        status::install(&db.ctx, Arc::downgrade(&db.shared))?;
        db.ctx.register_udtf(
            session_window::FUNCTION,
            Arc::new(session_window::SessionFunction { cell: db.shared.cell.clone() }),
        );
        // `approx_percentile(x, 0.99)`, as other streaming databases spell it.
        let percentile = datafusion::functions_aggregate::approx_percentile_cont::approx_percentile_cont_udaf();
        db.ctx.register_udaf(percentile.as_ref().clone().with_aliases(["approx_percentile"]));
        let shared = Arc::downgrade(&db.shared);
        system::serve_view_queries(
            &db.ctx,
            Arc::new(move |name: &str| shared.upgrade()?.views().get(name).map(|view| view.query.clone())),
        )?;
        spawn_barriers(Arc::downgrade(&db.shared), options.barrier_interval);
        for (name, (id, options)) in views.sources {
            db.shared.sources().insert(name, source::SourceHandle::new(id, options));
        }
        db.load_models(views.models).await;
        for (materialized, name, query) in views.list {
            if let Err(e) = db.restore_view(materialized, &name, query).await {
                tracing::error!(view = %name, "view could not be restored and is dropped: {e}");
            }
        }
        *db.shared.restoring.lock().unwrap_or_else(|p| p.into_inner()) = None;
        for (id, name, from, options) in views.sinks {
            if let Err(e) = db.restore_sink(id, &name, &from, options) {
                tracing::error!(sink = %name, "sink could not be restored and is dropped: {e}");
            }
        }
        db.keep_live_outboxes();
        db.start_sources().await;
        tracing::info!(tables, last_seq, replayed_segments, "database opened");
        if replayed_segments > 0 {
            db.start_snapshot();
        }
        Ok(db)
    }

    /// Drops the outboxes views brought back from a checkpoint for exactly-once sinks that
    /// are gone (dropped after that checkpoint, or no longer exactly once).
    fn keep_live_outboxes(&self) {
        let sinks: Vec<(String, String)> = self
            .shared
            .sinks()
            .iter()
            .filter(|(_, s)| s.exactly_once)
            .map(|(name, s)| (name.clone(), s.from.clone()))
            .collect();
        for (view, handle) in self.shared.views().iter() {
            let live = sinks.iter().filter(|(_, from)| from == view).map(|(name, _)| name.as_str()).collect();
            handle.subscribers.keep_outboxes(&live);
        }
    }

    /// Re-plans and starts a view recorded in the log.
    async fn restore_view(&self, materialized: bool, name: &str, query: String) -> Result<Outcome> {
        let state = self.session_state();
        if materialized {
            let planned = sql::plan_view(&state, name.to_string(), false, &query);
            let Planned::CreateView(create) = SnapshotCell::scope(self.shared.cell.committed(), planned).await? else {
                return Err(Error::Internal("a view query planned as something else".into()));
            };
            self.create_view(create, false).await
        } else {
            let (plan, reads) =
                SnapshotCell::scope(self.shared.cell.committed(), sql::plan_query(&state, &query)).await?;
            let create = sql::CreateView {
                name: name.to_string(),
                if_not_exists: false,
                plan,
                query,
                reads,
                emit_on_window_close: false,
            };
            self.create_plain_view(create, false).await
        }
    }

    /// Parses, plans and runs every statement in `sql`, stopping at the first error.
    pub async fn run(&self, sql: &str) -> Result<Vec<Outcome>> {
        let mut outcomes = Vec::new();
        for statement in sql::parse(sql)? {
            let planned = self.plan(&statement, sql).await?;
            outcomes.push(self.execute(planned, sql).await?);
        }
        Ok(outcomes)
    }

    /// Plans one parsed statement. `sql` is the text it came from, for error positions.
    pub async fn plan(&self, statement: &Statement, sql: &str) -> Result<Planned> {
        let state = self.session_state();
        let planned = SnapshotCell::scope(self.shared.cell.committed(), sql::plan(&state, statement, sql))
            .await
            .map_err(|e| place_relation(e, sql))?;
        if let Planned::Query(plan) | Planned::Write(plan) = &planned {
            self.check_views_healthy(plan)?;
        }
        Ok(planned)
    }

    /// Streams `(epoch, diff, columns…)` for every change to `view` until the client goes
    /// away or the view is dropped; with `snapshot`, the current rows come first.
    fn subscribe(&self, view: &str, snapshot: bool, schema: SchemaRef) -> Result<Outcome> {
        let handle = self.shared.views().get(view).cloned().ok_or_else(|| Error::Plan {
            code: "42809",
            message: format!("\"{view}\" is not a materialized view; SUBSCRIBE follows materialized views"),
            position: None,
        })?;
        let subscription = handle.subscribers.subscribe(view, &self.shared.cell, snapshot)?;
        let name = view.to_string();
        let batch_schema = schema.clone();
        let stream = futures::stream::unfold(subscription, move |mut subscription| {
            let schema = batch_schema.clone();
            let name = name.clone();
            async move {
                match subscription.changes.recv().await {
                    Some((epoch, change)) => Some((subscription_rows(&schema, epoch, &change), subscription)),
                    // Say once why the stream ends, then end it.
                    None if subscription.lagged.swap(false, Ordering::AcqRel) => Some((
                        Err(datafusion::error::DataFusionError::Execution(format!(
                            "this subscription to \"{name}\" fell too far behind and was closed; subscribe again"
                        ))),
                        subscription,
                    )),
                    None => None,
                }
            }
        });
        Ok(Outcome::Rows { schema: schema.clone(), stream: Box::pin(RecordBatchStreamAdapter::new(schema, stream)) })
    }

    /// What a write reads: the tables including changes not yet durable (they are ahead of
    /// this write in the log), and the views at their serving epoch.
    fn writer_snapshot(&self, writer: &Writer) -> Arc<Snapshot> {
        let views = self.shared.cell.serving().views.clone();
        Arc::new(Snapshot { tables: writer.working.tables.clone(), views, ..Snapshot::default() })
    }

    fn reads_views(&self, plan: &LogicalPlan) -> Result<bool> {
        let views = self.shared.views();
        let mut found = false;
        plan.apply_with_subqueries(|node| {
            found |= matches!(node, LogicalPlan::TableScan(scan) if views.contains_key(scan.table_name.table()));
            Ok(if found { TreeNodeRecursion::Stop } else { TreeNodeRecursion::Continue })
        })?;
        Ok(found)
    }

    /// A view whose dataflow failed no longer follows its inputs: refuse to read it rather
    /// than serve stale rows as if they were current.
    fn check_views_healthy(&self, plan: &LogicalPlan) -> Result<()> {
        let views = self.shared.views();
        let mut failed = None;
        plan.apply_with_subqueries(|node| {
            if let LogicalPlan::TableScan(scan) = node
                && let Some(view) = views.get(scan.table_name.table())
                && let Some(failure) = view.failures.get()
            {
                failed = Some((scan.table_name.table().to_string(), failure));
                return Ok(TreeNodeRecursion::Stop);
            }
            Ok(TreeNodeRecursion::Continue)
        })?;
        match failed {
            Some((name, failure)) => Err(Error::Plan {
                code: "XX000",
                message: format!(
                    "materialized view \"{name}\" stopped following its inputs: {failure}; drop and create it again"
                ),
                position: None,
            }),
            None => Ok(()),
        }
    }

    /// Runs a planned statement.
    pub async fn execute(&self, planned: Planned, sql: &str) -> Result<Outcome> {
        let result = match planned {
            Planned::Query(plan) => self.query(plan, sql).await,
            Planned::Write(plan) => self.write(plan, sql).await,
            Planned::CreateTable(create) => self.create_table(create, sql).await,
            Planned::Drop(drop) => self.drop_relations(drop).await,
            Planned::CreateSource { name, if_not_exists, columns, watermark, options } => {
                self.create_source(name, if_not_exists, columns, watermark, options).await
            }
            Planned::ShowSources => {
                let names = self.shared.sources().keys().cloned().collect();
                self.names(names)
            }
            Planned::CreateSink { name, if_not_exists, from, options } => {
                self.create_sink(name, if_not_exists, from, options).await
            }
            Planned::ShowSinks => {
                let names = self.shared.sinks().keys().cloned().collect();
                self.names(names)
            }
            Planned::DeclareSubscribe { .. } | Planned::Fetch { .. } | Planned::Close { .. } => {
                Err(Error::NotSupported {
                    feature: "cursors outside a client connection".into(),
                    hint: Some("DECLARE, FETCH and CLOSE work over the Postgres protocol".into()),
                })
            }
            Planned::ShowTables => {
                let names = self.shared.cell.committed().tables.keys().cloned().collect();
                self.names(names)
            }
            Planned::CreateView(create) => self.create_view(create, true).await,
            Planned::ShowViews => {
                let names = self.shared.views().keys().cloned().collect();
                self.names(names)
            }
            Planned::Flush => self.flush().await.map(|_| Outcome::Command { tag: "FLUSH", rows: None }),
            Planned::Checkpoint => self.checkpoint().await.map(|_| Outcome::Command { tag: "CHECKPOINT", rows: None }),
            Planned::ExplainView(lines) => self.lines(sql::explain_schema(), lines),
            Planned::Subscribe { view, snapshot, schema } => self.subscribe(&view, snapshot, schema),
            Planned::CreatePlainView(view) => self.create_plain_view(view, true).await,
            Planned::Model(statement) => self.run_model_statement(statement).await,
        };
        result.map_err(|e| place_relation(e, sql))
    }

    /// Tells the catalog functions (`current_user`, `pg_roles`, …) who clients log in as.
    pub fn set_login_user(&self, user: &str) -> Result<()> {
        system::set_user(&self.ctx, user)
    }

    /// A fresh copy of the session state, for planning.
    pub fn session_state(&self) -> SessionState {
        self.ctx.state()
    }

    /// Names and row counts of all tables, for metrics.
    pub fn table_rows(&self) -> Vec<(String, usize)> {
        self.shared.cell.committed().tables.iter().map(|(name, v)| (name.clone(), v.num_rows())).collect()
    }

    /// Log counters, for metrics.
    pub fn log_stats(&self) -> Arc<LogStats> {
        self.shared.log.stats().clone()
    }

    async fn query(&self, plan: LogicalPlan, sql: &str) -> Result<Outcome> {
        // Queries over views read the last epoch every view finished, tables included, so
        // everything they read agrees; queries over tables alone read the latest commit.
        let snapshot = if self.reads_views(&plan)? { self.shared.cell.serving() } else { self.shared.cell.committed() };
        // A lookup by key skips DataFusion's planning and the scan.
        if let Some((schema, batch)) = lookup::answer(&plan, &snapshot)? {
            let stream = RecordBatchStreamAdapter::new(schema.clone(), futures::stream::iter([Ok(batch)]));
            return Ok(Outcome::Rows { schema, stream: Box::pin(stream) });
        }
        let ctx = &self.ctx;
        SnapshotCell::scope(snapshot, async move {
            let frame = ctx.execute_logical_plan(plan).await?;
            let schema: SchemaRef = Arc::new(frame.schema().as_arrow().clone());
            let stream = frame.execute_stream().await?;
            Ok(Outcome::Rows { schema, stream })
        })
        .await
        .map_err(|e: datafusion::error::DataFusionError| Error::from_datafusion(e, sql))
    }

    /// Runs `plan` to completion reading `snapshot`.
    async fn collect(&self, plan: LogicalPlan, snapshot: Arc<Snapshot>, sql: &str) -> Result<Vec<RecordBatch>> {
        let ctx = &self.ctx;
        SnapshotCell::scope(snapshot, async move { ctx.execute_logical_plan(plan).await?.collect().await })
            .await
            .map_err(|e| Error::from_datafusion(e, sql))
    }

    async fn write(&self, plan: LogicalPlan, sql: &str) -> Result<Outcome> {
        let LogicalPlan::Dml(dml) = plan else {
            return Err(Error::Internal("write path given a plan that is not INSERT, UPDATE or DELETE".into()));
        };
        let name = dml.table_name.table().to_string();
        // INSERT … VALUES reads no table: compute its rows before taking the writer lock,
        // so concurrent inserts only serialize on applying and queueing their change.
        let ready_rows = match dml.op {
            WriteOp::Insert(_) if !reads_tables(&dml.input)? => {
                Some(self.collect(dml.input.as_ref().clone(), self.shared.cell.committed(), sql).await?)
            }
            _ => None,
        };
        if self.shared.views().contains_key(&name) {
            return Err(Error::Plan {
                code: "42809",
                message: format!("cannot change materialized view \"{name}\"; change the tables it reads"),
                position: None,
            });
        }
        if self.shared.sources().contains_key(&name) {
            return Err(Error::Plan {
                code: "42809",
                message: format!("cannot change source \"{name}\"; its rows come from its connector"),
                position: None,
            });
        }
        self.shared.feeds.wait_for_room().await;
        let mut writer = self.shared.writer.lock().await;
        let state =
            writer.tables.get(&name).ok_or_else(|| Error::UndefinedTable { name: name.clone(), position: None })?;
        let def = state.def().clone();
        check_target(&dml, &def)?;
        if def.append_only && !matches!(dml.op, WriteOp::Insert(_)) {
            return Err(Error::NotSupported {
                feature: format!(
                    "{} on \"{name}\", a table with a WATERMARK,",
                    if matches!(dml.op, WriteOp::Delete) { "DELETE" } else { "UPDATE" }
                ),
                hint: Some("a table with a watermark only takes appended rows (INSERT)".into()),
            });
        }
        let schema = def.schema.clone();
        let working = self.writer_snapshot(&writer);
        let (tag, change) = match dml.op {
            WriteOp::Insert(_) => {
                let rows = match ready_rows {
                    Some(rows) => rows,
                    None => self.collect(dml.input.as_ref().clone(), working, sql).await?,
                };
                let rows = concat(&schema, rows)?;
                ("INSERT", ChangeBatch::inserts(rows))
            }
            WriteOp::Delete => {
                let rows = concat(&schema, self.collect(dml.input.as_ref().clone(), working, sql).await?)?;
                ("DELETE", ChangeBatch::retracts(rows))
            }
            WriteOp::Update => {
                let paired = old_and_new_rows(&dml, &def)?;
                let batches = self.collect(paired, working, sql).await?;
                let width = schema.fields().len();
                let mut olds = Vec::new();
                let mut news = Vec::new();
                for batch in batches {
                    olds.push(RecordBatch::try_new(relaxed(&schema), batch.columns()[..width].to_vec())?);
                    news.push(RecordBatch::try_new(relaxed(&schema), batch.columns()[width..].to_vec()).map_err(
                        |e| Error::Internal(format!("UPDATE produced rows that do not fit \"{name}\": {e}")),
                    )?);
                }
                ("UPDATE", ChangeBatch::replace(concat(&schema, olds)?, concat(&schema, news)?)?)
            }
            _ => return Err(Error::not_supported("this kind of write")),
        };
        let affected = if tag == "UPDATE" { change.num_rows() / 2 } else { change.num_rows() };
        if affected == 0 {
            return Ok(Outcome::Command { tag, rows: Some(0) });
        }
        writer.apply(&name, &change)?;
        let entries = vec![Record::Change { table: name.clone() }.entry(Some(change.to_flat()?))?];
        let ack = self.enqueue(&writer, entries, vec![(name, change)]).await?;
        drop(writer);
        self.durable(ack).await?;
        Ok(Outcome::Command { tag, rows: Some(affected) })
    }

    async fn create_table(&self, create: CreateTable, sql: &str) -> Result<Outcome> {
        let defaults = plan_defaults(&self.ctx, &create.defaults)?;
        let mut writer = self.shared.writer.lock().await;
        if self.shared.exists_already(&writer, &create.name, create.if_not_exists)? {
            return Ok(Outcome::Command { tag: "CREATE TABLE", rows: None });
        }
        let rows = match create.source {
            Some(plan) => Some(concat(&create.schema, self.collect(plan, self.writer_snapshot(&writer), sql).await?)?),
            None => None,
        };
        let def = Arc::new(TableDef::new(
            writer.next_id,
            create.name.clone(),
            create.schema.clone(),
            create.primary_key,
            create.defaults,
            defaults,
        ));
        writer.create(def.clone())?;
        let mut entries = vec![create_record(&def)?];
        if let Some(rows) = rows {
            let change = ChangeBatch::inserts(rows);
            if let Err(e) = writer.apply(&def.name, &change) {
                writer.drop_table(&def.name);
                return Err(e);
            }
            entries.push(Record::Change { table: def.name.clone() }.entry(Some(change.to_flat()?))?);
        }
        let ack = self.enqueue(&writer, entries, Vec::new()).await?;
        drop(writer);
        self.durable(ack).await?;
        Ok(Outcome::Command { tag: "CREATE TABLE", rows: None })
    }

    fn names(&self, names: Vec<String>) -> Result<Outcome> {
        self.lines(sql::show_tables_schema(), names)
    }

    /// A one-column text result.
    fn lines(&self, schema: SchemaRef, lines: Vec<String>) -> Result<Outcome> {
        let batch = RecordBatch::try_new(schema.clone(), vec![Arc::new(StringArray::from(lines))])?;
        let stream = RecordBatchStreamAdapter::new(schema.clone(), futures::stream::iter([Ok(batch)]));
        Ok(Outcome::Rows { schema, stream: Box::pin(stream) })
    }

    /// Queues log entries for the writer's current state; call with the writer lock held.
    /// Once durable, the state is published and `changes` flow to the views.
    async fn enqueue(
        &self,
        writer: &Writer,
        entries: Vec<LogEntry>,
        changes: Vec<(String, ChangeBatch)>,
    ) -> Result<Ack> {
        let working = writer.working.clone();
        let cell = self.shared.cell.clone();
        let feeds = self.shared.feeds.clone();
        let publish = Box::new(move |seq| {
            cell.publish_tables(working.tables.clone(), seq);
            for (table, change) in &changes {
                feeds.send_change(table, change);
            }
        });
        self.shared.log.enqueue(entries, publish).await
    }

    /// Waits until every materialized view includes every write committed before the call.
    pub async fn flush(&self) -> Result<u64> {
        let mut complete = self.shared.epochs.subscribe();
        let epoch = self.shared.inject_barrier(false).await?;
        let caught_up = tokio::time::timeout(CATCH_UP_TIMEOUT, async {
            loop {
                if let Some((name, failure)) = self.shared.abandon_failed_views().into_iter().next() {
                    return Err(Error::Plan {
                        code: "XX000",
                        message: format!("materialized view \"{name}\" failed: {failure}"),
                        position: None,
                    });
                }
                if *complete.borrow_and_update() >= epoch {
                    return Ok(());
                }
                // Wake on progress, and now and then to notice a failed view.
                let _ = tokio::time::timeout(Duration::from_millis(200), complete.changed()).await;
            }
        })
        .await;
        match caught_up {
            Ok(result) => result.map(|_| epoch),
            Err(_) => Err(Error::Plan {
                code: "57014",
                message: format!("materialized views did not catch up within {CATCH_UP_TIMEOUT:?}"),
                position: None,
            }),
        }
    }

    /// The checkpointed states of view `name` and the changes to its `inputs` since, if
    /// the checkpoint being restored holds this view with this query, nothing it reads was
    /// created or dropped since, and its states read back whole.
    async fn restore_point(&self, name: &str, query: &str, inputs: &[String]) -> Option<(u64, view::Restore)> {
        let (epoch, object, tail, layout) = {
            let restoring = self.shared.restoring.lock().unwrap_or_else(|p| p.into_inner());
            let point = restoring.as_ref()?;
            if point.touched.contains(name) || inputs.iter().any(|i| point.touched.contains(i)) {
                tracing::info!(view = %name, "rebuilding the view: it or what it reads changed since the checkpoint");
                return None;
            }
            let entry = point.manifest.views.iter().find(|v| v.name == name && v.query == query)?;
            let tail = inputs.iter().map(|i| (i.clone(), point.tail.get(i).cloned().unwrap_or_default())).collect();
            (point.manifest.epoch, entry.object.clone(), tail, entry.layout.clone())
        };
        let read = async {
            let stored = self.shared.checkpoints.read_view(&object).await?;
            let mut states = BTreeMap::new();
            let mut files = BTreeMap::new();
            let download =
                self.shared.spill.root.join(format!("download-{}", DOWNLOADS.fetch_add(1, Ordering::Relaxed)));
            for (number, state) in stored {
                if !state.files.is_empty() {
                    let dir = download.join(format!("op-{number}"));
                    let bytes = self.shared.checkpoints.download(&state, &dir).await?;
                    tracing::info!(view = %name, operator = number, bytes, "downloaded spilled state");
                    files.insert(number, dir);
                }
                states.insert(number, state.bytes);
            }
            Ok::<_, Error>(view::Restore { states, files, tail, layout })
        };
        match read.await {
            Ok(restore) => Some((epoch, restore)),
            Err(e) => {
                tracing::warn!(view = %name, epoch, "checkpoint unreadable, rebuilding the view: {e}");
                None
            }
        }
    }

    /// At shutdown: a checkpoint if checkpoints are on and anything was written since the
    /// last one.
    pub async fn final_checkpoint(&self) -> Result<()> {
        let written = self.shared.log.stats().last_seq.load(Ordering::Relaxed);
        let checkpointed = self.shared.last_checkpoint.lock().unwrap_or_else(|p| p.into_inner()).1;
        if self.shared.checkpoint_interval.is_none() || written <= checkpointed || self.shared.views().is_empty() {
            return Ok(());
        }
        self.checkpoint().await.map(|epoch| tracing::info!(epoch, "checkpoint taken at shutdown"))
    }

    /// Takes a checkpoint now (after the one in progress, if any) and waits until it is
    /// stored; returns its epoch. Every write committed before the call is in it.
    pub async fn checkpoint(&self) -> Result<u64> {
        let waited = tokio::time::timeout(CATCH_UP_TIMEOUT, async {
            while !self.shared.checkpoints.reserve(true) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let epoch = self.shared.inject_barrier(true).await?;
            loop {
                if let Some(record) = self.shared.checkpoints.history().into_iter().find(|r| r.epoch == epoch) {
                    return record
                        .result
                        .map(|_| epoch)
                        .map_err(|e| Error::Storage(format!("checkpoint {epoch} failed: {e}")));
                }
                self.shared.abandon_failed_views();
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        waited.unwrap_or_else(|_| {
            Err(Error::Plan {
                code: "57014",
                message: format!("the checkpoint did not complete within {CATCH_UP_TIMEOUT:?}"),
                position: None,
            })
        })
    }

    /// Starts a materialized view from the current contents of its inputs. `log` is false
    /// when restarting a view that is already in the log; it is then restored from the
    /// checkpoint being restored, if that holds it.
    async fn create_view(&self, create: CreateView, log: bool) -> Result<Outcome> {
        let state = self.session_state();
        // Model functions in the view switch versions at barriers after this one.
        let plan = crate::ml::udf::bind_to_view(create.plan.clone(), self.shared.epochs.last_barrier())?;
        let root = sql::view::lower_view(&state, &plan, create.emit_on_window_close)?;
        let mut inputs = root.tables();
        inputs.extend(create.reads.iter().filter(|r| !inputs.contains(r)).cloned().collect::<Vec<_>>());
        let mut writer = self.shared.writer.lock().await;
        if self.shared.exists_already(&writer, &create.name, create.if_not_exists)? {
            return Ok(Outcome::Command { tag: "CREATE MATERIALIZED VIEW", rows: None });
        }
        // Every leaf must be a relation whose changes reach views: a system catalog never
        // sends any, and the view would stay empty.
        let committed = self.shared.cell.committed();
        let views = self.shared.views().keys().cloned().collect::<HashSet<_>>();
        if let Some(missing) = root.tables().into_iter().find(|t| committed.relation(t).is_none() && !views.contains(t))
        {
            return Err(Error::NotSupported {
                feature: format!("reading \"{missing}\" in a materialized view"),
                hint: Some(
                    "views read tables, sources, materialized views and table functions; system catalogs are not maintained incrementally"
                        .into(),
                ),
            });
        }
        let id = writer.next_id;
        writer.next_id += 1;
        let schema = sql::without_watermark(&relaxed(&Arc::new(create.plan.schema().as_arrow().clone())));
        // A view that only ever gains rows keeps them without an index, as a source does.
        let def = match sql::view::append_only(&create.plan) {
            true => TableDef::append_only(id, create.name.clone(), schema),
            false => TableDef::new(id, create.name.clone(), schema, vec![], vec![], HashMap::new()),
        };
        let def = Arc::new(def.with_lookup_key(lookup::view_key(&create.plan)));
        let subscribers = Arc::new(view::Subscribers::default());
        let failures = Arc::new(FailureSlot::default());
        tracing::info!(view = %create.name, "starting materialized view:\n{}", root.describe());
        // A view reading another is always rebuilt: it starts from that view's rows.
        let reads_views = inputs.iter().any(|i| views.contains(i));
        let report = (!reads_views).then(|| self.shared.checkpoints.report_for(id));
        let restore = match log || reads_views {
            true => None,
            false => self.restore_point(&create.name, &create.query, &root.tables()).await,
        };
        let start = |root, restore| {
            let sink = ViewSink::new(
                create.name.clone(),
                TableState::new(def.clone())?,
                self.shared.cell.clone(),
                self.shared.epochs.clone(),
                subscribers.clone(),
                self.shared.feeds.clone(),
            );
            let state = view::StateOptions { report: report.clone(), restore, spill: self.shared.spill.clone() };
            view::spawn(id, root, sink, &self.shared.feeds, &failures, state)
        };
        let (mut pending, restored_from) = match restore {
            None => (start(root, None)?, None),
            Some((epoch, restore)) => match start(root, Some(restore)) {
                Ok(pending) => {
                    tracing::info!(view = %create.name, epoch, "materialized view restored from its checkpoint");
                    (pending, Some(epoch))
                }
                Err(e) => {
                    tracing::warn!(view = %create.name, epoch, "checkpoint not restored, rebuilding the view: {e}");
                    (start(sql::view::lower_view(&state, &plan, create.emit_on_window_close)?, None)?, None)
                }
            },
        };
        if !log && restored_from.is_none() {
            // Rebuilt from its inputs at restart: wrong if an input forgot rows.
            let forgetful = inputs.iter().find(|i| writer.tables.get(*i).is_some_and(|t| t.trimmed() > 0));
            if let Some(source) = forgetful {
                let failure = format!(
                    "cannot be rebuilt after the restart: source \"{source}\" has forgotten rows (retention = 'none') and the view's checkpoint could not be used; drop and re-create the view"
                );
                tracing::error!(view = %create.name, "{failure}");
                failures.set(failure);
            }
        }
        let checkpointed = report.is_some().then(|| pending.layout.clone());
        let late = pending.late.clone();
        for (name, upstream) in self.shared.views().iter() {
            if inputs.contains(name) {
                pending.reads_view(name, upstream.subscribers.clone());
            }
        }
        self.shared.views().insert(
            create.name.clone(),
            ViewHandle {
                id,
                query: create.query.clone(),
                inputs,
                failures,
                subscribers,
                late,
                checkpointed,
                restored_from,
            },
        );
        let entries = if log {
            vec![Record::CreateView { name: create.name.clone(), query: create.query }.entry(None)?]
        } else {
            Vec::new()
        };
        let (feeds, epochs, cell) = (self.shared.feeds.clone(), self.shared.epochs.clone(), self.shared.cell.clone());
        let ack = self.shared.log.enqueue(entries, Box::new(move |_| pending.connect(&feeds, &epochs, &cell))).await?;
        drop(writer);
        ack.durable().await?;
        // Return once the view shows its backfilled contents.
        self.flush().await?;
        Ok(Outcome::Command { tag: "CREATE MATERIALIZED VIEW", rows: None })
    }

    /// Creates a plain view: a named query that the planner inlines where it is used.
    async fn create_plain_view(&self, view: sql::CreateView, log: bool) -> Result<Outcome> {
        let mut writer = self.shared.writer.lock().await;
        if self.shared.exists_already(&writer, &view.name, view.if_not_exists)? {
            return Ok(Outcome::Command { tag: "CREATE VIEW", rows: None });
        }
        let created = writer.next_id;
        writer.next_id += 1;
        let provider: Arc<dyn datafusion::catalog::TableProvider> =
            Arc::new(datafusion::catalog::view::ViewTable::new(view.plan, Some(view.query.clone())));
        self.shared
            .plain_views()
            .insert(view.name.clone(), PlainViewHandle { query: view.query.clone(), reads: view.reads, created });
        let entries = if log {
            vec![Record::CreatePlainView { name: view.name.clone(), query: view.query }.entry(None)?]
        } else {
            Vec::new()
        };
        let cell = self.shared.cell.clone();
        let name = view.name;
        let ack =
            self.shared.log.enqueue(entries, Box::new(move |_| cell.publish_plain_view(&name, Some(provider)))).await?;
        drop(writer);
        ack.durable().await?;
        Ok(Outcome::Command { tag: "CREATE VIEW", rows: None })
    }

    /// DROP TABLE / MATERIALIZED VIEW / VIEW. Without CASCADE a relation that a view reads
    /// is kept (2BP01); with CASCADE the views reading it, directly or through other views,
    /// are dropped with it.
    async fn drop_relations(&self, statement: sql::DropRelations) -> Result<Outcome> {
        let sql::DropRelations { kind, names, if_exists, cascade } = statement;
        let tag = kind.drop_tag();
        let mut writer = self.shared.writer.lock().await;
        let mut dropping: Vec<String> = Vec::new();
        for name in names {
            match self.shared.kind_of(&writer, &name) {
                Some(found) if found == kind => {
                    if !dropping.contains(&name) {
                        dropping.push(name);
                    }
                }
                Some(found) => {
                    return Err(Error::Plan {
                        code: "42809",
                        message: format!(
                            "\"{name}\" is a {}, not a {}; use {}",
                            found.noun(),
                            kind.noun(),
                            found.drop_tag()
                        ),
                        position: None,
                    });
                }
                None if if_exists => {}
                None => return Err(Error::UndefinedTable { name, position: None }),
            }
        }
        if cascade {
            let mut next = 0;
            while next < dropping.len() {
                for dependent in self.shared.dependents(&dropping[next]) {
                    if !dropping.contains(&dependent) {
                        dropping.push(dependent);
                    }
                }
                next += 1;
            }
        } else {
            for name in &dropping {
                self.shared.check_no_dependents(kind.noun(), name, &dropping)?;
            }
        }
        // Readers before what they read.
        let mut entries = Vec::new();
        let mut plain = Vec::new();
        for name in dropping.into_iter().rev() {
            match self.shared.kind_of(&writer, &name) {
                Some(sql::RelationKind::Table) => {
                    writer.drop_table(&name);
                    entries.push(Record::DropTable { name }.entry(None)?);
                }
                Some(sql::RelationKind::Source) => {
                    if let Some(source) = self.shared.sources().remove(&name) {
                        source.stop();
                    }
                    writer.drop_table(&name);
                    entries.push(Record::DropTable { name }.entry(None)?);
                }
                Some(sql::RelationKind::MaterializedView) => {
                    let removed = self.shared.views().remove(&name);
                    if let Some(view) = removed {
                        self.shared.checkpoints.forget_view(view.id);
                        view.subscribers.close_view();
                        self.shared.epochs.remove_view(&name, view.id, &self.shared.feeds, &self.shared.cell);
                        self.shared.cell.publish_view(&name, None);
                    }
                    entries.push(Record::DropView { name }.entry(None)?);
                }
                Some(sql::RelationKind::View) => {
                    self.shared.plain_views().remove(&name);
                    entries.push(Record::DropPlainView { name: name.clone() }.entry(None)?);
                    plain.push(name);
                }
                Some(sql::RelationKind::Sink) => {
                    let removed = self.shared.sinks().remove(&name);
                    if let Some(sink) = removed {
                        sink.stop();
                        if let Some(view) = self.shared.views().get(&sink.from) {
                            view.subscribers.detach_outbox(&name);
                        }
                    }
                    entries.push(Record::DropSink { name }.entry(None)?);
                }
                None => {}
            }
        }
        if entries.is_empty() {
            return Ok(Outcome::Command { tag, rows: None });
        }
        let working = writer.working.clone();
        let cell = self.shared.cell.clone();
        let publish = Box::new(move |seq| {
            cell.publish_tables(working.tables.clone(), seq);
            for name in &plain {
                cell.publish_plain_view(name, None);
            }
        });
        let ack = self.shared.log.enqueue(entries, publish).await?;
        drop(writer);
        self.durable(ack).await?;
        Ok(Outcome::Command { tag, rows: None })
    }

    async fn durable(&self, ack: Ack) -> Result<()> {
        ack.durable().await?;
        let stats = self.shared.log.stats();
        let last = stats.last_seq.load(Ordering::Relaxed);
        if last - stats.snapshot_seq.load(Ordering::Relaxed) >= self.shared.snapshot_every {
            self.start_snapshot();
        }
        Ok(())
    }

    /// Writes a snapshot of the committed state in the background (one at a time), so the
    /// log stays short and restarts stay fast.
    fn start_snapshot(&self) {
        let backoff = self.shared.snapshot_backoff.lock().unwrap_or_else(|p| p.into_inner()).1;
        if backoff.is_some_and(|at| std::time::Instant::now() < at) {
            return;
        }
        if self.shared.snapshot_running.swap(true, Ordering::AcqRel) {
            return;
        }
        // Cut at the last stored checkpoint's entry, when there is one, so that entry
        // survives the snapshot and a restart still restores views from it. Once a source
        // has forgotten rows that is required: its views cannot be rebuilt from what is left.
        let cut = self.shared.stored_cut.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let snapshot_seq = self.shared.log.stats().snapshot_seq.load(Ordering::Relaxed);
        let cut = cut.filter(|(cut, _)| cut.seq > snapshot_seq);
        let forgotten = || self.shared.cell.committed().tables.values().any(|t| t.trimmed > 0);
        if cut.is_none() && forgotten() {
            self.shared.snapshot_running.store(false, Ordering::Release);
            return; // the next stored checkpoint gives a cut
        }
        let shared = self.shared.clone();
        tokio::spawn(async move {
            let (snapshot, marker, forgotten) = match cut {
                Some((cut, forgotten)) => {
                    let snapshot = Snapshot { tables: cut.tables.tables.clone(), seq: cut.seq, ..Snapshot::default() };
                    (Arc::new(snapshot), Some(cut.epoch), forgotten)
                }
                None => (shared.cell.committed(), None, HashSet::new()),
            };
            let started = (chrono::Utc::now(), std::time::Instant::now());
            let result = async {
                let mut entries = Vec::new();
                let sources =
                    shared.sources().iter().map(|(n, s)| (n.clone(), s.options.clone())).collect::<BTreeMap<_, _>>();
                for version in snapshot.tables.values() {
                    let name = &version.def.name;
                    entries.push(match sources.get(name) {
                        Some(options) => {
                            Record::CreateSource { id: version.def.id, name: name.clone(), options: options.clone() }
                                .entry(Some(RecordBatch::new_empty(version.def.schema.clone())))?
                        }
                        None => create_record(&version.def)?,
                    });
                    // Rows a source forgot (or forgets at this cut) are left out; the
                    // numbering of those it keeps goes on from them.
                    let before = if forgotten.contains(name) { version.appended() } else { version.trimmed };
                    if before > 0 {
                        entries.push(Record::Trim { table: name.clone(), before }.entry(None)?);
                    }
                    if !forgotten.contains(name) {
                        for batch in version.batches()? {
                            entries.push(Record::Rows { table: version.def.name.clone() }.entry(Some(batch))?);
                        }
                    }
                    if let Some(ledger) = &version.ledger {
                        let record = Record::Ledger {
                            table: name.clone(),
                            offsets: ledger.offsets.iter().map(|(p, o)| (*p, *o)).collect(),
                            dead_letter_count: ledger.dead_letter_count,
                        };
                        entries.push(record.entry(Some(source::dead_letter_batch(ledger.dead_letters.iter())?))?);
                    }
                }
                for record in model::snapshot_records(&shared.models.registry) {
                    entries.push(record.entry(None)?);
                }
                // Views in creation order: a view may read the views before it.
                let mut views: Vec<(u64, bool, String, String)> =
                    shared.plain_views().iter().map(|(n, v)| (v.created, false, n.clone(), v.query.clone())).collect();
                views.extend(shared.views().iter().map(|(n, v)| (v.id, true, n.clone(), v.query.clone())));
                views.sort();
                for (_, materialized, name, query) in views {
                    let record = if materialized {
                        Record::CreateView { name, query }
                    } else {
                        Record::CreatePlainView { name, query }
                    };
                    entries.push(record.entry(None)?);
                }
                let mut sinks: Vec<(u64, String, String, BTreeMap<String, String>)> =
                    shared.sinks().iter().map(|(n, s)| (s.id, n.clone(), s.from.clone(), s.options.clone())).collect();
                sinks.sort();
                for (_, name, from, options) in sinks {
                    entries.push(Record::CreateSink { name, from, options }.entry(None)?);
                }
                if let Some(epoch) = marker {
                    entries.push(Record::Checkpoint { epoch }.entry(None)?);
                }
                shared.log.write_snapshot(snapshot.seq, &entries).await
            }
            .await;
            {
                // Failures back off exponentially (1 s doubling to a minute) so a store that
                // is away is not hammered on every commit; the log keeps everything meanwhile.
                let mut backoff = shared.snapshot_backoff.lock().unwrap_or_else(|p| p.into_inner());
                match &result {
                    Ok(bytes) => {
                        tracing::info!(seq = snapshot.seq, bytes, "snapshot written");
                        *backoff = (0, None);
                    }
                    Err(e) => {
                        let wait = (SNAPSHOT_RETRY_FIRST * 2u32.pow(backoff.0.min(6))).min(SNAPSHOT_RETRY_MAX);
                        tracing::warn!(
                            seq = snapshot.seq,
                            "snapshot failed, the log is kept; next try in {wait:?}: {e}"
                        );
                        *backoff = (backoff.0 + 1, Some(std::time::Instant::now() + wait));
                    }
                }
            }
            let record = status::SnapshotRecord {
                seq: snapshot.seq,
                started_at: started.0,
                duration: started.1.elapsed(),
                rows: snapshot.tables.values().map(|t| t.num_rows() as u64).sum(),
                result: result.map_err(|e| e.to_string()),
            };
            let mut history = shared.snapshots.lock().unwrap_or_else(|p| p.into_inner());
            if history.len() == status::SNAPSHOT_HISTORY {
                history.pop_front();
            }
            history.push_back(record);
            drop(history);
            shared.snapshot_running.store(false, Ordering::Release);
        });
    }
}

fn new_session(cell: Arc<SnapshotCell>, workers: usize) -> Result<SessionContext> {
    let mut config = SessionConfig::new()
        .with_target_partitions(workers.max(1))
        .with_default_catalog_and_schema(CATALOG_NAME, SCHEMA_NAME)
        .with_create_default_catalog_and_schema(false)
        // `system` registers information_schema itself, with Postgres type names.
        .with_information_schema(false);
    let options = config.options_mut();
    options.set("datafusion.sql_parser.dialect", "PostgreSQL")?;
    // Plain Utf8 keeps stored tables and their log in one string type.
    options.set("datafusion.sql_parser.map_string_types_to_utf8view", "false")?;
    // TIMESTAMPTZ needs a session time zone to mean anything; like a Postgres server
    // configured with TimeZone = 'UTC'.
    options.set("datafusion.execution.time_zone", "+00:00")?;
    // Spans let planning errors point at the offending identifier.
    options.set("datafusion.sql_parser.collect_spans", "true")?;
    let ctx = SessionContext::new_with_config(config);
    // Postgres spells sample variance `variance` too.
    let var_samp = datafusion::functions_aggregate::variance::var_samp_udaf();
    ctx.register_udaf(var_samp.as_ref().clone().with_aliases(["variance"]));
    let catalog = MemoryCatalogProvider::new();
    catalog.register_schema(SCHEMA_NAME, Arc::new(FreshetSchema::new(cell.clone())))?;
    ctx.register_catalog(CATALOG_NAME, Arc::new(catalog));
    system::install(&ctx, cell)?;
    Ok(ctx)
}

/// Barriers every `interval` while any view runs; stops when the database is dropped.
fn spawn_barriers(shared: std::sync::Weak<Shared>, interval: Duration) {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(interval).await;
            let Some(shared) = shared.upgrade() else { return };
            if shared.views().is_empty() {
                continue;
            }
            shared.abandon_failed_views();
            if let Err(e) = shared.trim_sources().await {
                tracing::warn!("sources could not forget checkpointed rows: {e}");
            }
            let checkpoint = shared.checkpoint_due();
            if let Err(e) = shared.inject_barrier(checkpoint).await {
                tracing::warn!("barrier not injected: {e}");
            }
        }
    });
}

/// Applies log entries to `writer`; view definitions are collected into `views` (name,
/// query) in order, to be started once every table is recovered.
/// View definitions found while replaying, in creation order: (name, query).
/// The views in the log, in creation order (a view may read those before it).
#[derive(Default)]
struct RecoveredViews {
    /// (materialized, name, query).
    list: Vec<(bool, String, String)>,
    /// Sources by name: id and options.
    sources: BTreeMap<String, (u64, BTreeMap<String, String>)>,
    /// Sinks in creation order: (order, name, view, options).
    sinks: Vec<(u64, String, String, BTreeMap<String, String>)>,
    /// Models: their stored versions and the active one.
    models: model::RecoveredModels,
    /// Epochs of the complete checkpoints in the store.
    checkpoints: HashSet<u64>,
    /// The log after the last of those checkpoints' entries, if one was met.
    tail: Option<Tail>,
    /// The greatest checkpoint epoch the log mentions.
    last_checkpoint: u64,
}

/// What the log holds after a checkpoint's entry.
#[derive(Default)]
struct Tail {
    epoch: u64,
    changes: HashMap<String, Vec<ChangeBatch>>,
    touched: HashSet<String>,
}

/// The complete checkpoints this build can restore, by epoch. Trouble reading them costs
/// only a rebuild of the views, so it is reported, not fatal.
async fn checkpoints_to_restore(store: &Arc<dyn ObjectStore>) -> HashMap<u64, crate::state::checkpoint::Manifest> {
    let format = crate::state::checkpoint::state_format();
    match crate::state::checkpoint::complete(store).await {
        Ok(manifests) => manifests
            .into_iter()
            .filter(|m| {
                let usable = m.format == format;
                if !usable {
                    tracing::info!(
                        epoch = m.epoch,
                        "checkpoint written by {} is not restored; views are rebuilt",
                        m.format
                    );
                }
                usable
            })
            .map(|m| (m.epoch, m))
            .collect(),
        Err(e) => {
            tracing::warn!("checkpoints could not be read; views are rebuilt from their inputs: {e}");
            HashMap::new()
        }
    }
}

fn replay(ctx: &SessionContext, writer: &mut Writer, views: &mut RecoveredViews, entries: Vec<LogEntry>) -> Result<()> {
    for entry in entries {
        let record: Record = serde_json::from_slice(&entry.header)
            .map_err(|e| Error::Corrupt { location: "log entry header".into(), reason: e.to_string() })?;
        let batch = || {
            entry.batch.clone().ok_or_else(|| Error::Corrupt {
                location: format!("log record {record:?}"),
                reason: "rows are missing".into(),
            })
        };
        if views.models.replay(&record) {
            continue;
        }
        if let Some(tail) = &mut views.tail {
            match &record {
                Record::CreateTable { name, .. }
                | Record::DropTable { name }
                | Record::CreateSource { name, .. }
                | Record::CreateView { name, .. }
                | Record::DropView { name }
                | Record::CreatePlainView { name, .. }
                | Record::DropPlainView { name } => {
                    tail.touched.insert(name.clone());
                }
                _ => {}
            }
        }
        match &record {
            Record::Checkpoint { epoch } => {
                views.last_checkpoint = views.last_checkpoint.max(*epoch);
                if views.checkpoints.contains(epoch) {
                    views.tail = Some(Tail { epoch: *epoch, ..Tail::default() });
                }
            }
            Record::CreateTable { id, name, primary_key, defaults } => {
                let schema = batch()?.schema();
                let planned = plan_defaults(ctx, defaults)?;
                let def = TableDef::new(*id, name.clone(), schema, primary_key.clone(), defaults.clone(), planned);
                writer.create(Arc::new(def))?;
            }
            Record::DropTable { name } => {
                writer.drop_table(name);
                views.sources.remove(name);
            }
            Record::CreateSource { id, name, options } => {
                writer.create(source::relation(*id, name, batch()?.schema()))?;
                views.sources.insert(name.clone(), (*id, options.clone()));
            }
            Record::CreateView { name, query } => {
                // A snapshot may already hold a view whose record is also in a later segment.
                views.list.retain(|(_, n, _)| n != name);
                views.list.push((true, name.clone(), query.clone()));
            }
            Record::DropView { name } | Record::DropPlainView { name } => views.list.retain(|(_, n, _)| n != name),
            Record::Ledger { table, offsets, dead_letter_count } => {
                let dead = source::dead_letters_from(&batch()?)?;
                writer.advance_ledger(table, offsets.iter().copied().collect(), &dead, Some(*dead_letter_count))?;
            }
            Record::CreateSink { name, from, options } => {
                views.sinks.retain(|(_, n, _, _)| n != name);
                let order = views.sinks.last().map_or(0, |s| s.0 + 1);
                views.sinks.push((order, name.clone(), from.clone(), options.clone()));
            }
            Record::DropSink { name } => views.sinks.retain(|(_, n, _, _)| n != name),
            Record::Trim { table, before } => writer.trim(table, *before)?,
            Record::CreatePlainView { name, query } => {
                views.list.retain(|(_, n, _)| n != name);
                views.list.push((false, name.clone(), query.clone()));
            }
            Record::ModelVersion { .. } | Record::ActivateModel { .. } | Record::DropModel { .. } => {}
            Record::Change { table } | Record::Rows { table } => {
                let state = writer.tables.get(table).ok_or_else(|| Error::Corrupt {
                    location: format!("log record {record:?}"),
                    reason: "the table it changes does not exist".into(),
                })?;
                let schema = state.def().schema.clone();
                let change = match record {
                    Record::Change { .. } => ChangeBatch::from_flat(&batch()?, schema)?,
                    _ => ChangeBatch::inserts(RecordBatch::try_new(schema, batch()?.columns().to_vec())?),
                };
                writer.apply(table, &change)?;
                if let Some(tail) = &mut views.tail {
                    tail.changes.entry(table.clone()).or_default().push(change);
                }
            }
        }
    }
    Ok(())
}

fn create_record(def: &TableDef) -> Result<LogEntry> {
    Record::CreateTable {
        id: def.id,
        name: def.name.clone(),
        primary_key: def.primary_key.clone(),
        defaults: def.default_texts.clone(),
    }
    .entry(Some(RecordBatch::new_empty(def.schema.clone())))
}

fn plan_defaults(ctx: &SessionContext, texts: &[(String, String)]) -> Result<HashMap<String, Expr>> {
    let empty = DFSchema::empty();
    texts
        .iter()
        .map(|(column, text)| {
            let expr = ctx.parse_sql_expr(text, &empty).map_err(|e| Error::from_datafusion(e, text))?;
            Ok((column.clone(), expr))
        })
        .collect()
}

/// A prepared write must still target the table it was planned against.
fn check_target(dml: &DmlStatement, def: &TableDef) -> Result<()> {
    match table::planned_table_id(&dml.target) {
        Some(id) if id == def.id => Ok(()),
        _ => Err(Error::Plan {
            code: "0A000",
            message: format!(
                "table \"{}\" was dropped or recreated after this statement was prepared; prepare it again",
                def.name
            ),
            position: None,
        }),
    }
}

/// Whether a plan (including its subqueries) scans any table.
fn reads_tables(plan: &LogicalPlan) -> Result<bool> {
    let mut found = false;
    plan.apply_with_subqueries(|node| {
        found |= matches!(node, LogicalPlan::TableScan(_));
        Ok(if found { TreeNodeRecursion::Stop } else { TreeNodeRecursion::Continue })
    })?;
    Ok(found)
}

/// For UPDATE: one plan that yields each matched row's old values followed by its new ones.
fn old_and_new_rows(dml: &DmlStatement, def: &TableDef) -> Result<LogicalPlan> {
    let LogicalPlan::Projection(projection) = dml.input.as_ref() else {
        return Err(Error::Internal("UPDATE plan does not start with a projection".into()));
    };
    let source = projection.input.as_ref().clone();
    let columns: Vec<Column> = source.schema().columns();
    if columns.len() != def.schema.fields().len() {
        return Err(Error::not_supported("UPDATE … FROM"));
    }
    let old = columns.into_iter().enumerate().map(|(i, c)| Expr::Column(c).alias(format!("__freshet_old_{i}")));
    let exprs: Vec<Expr> = old.chain(projection.expr.iter().cloned()).collect();
    Ok(LogicalPlanBuilder::from(source).project(exprs)?.build()?)
}

/// Concatenates query output into one batch of the table's columns. Every column is made
/// nullable here; the table checks NOT NULL itself and reports it as a constraint error.
fn concat(schema: &SchemaRef, batches: Vec<RecordBatch>) -> Result<RecordBatch> {
    let schema = relaxed(schema);
    let aligned = batches
        .into_iter()
        .map(|b| RecordBatch::try_new(schema.clone(), b.columns().to_vec()))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    Ok(concat_batches(&schema, &aligned)?)
}

/// `schema` with every field nullable.
fn relaxed(schema: &SchemaRef) -> SchemaRef {
    Arc::new(datafusion::arrow::datatypes::Schema::new(
        schema.fields().iter().map(|f| f.as_ref().clone().with_nullable(true)).collect::<Vec<_>>(),
    ))
}

/// One epoch's change to a view as SUBSCRIBE rows: `epoch`, `diff`, then the columns.
fn subscription_rows(schema: &SchemaRef, epoch: u64, change: &ChangeBatch) -> datafusion::error::Result<RecordBatch> {
    let n = change.num_rows();
    let mut columns: Vec<datafusion::arrow::array::ArrayRef> = vec![
        Arc::new(datafusion::arrow::array::Int64Array::from(vec![epoch as i64; n])),
        Arc::new(change.weights().clone()),
    ];
    columns.extend(change.batch().columns().iter().cloned());
    let options = datafusion::arrow::array::RecordBatchOptions::new().with_row_count(Some(n));
    Ok(RecordBatch::try_new_with_options(relaxed(schema), columns, &options)?)
}

/// Gives "relation does not exist" errors the position of the name in the statement.
fn place_relation(e: Error, sql: &str) -> Error {
    match e {
        Error::UndefinedTable { name, position: None } => {
            let position = sql::locate_word(sql, &name);
            Error::UndefinedTable { name, position }
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::util::pretty::pretty_format_batches;
    use futures::TryStreamExt;

    async fn open(dir: &std::path::Path) -> Database {
        Database::open(crate::state::open_local_store(dir).expect("store")).await.expect("opens")
    }

    async fn rows(db: &Database, sql: &str) -> String {
        let mut outcomes = db.run(sql).await.expect("query runs");
        let Some(Outcome::Rows { stream, .. }) = outcomes.pop() else { panic!("{sql} returned no rows") };
        let batches: Vec<RecordBatch> = stream.try_collect().await.expect("stream");
        pretty_format_batches(&batches).expect("formats").to_string()
    }

    #[tokio::test]
    async fn writes_survive_reopen() {
        let dir = tempfile::tempdir().expect("temp dir");
        {
            let db = open(dir.path()).await;
            db.run("CREATE TABLE t (id INT PRIMARY KEY, name TEXT NOT NULL DEFAULT 'anon', score DOUBLE)")
                .await
                .expect("create");
            db.run("INSERT INTO t (id, score) VALUES (1, 0.5), (2, 1.5)").await.expect("insert");
            db.run("UPDATE t SET name = 'two', score = score * 2 WHERE id = 2").await.expect("update");
            db.run("INSERT INTO t VALUES (3, 'three', NULL)").await.expect("insert");
            db.run("DELETE FROM t WHERE id = 1").await.expect("delete");
        }
        let db = open(dir.path()).await;
        let table = rows(&db, "SELECT id, name, score FROM t ORDER BY id").await;
        assert_eq!(
            table,
            "+----+-------+-------+\n| id | name  | score |\n+----+-------+-------+\n| 2  | two   | 3.0   |\n| 3  | three |       |\n+----+-------+-------+"
        );
    }

    #[tokio::test]
    async fn failed_statements_change_nothing() {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = open(dir.path()).await;
        db.run("CREATE TABLE t (id INT PRIMARY KEY, v INT NOT NULL)").await.expect("create");
        db.run("INSERT INTO t VALUES (1, 10), (2, 20)").await.expect("insert");
        let dup = db.run("INSERT INTO t VALUES (3, 30), (1, 99)").await.err().expect("duplicate key");
        assert_eq!(dup.sqlstate(), "23505");
        let null = db.run("UPDATE t SET v = NULL WHERE id = 2").await.err().expect("not null");
        assert_eq!(null.sqlstate(), "23502");
        let clash = db.run("UPDATE t SET id = 1 WHERE id = 2").await.err().expect("key clash");
        assert_eq!(clash.sqlstate(), "23505");
        assert_eq!(
            rows(&db, "SELECT sum(v) AS s, count(*) AS n FROM t").await,
            "+----+---+\n| s  | n |\n+----+---+\n| 30 | 2 |\n+----+---+"
        );
    }

    #[tokio::test]
    async fn snapshots_replace_the_log() {
        let dir = tempfile::tempdir().expect("temp dir");
        {
            let db = open(dir.path()).await;
            db.run("CREATE TABLE t (id BIGINT)").await.expect("create");
            for i in 0..10 {
                db.run(&format!("INSERT INTO t VALUES ({i})")).await.expect("insert");
            }
            db.run("CREATE TABLE gone (x INT)").await.expect("create");
            db.run("DROP TABLE gone").await.expect("drop");
        }
        {
            // Reopening replays the log and then snapshots it.
            let db = open(dir.path()).await;
            for _ in 0..100 {
                if db.log_stats().snapshot_seq.load(Ordering::Relaxed) > 0 {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            assert!(db.log_stats().snapshot_seq.load(Ordering::Relaxed) > 0, "snapshot taken");
            db.run("INSERT INTO t VALUES (100)").await.expect("insert after snapshot");
        }
        let db = open(dir.path()).await;
        assert_eq!(
            rows(&db, "SELECT count(*) AS n, sum(id) AS s FROM t").await,
            "+----+-----+\n| n  | s   |\n+----+-----+\n| 11 | 145 |\n+----+-----+"
        );
        let err = db.run("SELECT * FROM gone").await.err().expect("dropped");
        assert_eq!(err.sqlstate(), "42P01");
        assert_eq!(err.position(), Some(15));
    }
}
