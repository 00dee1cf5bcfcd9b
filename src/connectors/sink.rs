//! Sinks: a materialized view's changes, epoch by epoch, written to Kafka or to Parquet
//! files.
//!
//! Three modes say how a change becomes Kafka messages:
//! - `append`: each inserted row is one message; retractions are not written (they are
//!   counted in `freshet_catalog.sinks`), so use it for views that only grow.
//! - `upsert`: messages are keyed by `key = 'column'`; an inserted row is written under its
//!   key, and a key whose rows were all retracted in the epoch gets a tombstone (a message
//!   with no value), so a compacted topic holds the view.
//! - `debezium`: each change is `{"before": …, "after": …, "op": "c" | "u" | "d"}`; with a
//!   key, a retraction and an insertion of the same key in one epoch are one update.
//!
//! A file sink writes one Parquet file per epoch into a local directory (under a temporary
//! name first, synced and renamed once complete) or under an object-store prefix
//! (`s3://bucket/prefix`, one PUT per file), so no partly written file is ever visible under
//! its final name. `mode = 'append'` writes inserted rows; `mode = 'changes'` writes every
//! change with a `_diff` column (+n inserted, -n retracted).
//!
//! By default delivery is at least once: an epoch is acknowledged by the broker (or its
//! file renamed) before the next epoch is written, and after a restart (or when the sink
//! fell behind) the sink writes the view's current rows again before following its changes.
//!
//! With `exactly_once = 'true'` a sink delivers what a stored checkpoint holds, one segment
//! per checkpoint (see `catalog::outbox`). A file sink names each file after its segment's
//! epoch under a prefix fixed at creation, so a segment written again replaces its own
//! file. A Kafka sink tags each message with headers (`freshet-sink`, `freshet-epoch`,
//! `freshet-index`: the sink, the segment's epoch, the message's number in the segment);
//! after a crash or a failed delivery it reads the end of each partition back, and writes
//! only the messages of the last segment that are missing and the segments after it. (Kafka
//! transactions would make each segment appear at once; the broker the tests run against
//! cannot commit one.) A file sink can also read its segments back as rows
//! ([`SinkWriter::written_after`]), so a view restored from an older checkpoint than the
//! sink delivered from does not write the replayed changes twice.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use datafusion::arrow::array::{Array, Int64Array};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::arrow::json::WriterBuilder;
use datafusion::arrow::json::writer::LineDelimited;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::arrow::util::display::array_value_to_string;
use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use object_store::path::Path as StorePath;
use object_store::{ObjectStore, ObjectStoreExt};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message as _, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use super::kafka::brokers_and_topic;
use super::{Options, option_error};
use crate::dataflow::ChangeBatch;
use crate::error::{Error, Result};

/// How a change becomes messages or file rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Append,
    Upsert,
    Debezium,
    /// Files: every change, with a `_diff` column.
    Changes,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Append => "append",
            Mode::Upsert => "upsert",
            Mode::Debezium => "debezium",
            Mode::Changes => "changes",
        }
    }
}

/// What a sink's options describe.
#[derive(Debug, Clone, PartialEq)]
pub enum SinkSpec {
    Kafka(KafkaSink),
    File(FileSink),
}

impl SinkSpec {
    pub fn from_options(options: &Options) -> Result<SinkSpec> {
        match options.get("connector").map(|c| c.to_ascii_lowercase()).as_deref() {
            Some("kafka") => Ok(SinkSpec::Kafka(KafkaSink::from_options(options)?)),
            Some("file") => Ok(SinkSpec::File(FileSink::from_options(options)?)),
            None => Err(option_error("CREATE SINK needs WITH (connector = 'kafka' | 'file', …)")),
            Some(other) => Err(Error::NotSupported {
                feature: format!("sinks with connector {other}"),
                hint: Some("sinks available today: kafka, file".into()),
            }),
        }
    }

    /// Whether it delivers exactly once, at checkpoints.
    pub fn exactly_once(&self) -> bool {
        match self {
            SinkSpec::Kafka(kafka) => kafka.exactly_once,
            SinkSpec::File(file) => file.exactly_once,
        }
    }

    pub fn mode(&self) -> Mode {
        match self {
            SinkSpec::Kafka(kafka) => kafka.mode,
            SinkSpec::File(file) => file.mode,
        }
    }

    /// Where it writes, for messages and `freshet_catalog.sinks`.
    pub fn target(&self) -> String {
        match self {
            SinkSpec::Kafka(kafka) => kafka.topic.clone(),
            SinkSpec::File(file) => file.path.clone(),
        }
    }

    /// Opens the sink for a view with columns `schema`; errors if they do not fit.
    pub fn open(&self, sink: &str, schema: &Schema) -> Result<SinkWriter> {
        match self {
            SinkSpec::Kafka(kafka) => Ok(SinkWriter::Kafka {
                producer: kafka.producer(sink)?,
                topic: kafka.topic.clone(),
                mode: kafka.mode,
                key: kafka.key_index(schema)?,
                exactly_once: kafka.exactly_once.then(|| kafka.tags(sink)),
            }),
            SinkSpec::File(file) => {
                let dir = if crate::state::is_url(&file.path) {
                    let (store, key) = crate::state::open_url(&file.path)?;
                    Directory::Store { store, key, url: file.path.trim_end_matches('/').to_string() }
                } else {
                    let path = PathBuf::from(file.path.trim_start_matches("file://"));
                    std::fs::create_dir_all(&path).map_err(|e| {
                        option_error(format!("sink {sink}: cannot create directory {}: {e}", path.display()))
                    })?;
                    Directory::Local(path)
                };
                // Epochs are numbered again after a restart, so at least once the start
                // time keeps names apart; exactly once, files are named by checkpoint
                // epochs, which are never reused.
                let prefix = match (&file.prefix, file.exactly_once) {
                    (Some(prefix), true) => prefix.clone(),
                    (prefix, _) => {
                        format!("{}-{}", prefix.as_deref().unwrap_or(sink), chrono::Utc::now().timestamp_millis())
                    }
                };
                Ok(SinkWriter::File { dir, prefix, mode: file.mode })
            }
        }
    }
}

/// A Parquet file sink's options.
#[derive(Debug, Clone, PartialEq)]
pub struct FileSink {
    /// A local directory or an object-store prefix (`s3://bucket/prefix`).
    pub path: String,
    pub mode: Mode,
    pub exactly_once: bool,
    /// What file names start with (default: the sink's name). At least once, the time the
    /// sink started follows it; exactly once, it is fixed when the sink is created.
    pub prefix: Option<String>,
}

impl FileSink {
    pub fn from_options(options: &Options) -> Result<FileSink> {
        let known = ["connector", "path", "mode", "format", "exactly_once", "prefix"];
        if let Some(unknown) = options.keys().find(|k| !known.contains(&k.as_str())) {
            return Err(option_error(format!(
                "option {unknown} is unknown for a file sink (known: path, mode, exactly_once, prefix)"
            )));
        }
        let prefix = options.get("prefix").cloned();
        if let Some(prefix) = &prefix
            && (prefix.is_empty() || prefix.contains('/') || prefix.starts_with('.'))
        {
            return Err(option_error(format!(
                "prefix = '{prefix}' must be a file name: not empty, without '/', not starting with '.'"
            )));
        }
        match options.get("format").map(|f| f.to_ascii_lowercase()).as_deref() {
            None | Some("parquet") => {}
            Some(other) => {
                return Err(Error::NotSupported {
                    feature: format!("file sinks with FORMAT {}", other.to_ascii_uppercase()),
                    hint: Some("file sinks write FORMAT PARQUET".into()),
                });
            }
        }
        let path = options.get("path").ok_or_else(|| option_error("a file sink needs path = 'directory'"))?;
        if crate::state::is_url(path) {
            // Checks the scheme and bucket now rather than at the first epoch.
            crate::state::open_url(path)?;
        }
        let mode = match options.get("mode").map(|m| m.to_ascii_lowercase()).as_deref() {
            None | Some("append") => Mode::Append,
            Some("changes") => Mode::Changes,
            Some(other) => return Err(option_error(format!("mode = '{other}' must be 'append' or 'changes'"))),
        };
        Ok(FileSink { path: path.clone(), mode, exactly_once: super::flag(options, "exactly_once")?, prefix })
    }
}

/// An open sink.
pub enum SinkWriter {
    Kafka {
        producer: FutureProducer,
        topic: String,
        mode: Mode,
        key: Option<usize>,
        /// Set for an exactly-once sink: how its messages are tagged and found again.
        exactly_once: Option<Tags>,
    },
    /// Files are named `<prefix>-<epoch>.parquet`; the prefix holds the time the sink
    /// started, so epochs numbered again after a restart never overwrite earlier files.
    File { dir: Directory, prefix: String, mode: Mode },
}

/// Where a file sink writes.
pub enum Directory {
    /// Each file is written under a hidden temporary name, synced, then renamed.
    Local(PathBuf),
    /// Each file is one PUT, which makes it visible whole or not at all.
    Store { store: Arc<dyn ObjectStore>, key: String, url: String },
}

/// What writing one epoch did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Written {
    /// Messages or rows.
    pub records: u64,
    pub bytes: u64,
    /// Retractions append mode left out.
    pub skipped: u64,
}

impl SinkWriter {
    /// Writes one epoch's change; returns once it is delivered (acknowledged or renamed).
    /// Writing the same epoch again after an error is safe (at least once).
    pub async fn write(&self, epoch: u64, change: &ChangeBatch) -> Result<Written> {
        match self {
            SinkWriter::Kafka { producer, topic, mode, key, .. } => {
                let (messages, skipped) = encode(*mode, *key, change)?;
                deliver(producer, topic, &messages).await?;
                let bytes = messages.iter().map(|m| m.value.as_ref().map_or(0, Vec::len)).sum::<usize>();
                Ok(Written { records: messages.len() as u64, bytes: bytes as u64, skipped })
            }
            SinkWriter::File { dir, prefix, mode } => {
                let (rows, skipped) = file_rows(*mode, change)?;
                if rows.num_rows() == 0 {
                    return Ok(Written { skipped, ..Written::default() });
                }
                let name = format!("{prefix}-{epoch:020}.parquet");
                let records = rows.num_rows() as u64;
                let bytes = match dir {
                    Directory::Local(dir) => {
                        let dir = dir.clone();
                        tokio::task::spawn_blocking(move || write_parquet(&dir, &name, &rows))
                            .await
                            .map_err(|e| Error::Internal(format!("the file writer panicked: {e}")))??
                    }
                    Directory::Store { store, key, url } => {
                        let file =
                            parquet_bytes(&rows).map_err(|e| Error::Storage(format!("writing {url}/{name}: {e}")))?;
                        let size = file.len() as u64;
                        let location =
                            StorePath::from(if key.is_empty() { name.clone() } else { format!("{key}/{name}") });
                        store
                            .put(&location, file.into())
                            .await
                            .map_err(|e| Error::Storage(format!("writing {url}/{name}: {e}")))?;
                        size
                    }
                };
                Ok(Written { records, bytes, skipped })
            }
        }
    }
}

impl SinkWriter {
    /// What an exactly-once file sink holds of the segments sealed after checkpoint
    /// `epoch`: their epochs, and their rows folded into one change in `schema`'s columns.
    /// `None` for a Kafka sink, whose messages are not read back as rows.
    pub async fn written_after(&self, epoch: u64, schema: &SchemaRef) -> Result<Option<(Vec<u64>, ChangeBatch)>> {
        let SinkWriter::File { dir, prefix, mode } = self else { return Ok(None) };
        let later = |name: &str| segment_epoch(prefix, name).filter(|e| *e > epoch);
        let mut files: Vec<(u64, bytes::Bytes, String)> = Vec::new();
        match dir {
            Directory::Local(dir) => {
                let io = |e: std::io::Error| Error::Storage(format!("reading {}: {e}", dir.display()));
                for entry in std::fs::read_dir(dir).map_err(io)? {
                    let path = entry.map_err(io)?.path();
                    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
                    if let Some(epoch) = later(&name) {
                        let file = std::fs::read(&path).map_err(io)?;
                        files.push((epoch, file.into(), path.display().to_string()));
                    }
                }
            }
            Directory::Store { store, key, url } => {
                let prefix = (!key.is_empty()).then(|| StorePath::from(key.as_str()));
                let listed: Vec<_> = futures::TryStreamExt::try_collect(store.list(prefix.as_ref()))
                    .await
                    .map_err(|e| Error::Storage(format!("listing {url}: {e}")))?;
                for meta in listed {
                    let Some(epoch) = meta.location.filename().and_then(later) else { continue };
                    let read = |e: object_store::Error| Error::Storage(format!("reading {url}/{}: {e}", meta.location));
                    let file = store.get(&meta.location).await.map_err(read)?.bytes().await.map_err(read)?;
                    files.push((epoch, file, format!("{url}/{}", meta.location)));
                }
            }
        }
        files.sort_by_key(|(epoch, _, _)| *epoch);
        let mut changes = Vec::new();
        for (_, file, location) in &files {
            let corrupt = |e: datafusion::parquet::errors::ParquetError| Error::Corrupt {
                location: location.clone(),
                reason: format!("a file this sink wrote does not read back: {e}"),
            };
            let reader =
                ParquetRecordBatchReaderBuilder::try_new(file.clone()).map_err(corrupt)?.build().map_err(corrupt)?;
            for batch in reader {
                let batch = batch.map_err(|e| Error::Corrupt { location: location.clone(), reason: e.to_string() })?;
                changes.push(written_change(*mode, &batch, schema)?);
            }
        }
        let epochs = files.iter().map(|(epoch, _, _)| *epoch).collect();
        Ok(Some((epochs, ChangeBatch::concat(schema, &changes)?)))
    }

    /// Readies an exactly-once sink: where delivery takes up. A Kafka sink reads the last
    /// messages of each partition for its own; a file sink starts from nothing, since a
    /// segment written again replaces its own file.
    pub async fn begin_exactly_once(&self) -> Result<Resume> {
        let SinkWriter::Kafka { topic, exactly_once: Some(tags), .. } = self else {
            return Ok(Resume::default());
        };
        let (topic, tags) = (topic.clone(), tags.clone());
        tokio::task::spawn_blocking(move || tags.resume(&topic))
            .await
            .map_err(|e| Error::Internal(format!("reading back a sink's topic panicked: {e}")))?
    }

    /// Delivers the segment sealed at checkpoint `epoch`, leaving out the messages
    /// `resume` says the target holds: a Kafka sink tags each message with the sink, the
    /// epoch and the message's number in the segment; a file sink writes one file named
    /// after the epoch.
    pub async fn deliver_segment(&self, epoch: u64, change: &ChangeBatch, resume: &Resume) -> Result<Written> {
        let SinkWriter::Kafka { producer, topic, mode, key, exactly_once: Some(tags) } = self else {
            return self.write(epoch, change).await;
        };
        let (messages, skipped) = encode(*mode, *key, change)?;
        let held = |i: usize| resume.epoch == epoch && resume.present.contains(&(i as u64));
        let tagged: Vec<(usize, &Message)> = messages.iter().enumerate().filter(|(i, _)| !held(*i)).collect();
        deliver_tagged(producer, topic, &tagged, Some((tags.sink.as_str(), epoch))).await?;
        let bytes = tagged.iter().map(|(_, m)| m.value.as_ref().map_or(0, Vec::len)).sum::<usize>();
        Ok(Written { records: tagged.len() as u64, bytes: bytes as u64, skipped })
    }
}

/// Where an exactly-once sink takes up delivery after a start or a failure: the segments
/// before `epoch` are in the target whole, and of segment `epoch` the messages numbered in
/// `present` (a crash can cut a segment short).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Resume {
    pub epoch: u64,
    pub present: HashSet<u64>,
}

/// Headers an exactly-once Kafka sink puts on each message.
const HEADER_SINK: &str = "freshet-sink";
const HEADER_EPOCH: &str = "freshet-epoch";
const HEADER_INDEX: &str = "freshet-index";
/// Messages read back per partition at first when looking for the sink's last ones; the
/// window grows fourfold until it reaches a message of an earlier segment, the start of the
/// partition, or the most.
const SCAN_FIRST: i64 = 4096;
const SCAN_MOST: i64 = 4 << 20;
/// Reading back stops once no message arrived for this long.
const SCAN_IDLE: Duration = Duration::from_millis(1000);

/// How an exactly-once Kafka sink finds its own messages in its topic.
#[derive(Clone)]
pub struct Tags {
    /// The value of the `freshet-sink` header.
    sink: String,
    brokers: String,
    properties: Vec<(String, String)>,
}

impl Tags {
    /// Reads the end of each partition for this sink's messages: the last segment found,
    /// and which of its messages arrived.
    fn resume(&self, topic: &str) -> Result<Resume> {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.brokers)
            .set("group.id", format!("{}-read-back", self.sink))
            .set("client.id", format!("{}-read-back", self.sink))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false");
        for (key, value) in &self.properties {
            config.set(key, value);
        }
        let consumer: BaseConsumer =
            config.create().map_err(|e| Error::Storage(format!("reading back topic {topic}: {e}")))?;
        let mut windows = BTreeMap::new();
        for partition in super::kafka::partitions(&consumer, topic)? {
            let (low, high) = consumer
                .fetch_watermarks(topic, partition, READ_BACK_TIMEOUT)
                .map_err(|e| Error::Storage(format!("offsets of {topic} partition {partition}: {e}")))?;
            windows.insert(partition, (low, high, SCAN_FIRST));
        }
        let mut found: Vec<(u64, u64)> = Vec::new();
        while !windows.is_empty() {
            let mut assignment = TopicPartitionList::new();
            for (&partition, &(low, high, window)) in &windows {
                assignment
                    .add_partition_offset(topic, partition, Offset::Offset((high - window).max(low)))
                    .map_err(|e| Error::Storage(e.to_string()))?;
            }
            consumer.assign(&assignment).map_err(|e| Error::Storage(format!("reading back topic {topic}: {e}")))?;
            let mut ours: BTreeMap<i32, Vec<(u64, u64)>> = BTreeMap::new();
            let mut idle_since = std::time::Instant::now();
            while idle_since.elapsed() < SCAN_IDLE {
                match consumer.poll(Duration::from_millis(100)) {
                    None => continue,
                    Some(Err(e)) => return Err(Error::Storage(format!("reading back topic {topic}: {e}"))),
                    Some(Ok(message)) => {
                        idle_since = std::time::Instant::now();
                        if let Some(tag) = self.tag_of(&message) {
                            ours.entry(message.partition()).or_default().push(tag);
                        }
                    }
                }
            }
            // A partition is done once its window reaches a message of an earlier segment
            // than its last (so all of the last segment's messages there are in it), its
            // start, or the most read back.
            windows.retain(|partition, (low, high, window)| {
                let tags = ours.remove(partition).unwrap_or_default();
                let last = tags.iter().map(|(epoch, _)| *epoch).max();
                let whole = last.is_some_and(|last| tags.iter().any(|(epoch, _)| *epoch < last));
                let done = whole || *high - *window <= *low || *window >= SCAN_MOST;
                if done {
                    found.extend(tags);
                } else {
                    *window *= 4;
                }
                !done
            });
        }
        let epoch = found.iter().map(|(epoch, _)| *epoch).max().unwrap_or(0);
        let present = found.iter().filter(|(e, _)| *e == epoch).map(|(_, index)| *index).collect();
        Ok(Resume { epoch, present })
    }

    /// (epoch, number) of a message this sink wrote.
    fn tag_of(&self, message: &rdkafka::message::BorrowedMessage<'_>) -> Option<(u64, u64)> {
        let headers = message.headers()?;
        let (mut sink, mut epoch, mut index) = (None, None, None);
        for header in headers.iter() {
            let value = header.value.and_then(|v| std::str::from_utf8(v).ok());
            match header.key {
                HEADER_SINK => sink = value,
                HEADER_EPOCH => epoch = value.and_then(|v| v.parse().ok()),
                HEADER_INDEX => index = value.and_then(|v| v.parse().ok()),
                _ => {}
            }
        }
        if sink != Some(self.sink.as_str()) {
            return None; // another writer's message
        }
        Some((epoch?, index?))
    }
}

/// How long reading back a topic's offsets may take.
const READ_BACK_TIMEOUT: Duration = Duration::from_secs(30);

/// The rows a file sink writes for a change.
fn file_rows(mode: Mode, change: &ChangeBatch) -> Result<(RecordBatch, u64)> {
    let change = change.consolidate()?;
    if mode == Mode::Changes {
        let batch = change.batch();
        let mut fields: Vec<Field> = batch.schema().fields().iter().map(|f| f.as_ref().clone()).collect();
        fields.push(Field::new("_diff", DataType::Int64, false));
        let mut columns = batch.columns().to_vec();
        columns.push(Arc::new(Int64Array::from(change.weights().values().to_vec())));
        return Ok((RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)?, 0));
    }
    let (inserts, retracts) = change.split()?;
    Ok((inserts, retracts.num_rows() as u64))
}

/// The epoch of a segment file named `<prefix>-<epoch>.parquet` (never a hidden
/// temporary file, which starts with a dot).
fn segment_epoch(prefix: &str, name: &str) -> Option<u64> {
    name.strip_prefix(prefix)?.strip_prefix('-')?.strip_suffix(".parquet")?.parse().ok()
}

/// A change read back from rows [`file_rows`] wrote: `_diff` holds the weights in
/// `changes` mode; in `append` mode each row was inserted once.
fn written_change(mode: Mode, rows: &RecordBatch, schema: &SchemaRef) -> Result<ChangeBatch> {
    let width = schema.fields().len();
    if rows.num_columns() < width {
        return Err(Error::Internal(format!("a sink file has {} columns, the view {width}", rows.num_columns())));
    }
    let columns = rows.columns()[..width]
        .iter()
        .zip(schema.fields())
        .map(|(c, f)| if c.data_type() == f.data_type() { Ok(c.clone()) } else { cast(c, f.data_type()) })
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let batch = RecordBatch::try_new_with_options(
        schema.clone(),
        columns,
        &datafusion::arrow::record_batch::RecordBatchOptions::new().with_row_count(Some(rows.num_rows())),
    )?;
    match mode {
        Mode::Changes => {
            let diff = rows
                .column_by_name("_diff")
                .and_then(|d| d.as_any().downcast_ref::<Int64Array>())
                .ok_or_else(|| Error::Internal("a sink file in changes mode has no _diff column".into()))?;
            ChangeBatch::try_new(batch, diff.clone())
        }
        _ => Ok(ChangeBatch::inserts(batch)),
    }
}

/// `rows` as a Parquet file in memory.
fn parquet_bytes(rows: &RecordBatch) -> datafusion::parquet::errors::Result<Vec<u8>> {
    let mut writer = datafusion::parquet::arrow::ArrowWriter::try_new(Vec::new(), rows.schema(), None)?;
    writer.write(rows)?;
    writer.into_inner()
}

/// Writes `rows` to `dir/name` through a temporary file renamed at the end; returns the
/// file's size.
fn write_parquet(dir: &std::path::Path, name: &str, rows: &RecordBatch) -> Result<u64> {
    use datafusion::parquet::arrow::ArrowWriter;
    let temporary = dir.join(format!(".{name}.tmp"));
    let io = |e: std::io::Error| Error::Storage(format!("writing {}: {e}", temporary.display()));
    let file = std::fs::File::create(&temporary).map_err(io)?;
    let mut writer = ArrowWriter::try_new(file, rows.schema(), None)
        .map_err(|e| Error::Storage(format!("writing {}: {e}", temporary.display())))?;
    writer.write(rows).map_err(|e| Error::Storage(format!("writing {}: {e}", temporary.display())))?;
    let file = writer.into_inner().map_err(|e| Error::Storage(format!("writing {}: {e}", temporary.display())))?;
    file.sync_all().map_err(io)?;
    let size = file.metadata().map_err(io)?.len();
    std::fs::rename(&temporary, dir.join(name)).map_err(io)?;
    Ok(size)
}

/// A Kafka sink's options.
#[derive(Debug, Clone, PartialEq)]
pub struct KafkaSink {
    pub brokers: String,
    pub topic: String,
    /// The column whose value is each message's key.
    pub key: Option<String>,
    pub mode: Mode,
    pub properties: Vec<(String, String)>,
    pub exactly_once: bool,
    /// The `freshet-sink` header of an exactly-once sink's messages (default
    /// `freshet-<sink>`).
    pub sink_id: Option<String>,
}

const SINK_OPTIONS: &[&str] = &["connector", "brokers", "topic", "key", "mode", "format", "exactly_once", "sink_id"];

impl KafkaSink {
    pub fn from_options(options: &Options) -> Result<KafkaSink> {
        if let Some(unknown) =
            options.keys().find(|k| !SINK_OPTIONS.contains(&k.as_str()) && !k.starts_with("properties."))
        {
            return Err(option_error(format!(
                "option {unknown} is unknown for a kafka sink (known: brokers, topic, key, mode, exactly_once, sink_id, properties.<librdkafka setting>)"
            )));
        }
        match options.get("format").map(|f| f.to_ascii_lowercase()).as_deref() {
            None | Some("json") => {}
            Some(other) => {
                return Err(Error::NotSupported {
                    feature: format!("sinks with FORMAT {}", other.to_ascii_uppercase()),
                    hint: Some("sinks write FORMAT JSON".into()),
                });
            }
        }
        let (brokers, topic) = brokers_and_topic(options, "sink")?;
        let mode = match options.get("mode").map(|m| m.to_ascii_lowercase()).as_deref() {
            None | Some("append") => Mode::Append,
            Some("upsert") => Mode::Upsert,
            Some("debezium") => Mode::Debezium,
            Some(other) => {
                return Err(option_error(format!("mode = '{other}' must be 'append', 'upsert' or 'debezium'")));
            }
        };
        let key = options.get("key").map(|k| k.to_ascii_lowercase());
        if mode == Mode::Upsert && key.is_none() {
            return Err(option_error("an upsert sink needs key = 'column': tombstones and updates go by key"));
        }
        let properties = options
            .iter()
            .filter_map(|(k, v)| k.strip_prefix("properties.").map(|k| (k.to_string(), v.clone())))
            .collect();
        let exactly_once = super::flag(options, "exactly_once")?;
        let sink_id = options.get("sink_id").cloned();
        if sink_id.is_some() && !exactly_once {
            return Err(option_error("sink_id is for exactly_once = 'true' sinks"));
        }
        Ok(KafkaSink { brokers, topic, key, mode, properties, exactly_once, sink_id })
    }

    /// Checks the sink against the view's columns; returns the key column's index.
    pub fn key_index(&self, schema: &datafusion::arrow::datatypes::Schema) -> Result<Option<usize>> {
        self.key
            .as_ref()
            .map(|key| {
                schema.index_of(key).map_err(|_| {
                    let columns: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
                    option_error(format!("key = '{key}' is not a column of the view (columns: {})", columns.join(", ")))
                })
            })
            .transpose()
    }

    /// How an exactly-once sink tags its messages.
    fn tags(&self, sink: &str) -> Tags {
        let id = self.sink_id.clone().unwrap_or_else(|| format!("freshet-{sink}"));
        Tags { sink: id, brokers: self.brokers.clone(), properties: self.properties.clone() }
    }

    pub fn producer(&self, sink: &str) -> Result<FutureProducer> {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.brokers)
            .set("client.id", format!("freshet-sink-{sink}"))
            .set("linger.ms", "5")
            .set("message.timeout.ms", "30000");
        if self.exactly_once {
            // Retries inside the client never write a message twice or out of order.
            config.set("enable.idempotence", "true");
        }
        for (key, value) in &self.properties {
            config.set(key, value);
        }
        config.create().map_err(|e| option_error(format!("sink {sink}: cannot create a Kafka producer: {e}")))
    }
}

/// One message to write.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub key: Option<Vec<u8>>,
    /// None is a tombstone.
    pub value: Option<Vec<u8>>,
}

/// The messages for one epoch's change, and how many retractions append mode left out.
pub fn encode(mode: Mode, key: Option<usize>, change: &ChangeBatch) -> Result<(Vec<Message>, u64)> {
    let (inserts, retracts) = change.consolidate()?.split()?;
    let after = json_rows(&inserts)?;
    let before = json_rows(&retracts)?;
    let keys = |batch: &RecordBatch| -> Result<Vec<Option<String>>> {
        let Some(k) = key else { return Ok(vec![None; batch.num_rows()]) };
        let column = batch.column(k);
        (0..batch.num_rows())
            .map(|i| if column.is_null(i) { Ok(None) } else { Ok(Some(array_value_to_string(column, i)?)) })
            .collect()
    };
    let after_keys = keys(&inserts)?;
    let before_keys = keys(&retracts)?;
    let bytes = |k: &Option<String>| k.as_ref().map(|k| k.as_bytes().to_vec());
    let mut messages = Vec::with_capacity(after.len() + before.len());
    let mut skipped = 0;
    match mode {
        Mode::Append | Mode::Changes => {
            skipped = before.len() as u64;
            for (k, row) in after_keys.iter().zip(after) {
                messages.push(Message { key: bytes(k), value: Some(row.into_bytes()) });
            }
        }
        Mode::Upsert => {
            let inserted: HashSet<&Option<String>> = after_keys.iter().collect();
            let mut tombstoned = HashSet::new();
            for k in &before_keys {
                if !inserted.contains(k) && tombstoned.insert(k) {
                    messages.push(Message { key: bytes(k), value: None });
                }
            }
            for (k, row) in after_keys.iter().zip(after) {
                messages.push(Message { key: bytes(k), value: Some(row.into_bytes()) });
            }
        }
        Mode::Debezium => {
            // With a key, a retraction and an insertion of one key are an update.
            let mut pending: HashMap<&String, Vec<String>> = HashMap::new();
            let mut deletes: Vec<(Option<String>, String)> = Vec::new();
            for (k, row) in before_keys.iter().zip(before) {
                match k {
                    Some(k) => pending.entry(k).or_default().push(row),
                    None => deletes.push((None, row)),
                }
            }
            for (k, row) in after_keys.iter().zip(after) {
                let old = k.as_ref().and_then(|k| pending.get_mut(k)).and_then(|rows| rows.pop());
                let (op, before) = match old {
                    Some(old) => ("u", old),
                    None => ("c", "null".to_string()),
                };
                let value = format!(r#"{{"before":{before},"after":{row},"op":"{op}"}}"#);
                messages.push(Message { key: bytes(k), value: Some(value.into_bytes()) });
            }
            for k in &before_keys {
                if let Some(k) = k
                    && let Some(rows) = pending.get_mut(k)
                    && let Some(row) = rows.pop()
                {
                    deletes.push((Some(k.clone()), row));
                }
            }
            for (k, row) in deletes {
                let value = format!(r#"{{"before":{row},"after":null,"op":"d"}}"#);
                messages.push(Message { key: bytes(&k), value: Some(value.into_bytes()) });
            }
        }
    }
    Ok((messages, skipped))
}

/// Each row as one JSON object, with nulls written out.
fn json_rows(batch: &RecordBatch) -> Result<Vec<String>> {
    if batch.num_rows() == 0 {
        return Ok(Vec::new());
    }
    let mut writer = WriterBuilder::new().with_explicit_nulls(true).build::<_, LineDelimited>(Vec::new());
    writer.write(batch)?;
    writer.finish()?;
    let text =
        String::from_utf8(writer.into_inner()).map_err(|e| Error::Internal(format!("JSON is not UTF-8: {e}")))?;
    Ok(text.lines().map(str::to_string).collect())
}

/// How long one epoch's messages may take to be acknowledged before the epoch is retried.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(60);

/// Writes `messages` to the topic; returns once the broker acknowledged all of them.
pub async fn deliver(producer: &FutureProducer, topic: &str, messages: &[Message]) -> Result<()> {
    let numbered: Vec<(usize, &Message)> = messages.iter().enumerate().collect();
    deliver_tagged(producer, topic, &numbered, None).await
}

/// Writes numbered `messages`; with `tag` = (sink, epoch), each carries the sink, the epoch
/// and its number as headers.
async fn deliver_tagged(
    producer: &FutureProducer,
    topic: &str,
    messages: &[(usize, &Message)],
    tag: Option<(&str, u64)>,
) -> Result<()> {
    let epoch = tag.map(|(_, epoch)| epoch.to_string());
    let mut pending = Vec::with_capacity(messages.len());
    for (index, message) in messages {
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic);
        if let Some(key) = &message.key {
            record = record.key(key.as_slice());
        }
        if let Some(value) = &message.value {
            record = record.payload(value.as_slice());
        }
        if let (Some((sink, _)), Some(epoch)) = (tag, &epoch) {
            let index = index.to_string();
            let headers = OwnedHeaders::new()
                .insert(Header { key: HEADER_SINK, value: Some(sink) })
                .insert(Header { key: HEADER_EPOCH, value: Some(epoch.as_str()) })
                .insert(Header { key: HEADER_INDEX, value: Some(index.as_str()) });
            record = record.headers(headers);
        }
        // `send` waits while librdkafka's queue is full.
        pending.push(producer.send(record, DELIVERY_TIMEOUT));
    }
    for result in futures::future::join_all(pending).await {
        result.map_err(|(e, _)| Error::Storage(format!("writing to topic {topic}: {e}")))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use datafusion::arrow::array::{Int64Array, StringArray};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};

    use super::*;

    fn change(rows: &[(&str, i64, i64)]) -> ChangeBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("device", DataType::Utf8, true),
            Field::new("n", DataType::Int64, true),
        ]));
        let batch = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.0))),
                Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.1))),
            ],
        )
        .expect("batch");
        ChangeBatch::try_new(batch, Int64Array::from_iter_values(rows.iter().map(|r| r.2))).expect("change")
    }

    fn text(messages: &[Message]) -> Vec<(String, String)> {
        let s = |b: &Option<Vec<u8>>| b.as_ref().map_or("∅".to_string(), |b| String::from_utf8_lossy(b).into_owned());
        messages.iter().map(|m| (s(&m.key), s(&m.value))).collect()
    }

    #[test]
    fn upsert_writes_new_values_and_tombstones_for_vanished_keys() {
        let epoch = change(&[("a", 1, -1), ("a", 2, 1), ("b", 5, -1), ("c", 7, 1)]);
        let (messages, _) = encode(Mode::Upsert, Some(0), &epoch).expect("encoded");
        assert_eq!(
            text(&messages),
            [
                ("b".into(), "∅".into()),
                ("a".into(), r#"{"device":"a","n":2}"#.into()),
                ("c".into(), r#"{"device":"c","n":7}"#.into())
            ]
        );
    }

    #[test]
    fn debezium_pairs_a_keys_retraction_and_insertion_as_an_update() {
        let epoch = change(&[("a", 1, -1), ("a", 2, 1), ("b", 5, -1), ("c", 7, 1)]);
        let (messages, _) = encode(Mode::Debezium, Some(0), &epoch).expect("encoded");
        let values: Vec<String> = text(&messages).into_iter().map(|(_, v)| v).collect();
        assert_eq!(
            values,
            [
                r#"{"before":{"device":"a","n":1},"after":{"device":"a","n":2},"op":"u"}"#,
                r#"{"before":null,"after":{"device":"c","n":7},"op":"c"}"#,
                r#"{"before":{"device":"b","n":5},"after":null,"op":"d"}"#,
            ]
        );
    }

    #[test]
    fn append_writes_insertions_and_counts_what_it_leaves_out() {
        let epoch = change(&[("a", 1, -1), ("a", 2, 1), ("a", 2, 1)]);
        let (messages, skipped) = encode(Mode::Append, None, &epoch).expect("encoded");
        assert_eq!(skipped, 1);
        assert_eq!(messages.len(), 2);
        assert!(messages.iter().all(|m| m.key.is_none()));
    }
}
