//! Checkpoints of materialized views: collecting their operator states at a checkpoint
//! barrier, storing them, and choosing one to restore from at start.
//!
//! A checkpoint barrier is a barrier whose log append also stores a
//! `Record::Checkpoint { epoch }` entry, so the checkpoint has an exact place in the log:
//! every change before that entry is in the states, every change after it is not. At start
//! the views of the newest complete checkpoint whose entry is still in the log (not folded
//! into a snapshot) are restored from their states and fed only the changes after the
//! entry; every other view is rebuilt from its inputs, as before checkpoints existed. So a
//! checkpoint only ever saves work: a missing, damaged or foreign one costs a rebuild,
//! never a wrong answer.
//!
//! [`Checkpoints`] is the coordinator: [`Checkpoints::begin`] opens an epoch with the views
//! that will report, the runtime reports each operator's state through the closure
//! [`Checkpoints::report_for`] makes, and once every view has reported a task writes the
//! view objects, then the manifest, then deletes checkpoints beyond the newest few.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use object_store::ObjectStore;

use crate::dataflow::checkpoint::{OperatorState, StateReport};
use crate::error::Result;
use crate::state::checkpoint::{self as store, Manifest, ManifestView, StoredState};

/// Default time between checkpoints.
pub const DEFAULT_CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);
/// Complete checkpoints kept in the store.
pub const DEFAULT_CHECKPOINTS_KEPT: usize = 3;
/// A checkpoint some view never reported for (it failed or was dropped mid-way) is given
/// up after this long, so the next one can start.
const ABANDON_AFTER: Duration = Duration::from_secs(30);
/// Checkpoints start at least this many times their last duration apart, so taking them
/// uses at most about a tenth of the time: after one that took 300 ms, the next starts no
/// sooner than 3 s after it. Whole states are written each time, so a large state is
/// checkpointed less often rather than slowing its views down.
pub const SPACING_FACTOR: u32 = 10;
/// The wait after a failed checkpoint, doubled after each further failure up to the
/// maximum (a store that is away is not hammered every interval).
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);
/// Most checkpoint attempts `freshet_catalog.checkpoints` remembers.
pub const HISTORY: usize = 100;

/// One checkpoint attempt, for `freshet_catalog.checkpoints`.
#[derive(Debug, Clone)]
pub struct CheckpointRecord {
    pub epoch: u64,
    pub started_at: chrono::DateTime<chrono::Utc>,
    pub duration: Duration,
    /// Views whose state it holds, and views left out (an operator that cannot be
    /// checkpointed; those are rebuilt after a restart).
    pub views: usize,
    pub views_left_out: usize,
    /// Bytes written and bytes of state it holds (its objects and every shared file it
    /// refers to, uploaded now or before), or why it failed.
    pub result: std::result::Result<(u64, u64), String>,
}

/// A view taking part in a checkpoint.
#[derive(Debug, Clone)]
pub struct CheckpointedView {
    pub id: u64,
    pub name: String,
    pub query: String,
    /// Its operators' names in number order.
    pub layout: Vec<String>,
}

/// Operator states by operator number (`None`: that operator cannot be checkpointed).
type States = BTreeMap<usize, Option<OperatorState>>;

/// The tables at a checkpoint's log entry: where a log snapshot may be cut so that the
/// checkpoint's entry survives it, and what sources with `retention = 'none'` may forget.
pub struct Cut {
    pub epoch: u64,
    /// The log position of the checkpoint's entry.
    pub seq: u64,
    pub tables: Arc<crate::catalog::table::Snapshot>,
}

struct InFlight {
    epoch: u64,
    cut: Option<Arc<Cut>>,
    started: (chrono::DateTime<chrono::Utc>, Instant),
    /// By view id: the view and its operators' states so far (`None`: cannot be
    /// checkpointed).
    views: HashMap<u64, (CheckpointedView, States)>,
    /// Views left out so far, with why.
    left_out: Vec<(String, String)>,
}

#[derive(Default)]
struct Inner {
    in_flight: Option<InFlight>,
    /// A complete checkpoint's states being written.
    writing: bool,
    /// A checkpoint barrier is on its way (between [`Checkpoints::reserve`] and `begin`).
    reserved: bool,
    /// Failed checkpoints in a row, and when the next periodic one may start.
    failures: (u32, Option<Instant>),
    /// The last checkpoint stored, and the ids of the views it holds.
    stored: Option<(u64, HashSet<u64>)>,
    /// Shared files known to be in the store (listed at the first checkpoint that has any).
    uploaded: Option<HashMap<String, u64>>,
    /// The last stored checkpoint's cut and views, until [`Checkpoints::take_stored`].
    completed: Option<(Arc<Cut>, HashSet<u64>)>,
    history: VecDeque<CheckpointRecord>,
}

/// The last checkpoint stored: its epoch and the ids of the views it holds.
#[derive(Debug, Clone, Default)]
pub struct Stored {
    pub epoch: u64,
    pub views: Arc<HashSet<u64>>,
}

/// Coordinates checkpoints; shared by the barrier task, every view's operators and the
/// writer task.
pub struct Checkpoints {
    store: Arc<dyn ObjectStore>,
    /// The directory `store` keeps its objects in, when it is a local one: shared files
    /// are linked in and out instead of copied.
    local_root: Option<std::path::PathBuf>,
    kept: usize,
    inner: Mutex<Inner>,
    /// Announces each stored checkpoint (exactly-once sinks deliver up to it).
    stored: tokio::sync::watch::Sender<Stored>,
}

impl Checkpoints {
    pub fn new(store: Arc<dyn ObjectStore>, local_root: Option<std::path::PathBuf>, kept: usize) -> Arc<Checkpoints> {
        let stored = tokio::sync::watch::Sender::new(Stored::default());
        Arc::new(Checkpoints { store, local_root, kept: kept.max(1), inner: Mutex::default(), stored })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Claims the next checkpoint if none is on its way, collecting or writing (one that
    /// has waited too long for its views is given up), and, unless `asked` (a CHECKPOINT
    /// statement), no failure's backoff is running. Every claim is followed by
    /// [`Checkpoints::begin`] or [`Checkpoints::release`].
    pub fn reserve(&self, asked: bool) -> bool {
        let mut inner = self.lock();
        if !asked && inner.failures.1.is_some_and(|at| Instant::now() < at) {
            return false;
        }
        if let Some(in_flight) = &inner.in_flight
            && in_flight.started.1.elapsed() > ABANDON_AFTER
        {
            let waiting: Vec<String> = in_flight.views.values().map(|(v, _)| v.name.clone()).collect();
            let failure = format!("views did not report their state in time: {}", waiting.join(", "));
            tracing::warn!(epoch = in_flight.epoch, "checkpoint abandoned: {failure}");
            let in_flight = inner.in_flight.take().expect("checked just above");
            record(&mut inner, &in_flight, Err(failure));
        }
        let free = inner.in_flight.is_none() && !inner.writing && !inner.reserved;
        inner.reserved |= free;
        free
    }

    /// Gives up a claim whose barrier could not be injected.
    pub fn release(&self) {
        self.lock().reserved = false;
    }

    /// Opens checkpoint `epoch`, to be complete once each of `views` has reported every
    /// operator. Runs in log order, before the barrier reaches any view.
    pub fn begin(self: &Arc<Self>, epoch: u64, views: Vec<CheckpointedView>, cut: Option<Arc<Cut>>) {
        let mut inner = self.lock();
        inner.reserved = false;
        let views = views.into_iter().map(|v| (v.id, (v, BTreeMap::new()))).collect();
        let started = (chrono::Utc::now(), Instant::now());
        inner.in_flight = Some(InFlight { epoch, cut, started, views, left_out: Vec::new() });
        self.complete_if_ready(&mut inner);
    }

    /// Where view `id`'s operators report their states.
    pub fn report_for(self: &Arc<Self>, id: u64) -> StateReport {
        let checkpoints = Arc::downgrade(self);
        Arc::new(move |epoch, operator, state| {
            if let Some(checkpoints) = checkpoints.upgrade() {
                checkpoints.report(id, epoch, operator, state);
            }
        })
    }

    fn report(self: &Arc<Self>, id: u64, epoch: u64, operator: usize, state: Result<Option<OperatorState>>) {
        let mut inner = self.lock();
        let Some(in_flight) = inner.in_flight.as_mut().filter(|f| f.epoch == epoch) else { return };
        let Some((view, states)) = in_flight.views.get_mut(&id) else { return };
        match state {
            Ok(state) => {
                states.insert(operator, state);
            }
            Err(e) => {
                let name = view.name.clone();
                in_flight.views.remove(&id);
                in_flight.left_out.push((name, format!("operator {operator} failed to write its state: {e}")));
            }
        }
        self.complete_if_ready(&mut inner);
    }

    /// View `id` is gone (dropped or failed): the checkpoint in flight stops waiting for it.
    pub fn forget_view(self: &Arc<Self>, id: u64) {
        let mut inner = self.lock();
        if let Some(in_flight) = &mut inner.in_flight {
            in_flight.views.remove(&id);
        }
        self.complete_if_ready(&mut inner);
    }

    fn complete_if_ready(self: &Arc<Self>, inner: &mut Inner) {
        let Some(in_flight) = &inner.in_flight else { return };
        if in_flight.views.values().any(|(view, states)| states.len() < view.layout.len()) {
            return;
        }
        let in_flight = inner.in_flight.take().expect("checked just above");
        inner.writing = true;
        let checkpoints = self.clone();
        tokio::spawn(async move {
            let mut in_flight = in_flight;
            let result = checkpoints.write(&mut in_flight).await;
            let mut inner = checkpoints.lock();
            let result = match result {
                Ok((bytes, state, views)) => {
                    tracing::debug!(epoch = in_flight.epoch, bytes, "checkpoint written");
                    if let Some(cut) = &in_flight.cut {
                        inner.completed = Some((cut.clone(), views.clone()));
                    }
                    let announced = Stored { epoch: in_flight.epoch, views: Arc::new(views.clone()) };
                    checkpoints.stored.send_replace(announced);
                    inner.stored = Some((in_flight.epoch, views));
                    inner.failures = (0, None);
                    Ok((bytes, state))
                }
                Err(e) => {
                    let wait = (RETRY_FIRST * 2u32.pow(inner.failures.0.min(6))).min(RETRY_MAX);
                    inner.failures = (inner.failures.0 + 1, Some(Instant::now() + wait));
                    tracing::warn!(
                        epoch = in_flight.epoch,
                        "checkpoint failed, views keep running; next try in {wait:?}: {e}"
                    );
                    Err(e)
                }
            };
            inner.writing = false;
            record(&mut inner, &in_flight, result.map_err(|e| e.to_string()));
        });
    }

    /// Stores every view's states, then the manifest, then deletes old checkpoints.
    /// Returns the bytes written, the bytes of state the checkpoint holds, and the views
    /// stored.
    async fn write(&self, in_flight: &mut InFlight) -> Result<(u64, u64, HashSet<u64>)> {
        let mut manifest = Manifest {
            epoch: in_flight.epoch,
            format: store::state_format(),
            views: Vec::new(),
            created_at_ms: in_flight.started.0.timestamp_millis(),
        };
        let mut total = 0;
        let mut stored = HashSet::new();
        let shares =
            in_flight.views.values().flat_map(|(_, states)| states.values()).flatten().any(|s| !s.files.is_empty());
        let known = self.lock().uploaded.take();
        let listed = known.is_some() || shares;
        let mut uploaded = match known {
            Some(uploaded) => uploaded,
            None if shares => store::shared_files(&self.store).await?,
            None => HashMap::new(),
        };
        let result = self.write_views(in_flight, &mut manifest, &mut uploaded, &mut stored).await;
        let mut state = 0;
        let mut deleted = Vec::new();
        let result = match result {
            Ok((bytes, held)) => {
                total += bytes;
                state = held;
                async {
                    total += store::write_manifest(&self.store, &manifest).await?;
                    let old = store::delete_old(&self.store, self.kept).await?;
                    tracing::trace!(old, "old checkpoints deleted");
                    if !uploaded.is_empty() {
                        deleted = store::delete_unreferenced(&self.store).await?;
                    }
                    Ok(())
                }
                .await
            }
            Err(e) => Err(e),
        };
        for object in &deleted {
            uploaded.remove(object);
        }
        self.lock().uploaded = listed.then_some(uploaded);
        result.map(|()| (total, state, stored))
    }

    /// Stores each view's states and uploads the shared files they refer to that are not
    /// in the store yet; returns the bytes written and the bytes of state held.
    async fn write_views(
        &self,
        in_flight: &mut InFlight,
        manifest: &mut Manifest,
        uploaded: &mut HashMap<String, u64>,
        stored: &mut HashSet<u64>,
    ) -> Result<(u64, u64)> {
        let mut total = 0;
        let mut held = 0;
        for (id, (view, states)) in &mut in_flight.views {
            if states.values().any(Option::is_none) {
                continue; // an operator cannot be checkpointed: the view is rebuilt instead
            }
            // A view dropped while its checkpoint is written takes its local files with it:
            // it is left out rather than failing the checkpoint of the others.
            let local = states.values().flatten().flat_map(|s| &s.files);
            if local.clone().any(|f| !f.local.exists()) {
                continue;
            }
            // Taken, not copied: states can be large. The history reads only their presence.
            let mut files = Vec::new();
            let mut parts = BTreeMap::new();
            for (n, state) in states.iter_mut() {
                let state = state.replace(OperatorState::default()).unwrap_or_default();
                for file in &state.files {
                    if !uploaded.contains_key(&file.object) {
                        let size =
                            store::upload_file(&self.store, self.local_root.as_deref(), &file.local, &file.object)
                                .await?;
                        total += size;
                        uploaded.insert(file.object.clone(), size);
                    }
                    held += uploaded.get(&file.object).copied().unwrap_or(0);
                    files.push(file.object.clone());
                }
                let shared = state.files.into_iter().map(|f| (f.name, f.object)).collect();
                parts.insert(*n, StoredState { bytes: state.bytes, files: shared });
            }
            let (object, bytes) = store::write_view(&self.store, in_flight.epoch, *id, &parts).await?;
            total += bytes;
            held += bytes;
            stored.insert(*id);
            let (name, query, layout) = (view.name.clone(), view.query.clone(), view.layout.join(","));
            manifest.views.push(ManifestView { name, query, object, bytes, layout, files });
        }
        Ok((total, held))
    }

    /// A view's operator states, as a checkpoint stored them.
    pub async fn read_view(&self, object: &str) -> Result<BTreeMap<usize, StoredState>> {
        store::read_view(&self.store, object).await
    }

    /// Downloads the shared files of `state` into `dir`, under their names.
    pub async fn download(&self, state: &StoredState, dir: &std::path::Path) -> Result<u64> {
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(|e| crate::error::Error::Storage(format!("creating {}: {e}", dir.display())))?;
        let mut bytes = 0;
        for (name, object) in &state.files {
            bytes += store::download_file(&self.store, self.local_root.as_deref(), object, &dir.join(name)).await?;
        }
        Ok(bytes)
    }

    /// The cut and views of the checkpoint stored since the last call, if any.
    pub fn take_stored(&self) -> Option<(Arc<Cut>, HashSet<u64>)> {
        self.lock().completed.take()
    }

    /// How long the last checkpoint took, from its barrier to its manifest.
    pub fn last_duration(&self) -> Duration {
        self.lock().history.back().map_or(Duration::ZERO, |r| r.duration)
    }

    /// The epoch of the last stored checkpoint, if it holds view `id`.
    pub fn last_holding(&self, id: u64) -> Option<u64> {
        self.lock().stored.as_ref().filter(|(_, views)| views.contains(&id)).map(|(epoch, _)| *epoch)
    }

    /// Follows the stored checkpoints: the last one now, and each one after it.
    pub fn watch_stored(&self) -> tokio::sync::watch::Receiver<Stored> {
        self.stored.subscribe()
    }

    /// The checkpoint attempts since the server started, oldest first.
    pub fn history(&self) -> Vec<CheckpointRecord> {
        self.lock().history.iter().cloned().collect()
    }
}

fn record(inner: &mut Inner, in_flight: &InFlight, result: std::result::Result<(u64, u64), String>) {
    let views = in_flight.views.values().filter(|(_, states)| states.values().all(Option::is_some)).count();
    if inner.history.len() == HISTORY {
        inner.history.pop_front();
    }
    inner.history.push_back(CheckpointRecord {
        epoch: in_flight.epoch,
        started_at: in_flight.started.0,
        duration: in_flight.started.1.elapsed(),
        views,
        views_left_out: in_flight.views.len() - views + in_flight.left_out.len(),
        result,
    });
}
