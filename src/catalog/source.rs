//! Sources at run time: each source's relation is appended to by an ingest task that
//! runs its connector. Every batch goes through the write-ahead log like an INSERT, so a
//! source's rows are durable, queryable, and feed views exactly like a table's; the
//! relation's row count is the connector's position, so after a restart the task resumes
//! right after the last durable event.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::table::TableDef;
use super::{Database, Outcome, Record};
use datafusion::arrow::array::StringArray;
use datafusion::arrow::compute::concat_batches;
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::arrow::record_batch::RecordBatch;

use crate::connectors::generator::GeneratorSpec;
use crate::connectors::{ConnectorSpec, FILE_COLUMN, Format, Options, option_error};
use crate::dataflow::ChangeBatch;
use crate::error::{Error, Result};

/// Most events a generator appends in one write.
const MAX_BATCH: u64 = 16_384;
/// How often a throttled generator appends.
const TICK: Duration = Duration::from_millis(100);
/// How long an ingest task waits after a failed write before trying again.
const RETRY: Duration = Duration::from_secs(1);

/// A source in the catalog.
pub struct SourceHandle {
    pub id: u64,
    pub options: Options,
    task: Option<tokio::task::AbortHandle>,
}

impl SourceHandle {
    pub fn new(id: u64, options: Options) -> Self {
        SourceHandle { id, options, task: None }
    }

    /// Stops the ingest task (the source is dropped or the database closes).
    pub fn stop(&self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// The relation of source `name`.
pub fn relation(id: u64, name: &str, schema: SchemaRef) -> Arc<TableDef> {
    Arc::new(TableDef::new(id, name.to_string(), schema, vec![], vec![], HashMap::new()))
}

impl Database {
    /// CREATE SOURCE: records the source with its options (defaults written out, so a
    /// restart continues the same sequence) and starts ingesting.
    pub(super) async fn create_source(
        &self,
        name: String,
        if_not_exists: bool,
        columns: Option<SchemaRef>,
        options: BTreeMap<String, String>,
    ) -> Result<Outcome> {
        let (options, schema) = match (ConnectorSpec::from_options(&options, columns.is_some())?, columns) {
            (ConnectorSpec::Generator(generator), _) => (generator.resolved(&options), generator.schema()),
            (ConnectorSpec::File { .. }, Some(schema)) => {
                if schema.column_with_name(FILE_COLUMN).is_some() {
                    return Err(option_error(format!(
                        "a file source adds the column {FILE_COLUMN} (the file of each row); rename yours"
                    )));
                }
                let mut fields: Vec<Field> = schema.fields().iter().map(|f| f.as_ref().clone()).collect();
                fields.push(Field::new(FILE_COLUMN, DataType::Utf8, false));
                (options, Arc::new(Schema::new(fields)))
            }
            (_, Some(schema)) => (options, schema),
            (_, None) => return Err(Error::Internal("a connector without columns".into())),
        };
        let mut writer = self.shared.writer.lock().await;
        if self.shared.exists_already(&writer, &name, if_not_exists)? {
            return Ok(Outcome::Command { tag: "CREATE SOURCE", rows: None });
        }
        let id = writer.next_id;
        writer.create(relation(id, &name, schema.clone()))?;
        self.shared.sources().insert(name.clone(), SourceHandle::new(id, options.clone()));
        let columns = RecordBatch::new_empty(schema);
        let entries = vec![Record::CreateSource { id, name: name.clone(), options }.entry(Some(columns))?];
        let ack = self.enqueue(&writer, entries, Vec::new()).await?;
        drop(writer);
        self.durable(ack).await?;
        self.start_source(&name).await;
        Ok(Outcome::Command { tag: "CREATE SOURCE", rows: None })
    }

    /// Starts the ingest task of every source (at open).
    pub(super) async fn start_sources(&self) {
        let names: Vec<String> = self.shared.sources().keys().cloned().collect();
        for name in names {
            self.start_source(&name).await;
        }
    }

    /// Stops every ingest task; the database stops growing its sources.
    pub fn stop_sources(&self) {
        for source in self.shared.sources().values() {
            source.stop();
        }
    }

    async fn start_source(&self, name: &str) {
        let Some((id, options)) = self.shared.sources().get(name).map(|s| (s.id, s.options.clone())) else { return };
        let declared = !matches!(GeneratorSpec::from_options(&options), Ok(Some(_)));
        let generator = match ConnectorSpec::from_options(&options, declared) {
            Ok(ConnectorSpec::Generator(generator)) => generator,
            Ok(ConnectorSpec::File { path, format, watch }) => {
                let task = tokio::spawn(read_files(self.clone_weak(), name.to_string(), id, path, format, watch));
                if let Some(handle) = self.shared.sources().get_mut(name) {
                    handle.task = Some(task.abort_handle());
                }
                return;
            }
            Ok(ConnectorSpec::Http { .. }) => return, // rows are pushed to it: no task
            Err(e) => {
                tracing::error!(source = %name, "source cannot start: {e}");
                return;
            }
        };
        let position = {
            let writer = self.shared.writer.lock().await;
            writer.tables.get(name).map_or(0, |t| t.version().num_rows() as u64)
        };
        let shared = Arc::downgrade(&self.shared);
        let ctx = self.ctx.clone();
        let source = name.to_string();
        let task = tokio::spawn(async move {
            let mut events = generator.open(position);
            let started = Instant::now();
            let start_position = position;
            tracing::info!(source = %source, position, "source ingesting");
            loop {
                if generator.events.is_some_and(|limit| events.position() >= limit) {
                    tracing::info!(source = %source, events = events.position(), "source reached its event limit");
                    return;
                }
                // Throttled: the events due by now at `rate` per second; else a full batch.
                let due = if generator.rate == 0 {
                    MAX_BATCH
                } else {
                    let expected = (started.elapsed().as_secs_f64() * generator.rate as f64) as u64;
                    (start_position + expected).saturating_sub(events.position()).min(MAX_BATCH)
                };
                let n = generator.events.map_or(due, |limit| due.min(limit - events.position()));
                if n == 0 {
                    tokio::time::sleep(TICK).await;
                    continue;
                }
                let batch = match events.next_batch(n as usize) {
                    Ok(batch) => batch,
                    Err(e) => {
                        tracing::error!(source = %source, "generator failed, source stopped: {e}");
                        return;
                    }
                };
                let Some(shared) = shared.upgrade() else { return };
                let db = Database { ctx: ctx.clone(), shared };
                match db.append_source(&source, id, ChangeBatch::inserts(batch)).await {
                    Ok(true) => {}
                    Ok(false) => return, // dropped
                    Err(e) => {
                        // Not durable: generate the same events again after a pause.
                        tracing::warn!(source = %source, "appending to the source failed, retrying: {e}");
                        events = generator.open(events.position() - n);
                        tokio::time::sleep(RETRY).await;
                    }
                }
            }
        });
        if let Some(handle) = self.shared.sources().get_mut(name) {
            handle.task = Some(task.abort_handle());
        }
    }

    /// What an ingest task holds: the session context and a weak reference, so a task
    /// never keeps a closed database alive.
    fn clone_weak(&self) -> (datafusion::prelude::SessionContext, std::sync::Weak<super::Shared>) {
        (self.ctx.clone(), Arc::downgrade(&self.shared))
    }

    /// `POST /ingest/<source>`: decodes `body` in the source's format and appends it;
    /// returns the number of rows, durable when this returns. Nothing is appended if any
    /// record does not decode.
    pub async fn ingest(&self, name: &str, body: &[u8]) -> Result<usize> {
        let (id, options) = self
            .shared
            .sources()
            .get(name)
            .map(|s| (s.id, s.options.clone()))
            .ok_or_else(|| Error::UndefinedTable { name: name.to_string(), position: None })?;
        let declared = GeneratorSpec::from_options(&options)?.is_none();
        let ConnectorSpec::Http { format } = ConnectorSpec::from_options(&options, declared)? else {
            return Err(Error::Plan {
                code: "42809",
                message: format!("source \"{name}\" does not take rows over HTTP (its connector is not http)"),
                position: None,
            });
        };
        let schema = self
            .shared
            .cell
            .committed()
            .relation(name)
            .map(|v| v.def.schema.clone())
            .ok_or_else(|| Error::UndefinedTable { name: name.to_string(), position: None })?;
        let batches = crate::connectors::decode(format, &schema, body)?;
        let rows = concat_batches(&schema, &batches)?;
        let count = rows.num_rows();
        if count > 0 && !self.append_source(name, id, ChangeBatch::inserts(rows)).await? {
            return Err(Error::UndefinedTable { name: name.to_string(), position: None });
        }
        Ok(count)
    }

    /// Appends a connector's rows to source `name` (if it is still the source `id`);
    /// returns once they are durable. `false` when the source is gone.
    async fn append_source(&self, name: &str, id: u64, change: ChangeBatch) -> Result<bool> {
        self.shared.feeds.wait_for_room().await;
        let mut writer = self.shared.writer.lock().await;
        if self.shared.sources().get(name).is_none_or(|s| s.id != id) {
            return Ok(false);
        }
        writer.apply(name, &change)?;
        let entries = vec![Record::Change { table: name.to_string() }.entry(Some(change.to_flat()?))?];
        let ack = self.enqueue(&writer, entries, vec![(name.to_string(), change)]).await?;
        drop(writer);
        self.durable(ack).await?;
        Ok(true)
    }
}

/// Polling interval of a file source with `watch = 'true'`.
const WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// A file source's task: appends each matching file whole, in name order, with the file's
/// path in every row; files already in the source (after a restart) are skipped. A file
/// that does not decode is reported and skipped, never half appended.
async fn read_files(
    (ctx, shared): (datafusion::prelude::SessionContext, std::sync::Weak<super::Shared>),
    name: String,
    id: u64,
    path: String,
    format: Format,
    watch: bool,
) {
    let db = || shared.upgrade().map(|shared| Database { ctx: ctx.clone(), shared });
    let Some(first) = db() else { return };
    let (mut done, schema) = match files_read(&first, &name) {
        Ok(found) => found,
        Err(e) => {
            tracing::error!(source = %name, "cannot read which files the source holds: {e}");
            return;
        }
    };
    drop(first);
    let declared = Arc::new(Schema::new(schema.fields()[..schema.fields().len() - 1].to_vec()));
    let mut failed: HashSet<String> = HashSet::new();
    loop {
        let mut paths: Vec<String> = match glob::glob(&path) {
            Ok(paths) => {
                paths.filter_map(|p| p.ok()).filter(|p| p.is_file()).map(|p| p.display().to_string()).collect()
            }
            Err(e) => {
                tracing::error!(source = %name, "path {path} is not a valid glob: {e}");
                return;
            }
        };
        paths.retain(|f| !done.contains(f) && !failed.contains(f));
        paths.sort();
        for file in paths {
            let rows = match tokio::fs::read(&file).await {
                Ok(bytes) => crate::connectors::decode(format, &declared, &bytes)
                    .and_then(|batches| Ok(concat_batches(&declared, &batches)?)),
                Err(e) => Err(Error::Storage(format!("reading {file}: {e}"))),
            };
            let rows = match rows.and_then(|rows| with_file(&schema, rows, &file)) {
                Ok(rows) => rows,
                Err(e) => {
                    tracing::error!(source = %name, file = %file, "file skipped: {e}");
                    failed.insert(file);
                    continue;
                }
            };
            let Some(db) = db() else { return };
            let count = rows.num_rows();
            match db.append_source(&name, id, ChangeBatch::inserts(rows)).await {
                Ok(true) => {
                    tracing::info!(source = %name, file = %file, rows = count, "file read");
                    done.insert(file);
                }
                Ok(false) => return,
                Err(e) => {
                    tracing::warn!(source = %name, file = %file, "appending the file failed, retrying: {e}");
                    tokio::time::sleep(RETRY).await;
                }
            }
        }
        if !watch {
            return;
        }
        tokio::time::sleep(WATCH_INTERVAL).await;
    }
}

/// The files source `name` already holds, and its schema.
fn files_read(db: &Database, name: &str) -> Result<(HashSet<String>, SchemaRef)> {
    let snapshot = db.shared.cell.committed();
    let version = snapshot.relation(name).ok_or_else(|| Error::UndefinedTable { name: name.into(), position: None })?;
    let schema = version.def.schema.clone();
    let mut done = HashSet::new();
    for batch in version.batches()? {
        let files = batch
            .column_by_name(FILE_COLUMN)
            .and_then(|c| c.as_any().downcast_ref::<StringArray>().cloned())
            .ok_or_else(|| Error::Internal(format!("source \"{name}\" has no {FILE_COLUMN} column")))?;
        done.extend(files.iter().flatten().map(str::to_string));
    }
    Ok((done, schema))
}

/// `rows` with the file column appended.
fn with_file(schema: &SchemaRef, rows: RecordBatch, file: &str) -> Result<RecordBatch> {
    let mut columns = rows.columns().to_vec();
    columns.push(Arc::new(StringArray::from(vec![file; rows.num_rows()])));
    Ok(RecordBatch::try_new(schema.clone(), columns)?)
}
