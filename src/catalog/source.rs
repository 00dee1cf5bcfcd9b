//! Sources at run time: each source's relation is appended to by an ingest task that
//! runs its connector. Every batch goes through the write-ahead log like an INSERT, so a
//! source's rows are durable, queryable, and feed views exactly like a table's; the
//! relation's row count is the connector's position, so after a restart the task resumes
//! right after the last durable event. Connectors with offsets (Kafka) record them in the
//! source's [`Ledger`], written to the log with the rows they belong to, together with the
//! records that did not decode (dead letters).

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use super::table::TableDef;
use super::{Database, Outcome, Record};
use datafusion::arrow::array::{Array, BinaryArray, Int32Array, Int64Array, StringArray};
use datafusion::arrow::compute::concat_batches;
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::arrow::record_batch::RecordBatch;

use crate::connectors::files::FileSet;
use crate::connectors::generator::GeneratorSpec;
use crate::connectors::{ConnectorSpec, DeadLetter, FILE_COLUMN, Format, Options, Progress, option_error};
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
    /// Tells a connector thread (Kafka) to stop.
    stop: Arc<AtomicBool>,
    pub progress: Arc<Progress>,
}

impl SourceHandle {
    pub fn new(id: u64, options: Options) -> Self {
        SourceHandle {
            id,
            options,
            task: None,
            stop: Arc::new(AtomicBool::new(false)),
            progress: Arc::new(Progress::new()),
        }
    }

    /// Stops the ingest task (the source is dropped or the database closes).
    pub fn stop(&self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// Dead letters kept per source (the oldest go first; all are counted).
pub const DEAD_LETTERS_KEPT: usize = 1000;

/// Where a source's connector is, as of the rows the source holds: durable with them.
#[derive(Debug, Clone, Default)]
pub struct Ledger {
    /// Kafka: the next offset to read, per partition.
    pub offsets: BTreeMap<i32, i64>,
    /// The latest records that did not decode.
    pub dead_letters: Arc<VecDeque<DeadLetter>>,
    /// Every record that did not decode, including those no longer kept.
    pub dead_letter_count: u64,
}

impl Ledger {
    /// This ledger moved to `offsets`, with `dead` appended.
    pub fn advanced(&self, offsets: BTreeMap<i32, i64>, dead: &[DeadLetter], count: Option<u64>) -> Ledger {
        let mut dead_letters = self.dead_letters.clone();
        if !dead.is_empty() {
            let kept = Arc::make_mut(&mut dead_letters);
            kept.extend(dead.iter().cloned());
            while kept.len() > DEAD_LETTERS_KEPT {
                kept.pop_front();
            }
        }
        Ledger { offsets, dead_letters, dead_letter_count: count.unwrap_or(self.dead_letter_count + dead.len() as u64) }
    }
}

/// Dead letters as rows, for the log.
pub fn dead_letter_batch<'a>(letters: impl Iterator<Item = &'a DeadLetter>) -> Result<RecordBatch> {
    let letters: Vec<&DeadLetter> = letters.collect();
    let schema = Arc::new(Schema::new(vec![
        Field::new("partition", DataType::Int32, true),
        Field::new("offset", DataType::Int64, true),
        Field::new("error", DataType::Utf8, false),
        Field::new("raw", DataType::Binary, false),
        Field::new("at_ms", DataType::Int64, false),
    ]));
    Ok(RecordBatch::try_new(
        schema,
        vec![
            Arc::new(Int32Array::from_iter(letters.iter().map(|d| d.partition))),
            Arc::new(Int64Array::from_iter(letters.iter().map(|d| d.offset))),
            Arc::new(StringArray::from_iter_values(letters.iter().map(|d| d.error.as_str()))),
            Arc::new(BinaryArray::from_iter_values(letters.iter().map(|d| d.raw.as_slice()))),
            Arc::new(Int64Array::from_iter_values(letters.iter().map(|d| d.at_ms))),
        ],
    )?)
}

/// Dead letters from their rows in the log.
pub fn dead_letters_from(batch: &RecordBatch) -> Result<Vec<DeadLetter>> {
    fn column<'a, T: 'static>(batch: &'a RecordBatch, name: &str) -> Result<&'a T> {
        batch.column_by_name(name).and_then(|c| c.as_any().downcast_ref::<T>()).ok_or_else(|| Error::Corrupt {
            location: "dead letters in the log".into(),
            reason: format!("column {name} is missing or of the wrong type"),
        })
    }
    let partition = column::<Int32Array>(batch, "partition")?;
    let offset = column::<Int64Array>(batch, "offset")?;
    let error = column::<StringArray>(batch, "error")?;
    let raw = column::<BinaryArray>(batch, "raw")?;
    let at = column::<Int64Array>(batch, "at_ms")?;
    Ok((0..batch.num_rows())
        .map(|i| DeadLetter {
            partition: partition.is_valid(i).then(|| partition.value(i)),
            offset: offset.is_valid(i).then(|| offset.value(i)),
            error: error.value(i).to_string(),
            raw: raw.value(i).to_vec(),
            at_ms: at.value(i),
        })
        .collect())
}

/// What a connector appends besides rows: its new offsets and the records it skipped.
pub struct LedgerUpdate {
    pub offsets: BTreeMap<i32, i64>,
    pub dead_letters: Vec<DeadLetter>,
}

/// The relation of source `name`.
pub fn relation(id: u64, name: &str, schema: SchemaRef) -> Arc<TableDef> {
    Arc::new(TableDef::append_only(id, name.to_string(), schema))
}

impl Database {
    /// CREATE SOURCE: records the source with its options (defaults written out, so a
    /// restart continues the same sequence) and starts ingesting.
    pub(super) async fn create_source(
        &self,
        name: String,
        if_not_exists: bool,
        columns: Option<SchemaRef>,
        watermark: Option<crate::sql::WatermarkClause>,
        options: BTreeMap<String, String>,
    ) -> Result<Outcome> {
        let spec = ConnectorSpec::from_options(&options, columns.is_some())?;
        if matches!(spec, ConnectorSpec::File { .. }) && !crate::connectors::retains_rows(&options)? {
            return Err(option_error(
                "retention = 'none' is not available for file sources: a file source knows the files it has read from its rows",
            ));
        }
        let (options, schema) = match (spec, columns) {
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
            (ConnectorSpec::Kafka(kafka), declared) => (options, kafka.schema(declared.as_ref())?),
            (ConnectorSpec::Mqtt(mqtt), declared) => {
                let fields = crate::connectors::kafka::value_fields(mqtt.format, declared.as_ref(), "mqtt")?;
                (options, Arc::new(Schema::new(fields)))
            }
            (_, Some(schema)) => (options, schema),
            (_, None) => return Err(Error::Internal("a connector without columns".into())),
        };
        // A declared watermark replaces a generator's default one.
        let schema = match &watermark {
            Some(clause) => crate::sql::with_watermark(&schema, clause)?,
            None => schema,
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

    /// Stops every ingest task and every sink; the database stops growing its sources
    /// and writing out its views.
    pub fn stop_sources(&self) {
        for source in self.shared.sources().values() {
            source.stop();
        }
        for sink in self.shared.sinks().values() {
            sink.stop();
        }
    }

    async fn start_source(&self, name: &str) {
        let Some((id, options, progress, stop)) =
            self.shared.sources().get(name).map(|s| (s.id, s.options.clone(), s.progress.clone(), s.stop.clone()))
        else {
            return;
        };
        let declared = !matches!(GeneratorSpec::from_options(&options), Ok(Some(_)));
        let generator = match ConnectorSpec::from_options(&options, declared) {
            Ok(ConnectorSpec::Generator(generator)) => generator,
            Ok(ConnectorSpec::File { path, format, watch }) => {
                let task =
                    tokio::spawn(read_files(self.clone_weak(), name.to_string(), id, path, format, watch, progress));
                if let Some(handle) = self.shared.sources().get_mut(name) {
                    handle.task = Some(task.abort_handle());
                }
                return;
            }
            Ok(ConnectorSpec::Kafka(spec)) => {
                self.start_kafka(name, id, spec, progress, stop).await;
                return;
            }
            Ok(ConnectorSpec::Mqtt(spec)) => {
                self.start_mqtt(name, id, spec, progress).await;
                return;
            }
            Ok(ConnectorSpec::Http { .. }) => {
                progress.set_status("running");
                return; // rows are pushed to it: no task
            }
            Err(e) => {
                progress.stopped(&format!("the source cannot start: {e}"));
                tracing::error!(source = %name, "source cannot start: {e}");
                return;
            }
        };
        let position = {
            let writer = self.shared.writer.lock().await;
            writer.tables.get(name).map_or(0, |t| t.version().appended())
        };
        let shared = Arc::downgrade(&self.shared);
        let ctx = self.ctx.clone();
        let source = name.to_string();
        let task = tokio::spawn(async move {
            let mut events = generator.open(position);
            let started = Instant::now();
            let start_position = position;
            tracing::info!(source = %source, position, "source ingesting");
            progress.set_status("running");
            loop {
                if generator.events.is_some_and(|limit| events.position() >= limit) {
                    tracing::info!(source = %source, events = events.position(), "source reached its event limit");
                    progress.set_status("finished");
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
                        progress.stopped(&format!("the generator failed: {e}"));
                        tracing::error!(source = %source, "generator failed, source stopped: {e}");
                        return;
                    }
                };
                let rows = batch.num_rows() as u64;
                let bytes = batch.get_array_memory_size() as u64;
                let Some(shared) = shared.upgrade() else { return };
                let db = Database { ctx: ctx.clone(), shared };
                match db.append_source(&source, id, ChangeBatch::inserts(batch), None).await {
                    Ok(true) => progress.read(rows, bytes),
                    Ok(false) => return, // dropped
                    Err(e) => {
                        // Not durable: generate the same events again after a pause.
                        progress.failed_attempt(&format!("appending to the source failed: {e}"));
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

    /// Starts a Kafka source: a consumer thread from the recorded offsets, and a task
    /// appending what it reads.
    async fn start_kafka(
        &self,
        name: &str,
        id: u64,
        spec: crate::connectors::kafka::KafkaSource,
        progress: Arc<Progress>,
        stop: Arc<AtomicBool>,
    ) {
        let (offsets, schema) = {
            let writer = self.shared.writer.lock().await;
            let Some(state) = writer.tables.get(name) else { return };
            (state.ledger().map(|l| l.offsets.clone()).unwrap_or_default(), state.def().schema.clone())
        };
        let (sender, receiver) = tokio::sync::mpsc::channel(2);
        let (source, thread_progress) = (name.to_string(), progress.clone());
        let thread = std::thread::Builder::new().name(format!("kafka-{name}")).spawn(move || {
            crate::connectors::kafka::consume(spec, source, schema, offsets, sender, thread_progress, stop)
        });
        if let Err(e) = thread {
            progress.stopped(&format!("cannot start the consumer thread: {e}"));
            return;
        }
        let task = tokio::spawn(append_polled(self.clone_weak(), name.to_string(), id, receiver, progress));
        if let Some(handle) = self.shared.sources().get_mut(name) {
            handle.task = Some(task.abort_handle());
        }
    }

    /// Starts an MQTT source: a task running the connection, and a task appending what it
    /// receives and acknowledging the messages once durable.
    async fn start_mqtt(
        &self,
        name: &str,
        id: u64,
        spec: crate::connectors::mqtt::MqttSource,
        progress: Arc<Progress>,
    ) {
        let schema = {
            let writer = self.shared.writer.lock().await;
            let Some(state) = writer.tables.get(name) else { return };
            state.def().schema.clone()
        };
        let (sender, mut receiver) = tokio::sync::mpsc::channel::<crate::connectors::mqtt::Received>(2);
        let connection =
            tokio::spawn(crate::connectors::mqtt::receive(spec, name.to_string(), schema, sender, progress.clone()));
        let (ctx, shared) = self.clone_weak();
        let source = name.to_string();
        let task = tokio::spawn(async move {
            // Ends the connection when this task ends (the source is dropped or closed).
            let _connection = AbortOnDrop(connection.abort_handle());
            while let Some(received) = receiver.recv().await {
                let update = LedgerUpdate { offsets: BTreeMap::new(), dead_letters: received.dead_letters };
                let ledger = (!update.dead_letters.is_empty()).then_some(&update);
                loop {
                    let Some(shared) = shared.upgrade() else { return };
                    let db = Database { ctx: ctx.clone(), shared };
                    match db.append_source(&source, id, ChangeBatch::inserts(received.rows.clone()), ledger).await {
                        Ok(true) => break,
                        Ok(false) => return,
                        Err(e) => {
                            progress.failed_attempt(&format!("appending to the source failed: {e}"));
                            tokio::time::sleep(RETRY).await;
                        }
                    }
                }
                // Durable: now the broker may forget them.
                for publish in &received.to_ack {
                    if let Err(e) = received.client.ack(publish).await {
                        tracing::warn!(source = %source, "mqtt acknowledgement not sent (the broker will resend): {e}");
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
    pub(super) fn clone_weak(&self) -> (datafusion::prelude::SessionContext, std::sync::Weak<super::Shared>) {
        (self.ctx.clone(), Arc::downgrade(&self.shared))
    }

    /// The records of `body` that do not decode for http source `name`, by line (see
    /// [`crate::connectors::bad_records`]); empty when the source is not an http source.
    pub fn bad_records(&self, name: &str, body: &[u8]) -> Vec<(usize, String)> {
        let Some(options) = self.shared.sources().get(name).map(|s| s.options.clone()) else { return Vec::new() };
        let Ok(ConnectorSpec::Http { format }) = ConnectorSpec::from_options(&options, true) else { return Vec::new() };
        let Some(schema) = self.shared.cell.committed().relation(name).map(|v| v.def.schema.clone()) else {
            return Vec::new();
        };
        match crate::connectors::json_array_as_lines(body) {
            Ok(lines) if format == Format::Json => crate::connectors::bad_records(format, &schema, &lines),
            Ok(_) => crate::connectors::bad_records(format, &schema, body),
            Err(_) => Vec::new(),
        }
    }

    /// `POST /ingest/<source>`: decodes `body` in the source's format (JSON lines or one
    /// JSON array, or CSV) and appends it;
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
        let body = match format {
            Format::Json => crate::connectors::json_array_as_lines(body)?,
            _ => std::borrow::Cow::Borrowed(body),
        };
        let batches = crate::connectors::decode(format, &schema, &body)?;
        let rows = concat_batches(&schema, &batches)?;
        let count = rows.num_rows();
        if count > 0 && !self.append_source(name, id, ChangeBatch::inserts(rows), None).await? {
            return Err(Error::UndefinedTable { name: name.to_string(), position: None });
        }
        Ok(count)
    }

    /// Appends a connector's rows to source `name` (if it is still the source `id`), with
    /// the connector's new ledger entry if any; returns once both are durable. `false`
    /// when the source is gone.
    async fn append_source(
        &self,
        name: &str,
        id: u64,
        change: ChangeBatch,
        ledger: Option<&LedgerUpdate>,
    ) -> Result<bool> {
        self.shared.feeds.wait_for_room().await;
        let mut writer = self.shared.writer.lock().await;
        if self.shared.sources().get(name).is_none_or(|s| s.id != id) {
            return Ok(false);
        }
        let mut entries = Vec::new();
        let mut changes = Vec::new();
        if change.num_rows() > 0 {
            writer.apply(name, &change)?;
            entries.push(Record::Change { table: name.to_string() }.entry(Some(change.to_flat()?))?);
            changes.push((name.to_string(), change));
        }
        if let Some(update) = ledger {
            let ledger = writer.advance_ledger(name, update.offsets.clone(), &update.dead_letters, None)?;
            let record = Record::Ledger {
                table: name.to_string(),
                offsets: ledger.offsets.iter().map(|(p, o)| (*p, *o)).collect(),
                dead_letter_count: ledger.dead_letter_count,
            };
            entries.push(record.entry(Some(dead_letter_batch(update.dead_letters.iter())?))?);
        }
        if entries.is_empty() {
            return Ok(true);
        }
        let ack = self.enqueue(&writer, entries, changes).await?;
        drop(writer);
        self.durable(ack).await?;
        Ok(true)
    }
}

/// A Kafka source's ingest task: appends each polled batch with its offsets; a batch that
/// cannot be appended is retried until it is (the consumer waits meanwhile).
async fn append_polled(
    (ctx, shared): (datafusion::prelude::SessionContext, std::sync::Weak<super::Shared>),
    name: String,
    id: u64,
    mut receiver: tokio::sync::mpsc::Receiver<crate::connectors::kafka::Polled>,
    progress: Arc<Progress>,
) {
    while let Some(polled) = receiver.recv().await {
        let update = LedgerUpdate { offsets: polled.offsets, dead_letters: polled.dead_letters };
        if !update.dead_letters.is_empty() {
            tracing::warn!(source = %name, records = update.dead_letters.len(), "records did not decode; see freshet_catalog.dead_letters");
        }
        loop {
            let Some(shared) = shared.upgrade() else { return };
            let db = Database { ctx: ctx.clone(), shared };
            match db.append_source(&name, id, ChangeBatch::inserts(polled.rows.clone()), Some(&update)).await {
                Ok(true) => break,
                Ok(false) => return,
                Err(e) => {
                    progress.failed_attempt(&format!("appending to the source failed: {e}"));
                    tracing::warn!(source = %name, "appending to the source failed, retrying: {e}");
                    tokio::time::sleep(RETRY).await;
                }
            }
        }
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
    progress: Arc<Progress>,
) {
    let db = || shared.upgrade().map(|shared| Database { ctx: ctx.clone(), shared });
    let Some(first) = db() else { return };
    let (mut done, mut failed, schema) = match files_read(&first, &name) {
        Ok(found) => found,
        Err(e) => {
            progress.stopped(&format!("cannot read which files the source holds: {e}"));
            tracing::error!(source = %name, "cannot read which files the source holds: {e}");
            return;
        }
    };
    drop(first);
    let declared = Arc::new(Schema::new(schema.fields()[..schema.fields().len() - 1].to_vec()));
    let files = match FileSet::open(&path) {
        Ok(files) => files,
        Err(e) => {
            progress.stopped(&e.to_string());
            tracing::error!(source = %name, "{e}");
            return;
        }
    };
    loop {
        let mut paths = match files.list().await {
            Ok(paths) => paths,
            Err(e) => {
                // An object store that is away is retried; the progress view says why.
                progress.failed_attempt(&e.to_string());
                tracing::warn!(source = %name, "listing files failed, retrying: {e}");
                tokio::time::sleep(RETRY).await;
                continue;
            }
        };
        paths.retain(|f| !done.contains(f) && !failed.contains(f));
        paths.sort();
        if paths.is_empty() && progress.report().state.status == "starting" {
            progress.set_status("running");
        }
        let mut unfinished = false;
        for file in paths {
            let (rows, size) = match files.read(&file).await {
                Ok(bytes) => (
                    crate::connectors::decode(format, &declared, &bytes)
                        .and_then(|batches| Ok(concat_batches(&declared, &batches)?)),
                    bytes.len() as u64,
                ),
                Err(e) => {
                    // Unreadable now (a store that is away) is retried, not skipped.
                    progress.failed_attempt(&e.to_string());
                    tracing::warn!(source = %name, "{e}; retrying");
                    unfinished = true;
                    break;
                }
            };
            let rows = match rows.and_then(|rows| with_file(&schema, rows, &file)) {
                Ok(rows) => rows,
                Err(e) => {
                    tracing::error!(source = %name, file = %file, "file skipped: {e}");
                    progress.failed_attempt(&format!("file {file} skipped: {e}"));
                    if let Some(db) = db() {
                        // Kept as a dead letter, so the skip is visible in SQL and survives restarts.
                        let letter = DeadLetter::new(None, None, format!("file {file}: {e}"), file.as_bytes());
                        let update = LedgerUpdate { offsets: BTreeMap::new(), dead_letters: vec![letter] };
                        let empty = ChangeBatch::inserts(RecordBatch::new_empty(schema.clone()));
                        if let Err(e) = db.append_source(&name, id, empty, Some(&update)).await {
                            tracing::warn!(source = %name, "the dead letter was not recorded: {e}");
                        }
                    }
                    failed.insert(file);
                    continue;
                }
            };
            let Some(db) = db() else { return };
            let count = rows.num_rows();
            match db.append_source(&name, id, ChangeBatch::inserts(rows), None).await {
                Ok(true) => {
                    progress.read(count as u64, size);
                    progress.set_status("running");
                    tracing::info!(source = %name, file = %file, rows = count, "file read");
                    done.insert(file);
                }
                Ok(false) => return,
                Err(e) => {
                    // Files are appended in name order, so the rest wait for this one.
                    tracing::warn!(source = %name, file = %file, "appending the file failed, retrying: {e}");
                    unfinished = true;
                    break;
                }
            }
        }
        if !watch && !unfinished {
            return;
        }
        tokio::time::sleep(if unfinished { RETRY } else { WATCH_INTERVAL }).await;
    }
}

/// The files source `name` already holds, those it skipped (its dead letters), and its
/// schema.
fn files_read(db: &Database, name: &str) -> Result<(HashSet<String>, HashSet<String>, SchemaRef)> {
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
    let skipped = version.ledger.iter().flat_map(|l| l.dead_letters.iter());
    let failed = skipped.map(|d| String::from_utf8_lossy(&d.raw).into_owned()).collect();
    Ok((done, failed, schema))
}

/// `rows` with the file column appended.
fn with_file(schema: &SchemaRef, rows: RecordBatch, file: &str) -> Result<RecordBatch> {
    let mut columns = rows.columns().to_vec();
    columns.push(Arc::new(StringArray::from(vec![file; rows.num_rows()])));
    Ok(RecordBatch::try_new(schema.clone(), columns)?)
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
