//! Tables: their definitions, their rows, and how DataFusion reads them.
//!
//! A table's rows live in memory as a short list of Arrow batches ([`TableState`]), changed
//! only by applying [`ChangeBatch`]es, both live and when replaying the log, so there is a
//! single code path for both. Readers never see `TableState`; they see immutable
//! [`TableVersion`]s collected in a [`Snapshot`], which is swapped atomically when a write
//! becomes durable.

use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasher;
use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use datafusion::arrow::array::{Array, ArrayRef, BooleanArray, MutableArrayData, StringArray, UInt32Array, make_array};
use datafusion::arrow::compute::{concat_batches, filter_record_batch, take_record_batch};
use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::arrow::row::{RowConverter, Rows, SortField};
use datafusion::arrow::util::display::array_value_to_string;
use datafusion::catalog::{SchemaProvider, Session, TableProvider};
use datafusion::common::{Constraint, Constraints};
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::logical_expr::{Expr, TableType};
use datafusion::physical_plan::ExecutionPlan;

use crate::dataflow::{ChangeBatch, FastMap};
use crate::error::{Error, Result};

/// What a table is: its name, columns and constraints. Immutable once created.
#[derive(Debug)]
pub struct TableDef {
    /// Unique for the life of the data directory; tells a recreated table from the old one.
    pub id: u64,
    pub name: String,
    pub schema: SchemaRef,
    /// Indices of the primary key columns; empty without a primary key.
    pub primary_key: Vec<usize>,
    /// `(column, SQL text)` of DEFAULT expressions, as written by the user.
    pub default_texts: Vec<(String, String)>,
    /// The same defaults, planned.
    pub defaults: HashMap<String, Expr>,
    pub constraints: Constraints,
    /// Rows are only ever added (a source's relation): they are kept without an index.
    pub append_only: bool,
    /// The columns an equality lookup (`WHERE k = $1`) is answered by index on: a table's
    /// primary key, or the key a view's query guarantees (its GROUP BY columns). Empty:
    /// such queries scan. Unlike `primary_key` it changes nothing about how rows are
    /// stored or matched, so a key that is not unique only costs a longer chain.
    pub lookup_key: Vec<usize>,
}

impl TableDef {
    /// Builds a definition; `defaults` must be the planned form of `default_texts`.
    pub fn new(
        id: u64,
        name: String,
        schema: SchemaRef,
        primary_key: Vec<usize>,
        default_texts: Vec<(String, String)>,
        defaults: HashMap<String, Expr>,
    ) -> Self {
        let constraints = if primary_key.is_empty() {
            Constraints::default()
        } else {
            Constraints::new_unverified(vec![Constraint::PrimaryKey(primary_key.clone())])
        };
        // A relation with a watermark only takes appended rows.
        let append_only = crate::sql::watermark_of(&schema).is_some();
        let lookup_key = primary_key.clone();
        TableDef { id, name, schema, primary_key, default_texts, defaults, constraints, append_only, lookup_key }
    }

    /// The same definition, answering equality lookups on `columns` by index.
    pub fn with_lookup_key(self, columns: Vec<usize>) -> Self {
        TableDef { lookup_key: columns, ..self }
    }

    /// The definition of a relation whose rows are only ever appended: no primary key and
    /// no index, so an append costs a copy of the rows and nothing per row.
    pub fn append_only(id: u64, name: String, schema: SchemaRef) -> Self {
        TableDef { append_only: true, ..TableDef::new(id, name, schema, vec![], vec![], HashMap::new()) }
    }

    /// The name of the primary key constraint (and of its index in the system catalog).
    pub fn primary_key_name(&self) -> String {
        format!("{}_pkey", self.name)
    }

    /// Encodes lookup keys; `None` without a lookup key.
    fn lookup_converter(&self) -> Result<Option<RowConverter>> {
        if self.lookup_key.is_empty() {
            return Ok(None);
        }
        let fields =
            self.lookup_key.iter().map(|&i| SortField::new(self.schema.field(i).data_type().clone())).collect();
        Ok(Some(RowConverter::new(fields)?))
    }

    /// The columns that identify a row: the primary key, or every column without one.
    fn identity_columns(&self) -> Vec<usize> {
        if self.primary_key.is_empty() { (0..self.schema.fields().len()).collect() } else { self.primary_key.clone() }
    }
}

/// An immutable view of one table's rows, as some reader sees them.
#[derive(Debug, Clone)]
pub struct TableVersion {
    pub def: Arc<TableDef>,
    chunks: Arc<Vec<Chunk>>,
    /// A source's connector position and dead letters, as of these rows.
    pub ledger: Option<Arc<super::source::Ledger>>,
    /// Rows of an append-only relation forgotten from its start (source retention).
    pub trimmed: u64,
}

impl TableVersion {
    pub fn num_rows(&self) -> usize {
        self.chunks.iter().map(|c| c.live_rows()).sum()
    }

    /// Rows ever appended to an append-only relation, the forgotten ones included.
    pub fn appended(&self) -> u64 {
        self.trimmed + self.num_rows() as u64
    }

    /// The live rows whose lookup key equals `key` (one single-row array per column of
    /// `def.lookup_key`, of those columns' types), or `None` when the relation has no
    /// lookup key. A key with a NULL matches nothing, as `k = NULL` does in SQL.
    ///
    /// Each chunk's index is built on the first lookup that reaches it and shared by every
    /// later version holding the chunk; chunks only ever merge into new chunks, so most
    /// rows are indexed O(log n) times over their life.
    pub fn lookup(&self, key: &[ArrayRef]) -> Result<Option<RecordBatch>> {
        let Some(converter) = self.def.lookup_converter()? else { return Ok(None) };
        if key.iter().any(|column| column.len() != 1) {
            return Err(Error::Internal("a lookup key has one value per column".into()));
        }
        if key.iter().any(|column| column.is_null(0)) {
            return Ok(Some(RecordBatch::new_empty(self.def.schema.clone())));
        }
        let probe = converter.convert_columns(key)?;
        let probe = probe.row(0);
        let mut parts = Vec::new();
        for chunk in self.chunks.iter() {
            let index = match chunk.key_index.get() {
                Some(index) => index,
                None => {
                    let built = KeyIndex::build(&self.def, &converter, &chunk.batch)?;
                    chunk.key_index.get_or_init(|| built)
                }
            };
            let rows: Vec<u32> = index.rows(probe.as_ref()).filter(|&row| chunk.is_live(row as usize)).collect();
            if !rows.is_empty() {
                parts.push(take_record_batch(&chunk.batch, &UInt32Array::from(rows))?);
            }
        }
        Ok(Some(match parts.len() {
            0 => RecordBatch::new_empty(self.def.schema.clone()),
            1 => parts.swap_remove(0),
            _ => concat_batches(&self.def.schema, &parts)?,
        }))
    }

    /// The bytes of Arrow memory the rows hold (rows deleted but not yet merged away
    /// included; key indexes and published copies not): what `pg_relation_size` reports.
    pub fn memory_bytes(&self) -> usize {
        self.chunks.iter().map(|c| c.batch.get_array_memory_size()).sum()
    }

    /// Adds each Arrow allocation the rows hold to `into` (its address → its bytes), so a
    /// total over several relations counts once an allocation they share (a view keeps its
    /// source's buffers for the columns it passes through).
    pub fn allocations(&self, into: &mut FastMap<usize, usize>) {
        fn add(data: &datafusion::arrow::array::ArrayData, into: &mut FastMap<usize, usize>) {
            for buffer in data.buffers().iter().chain(data.nulls().map(|nulls| nulls.buffer())) {
                into.insert(buffer.data_ptr().as_ptr() as usize, buffer.capacity());
            }
            for child in data.child_data() {
                add(child, into);
            }
        }
        for chunk in self.chunks.iter() {
            for column in chunk.batch.columns() {
                add(&column.to_data(), into);
            }
        }
    }

    /// The live rows, as batches. Each chunk's live rows are computed once per version.
    pub fn batches(&self) -> Result<Vec<RecordBatch>> {
        self.chunks
            .iter()
            .map(|chunk| match chunk.published.get() {
                Some(batch) => Ok(batch.clone()),
                None => {
                    let batch = chunk.live_batch()?;
                    Ok(chunk.published.get_or_init(|| batch).clone())
                }
            })
            .collect()
    }
}

/// Every table and materialized view at one point in time.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub tables: BTreeMap<String, TableVersion>,
    /// Materialized views, each as of the last epoch it committed.
    pub views: BTreeMap<String, TableVersion>,
    /// Plain views: named queries the planner inlines.
    pub plain_views: BTreeMap<String, Arc<dyn TableProvider>>,
    /// The log segment this snapshot includes everything up to (0 = nothing logged yet).
    pub seq: u64,
}

impl Snapshot {
    /// A table or a view by name.
    pub fn relation(&self, name: &str) -> Option<&TableVersion> {
        self.tables.get(name).or_else(|| self.views.get(name))
    }
}

/// The size up to which an append-only relation merges its chunks.
const APPEND_CHUNK_ROWS: usize = 1 << 16;
/// Two chunks of an append-only relation that each hold at least this many rows are not
/// merged: a scan would not notice the difference, and a chunk kept as it arrived can share
/// its Arrow buffers with the relation it came from (a view's rows with its source's).
const APPEND_CHUNK_KEPT_ROWS: usize = 8192;
/// Two chunks of an indexed relation (a table, or a view that takes rows back) that each
/// hold at least this many live rows are not merged. Merging moves every row's index entry
/// (its identity encoded and hashed again), which cost a fifth of the engine's time for a
/// view of 600,000 groups changing every epoch; more chunks cost a scan or a lookup little.
const INDEXED_CHUNK_KEPT_ROWS: usize = 32768;

/// Slack below this many bytes per column is not worth a copy.
const SLACK_FLOOR: usize = 4096;

/// `rows`, with each column that holds more than an eighth (and [`SLACK_FLOOR`]) beyond its
/// own size (room a decoder reserved, or the rest of a batch it is a slice of) copied into
/// buffers of its own size: an appended chunk is kept as it arrived, and would hold that
/// memory for as long as its rows. Other columns stay shared, as do columns whose size
/// Arrow cannot work out from a slice (string and binary views, for one).
fn without_slack(rows: RecordBatch) -> Result<RecordBatch> {
    let mut columns = Vec::with_capacity(rows.num_columns());
    let mut copied = false;
    for column in rows.columns() {
        let data = column.to_data();
        let used = match column.data_type() {
            DataType::Utf8View | DataType::BinaryView => None,
            _ => data.get_slice_memory_size().ok(),
        };
        if used.is_none_or(|used| data.get_buffer_memory_size() <= used + used / 8 + SLACK_FLOOR) {
            columns.push(column.clone());
            continue;
        }
        let mut copy = MutableArrayData::new(vec![&data], false, data.len());
        copy.try_extend(0, 0, data.len())?;
        columns.push(make_array(copy.freeze()));
        copied = true;
    }
    match copied {
        true => Ok(RecordBatch::try_new(rows.schema(), columns)?),
        false => Ok(rows),
    }
}

/// Inserts `value` under `name`, or removes `name` when there is no value.
fn set_entry<V>(map: &mut BTreeMap<String, V>, name: &str, value: Option<V>) {
    match value {
        Some(v) => map.insert(name.to_string(), v),
        None => map.remove(name),
    };
}

tokio::task_local! {
    /// The snapshot a running statement reads; set so that every table in one statement is
    /// read at the same point, and so writers can read their own uncommitted state.
    static STATEMENT_SNAPSHOT: Arc<Snapshot>;
}

/// Holds the latest committed snapshot and hands out the one a statement should read.
#[derive(Debug, Default)]
pub struct SnapshotCell {
    /// Tables at the latest commit, views at their latest epoch.
    committed: RwLock<Arc<Snapshot>>,
    /// Tables and every view at the last epoch all views finished: what queries that read
    /// views see, so two views never disagree about which writes they include.
    serving: RwLock<Arc<Snapshot>>,
}

impl SnapshotCell {
    /// The newest durable snapshot.
    pub fn committed(&self) -> Arc<Snapshot> {
        match self.committed.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The last snapshot in which every view is at the same epoch.
    pub fn serving(&self) -> Arc<Snapshot> {
        match self.serving.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Makes `snapshot` what queries over views read.
    pub fn publish_serving(&self, snapshot: Arc<Snapshot>) {
        match self.serving.write() {
            Ok(mut guard) => *guard = snapshot,
            Err(poisoned) => *poisoned.into_inner() = snapshot,
        }
    }

    /// Makes `tables` at log position `seq` what new statements read, keeping the views.
    /// Called by the log committer, in log order.
    pub fn publish_tables(&self, tables: BTreeMap<String, TableVersion>, seq: u64) {
        self.update(|current| Snapshot {
            tables,
            views: current.views.clone(),
            plain_views: current.plain_views.clone(),
            seq,
        });
    }

    /// Adds (or with `None` removes) a plain view, keeping everything else.
    pub fn publish_plain_view(&self, name: &str, provider: Option<Arc<dyn TableProvider>>) {
        self.update(|current| {
            let mut next = current.clone();
            set_entry(&mut next.plain_views, name, provider);
            next
        });
    }

    /// Replaces (or with `None` removes) one view's contents, keeping everything else.
    pub fn publish_view(&self, name: &str, version: Option<TableVersion>) {
        self.update(|current| {
            let mut next = current.clone();
            set_entry(&mut next.views, name, version);
            next
        });
    }

    fn update(&self, f: impl FnOnce(&Snapshot) -> Snapshot) {
        let mut guard = match self.committed.write() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        let next = f(&guard);
        *guard = Arc::new(next);
    }

    /// The snapshot of the running statement, or the committed one outside a statement.
    pub fn current(&self) -> Arc<Snapshot> {
        STATEMENT_SNAPSHOT.try_with(|s| s.clone()).unwrap_or_else(|_| self.committed())
    }

    /// Runs `f` with every table lookup reading `snapshot`.
    pub async fn scope<F: Future>(snapshot: Arc<Snapshot>, f: F) -> F::Output {
        STATEMENT_SNAPSHOT.scope(snapshot, f).await
    }
}

/// Rows of one chunk, with the rows deleted since it was written marked rather than
/// removed, so a deletion costs O(1) and not a copy of the chunk.
#[derive(Debug, Clone)]
struct Chunk {
    /// Never reused: index entries name chunks by id, positions shift as chunks merge.
    id: u64,
    batch: RecordBatch,
    /// `true` for live rows; `None` while every row is live. Shared with published
    /// versions, copied only when a deletion follows a publish.
    live: Option<Arc<Vec<bool>>>,
    dead: usize,
    /// The live rows as readers see them, built on first read of a version.
    published: Arc<std::sync::OnceLock<RecordBatch>>,
    /// Where each lookup key is in `batch` (dead rows included), built on the first lookup.
    /// `batch` never changes, so deletions keep it valid.
    key_index: Arc<std::sync::OnceLock<KeyIndex>>,
    /// In an indexed relation, each row's identity encoded (dead rows included): what
    /// tells apart identities that hash alike.
    identities: Option<Arc<Rows>>,
}

impl Chunk {
    fn new(id: u64, batch: RecordBatch) -> Self {
        let (published, key_index) = (Arc::default(), Arc::default());
        Chunk { id, batch, live: None, dead: 0, published, key_index, identities: None }
    }

    /// A chunk of an indexed relation, with its rows' encoded identities.
    fn indexed(id: u64, batch: RecordBatch, identities: Rows) -> Self {
        Chunk { identities: Some(Arc::new(identities)), ..Chunk::new(id, batch) }
    }

    /// Row `row`'s encoded identity (empty outside an indexed relation).
    fn identity(&self, row: u32) -> &[u8] {
        self.identities.as_ref().map_or(&[], |rows| rows.row(row as usize).data())
    }

    fn is_live(&self, row: usize) -> bool {
        self.live.as_ref().is_none_or(|live| live[row])
    }

    fn live_rows(&self) -> usize {
        self.batch.num_rows() - self.dead
    }

    fn kill(&mut self, row: usize) {
        let rows = self.batch.num_rows();
        Arc::make_mut(self.live.get_or_insert_with(|| Arc::new(vec![true; rows])))[row] = false;
        self.dead += 1;
        self.published = Arc::default();
    }

    /// The live rows as a batch (the chunk itself when nothing was deleted).
    fn live_batch(&self) -> Result<RecordBatch> {
        match &self.live {
            None => Ok(self.batch.clone()),
            Some(live) => Ok(filter_record_batch(&self.batch, &BooleanArray::from(live.as_ref().clone()))?),
        }
    }
}

/// The rows of one chunk by lookup key: the first row with each key, and a chain from each
/// row to the next with the same key.
#[derive(Debug)]
struct KeyIndex {
    first: FastMap<Box<[u8]>, u32>,
    /// `NO_ROW` ends a chain.
    next: Vec<u32>,
}

const NO_ROW: u32 = u32::MAX;

impl KeyIndex {
    fn build(def: &TableDef, converter: &RowConverter, batch: &RecordBatch) -> Result<KeyIndex> {
        let columns: Vec<ArrayRef> = def.lookup_key.iter().map(|&i| batch.column(i).clone()).collect();
        let keys = converter.convert_columns(&columns)?;
        let mut first: FastMap<Box<[u8]>, u32> = FastMap::default();
        first.reserve(keys.num_rows());
        let mut next = vec![NO_ROW; keys.num_rows()];
        // Backwards, so each chain runs in row order.
        for row in (0..keys.num_rows()).rev() {
            if let Some(previous) = first.insert(keys.row(row).as_ref().into(), row as u32) {
                next[row] = previous;
            }
        }
        Ok(KeyIndex { first, next })
    }

    /// The rows with `key`, dead or alive.
    fn rows<'a>(&'a self, key: &[u8]) -> impl Iterator<Item = u32> + 'a {
        let start = self.first.get(key).copied();
        std::iter::successors(start, |&row| Some(self.next[row as usize]).filter(|&next| next != NO_ROW))
    }
}

/// Where a live copy of a row is: (chunk id, row in the chunk).
type Location = (u64, u32);

/// One identity's entry in a relation's index: its hash, and where its live copies are
/// (one, without an allocation, or several).
#[derive(Debug)]
struct Indexed {
    hash: u64,
    copies: Copies,
}

#[derive(Debug)]
enum Copies {
    One(Location),
    Many(Vec<Location>),
}

impl Copies {
    fn as_slice(&self) -> &[Location] {
        match self {
            Copies::One(one) => std::slice::from_ref(one),
            Copies::Many(all) => all,
        }
    }

    fn as_mut_slice(&mut self) -> &mut [Location] {
        match self {
            Copies::One(one) => std::slice::from_mut(one),
            Copies::Many(all) => all,
        }
    }

    fn push(&mut self, copy: Location) {
        match self {
            Copies::One(one) => *self = Copies::Many(vec![*one, copy]),
            Copies::Many(all) => all.push(copy),
        }
    }

    /// Takes out the copy added last, unless it is the only one.
    fn pop(&mut self) -> Option<Location> {
        let Copies::Many(all) = self else { return None };
        let last = all.pop();
        if let [one] = all[..] {
            *self = Copies::One(one);
        }
        last
    }
}

/// The encoded identity of `entry`'s rows, read in the chunk of its first copy.
fn identity_at<'a>(chunks: &'a [Chunk], positions: &FastMap<u64, usize>, entry: &Indexed) -> &'a [u8] {
    let (chunk, row) = entry.copies.as_slice()[0];
    positions.get(&chunk).map_or(&[], |&p| chunks[p].identity(row))
}

/// How many times each distinct row of a batch's encoded rows occurs, by hash: (hash, the
/// row's first index, count).
#[derive(Default)]
struct Counts(hashbrown::HashTable<(u64, usize, usize)>);

impl Counts {
    fn of(rows: &Rows, hashes: &[u64]) -> Counts {
        let mut counts = Counts::default();
        for (i, &hash) in hashes.iter().enumerate() {
            counts.add(rows, hash, i);
        }
        counts
    }

    /// Counts row `i` of `rows`, hashed `hash`; returns its count so far.
    fn add(&mut self, rows: &Rows, hash: u64, i: usize) -> usize {
        let row = rows.row(i).data();
        let same = |&(h, first, _): &(u64, usize, usize)| h == hash && rows.row(first).data() == row;
        let entry = self.0.entry(hash, same, |&(h, ..)| h).or_insert((hash, i, 0)).into_mut();
        entry.2 += 1;
        entry.2
    }

    /// The count of `row` (hashed `hash`), where `rows` are the rows counted.
    fn count(&self, rows: &Rows, hash: u64, row: &[u8]) -> usize {
        let same = |&(h, first, _): &(u64, usize, usize)| h == hash && rows.row(first).data() == row;
        self.0.find(hash, same).map_or(0, |&(.., n)| n)
    }

    fn iter(&self) -> impl Iterator<Item = (u64, usize, usize)> + '_ {
        self.0.iter().copied()
    }
}

/// A table's rows as the single writer sees and changes them.
///
/// Rows live in a few chunks (Arrow batches); an index maps each row's identity (its
/// primary key, or all its columns without one) to where its copies are. The index holds
/// each identity's hash and locations only: the encoded identities stay in their chunks,
/// one buffer each, and a lookup compares them there. Inserting appends a chunk, deleting
/// marks rows dead, so the cost of a change grows with the change and not with the table.
/// Chunks are merged like a binary counter (each row copied O(log n) times) until they are
/// large (see [`INDEXED_CHUNK_KEPT_ROWS`]), and rewritten once half their rows are dead.
pub struct TableState {
    def: Arc<TableDef>,
    chunks: Vec<Chunk>,
    next_chunk: u64,
    /// Every live row's identity, by its hash ([`TableState::hash`]).
    index: hashbrown::HashTable<Indexed>,
    hasher: foldhash::fast::RandomState,
    /// The bits of a hash kept: all of them, except in tests that make identities collide.
    hash_mask: u64,
    identity: RowConverter,
    ledger: Option<Arc<super::source::Ledger>>,
    trimmed: u64,
}

impl TableState {
    pub fn new(def: Arc<TableDef>) -> Result<Self> {
        let fields =
            def.identity_columns().iter().map(|&i| SortField::new(def.schema.field(i).data_type().clone())).collect();
        let identity = RowConverter::new(fields)?;
        Ok(TableState {
            def,
            chunks: Vec::new(),
            next_chunk: 0,
            index: hashbrown::HashTable::new(),
            hasher: foldhash::fast::RandomState::default(),
            hash_mask: u64::MAX,
            identity,
            ledger: None,
            trimmed: 0,
        })
    }

    pub fn def(&self) -> &Arc<TableDef> {
        &self.def
    }

    /// The rows as an immutable version for readers.
    pub fn version(&self) -> TableVersion {
        TableVersion {
            def: self.def.clone(),
            chunks: Arc::new(self.chunks.clone()),
            ledger: self.ledger.clone(),
            trimmed: self.trimmed,
        }
    }

    /// Rows forgotten from the start of an append-only relation.
    pub fn trimmed(&self) -> u64 {
        self.trimmed
    }

    /// Forgets an append-only relation's rows numbered below `before` (counting every
    /// row ever appended from 0). Rows already forgotten, or never held (a snapshot that
    /// left them out), count as forgotten.
    pub fn trim(&mut self, before: u64) -> Result<()> {
        if !self.def.append_only {
            return Err(Error::Internal(format!("\"{}\" is not append-only and cannot forget rows", self.def.name)));
        }
        let mut forget = before.saturating_sub(self.trimmed) as usize;
        while forget > 0 && !self.chunks.is_empty() {
            let rows = self.chunks[0].batch.num_rows();
            if rows <= forget {
                self.chunks.remove(0);
                forget -= rows;
            } else {
                let id = self.next_chunk;
                self.next_chunk += 1;
                self.chunks[0] = Chunk::new(id, self.chunks[0].batch.slice(forget, rows - forget));
                forget = 0;
            }
        }
        self.trimmed = self.trimmed.max(before);
        Ok(())
    }

    pub fn ledger(&self) -> Option<&Arc<super::source::Ledger>> {
        self.ledger.as_ref()
    }

    /// Records where the source's connector is, with the rows applied so far.
    pub fn set_ledger(&mut self, ledger: Arc<super::source::Ledger>) {
        self.ledger = Some(ledger);
    }

    /// Applies a change: retractions remove matching rows, insertions add rows. Either the
    /// whole change applies or, on a constraint violation, nothing does.
    pub fn apply(&mut self, change: &ChangeBatch) -> Result<()> {
        self.apply_all(std::slice::from_ref(change))
    }

    /// Applies the sum of `changes`, all or nothing as [`TableState::apply`] does. An
    /// append-only relation keeps each change's rows as they are, without copying them
    /// into one batch.
    pub fn apply_all(&mut self, changes: &[ChangeBatch]) -> Result<()> {
        if self.def.append_only {
            let mut appended = Vec::with_capacity(changes.len());
            for change in changes {
                let (inserts, retracts) = change.split()?;
                if retracts.num_rows() > 0 {
                    return Err(Error::Internal(format!("\"{}\" only takes appended rows", self.def.name)));
                }
                appended.push(self.checked_rows(inserts)?);
            }
            // A large part is kept as it came (sharing its buffers); consecutive small ones
            // are copied once into one chunk, where merging chunk by chunk would copy each
            // row several times (a join's output arrives in a part per input batch).
            let mut small: Vec<RecordBatch> = Vec::new();
            for inserts in appended.into_iter().filter(|rows| rows.num_rows() > 0) {
                if inserts.num_rows() >= APPEND_CHUNK_KEPT_ROWS {
                    self.append_chunk(std::mem::take(&mut small))?;
                    self.append_chunk(vec![inserts])?;
                    continue;
                }
                small.push(inserts);
                if small.iter().map(RecordBatch::num_rows).sum::<usize>() >= APPEND_CHUNK_ROWS {
                    self.append_chunk(std::mem::take(&mut small))?;
                }
            }
            self.append_chunk(small)?;
            return self.compact();
        }
        let change = match changes {
            [] => return Ok(()),
            [one] => one.clone(),
            _ => ChangeBatch::concat(&self.def.schema, changes)?,
        };
        let (inserts, retracts) = change.split()?;
        let inserts = self.checked_rows(inserts)?;
        let retracted = self.identity_rows(&retracts)?;
        let inserted = self.identity_rows(&inserts)?;
        let retracted_hashes: Vec<u64> = retracted.iter().map(|row| self.hash(row.data())).collect();
        let inserted_hashes: Vec<u64> = inserted.iter().map(|row| self.hash(row.data())).collect();
        let positions: FastMap<u64, usize> = self.chunks.iter().enumerate().map(|(p, c)| (c.id, p)).collect();
        // Validate everything before changing anything: each retracted identity has as
        // many copies as are retracted, and (with a primary key) each inserted one has
        // none left and comes once.
        let wanted = Counts::of(&retracted, &retracted_hashes);
        for (hash, row, count) in wanted.iter() {
            let present = self.copies(&positions, hash, retracted.row(row).data()).map_or(0, |c| c.as_slice().len());
            if present < count {
                return Err(Error::Internal(format!(
                    "table \"{}\": {} retracted rows are not in the table",
                    self.def.name,
                    count - present
                )));
            }
        }
        if !self.def.primary_key.is_empty() {
            let mut seen = Counts::default();
            for (i, row) in inserted.iter().enumerate() {
                let (key, hash) = (row.data(), inserted_hashes[i]);
                let present = self.copies(&positions, hash, key).map_or(0, |c| c.as_slice().len());
                let remaining = present - wanted.count(&retracted, hash, key);
                if remaining > 0 || seen.add(&inserted, hash, i) > 1 {
                    return Err(self.duplicate_key(&inserts, i));
                }
            }
        }
        // Validated: now mutate.
        for (row, &hash) in retracted.iter().zip(&retracted_hashes) {
            let (chunks, positions) = (&self.chunks, &positions);
            let same = |entry: &Indexed| entry.hash == hash && identity_at(chunks, positions, entry) == row.data();
            let Ok(mut entry) = self.index.find_entry(hash, same) else {
                return Err(Error::Internal("validated above: the row is present".into()));
            };
            let (chunk_id, position) = match entry.get_mut().copies.pop() {
                Some(copy) => copy,
                None => entry.remove().0.copies.as_slice()[0],
            };
            let chunk = positions.get(&chunk_id).expect("index entries name live chunks");
            self.chunks[*chunk].kill(position as usize);
        }
        if inserts.num_rows() > 0 {
            let id = self.next_chunk;
            self.next_chunk += 1;
            // The chunk goes in first: entries of its rows are compared in it.
            let mut positions = positions;
            positions.insert(id, self.chunks.len());
            self.chunks.push(Chunk::indexed(id, inserts, inserted));
            let chunk = self.chunks.last().expect("just pushed");
            for (i, &hash) in inserted_hashes.iter().enumerate() {
                let (chunks, positions) = (&self.chunks, &positions);
                let row = chunk.identity(i as u32);
                let same = |entry: &Indexed| entry.hash == hash && identity_at(chunks, positions, entry) == row;
                match self.index.find_mut(hash, same) {
                    Some(entry) => entry.copies.push((id, i as u32)),
                    None => {
                        let entry = Indexed { hash, copies: Copies::One((id, i as u32)) };
                        self.index.insert_unique(hash, entry, |entry| entry.hash);
                    }
                }
            }
        }
        self.compact()
    }

    /// The hash an identity is indexed by.
    fn hash(&self, identity: &[u8]) -> u64 {
        self.hasher.hash_one(identity) & self.hash_mask
    }

    /// Where the live copies of `identity` are, if it has any.
    fn copies(&self, positions: &FastMap<u64, usize>, hash: u64, identity: &[u8]) -> Option<&Copies> {
        let same = |entry: &Indexed| entry.hash == hash && identity_at(&self.chunks, positions, entry) == identity;
        self.index.find(hash, same).map(|entry| &entry.copies)
    }

    /// Rewrites chunks that are mostly dead, drops empty ones, and merges the newest chunks
    /// while the last holds at least half as many live rows as the one before it.
    fn compact(&mut self) -> Result<()> {
        let mut i = 0;
        while i < self.chunks.len() {
            let chunk = &self.chunks[i];
            if chunk.live_rows() == 0 {
                self.chunks.remove(i);
                continue;
            }
            if chunk.dead > chunk.live_rows() {
                let replacement = self.rewrite(&[i])?;
                self.chunks[i] = replacement;
            }
            i += 1;
        }
        while self.chunks.len() >= 2 {
            let n = self.chunks.len();
            if self.chunks[n - 1].live_rows() * 2 < self.chunks[n - 2].live_rows() {
                break;
            }
            // Appended rows never die, so merging only saves per-chunk overhead: stop once
            // chunks are large, instead of copying every row again each time the relation
            // doubles (which cost a quarter of a nexmark source's CPU, most of it the
            // kernel zeroing fresh pages for the copies).
            let (before, last) = (self.chunks[n - 2].live_rows(), self.chunks[n - 1].live_rows());
            if self.def.append_only
                && (before + last > APPEND_CHUNK_ROWS
                    || (before >= APPEND_CHUNK_KEPT_ROWS && last >= APPEND_CHUNK_KEPT_ROWS))
            {
                break;
            }
            if !self.def.append_only && before >= INDEXED_CHUNK_KEPT_ROWS && last >= INDEXED_CHUNK_KEPT_ROWS {
                break;
            }
            let merged = self.rewrite(&[n - 2, n - 1])?;
            self.chunks.truncate(n - 2);
            self.chunks.push(merged);
        }
        Ok(())
    }

    /// Appends `parts` (rows of an append-only relation) as one chunk: the part itself if
    /// there is one, else a copy of them all.
    fn append_chunk(&mut self, parts: Vec<RecordBatch>) -> Result<()> {
        let rows = match parts.as_slice() {
            [] => return Ok(()),
            [_] => without_slack(parts.into_iter().next().expect("one part"))?,
            _ => concat_batches(&self.def.schema, &parts)?,
        };
        let id = self.next_chunk;
        self.next_chunk += 1;
        self.chunks.push(Chunk::new(id, rows));
        Ok(())
    }

    /// The live rows of the chunks at `positions`, as one new chunk, with the index moved
    /// over to it.
    fn rewrite(&mut self, positions: &[usize]) -> Result<Chunk> {
        let id = self.next_chunk;
        self.next_chunk += 1;
        let mut parts = Vec::new();
        // Per rewritten chunk: each old row's position in the new chunk (dead rows: none).
        let mut moves: Vec<(u64, Vec<u32>)> = Vec::with_capacity(positions.len());
        let mut next_row = 0u32;
        for &p in positions {
            let chunk = &self.chunks[p];
            let mut positions = vec![u32::MAX; chunk.batch.num_rows()];
            for (row, position) in positions.iter_mut().enumerate() {
                if chunk.is_live(row) {
                    *position = next_row;
                    next_row += 1;
                }
            }
            moves.push((chunk.id, positions));
            parts.push(chunk.live_batch()?);
        }
        let batch = concat_batches(&self.def.schema, &parts)?;
        if self.def.append_only {
            return Ok(Chunk::new(id, batch));
        }
        // Each moved row's entry is found by its hash and its old location.
        let identities = self.identity_rows(&batch)?;
        let mut next_row = 0usize;
        for (chunk_id, positions) in &moves {
            for (old_row, &new_row) in positions.iter().enumerate() {
                if new_row == u32::MAX {
                    continue;
                }
                let hash = self.hash(identities.row(next_row).data());
                next_row += 1;
                let old = (*chunk_id, old_row as u32);
                let entry =
                    self.index.find_mut(hash, |entry| entry.hash == hash && entry.copies.as_slice().contains(&old));
                let entry = entry.ok_or_else(|| Error::Internal("a live row is missing from the index".into()))?;
                for location in entry.copies.as_mut_slice() {
                    if *location == old {
                        *location = (id, new_row);
                    }
                }
            }
        }
        Ok(Chunk::indexed(id, batch, identities))
    }

    fn identity_rows(&self, batch: &RecordBatch) -> Result<datafusion::arrow::row::Rows> {
        let columns: Vec<ArrayRef> = self.def.identity_columns().iter().map(|&i| batch.column(i).clone()).collect();
        Ok(self.identity.convert_columns(&columns)?)
    }

    /// Inserted rows under the relation's own schema, once their values are checked.
    fn checked_rows(&self, inserts: RecordBatch) -> Result<RecordBatch> {
        self.check_values(&inserts)?;
        RecordBatch::try_new(self.def.schema.clone(), inserts.columns().to_vec())
            .map_err(|e| Error::Internal(format!("rows do not match table \"{}\": {e}", self.def.name)))
    }

    /// NOT NULL, and well-formed JSON in JSON columns.
    fn check_values(&self, rows: &RecordBatch) -> Result<()> {
        for (field, column) in self.def.schema.fields().iter().zip(rows.columns()) {
            if !field.is_nullable() && column.null_count() > 0 {
                return Err(Error::NotNullViolation { table: self.def.name.clone(), column: field.name().clone() });
            }
            if crate::sql::is_json(field)
                && let Some(texts) = column.as_any().downcast_ref::<StringArray>()
            {
                for text in texts.iter().flatten() {
                    if let Err(e) = serde_json::from_str::<serde::de::IgnoredAny>(text) {
                        return Err(Error::InvalidValue {
                            code: "22P02",
                            message: format!("invalid input syntax for type json in column \"{}\": {e}", field.name()),
                        });
                    }
                }
            }
        }
        Ok(())
    }

    fn duplicate_key(&self, rows: &RecordBatch, row: usize) -> Error {
        let names: Vec<&str> = self.def.primary_key.iter().map(|&i| self.def.schema.field(i).name().as_str()).collect();
        let values: Vec<String> = self
            .def
            .primary_key
            .iter()
            .map(|&i| array_value_to_string(rows.column(i), row).unwrap_or_else(|_| "?".into()))
            .collect();
        Error::UniqueViolation {
            constraint: self.def.primary_key_name(),
            detail: format!("Key ({})=({}) already exists.", names.join(", "), values.join(", ")),
        }
    }
}

/// DataFusion's view of a freshet table. Rows are looked up when the query is planned for
/// execution, in the statement's snapshot, so a prepared statement always reads fresh data.
#[derive(Debug)]
pub struct FreshetTable {
    def: Arc<TableDef>,
    cell: Arc<SnapshotCell>,
}

#[async_trait]
impl TableProvider for FreshetTable {
    fn schema(&self) -> SchemaRef {
        self.def.schema.clone()
    }

    fn constraints(&self) -> Option<&Constraints> {
        Some(&self.def.constraints)
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn get_column_default(&self, column: &str) -> Option<&Expr> {
        self.def.defaults.get(column)
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let snapshot = self.cell.current();
        let version = snapshot.relation(&self.def.name).filter(|v| v.def.id == self.def.id).ok_or_else(|| {
            DataFusionError::Plan(format!(
                "table \"{}\" was dropped or recreated after this statement was prepared; prepare it again",
                self.def.name
            ))
        })?;
        let partitions = vec![version.batches().map_err(|e| DataFusionError::External(Box::new(e)))?];
        let exec = MemorySourceConfig::try_new_exec(&partitions, self.def.schema.clone(), projection.cloned())?;
        Ok(exec)
    }
}

/// The definition of the table, source or view a plan's table source was resolved to;
/// `None` if the source is not one of freshet's relations.
pub fn planned_def(source: &Arc<dyn datafusion::logical_expr::TableSource>) -> Option<Arc<TableDef>> {
    let provider = datafusion::datasource::source_as_provider(source).ok()?;
    (provider.as_ref() as &dyn std::any::Any).downcast_ref::<FreshetTable>().map(|t| t.def.clone())
}

/// The id of the table or view a plan's table source was resolved to.
pub fn planned_table_id(source: &Arc<dyn datafusion::logical_expr::TableSource>) -> Option<u64> {
    planned_def(source).map(|def| def.id)
}

/// The `public` schema: every table of the statement's snapshot.
#[derive(Debug)]
pub struct FreshetSchema {
    cell: Arc<SnapshotCell>,
}

impl FreshetSchema {
    pub fn new(cell: Arc<SnapshotCell>) -> Self {
        FreshetSchema { cell }
    }
}

#[async_trait]
impl SchemaProvider for FreshetSchema {
    fn table_names(&self) -> Vec<String> {
        let snapshot = self.cell.current();
        snapshot.tables.keys().chain(snapshot.views.keys()).chain(snapshot.plain_views.keys()).cloned().collect()
    }

    async fn table(&self, name: &str) -> DfResult<Option<Arc<dyn TableProvider>>> {
        let snapshot = self.cell.current();
        if let Some(view) = snapshot.plain_views.get(name) {
            return Ok(Some(view.clone()));
        }
        Ok(snapshot.relation(name).map(|version| {
            Arc::new(FreshetTable { def: version.def.clone(), cell: self.cell.clone() }) as Arc<dyn TableProvider>
        }))
    }

    fn table_exist(&self, name: &str) -> bool {
        let snapshot = self.cell.current();
        snapshot.relation(name).is_some() || snapshot.plain_views.contains_key(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{Int64Array, StringArray};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};

    fn def(primary_key: Vec<usize>) -> Arc<TableDef> {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("name", DataType::Utf8, true),
        ]));
        Arc::new(TableDef::new(1, "t".into(), schema, primary_key, vec![], HashMap::new()))
    }

    fn rows(def: &TableDef, rows: &[(i64, Option<&str>)]) -> RecordBatch {
        let ids = Int64Array::from(rows.iter().map(|r| r.0).collect::<Vec<_>>());
        let names = StringArray::from(rows.iter().map(|r| r.1).collect::<Vec<_>>());
        RecordBatch::try_new(def.schema.clone(), vec![Arc::new(ids), Arc::new(names)]).expect("matches schema")
    }

    fn contents(state: &TableState) -> Vec<(i64, Option<String>)> {
        let mut out = Vec::new();
        for batch in state.version().batches().expect("live rows") {
            let ids = batch.column(0).as_any().downcast_ref::<Int64Array>().expect("ids");
            let names = batch.column(1).as_any().downcast_ref::<StringArray>().expect("names");
            for i in 0..batch.num_rows() {
                out.push((ids.value(i), names.is_valid(i).then(|| names.value(i).to_string())));
            }
        }
        out.sort();
        out
    }

    /// Identities whose hashes collide (here: every identity has one of four hashes) are
    /// told apart by comparing them: each delete finds its own row, duplicates are counted
    /// per identity, and a primary key conflict is found among colliding keys.
    #[test]
    fn rows_whose_identities_hash_alike_are_told_apart() {
        for primary_key in [vec![], vec![0]] {
            let d = def(primary_key.clone());
            let mut state = TableState::new(d.clone()).expect("state");
            state.hash_mask = 3;
            let mut expected: Vec<(i64, Option<String>)> = Vec::new();
            for round in 0..40i64 {
                let batch: Vec<(i64, Option<&str>)> = (round * 10..round * 10 + 10).map(|i| (i, Some("x"))).collect();
                state.apply(&ChangeBatch::inserts(rows(&d, &batch))).expect("insert");
                expected.extend(batch.iter().map(|(i, s)| (*i, s.map(String::from))));
                if primary_key.is_empty() {
                    // A second copy of every third row.
                    let copies: Vec<(i64, Option<&str>)> = batch.iter().copied().filter(|r| r.0 % 3 == 0).collect();
                    state.apply(&ChangeBatch::inserts(rows(&d, &copies))).expect("copies");
                    expected.extend(copies.iter().map(|(i, s)| (*i, s.map(String::from))));
                }
                // Delete every fourth row of an earlier round, one copy.
                let old: Vec<(i64, Option<&str>)> =
                    (round * 5..round * 5 + 5).filter(|i| i % 4 == 0).map(|i| (i, Some("x"))).collect();
                state.apply(&ChangeBatch::retracts(rows(&d, &old))).expect("delete");
                for row in &old {
                    let at = expected.iter().position(|e| e.0 == row.0).expect("held");
                    expected.remove(at);
                }
            }
            expected.sort();
            assert_eq!(contents(&state), expected, "primary key {primary_key:?}");
            let absent = state.apply(&ChangeBatch::retracts(rows(&d, &[(5000, Some("x"))])));
            assert!(absent.is_err(), "a row never inserted is not found among its hash's rows");
            if !primary_key.is_empty() {
                let taken = state.apply(&ChangeBatch::inserts(rows(&d, &[(9999, None), (7, Some("again"))])));
                assert_eq!(taken.expect_err("7 is taken").sqlstate(), "23505");
                let twice = state.apply(&ChangeBatch::inserts(rows(&d, &[(9998, None), (9998, None)])));
                assert_eq!(twice.expect_err("9998 twice").sqlstate(), "23505");
            }
            assert_eq!(contents(&state), expected, "refused changes change nothing");
        }
    }

    #[test]
    fn primary_key_conflicts_change_nothing() {
        let d = def(vec![0]);
        let mut state = TableState::new(d.clone()).expect("state");
        state.apply(&ChangeBatch::inserts(rows(&d, &[(1, Some("a")), (2, Some("b"))]))).expect("fresh keys");
        let err = state
            .apply(&ChangeBatch::inserts(rows(&d, &[(3, Some("c")), (2, Some("again"))])))
            .expect_err("2 is taken");
        assert_eq!(err.sqlstate(), "23505");
        assert_eq!(err.detail().as_deref(), Some("Key (id)=(2) already exists."));
        assert_eq!(contents(&state), vec![(1, Some("a".into())), (2, Some("b".into()))]);
    }

    #[test]
    fn an_update_may_reuse_the_key_it_retracts() {
        let d = def(vec![0]);
        let mut state = TableState::new(d.clone()).expect("state");
        state.apply(&ChangeBatch::inserts(rows(&d, &[(1, Some("a"))]))).expect("insert");
        let update = ChangeBatch::replace(rows(&d, &[(1, Some("a"))]), rows(&d, &[(1, Some("z"))])).expect("update");
        state.apply(&update).expect("same key, new value");
        assert_eq!(contents(&state), vec![(1, Some("z".into()))]);
    }

    #[test]
    fn tables_without_a_key_are_multisets() {
        let d = def(vec![]);
        let mut state = TableState::new(d.clone()).expect("state");
        for _ in 0..3 {
            state.apply(&ChangeBatch::inserts(rows(&d, &[(7, None)]))).expect("duplicates allowed");
        }
        state.apply(&ChangeBatch::retracts(rows(&d, &[(7, None)]))).expect("retract one copy");
        assert_eq!(contents(&state), vec![(7, None), (7, None)]);
        let missing = state.apply(&ChangeBatch::retracts(rows(&d, &[(8, None)])));
        assert!(missing.is_err(), "retracting an absent row is a broken invariant");
    }

    #[test]
    fn deletes_and_reinserts_keep_the_index_right() {
        let d = def(vec![]);
        let mut state = TableState::new(d.clone()).expect("state");
        for round in 0..200i64 {
            let id = round % 17;
            state.apply(&ChangeBatch::inserts(rows(&d, &[(id, Some("x")), (id + 100, None)]))).expect("insert");
            if round % 3 == 0 {
                state.apply(&ChangeBatch::retracts(rows(&d, &[(id, Some("x"))]))).expect("delete one copy");
            }
        }
        let expected_copies = |id: i64| {
            (0..200i64).filter(|r| r % 17 == id).count() - (0..200i64).filter(|r| r % 17 == id && r % 3 == 0).count()
        };
        let got = contents(&state);
        for id in 0..17 {
            assert_eq!(got.iter().filter(|r| r.0 == id).count(), expected_copies(id), "copies of {id}");
        }
        assert_eq!(state.version().num_rows(), got.len());
        // Every copy can still be found and deleted.
        let all = state.version().batches().expect("rows");
        for batch in all {
            state.apply(&ChangeBatch::retracts(batch)).expect("delete every row");
        }
        assert_eq!(state.version().num_rows(), 0);
        assert!(state.index.is_empty());
    }

    #[test]
    fn not_null_is_enforced() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, true),
            Field::new("name", DataType::Utf8, false),
        ]));
        let d = Arc::new(TableDef::new(1, "t".into(), schema.clone(), vec![], vec![], HashMap::new()));
        let mut state = TableState::new(d).expect("state");
        let batch = RecordBatch::try_new(
            Arc::new(Schema::new(vec![
                Field::new("id", DataType::Int64, true),
                Field::new("name", DataType::Utf8, true),
            ])),
            vec![Arc::new(Int64Array::from(vec![1])), Arc::new(StringArray::from(vec![None::<&str>]))],
        )
        .expect("nullable batch");
        let err = state.apply(&ChangeBatch::inserts(batch)).expect_err("null name");
        assert_eq!(err.sqlstate(), "23502");
    }

    #[test]
    fn many_small_inserts_stay_few_batches() {
        let d = def(vec![0]);
        let mut state = TableState::new(d.clone()).expect("state");
        for i in 0..1000 {
            state.apply(&ChangeBatch::inserts(rows(&d, &[(i, None)]))).expect("insert");
        }
        assert_eq!(contents(&state).len(), 1000);
        assert!(state.chunks.len() <= 12, "{} chunks", state.chunks.len());
    }

    /// Large chunks of a relation with an index stay apart, and its rows stay right as
    /// changes kill rows in every chunk: a view's groups, updated epoch after epoch.
    #[test]
    fn large_chunks_of_an_indexed_relation_are_not_merged() {
        let d = def(vec![]);
        let mut state = TableState::new(d.clone()).expect("state");
        let mut expected: Vec<(i64, Option<String>)> = Vec::new();
        for part in 0..3i64 {
            let batch: Vec<(i64, Option<&str>)> =
                (part * 40_000..(part + 1) * 40_000).map(|i| (i, Some("a"))).collect();
            state.apply(&ChangeBatch::inserts(rows(&d, &batch))).expect("insert");
            expected.extend(batch.iter().map(|(i, s)| (*i, s.map(String::from))));
        }
        assert_eq!(state.chunks.len(), 3, "chunks of 40,000 rows are kept apart");
        // Rows across all three chunks are updated (retracted, inserted anew), some of
        // them again in a later round.
        for (round, name) in ["b", "c", "d"].into_iter().enumerate() {
            let chosen: Vec<i64> = (0..120_000).filter(|i| i % (3 + round as i64) == 0).collect();
            let old: Vec<(i64, Option<&str>)> =
                chosen.iter().map(|&i| (i, expected[i as usize].1.as_deref())).collect();
            let new: Vec<(i64, Option<&str>)> = chosen.iter().map(|&i| (i, Some(name))).collect();
            let change = ChangeBatch::replace(rows(&d, &old), rows(&d, &new)).expect("change");
            state.apply(&change).expect("update");
            for (i, name) in &new {
                expected[*i as usize] = (*i, name.map(String::from));
            }
        }
        expected.sort();
        assert_eq!(contents(&state), expected);
        assert!(state.chunks.len() <= 6, "{} chunks", state.chunks.len());
    }

    #[test]
    fn append_only_relations_keep_every_row_without_an_index() {
        let d = def(vec![]);
        let d = Arc::new(TableDef::append_only(2, "s".into(), d.schema.clone()));
        let mut state = TableState::new(d.clone()).expect("state");
        for i in 0..1000 {
            // Duplicates are rows like any other: an append-only relation is a multiset.
            state.apply(&ChangeBatch::inserts(rows(&d, &[(i % 500, Some("x"))]))).expect("append");
        }
        assert_eq!(contents(&state).len(), 1000);
        assert!(state.index.is_empty(), "no identity index is kept");
        assert!(state.chunks.len() <= 12, "{} chunks", state.chunks.len());
        let retract = ChangeBatch::retracts(rows(&d, &[(1, Some("x"))]));
        assert!(state.apply(&retract).is_err(), "rows are never taken away");
        assert_eq!(contents(&state).len(), 1000, "a refused change changes nothing");
    }

    #[test]
    fn appended_batches_are_kept_as_they_arrived_and_all_or_nothing() {
        let d = def(vec![]);
        let d = Arc::new(TableDef::append_only(2, "s".into(), d.schema.clone()));
        let mut state = TableState::new(d.clone()).expect("state");
        let batch = |from: i64| {
            let ids: Vec<(i64, Option<&str>)> = (from..from + 10_000).map(|i| (i, Some("x"))).collect();
            rows(&d, &ids)
        };
        let parts: Vec<ChangeBatch> = (0..3).map(|i| ChangeBatch::inserts(batch(i * 10_000))).collect();
        // A NULL id in the last part refuses the whole epoch.
        let null_id = RecordBatch::try_new(
            Arc::new(Schema::new(vec![
                Field::new("id", DataType::Int64, true),
                Field::new("name", DataType::Utf8, true),
            ])),
            vec![Arc::new(Int64Array::from(vec![None])), Arc::new(StringArray::from(vec![Some("y")]))],
        )
        .expect("batch");
        let refused = [parts.clone(), vec![ChangeBatch::inserts(null_id)]].concat();
        assert!(matches!(state.apply_all(&refused), Err(Error::NotNullViolation { .. })));
        assert!(contents(&state).is_empty(), "a refused epoch adds nothing");
        state.apply_all(&parts).expect("appended");
        assert_eq!(contents(&state), (0..30_000).map(|i| (i, Some("x".to_string()))).collect::<Vec<_>>());
        // Each part is a chunk of its own, holding the very buffers it arrived in.
        let kept = state.version().batches().expect("rows");
        assert_eq!(kept.len(), 3);
        for (kept, part) in kept.iter().zip(&parts) {
            for column in 0..2 {
                let (kept, arrived) = (kept.column(column).to_data(), part.batch().column(column).to_data());
                assert!(kept.buffers().iter().zip(arrived.buffers()).all(|(k, a)| k.ptr_eq(a)), "column {column}");
            }
        }
        // A slice of a larger batch is copied: kept whole, it would hold all of the batch.
        let before = state.version().memory_bytes();
        let large = batch(30_000).slice(0, 1000);
        state.apply_all(&[ChangeBatch::inserts(large.clone())]).expect("appended");
        let added = state.version().memory_bytes() - before;
        assert!(added < large.get_array_memory_size() / 5, "{added} bytes for 1,000 rows");
        assert_eq!(contents(&state).len(), 31_000);
    }

    #[test]
    fn small_parts_of_one_epoch_are_copied_once_into_one_chunk() {
        let d = def(vec![]);
        let d = Arc::new(TableDef::append_only(2, "s".into(), d.schema.clone()));
        let mut state = TableState::new(d.clone()).expect("state");
        let part = |from: i64, n: i64| {
            let ids: Vec<(i64, Option<&str>)> = (from..from + n).map(|i| (i, Some("x"))).collect();
            ChangeBatch::inserts(rows(&d, &ids))
        };
        // Twelve parts of 1,000 rows (as a join emits a part per input batch), then a large
        // one, then two more small ones.
        let mut parts: Vec<ChangeBatch> = (0..12).map(|i| part(i * 1000, 1000)).collect();
        parts.push(part(12_000, 10_000));
        parts.extend([part(22_000, 500), part(22_500, 500)]);
        state.apply_all(&parts).expect("appended");
        assert_eq!(contents(&state), (0..23_000).map(|i| (i, Some("x".to_string()))).collect::<Vec<_>>());
        let sizes: Vec<usize> = state.chunks.iter().map(|c| c.batch.num_rows()).collect();
        assert_eq!(sizes, vec![12_000, 10_000, 1000], "small parts are gathered, the large one kept");
        let large = state.version().batches().expect("rows")[1].column(0).to_data();
        assert!(large.buffers()[0].ptr_eq(&parts[12].batch().column(0).to_data().buffers()[0]), "kept as it came");
    }

    #[test]
    fn memory_shared_between_relations_is_counted_once_in_a_total() {
        let d = def(vec![]);
        let d = Arc::new(TableDef::append_only(2, "s".into(), d.schema.clone()));
        let ids: Vec<(i64, Option<&str>)> = (0..10_000).map(|i| (i, None)).collect();
        let rows = rows(&d, &ids);
        let (mut source, mut view) = (TableState::new(d.clone()).expect("state"), TableState::new(d).expect("state"));
        source.apply(&ChangeBatch::inserts(rows.clone())).expect("appended");
        view.apply(&ChangeBatch::inserts(rows)).expect("appended");
        let (source, view) = (source.version(), view.version());
        let mut allocations = FastMap::default();
        source.allocations(&mut allocations);
        let alone: usize = allocations.values().sum();
        view.allocations(&mut allocations);
        assert_eq!(allocations.values().sum::<usize>(), alone, "the view holds the source's buffers");
        assert!(alone >= 80_000 && alone <= source.memory_bytes(), "{alone} bytes for 10,000 ids");
    }
}
