//! Tables: their definitions, their rows, and how DataFusion reads them.
//!
//! A table's rows live in memory as a short list of Arrow batches ([`TableState`]), changed
//! only by applying [`ChangeBatch`]es, both live and when replaying the log, so there is a
//! single code path for both. Readers never see `TableState`; they see immutable
//! [`TableVersion`]s collected in a [`Snapshot`], which is swapped atomically when a write
//! becomes durable.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use datafusion::arrow::array::{Array, ArrayRef, BooleanArray, StringArray};
use datafusion::arrow::compute::{concat_batches, filter_record_batch};
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::arrow::row::{RowConverter, SortField};
use datafusion::arrow::util::display::array_value_to_string;
use datafusion::catalog::{SchemaProvider, Session, TableProvider};
use datafusion::common::{Constraint, Constraints};
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::logical_expr::{Expr, TableType};
use datafusion::physical_plan::ExecutionPlan;

use crate::dataflow::ChangeBatch;
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
        TableDef { id, name, schema, primary_key, default_texts, defaults, constraints }
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
    pub batches: Arc<Vec<RecordBatch>>,
}

impl TableVersion {
    pub fn num_rows(&self) -> usize {
        self.batches.iter().map(|b| b.num_rows()).sum()
    }
}

/// Every table and materialized view at one point in time.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub tables: BTreeMap<String, TableVersion>,
    /// Materialized views, each as of the last epoch it committed.
    pub views: BTreeMap<String, TableVersion>,
    /// The log segment this snapshot includes everything up to (0 = nothing logged yet).
    pub seq: u64,
}

impl Snapshot {
    /// A table or a view by name.
    pub fn relation(&self, name: &str) -> Option<&TableVersion> {
        self.tables.get(name).or_else(|| self.views.get(name))
    }
}

tokio::task_local! {
    /// The snapshot a running statement reads; set so that every table in one statement is
    /// read at the same point, and so writers can read their own uncommitted state.
    static STATEMENT_SNAPSHOT: Arc<Snapshot>;
}

/// Holds the latest committed snapshot and hands out the one a statement should read.
#[derive(Debug, Default)]
pub struct SnapshotCell {
    committed: RwLock<Arc<Snapshot>>,
}

impl SnapshotCell {
    /// The newest durable snapshot.
    pub fn committed(&self) -> Arc<Snapshot> {
        match self.committed.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Makes `tables` at log position `seq` what new statements read, keeping the views.
    /// Called by the log committer, in log order.
    pub fn publish_tables(&self, tables: BTreeMap<String, TableVersion>, seq: u64) {
        self.update(|current| Snapshot { tables, views: current.views.clone(), seq });
    }

    /// Replaces (or with `None` removes) one view's contents, keeping everything else.
    pub fn publish_view(&self, name: &str, version: Option<TableVersion>) {
        self.update(|current| {
            let mut next = current.clone();
            match version {
                Some(v) => next.views.insert(name.to_string(), v),
                None => next.views.remove(name),
            };
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

/// A table's rows as the single writer sees and changes them.
pub struct TableState {
    def: Arc<TableDef>,
    batches: Vec<RecordBatch>,
    /// Encoded primary keys of every row; empty for tables without a primary key.
    keys: HashSet<Box<[u8]>>,
    identity: RowConverter,
}

impl TableState {
    pub fn new(def: Arc<TableDef>) -> Result<Self> {
        let fields =
            def.identity_columns().iter().map(|&i| SortField::new(def.schema.field(i).data_type().clone())).collect();
        let identity = RowConverter::new(fields)?;
        Ok(TableState { def, batches: Vec::new(), keys: HashSet::new(), identity })
    }

    pub fn def(&self) -> &Arc<TableDef> {
        &self.def
    }

    /// The rows as an immutable version for readers.
    pub fn version(&self) -> TableVersion {
        TableVersion { def: self.def.clone(), batches: Arc::new(self.batches.clone()) }
    }

    /// Applies a change: retractions remove matching rows, insertions add rows. Either the
    /// whole change applies or, on a constraint violation, nothing does.
    pub fn apply(&mut self, change: &ChangeBatch) -> Result<()> {
        let (inserts, retracts) = change.split()?;
        self.check_values(&inserts)?;
        let inserts = RecordBatch::try_new(self.def.schema.clone(), inserts.columns().to_vec())
            .map_err(|e| Error::Internal(format!("rows do not match table \"{}\": {e}", self.def.name)))?;
        let keep = self.rows_to_keep(&retracts)?;
        let has_pk = !self.def.primary_key.is_empty();
        let mut retracted_keys = HashSet::new();
        let mut inserted_keys = Vec::new();
        if has_pk {
            let rows = self.identity_rows(&retracts)?;
            retracted_keys = rows.iter().map(|r| Box::<[u8]>::from(r.as_ref())).collect();
            let rows = self.identity_rows(&inserts)?;
            let mut seen = HashSet::new();
            for (i, row) in rows.iter().enumerate() {
                let key: Box<[u8]> = row.as_ref().into();
                let taken = self.keys.contains(&key) && !retracted_keys.contains(&key);
                if taken || !seen.insert(key.clone()) {
                    return Err(self.duplicate_key(&inserts, i));
                }
                inserted_keys.push(key);
            }
        }
        // Validated: now mutate.
        if let Some(keep) = keep {
            let mut kept = Vec::with_capacity(self.batches.len());
            for (batch, mask) in self.batches.iter().zip(keep) {
                let batch = match mask {
                    None => batch.clone(),
                    Some(mask) => filter_record_batch(batch, &mask)?,
                };
                if batch.num_rows() > 0 {
                    kept.push(batch);
                }
            }
            self.batches = kept;
        }
        for key in &retracted_keys {
            self.keys.remove(key);
        }
        self.keys.extend(inserted_keys);
        if inserts.num_rows() > 0 {
            self.batches.push(inserts);
            self.merge_tail()?;
        }
        Ok(())
    }

    /// For each stored batch, `None` to keep it whole or a mask of rows to keep. `None`
    /// overall when nothing is retracted.
    #[allow(clippy::type_complexity)]
    fn rows_to_keep(&self, retracts: &RecordBatch) -> Result<Option<Vec<Option<BooleanArray>>>> {
        if retracts.num_rows() == 0 {
            return Ok(None);
        }
        let mut wanted: HashMap<Box<[u8]>, usize> = HashMap::new();
        for row in self.identity_rows(retracts)?.iter() {
            *wanted.entry(row.as_ref().into()).or_default() += 1;
        }
        let mut remaining = retracts.num_rows();
        let mut masks = Vec::with_capacity(self.batches.len());
        for batch in &self.batches {
            if remaining == 0 {
                masks.push(None);
                continue;
            }
            let rows = self.identity_rows(batch)?;
            let mut any_removed = false;
            let mask: BooleanArray = rows
                .iter()
                .map(|row| {
                    if let Some(count) = wanted.get_mut(row.as_ref())
                        && *count > 0
                    {
                        *count -= 1;
                        remaining -= 1;
                        any_removed = true;
                        return Some(false);
                    }
                    Some(true)
                })
                .collect();
            masks.push(any_removed.then_some(mask));
        }
        if remaining > 0 {
            return Err(Error::Internal(format!(
                "table \"{}\": {remaining} retracted rows are not in the table",
                self.def.name
            )));
        }
        Ok(Some(masks))
    }

    fn identity_rows(&self, batch: &RecordBatch) -> Result<datafusion::arrow::row::Rows> {
        let columns: Vec<ArrayRef> = self.def.identity_columns().iter().map(|&i| batch.column(i).clone()).collect();
        Ok(self.identity.convert_columns(&columns)?)
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
            constraint: format!("{}_pkey", self.def.name),
            detail: format!("Key ({})=({}) already exists.", names.join(", "), values.join(", ")),
        }
    }

    /// Keeps the batch list short: merge the newest batches while the last is at least half
    /// the size of the one before it, like a binary counter. Each row is copied O(log n)
    /// times in total and a table of n rows has O(log n) batches.
    fn merge_tail(&mut self) -> Result<()> {
        while self.batches.len() >= 2 {
            let n = self.batches.len();
            if self.batches[n - 1].num_rows() * 2 < self.batches[n - 2].num_rows() {
                break;
            }
            let last = self.batches.pop().expect("len >= 2");
            let before = self.batches.pop().expect("len >= 2");
            self.batches.push(concat_batches(&self.def.schema, [&before, &last])?);
        }
        Ok(())
    }
}

/// DataFusion's view of a freshet table. Rows are looked up when the query is planned for
/// execution, in the statement's snapshot, so a prepared statement always reads fresh data.
#[derive(Debug)]
pub struct FreshetTable {
    def: Arc<TableDef>,
    cell: Arc<SnapshotCell>,
}

impl FreshetTable {
    /// The id of the table definition this provider was resolved to.
    pub fn id(&self) -> u64 {
        self.def.id
    }
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
        let partitions = vec![version.batches.as_ref().clone()];
        let exec = MemorySourceConfig::try_new_exec(&partitions, self.def.schema.clone(), projection.cloned())?;
        Ok(exec)
    }
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
        snapshot.tables.keys().chain(snapshot.views.keys()).cloned().collect()
    }

    async fn table(&self, name: &str) -> DfResult<Option<Arc<dyn TableProvider>>> {
        Ok(self.cell.current().relation(name).map(|version| {
            Arc::new(FreshetTable { def: version.def.clone(), cell: self.cell.clone() }) as Arc<dyn TableProvider>
        }))
    }

    fn table_exist(&self, name: &str) -> bool {
        self.cell.current().relation(name).is_some()
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
        for batch in &state.batches {
            let ids = batch.column(0).as_any().downcast_ref::<Int64Array>().expect("ids");
            let names = batch.column(1).as_any().downcast_ref::<StringArray>().expect("names");
            for i in 0..batch.num_rows() {
                out.push((ids.value(i), names.is_valid(i).then(|| names.value(i).to_string())));
            }
        }
        out.sort();
        out
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
        assert!(state.batches.len() <= 12, "{} batches", state.batches.len());
    }
}
