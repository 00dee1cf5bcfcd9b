//! The catalog: every object freshet knows about, and the [`Database`] that runs statements
//! against them.
//!
//! `Database` owns the DataFusion session (planning and batch queries), the tables, and
//! the durable log. Statement execution follows one rule: a change is applied in memory
//! under the writer lock, queued to the log in that same order, and becomes visible to
//! readers only when the log has stored it (the log's committer publishes the snapshot).
//! A statement that fails changes nothing.
//!
//! It does not speak any wire protocol; `server` turns its [`Outcome`]s into messages.

pub mod table;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use datafusion::arrow::array::{RecordBatch, StringArray};
use datafusion::arrow::compute::concat_batches;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::catalog::{CatalogProvider, MemoryCatalogProvider};
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::common::{Column, DFSchema};
use datafusion::datasource::source_as_provider;
use datafusion::execution::SendableRecordBatchStream;
use datafusion::execution::context::SessionState;
use datafusion::logical_expr::{DmlStatement, Expr, LogicalPlan, LogicalPlanBuilder, WriteOp};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::prelude::{SessionConfig, SessionContext};
use object_store::ObjectStore;
use serde::{Deserialize, Serialize};

use crate::dataflow::ChangeBatch;
use crate::error::{Error, Result};
use crate::sql::{self, CreateTable, Planned, Statement};
use crate::state::log::{Ack, Log, LogEntry, LogStats};
use table::{FreshetSchema, FreshetTable, Snapshot, SnapshotCell, TableDef, TableState};

/// The catalog name clients see (`current_database()`), and the one schema in it.
pub const CATALOG_NAME: &str = "freshet";
pub const SCHEMA_NAME: &str = "public";
/// Log segments written after the last snapshot before a new snapshot is taken.
const SNAPSHOT_EVERY_SEGMENTS: u64 = 2048;

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
        let state =
            self.tables.get_mut(table).ok_or_else(|| Error::UndefinedTable { name: table.into(), position: None })?;
        state.apply(change)?;
        let version = state.version();
        self.replace_version(table, Some(version));
        Ok(())
    }

    fn replace_version(&mut self, table: &str, version: Option<table::TableVersion>) {
        let mut tables = self.working.tables.clone();
        match version {
            Some(v) => tables.insert(table.to_string(), v),
            None => tables.remove(table),
        };
        self.working = Arc::new(Snapshot { tables, seq: 0 });
    }
}

struct Shared {
    cell: Arc<SnapshotCell>,
    writer: tokio::sync::Mutex<Writer>,
    log: Log,
    snapshot_running: AtomicBool,
}

/// A running freshet database: tables, their log, and the DataFusion session that plans
/// and runs queries over them. Cheap to clone; clones share everything.
#[derive(Clone)]
pub struct Database {
    ctx: SessionContext,
    shared: Arc<Shared>,
}

impl Database {
    /// Opens the database stored in `store`, replaying its snapshot and log.
    pub async fn open(store: Arc<dyn ObjectStore>) -> Result<Database> {
        let cell = Arc::new(SnapshotCell::default());
        let ctx = new_session(cell.clone())?;
        let (log, recovered) = Log::open(store).await?;
        let mut writer = Writer::default();
        let mut last_seq = 0;
        let replayed_segments = recovered.segments.len();
        if let Some((seq, entries)) = recovered.snapshot {
            replay(&ctx, &mut writer, entries)?;
            last_seq = seq;
        }
        for (seq, entries) in recovered.segments {
            replay(&ctx, &mut writer, entries)?;
            last_seq = seq;
        }
        cell.publish(Arc::new(Snapshot { tables: writer.working.tables.clone(), seq: last_seq }));
        let tables = writer.tables.len();
        let db = Database {
            ctx,
            shared: Arc::new(Shared {
                cell,
                writer: tokio::sync::Mutex::new(writer),
                log,
                snapshot_running: AtomicBool::new(false),
            }),
        };
        tracing::info!(tables, last_seq, replayed_segments, "database opened");
        if replayed_segments > 0 {
            db.start_snapshot();
        }
        Ok(db)
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
        SnapshotCell::scope(self.shared.cell.committed(), sql::plan(&state, statement, sql))
            .await
            .map_err(|e| place_relation(e, sql))
    }

    /// Runs a planned statement.
    pub async fn execute(&self, planned: Planned, sql: &str) -> Result<Outcome> {
        let result = match planned {
            Planned::Query(plan) => self.query(plan, sql).await,
            Planned::Write(plan) => self.write(plan, sql).await,
            Planned::CreateTable(create) => self.create_table(create, sql).await,
            Planned::DropTable { names, if_exists } => self.drop_tables(names, if_exists).await,
            Planned::ShowTables => self.show_tables(),
        };
        result.map_err(|e| place_relation(e, sql))
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
        let snapshot = self.shared.cell.committed();
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
        let mut writer = self.shared.writer.lock().await;
        let state =
            writer.tables.get(&name).ok_or_else(|| Error::UndefinedTable { name: name.clone(), position: None })?;
        let def = state.def().clone();
        check_target(&dml, &def)?;
        let schema = def.schema.clone();
        let working = writer.working.clone();
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
        let entries = vec![Record::Change { table: name }.entry(Some(change.to_flat()?))?];
        let ack = self.enqueue(&writer, entries).await?;
        drop(writer);
        self.durable(ack).await?;
        Ok(Outcome::Command { tag, rows: Some(affected) })
    }

    async fn create_table(&self, create: CreateTable, sql: &str) -> Result<Outcome> {
        let defaults = plan_defaults(&self.ctx, &create.defaults)?;
        let mut writer = self.shared.writer.lock().await;
        if writer.tables.contains_key(&create.name) {
            if create.if_not_exists {
                return Ok(Outcome::Command { tag: "CREATE TABLE", rows: None });
            }
            return Err(Error::DuplicateTable { name: create.name });
        }
        let rows = match create.source {
            Some(plan) => Some(concat(&create.schema, self.collect(plan, writer.working.clone(), sql).await?)?),
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
        let ack = self.enqueue(&writer, entries).await?;
        drop(writer);
        self.durable(ack).await?;
        Ok(Outcome::Command { tag: "CREATE TABLE", rows: None })
    }

    async fn drop_tables(&self, names: Vec<String>, if_exists: bool) -> Result<Outcome> {
        let mut writer = self.shared.writer.lock().await;
        for name in &names {
            if !writer.tables.contains_key(name) && !if_exists {
                return Err(Error::UndefinedTable { name: name.clone(), position: None });
            }
        }
        let mut entries = Vec::new();
        for name in names {
            if writer.tables.contains_key(&name) {
                writer.drop_table(&name);
                entries.push(Record::DropTable { name }.entry(None)?);
            }
        }
        if entries.is_empty() {
            return Ok(Outcome::Command { tag: "DROP TABLE", rows: None });
        }
        let ack = self.enqueue(&writer, entries).await?;
        drop(writer);
        self.durable(ack).await?;
        Ok(Outcome::Command { tag: "DROP TABLE", rows: None })
    }

    fn show_tables(&self) -> Result<Outcome> {
        let names: Vec<String> = self.shared.cell.committed().tables.keys().cloned().collect();
        let schema = sql::show_tables_schema();
        let batch = RecordBatch::try_new(schema.clone(), vec![Arc::new(StringArray::from(names))])?;
        let stream = RecordBatchStreamAdapter::new(schema.clone(), futures::stream::iter([Ok(batch)]));
        Ok(Outcome::Rows { schema, stream: Box::pin(stream) })
    }

    /// Queues log entries for the writer's current state; call with the writer lock held.
    async fn enqueue(&self, writer: &Writer, entries: Vec<LogEntry>) -> Result<Ack> {
        let working = writer.working.clone();
        let cell = self.shared.cell.clone();
        let publish = Box::new(move |seq| cell.publish(Arc::new(Snapshot { tables: working.tables.clone(), seq })));
        self.shared.log.enqueue(entries, publish).await
    }

    async fn durable(&self, ack: Ack) -> Result<()> {
        ack.durable().await?;
        let stats = self.shared.log.stats();
        let last = stats.last_seq.load(Ordering::Relaxed);
        if last - stats.snapshot_seq.load(Ordering::Relaxed) >= SNAPSHOT_EVERY_SEGMENTS {
            self.start_snapshot();
        }
        Ok(())
    }

    /// Writes a snapshot of the committed state in the background (one at a time), so the
    /// log stays short and restarts stay fast.
    fn start_snapshot(&self) {
        if self.shared.snapshot_running.swap(true, Ordering::AcqRel) {
            return;
        }
        let shared = self.shared.clone();
        tokio::spawn(async move {
            let snapshot = shared.cell.committed();
            let result = async {
                let mut entries = Vec::new();
                for version in snapshot.tables.values() {
                    entries.push(create_record(&version.def)?);
                    for batch in version.batches.iter() {
                        entries.push(Record::Rows { table: version.def.name.clone() }.entry(Some(batch.clone()))?);
                    }
                }
                shared.log.write_snapshot(snapshot.seq, &entries).await
            }
            .await;
            match result {
                Ok(()) => tracing::info!(seq = snapshot.seq, "snapshot written"),
                Err(e) => tracing::warn!(seq = snapshot.seq, "snapshot failed, the log is kept: {e}"),
            }
            shared.snapshot_running.store(false, Ordering::Release);
        });
    }
}

fn new_session(cell: Arc<SnapshotCell>) -> Result<SessionContext> {
    let mut config = SessionConfig::new()
        .with_default_catalog_and_schema(CATALOG_NAME, SCHEMA_NAME)
        .with_create_default_catalog_and_schema(false)
        .with_information_schema(true);
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
    let catalog = MemoryCatalogProvider::new();
    catalog.register_schema(SCHEMA_NAME, Arc::new(FreshetSchema::new(cell)))?;
    ctx.register_catalog(CATALOG_NAME, Arc::new(catalog));
    Ok(ctx)
}

fn replay(ctx: &SessionContext, writer: &mut Writer, entries: Vec<LogEntry>) -> Result<()> {
    for entry in entries {
        let record: Record = serde_json::from_slice(&entry.header)
            .map_err(|e| Error::Corrupt { location: "log entry header".into(), reason: e.to_string() })?;
        let batch = || {
            entry.batch.clone().ok_or_else(|| Error::Corrupt {
                location: format!("log record {record:?}"),
                reason: "rows are missing".into(),
            })
        };
        match &record {
            Record::CreateTable { id, name, primary_key, defaults } => {
                let schema = batch()?.schema();
                let planned = plan_defaults(ctx, defaults)?;
                let def = TableDef::new(*id, name.clone(), schema, primary_key.clone(), defaults.clone(), planned);
                writer.create(Arc::new(def))?;
            }
            Record::DropTable { name } => writer.drop_table(name),
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
    let planned_id = source_as_provider(&dml.target)
        .ok()
        .and_then(|provider| (provider.as_ref() as &dyn std::any::Any).downcast_ref::<FreshetTable>().map(|t| t.id()));
    match planned_id {
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
