//! Kafka: sources that read every partition of a topic, and sinks that write a view's
//! changes to a topic.
//!
//! A source assigns itself all partitions (no consumer-group rebalancing) and starts each
//! at the offset freshet recorded with the rows it last appended, so the broker's committed
//! group offsets are never trusted: rows and offsets become durable together, and after a
//! restart reading resumes exactly after the last durable record. A record that does not
//! decode is skipped and kept as a dead letter (or, with `on_error = 'fail'`, stops the
//! source). The consumer runs on its own thread; decoded batches go to the source's ingest
//! task over a bounded channel, so a slow log slows the consumer rather than growing memory.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use datafusion::arrow::array::{ArrayRef, BinaryArray, Int32Array, Int64Array, StringArray, TimestampNanosecondArray};
use datafusion::arrow::compute::concat_batches;
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::arrow::record_batch::RecordBatch;
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};

use super::avro::AvroValues;
use super::{DeadLetter, Format, Options, Progress, option_error};
use crate::error::{Error, Result};

/// Where a source starts reading a partition it has no recorded offset for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    Earliest,
    Latest,
    /// The first record at or after this time (milliseconds since the epoch).
    Timestamp(i64),
}

/// What to do with a record that does not decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnError {
    /// Skip it, count it, keep it in `freshet_catalog.dead_letters`.
    Skip,
    /// Stop the source with the error.
    Fail,
}

/// A record's metadata that `INCLUDE` adds as columns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metadata {
    Partition,
    Offset,
    Timestamp,
    Key,
}

impl Metadata {
    fn parse(word: &str) -> Result<Metadata> {
        match word {
            "partition" => Ok(Metadata::Partition),
            "offset" => Ok(Metadata::Offset),
            "timestamp" => Ok(Metadata::Timestamp),
            "key" => Ok(Metadata::Key),
            other => Err(option_error(format!(
                "INCLUDE {other} is unknown; a Kafka source can include partition, offset, timestamp and key"
            ))),
        }
    }

    /// The column's name when `INCLUDE` gives no alias.
    fn default_column(self) -> &'static str {
        match self {
            Metadata::Partition => "_partition",
            Metadata::Offset => "_offset",
            Metadata::Timestamp => "_timestamp",
            Metadata::Key => "_key",
        }
    }

    fn field(self, column: &str) -> Field {
        match self {
            Metadata::Partition => Field::new(column, DataType::Int32, false),
            Metadata::Offset => Field::new(column, DataType::Int64, false),
            Metadata::Timestamp => {
                Field::new(column, DataType::Timestamp(TimeUnit::Nanosecond, Some("+00:00".into())), true)
            }
            Metadata::Key => Field::new(column, DataType::Utf8, true),
        }
    }
}

/// A Kafka source's options.
#[derive(Debug, Clone, PartialEq)]
pub struct KafkaSource {
    pub brokers: String,
    pub topic: String,
    pub start: Start,
    pub group: Option<String>,
    pub format: Format,
    /// Metadata columns, in the order they follow the declared columns.
    /// The writer schema of FORMAT AVRO values.
    pub avro_schema: Option<String>,
    pub include: Vec<(Metadata, String)>,
    pub on_error: OnError,
    /// `properties.<name>` options, passed to librdkafka as `<name>`.
    pub properties: Vec<(String, String)>,
}

const SOURCE_OPTIONS: &[&str] =
    &["connector", "brokers", "topic", "start", "group", "format", "header", "include", "on_error", "avro.schema"];

impl KafkaSource {
    pub fn from_options(options: &Options, format: Format) -> Result<KafkaSource> {
        if let Some(unknown) =
            options.keys().find(|k| !SOURCE_OPTIONS.contains(&k.as_str()) && !k.starts_with("properties."))
        {
            if unknown.starts_with("schema.registry") {
                return Err(Error::NotSupported {
                    feature: "Avro schemas from a schema registry".into(),
                    hint: Some("give the writer schema inline with avro.schema = '{\"type\": \"record\", …}'".into()),
                });
            }
            return Err(option_error(format!(
                "option {unknown} is unknown for the kafka connector (known: brokers, topic, start, group, on_error, avro.schema, properties.<librdkafka setting>)"
            )));
        }
        let (brokers, topic) = brokers_and_topic(options, "source")?;
        let avro_schema = options.get("avro.schema").cloned();
        match (format, &avro_schema) {
            (Format::Avro, None) => {
                return Err(option_error(
                    "FORMAT AVRO needs the writer schema: avro.schema = '{\"type\": \"record\", …}'",
                ));
            }
            (Format::Avro, Some(_)) | (_, None) => {}
            (_, Some(_)) => return Err(option_error("avro.schema is for FORMAT AVRO")),
        }
        let start = match options.get("start").map(|s| s.trim().to_ascii_lowercase()) {
            None => Start::Earliest,
            Some(s) if s == "earliest" => Start::Earliest,
            Some(s) if s == "latest" => Start::Latest,
            Some(s) => match s.strip_prefix("timestamp:").map(|ms| ms.trim().parse::<i64>()) {
                Some(Ok(ms)) => Start::Timestamp(ms),
                _ => {
                    return Err(option_error(format!(
                        "start = '{s}' must be 'earliest', 'latest' or 'timestamp:<milliseconds since 1970>'"
                    )));
                }
            },
        };
        let on_error = match options.get("on_error").map(|s| s.to_ascii_lowercase()).as_deref() {
            None | Some("skip") => OnError::Skip,
            Some("fail") => OnError::Fail,
            Some(other) => return Err(option_error(format!("on_error = '{other}' must be 'skip' or 'fail'"))),
        };
        let mut include: Vec<(Metadata, String)> = Vec::new();
        for item in options.get("include").map(|i| i.split(',').collect::<Vec<_>>()).unwrap_or_default() {
            let mut words = item.split_whitespace().map(str::to_ascii_lowercase);
            let Some(what) = words.next() else { continue };
            let metadata = Metadata::parse(&what)?;
            let column = match (words.next().as_deref(), words.next()) {
                (None, _) => metadata.default_column().to_string(),
                (Some("as"), Some(alias)) => alias,
                _ => return Err(option_error(format!("INCLUDE {item}: expected `{what} [AS column]`"))),
            };
            if include.iter().any(|(m, c)| *m == metadata || *c == column) {
                return Err(option_error(format!("INCLUDE names {what} or column {column} twice")));
            }
            include.push((metadata, column));
        }
        let properties = options
            .iter()
            .filter_map(|(k, v)| k.strip_prefix("properties.").map(|k| (k.to_string(), v.clone())))
            .collect();
        Ok(KafkaSource {
            brokers,
            topic,
            start,
            group: options.get("group").cloned(),
            format,
            avro_schema,
            include,
            on_error,
            properties,
        })
    }

    /// The source's columns: the declared ones (or, for TEXT and BYTES, one `value`
    /// column), then the included metadata.
    pub fn schema(&self, declared: Option<&SchemaRef>) -> Result<SchemaRef> {
        let value = value_fields(self.format, declared, "kafka")?;
        if let Some(avro) = &self.avro_schema {
            AvroValues::new(avro, &Arc::new(Schema::new(value.clone())))?;
        }
        let mut fields = value;
        for (metadata, column) in &self.include {
            if fields.iter().any(|f| f.name() == column) {
                return Err(option_error(format!(
                    "INCLUDE adds column {column}, which the source already has; name it with INCLUDE … AS other"
                )));
            }
            fields.push(metadata.field(column));
        }
        Ok(Arc::new(Schema::new(fields)))
    }

    fn client_config(&self, source: &str) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.brokers)
            .set("group.id", self.group.clone().unwrap_or_else(|| format!("freshet-{source}")))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false")
            .set("client.id", format!("freshet-source-{source}"));
        for (key, value) in &self.properties {
            config.set(key, value);
        }
        config
    }
}

/// The columns a message's value gives: the declared ones, or for TEXT and BYTES one
/// `value` column (declared or not).
pub fn value_fields(format: Format, declared: Option<&SchemaRef>, connector: &str) -> Result<Vec<Field>> {
    Ok(match (format, declared) {
        (Format::Text, None) => vec![Field::new("value", DataType::Utf8, true)],
        (Format::Bytes, None) => vec![Field::new("value", DataType::Binary, true)],
        (Format::Text | Format::Bytes, Some(declared)) => {
            let wanted = if format == Format::Text { DataType::Utf8 } else { DataType::Binary };
            match declared.fields().as_ref() {
                [field] if *field.data_type() == wanted => vec![field.as_ref().clone()],
                _ => {
                    return Err(option_error(format!(
                        "FORMAT {} gives one column of type {}; declare one such column or none",
                        if format == Format::Text { "TEXT" } else { "BYTES" },
                        if format == Format::Text { "TEXT" } else { "BYTEA" },
                    )));
                }
            }
        }
        (_, Some(declared)) => declared.fields().iter().map(|f| f.as_ref().clone()).collect(),
        (_, None) => {
            return Err(option_error(format!(
                "a {connector} source needs its columns: CREATE SOURCE name (col TYPE, …), or FORMAT TEXT | BYTES"
            )));
        }
    })
}

/// `brokers` and `topic`, both required.
pub fn brokers_and_topic(options: &Options, what: &str) -> Result<(String, String)> {
    let brokers = options
        .get("brokers")
        .cloned()
        .ok_or_else(|| option_error(format!("a kafka {what} needs brokers = 'host:port[,host:port…]'")))?;
    let topic =
        options.get("topic").cloned().ok_or_else(|| option_error(format!("a kafka {what} needs topic = '…'")))?;
    Ok((brokers, topic))
}

/// What one round of polling produced, ready to append.
pub struct Polled {
    /// Decoded rows, in the source's schema.
    pub rows: RecordBatch,
    pub dead_letters: Vec<DeadLetter>,
    /// The next offset to read, per partition, once these rows are durable.
    pub offsets: BTreeMap<i32, i64>,
}

/// Most records decoded and appended together.
const MAX_RECORDS: usize = 16_384;
/// Fewest records per decode thread: smaller batches are decoded on the consumer thread.
const PARALLEL_SLICE: usize = 4096;
/// Longest a poll round waits to fill a batch.
const LINGER: Duration = Duration::from_millis(50);
/// How often partition high watermarks (for the lag) and new partitions are looked up.
const WATERMARK_EVERY: Duration = Duration::from_secs(2);
const METADATA_EVERY: Duration = Duration::from_secs(30);
/// Broker requests made by the consumer thread outside polling.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Backoff between attempts to reach the broker, doubling up to the maximum.
const BACKOFF_START: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Runs a Kafka source's consumer until `stop` is set or the ingest task goes away.
/// `offsets` are the recorded next offsets; partitions without one start at `spec.start`.
pub fn consume(
    spec: KafkaSource,
    source: String,
    schema: SchemaRef,
    mut offsets: BTreeMap<i32, i64>,
    out: tokio::sync::mpsc::Sender<Polled>,
    progress: Arc<Progress>,
    stop: Arc<AtomicBool>,
) {
    let mut backoff = BACKOFF_START;
    while !stop.load(Ordering::Acquire) && !out.is_closed() {
        match consume_once(&spec, &source, &schema, &mut offsets, &out, &progress, &stop) {
            Ok(()) => return,
            Err(e) => {
                progress.failed_attempt(&format!("{e}"));
                tracing::warn!(source = %source, "kafka source cannot read, retrying in {backoff:?}: {e}");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

/// The partitions of the topic, or an error naming what is missing.
pub(super) fn partitions(consumer: &BaseConsumer, topic: &str) -> Result<Vec<i32>> {
    let metadata = consumer
        .fetch_metadata(Some(topic), REQUEST_TIMEOUT)
        .map_err(|e| Error::Storage(format!("broker metadata for topic {topic}: {e}")))?;
    let found = metadata.topics().iter().find(|t| t.name() == topic);
    match found {
        Some(t) if t.error().is_none() && !t.partitions().is_empty() => {
            Ok(t.partitions().iter().map(|p| p.id()).collect())
        }
        Some(t) => Err(Error::Storage(format!(
            "topic {topic} is not available{}",
            t.error().map(|e| format!(": {e:?}")).unwrap_or_default()
        ))),
        None => Err(Error::Storage(format!("topic {topic} does not exist"))),
    }
}

/// Resolves where each partition without a recorded offset starts.
fn resolve_starts(
    consumer: &BaseConsumer,
    spec: &KafkaSource,
    partitions: &[i32],
    offsets: &mut BTreeMap<i32, i64>,
) -> Result<bool> {
    let missing: Vec<i32> = partitions.iter().copied().filter(|p| !offsets.contains_key(p)).collect();
    if missing.is_empty() {
        return Ok(false);
    }
    let topic = &spec.topic;
    for &partition in &missing {
        let (low, high) = consumer
            .fetch_watermarks(topic, partition, REQUEST_TIMEOUT)
            .map_err(|e| Error::Storage(format!("offsets of {topic} partition {partition}: {e}")))?;
        let start = match spec.start {
            Start::Earliest => low,
            Start::Latest => high,
            Start::Timestamp(ms) => {
                let mut wanted = TopicPartitionList::new();
                wanted
                    .add_partition_offset(topic, partition, Offset::Offset(ms))
                    .map_err(|e| Error::Storage(format!("{e}")))?;
                let found = consumer
                    .offsets_for_times(wanted, REQUEST_TIMEOUT)
                    .map_err(|e| Error::Storage(format!("offsets of {topic} at {ms} ms: {e}")))?;
                match found.find_partition(topic, partition).map(|e| e.offset()) {
                    Some(Offset::Offset(offset)) if offset >= 0 => offset,
                    _ => high, // nothing at or after that time yet
                }
            }
        };
        offsets.insert(partition, start);
    }
    Ok(true)
}

fn assign(consumer: &BaseConsumer, topic: &str, offsets: &BTreeMap<i32, i64>) -> Result<()> {
    let mut assignment = TopicPartitionList::new();
    for (&partition, &offset) in offsets {
        assignment
            .add_partition_offset(topic, partition, Offset::Offset(offset))
            .map_err(|e| Error::Storage(format!("{e}")))?;
    }
    consumer.assign(&assignment).map_err(|e| Error::Storage(format!("assigning partitions of {topic}: {e}")))
}

/// One connection's worth of consuming; returns Ok when asked to stop, Err to reconnect.
fn consume_once(
    spec: &KafkaSource,
    source: &str,
    schema: &SchemaRef,
    offsets: &mut BTreeMap<i32, i64>,
    out: &tokio::sync::mpsc::Sender<Polled>,
    progress: &Progress,
    stop: &AtomicBool,
) -> Result<()> {
    let consumer: BaseConsumer = spec
        .client_config(source)
        .create()
        .map_err(|e| option_error(format!("kafka source {source}: cannot create a consumer: {e}")))?;
    let mut known = partitions(&consumer, &spec.topic)?;
    if resolve_starts(&consumer, spec, &known, offsets)? {
        // Where new partitions start becomes durable before anything is read from them.
        let empty = RecordBatch::new_empty(schema.clone());
        if out.blocking_send(Polled { rows: empty, dead_letters: Vec::new(), offsets: offsets.clone() }).is_err() {
            return Ok(());
        }
    }
    assign(&consumer, &spec.topic, offsets)?;
    progress.set_status("running");
    tracing::info!(source = %source, topic = %spec.topic, partitions = known.len(), "kafka source reading");
    let mut decoder = RecordDecoder::new(spec.format, schema, spec.include.iter().map(|(m, _)| *m).collect());
    if let Some(avro) = &spec.avro_schema {
        decoder = decoder.with_avro(avro)?;
    }
    let mut fetched = FetchedQueue::of(&consumer)?;
    let mut watermarks_at = Instant::now() - WATERMARK_EVERY;
    let mut metadata_at = Instant::now();
    let mut records = Records::default();
    loop {
        if stop.load(Ordering::Acquire) || out.is_closed() {
            return Ok(());
        }
        let deadline = Instant::now() + LINGER;
        while records.len() < MAX_RECORDS {
            // Takes what is already fetched; an empty queue waits until the linger deadline.
            let left = deadline.saturating_duration_since(Instant::now());
            let (taken, error) = fetched.take(left, MAX_RECORDS - records.len(), &mut records);
            if let Some(e) = error {
                // librdkafka reconnects by itself; say so while it does.
                progress.failed_attempt(&e);
                tracing::debug!(source = %source, "kafka: {e}");
                break;
            }
            if taken == 0 {
                break;
            }
        }
        if !records.is_empty() {
            let (rows, dead_letters) = decoder.decode(&records)?;
            if spec.on_error == OnError::Fail
                && let Some(first) = dead_letters.first()
            {
                let message = format!(
                    "source {source} stopped: the record at partition {} offset {} does not decode: {} (on_error = 'fail')",
                    first.partition.unwrap_or(-1),
                    first.offset.unwrap_or(-1),
                    first.error
                );
                progress.stopped(&message);
                tracing::error!(source = %source, "{message}");
                stop.store(true, Ordering::Release);
                return Ok(());
            }
            for (partition, offset) in records.last_offsets() {
                offsets.insert(partition, offset + 1);
            }
            progress.read(records.len() as u64, records.bytes() as u64);
            records.clear();
            if out.blocking_send(Polled { rows, dead_letters, offsets: offsets.clone() }).is_err() {
                return Ok(());
            }
            progress.set_status("running");
        }
        if watermarks_at.elapsed() >= WATERMARK_EVERY {
            watermarks_at = Instant::now();
            let mut highs = BTreeMap::new();
            for &partition in &known {
                if let Ok((_, high)) = consumer.fetch_watermarks(&spec.topic, partition, Duration::from_secs(1)) {
                    highs.insert(partition, high);
                }
            }
            progress.set_highs(highs);
        }
        if metadata_at.elapsed() >= METADATA_EVERY {
            metadata_at = Instant::now();
            if let Ok(now) = partitions(&consumer, &spec.topic)
                && now.len() != known.len()
            {
                // New partitions are read from their start, whatever `start` says.
                let new: Vec<i32> = now.iter().copied().filter(|p| !offsets.contains_key(p)).collect();
                for partition in &new {
                    let (low, _) = consumer
                        .fetch_watermarks(&spec.topic, *partition, REQUEST_TIMEOUT)
                        .map_err(|e| Error::Storage(format!("{e}")))?;
                    offsets.insert(*partition, low);
                }
                assign(&consumer, &spec.topic, offsets)?;
                tracing::info!(source = %source, partitions = now.len(), "kafka topic gained partitions");
                known = now;
            }
        }
    }
}

/// The consumer's queue of fetched records, taken many at a time.
///
/// The rdkafka crate's `poll` hands out one message per call and reads the clock several
/// times for each; with records of 100 bytes that was a tenth of the source's CPU. This
/// takes up to a whole batch per call into librdkafka instead. It must be dropped before
/// the consumer it was taken from (declare it after the consumer).
struct FetchedQueue {
    queue: *mut rdkafka::bindings::rd_kafka_queue_t,
    /// Room for the message pointers one call returns.
    messages: Vec<*mut rdkafka::bindings::rd_kafka_message_t>,
}

impl FetchedQueue {
    fn of(consumer: &BaseConsumer) -> Result<FetchedQueue> {
        // SAFETY: the client pointer is valid while `consumer` lives; the queue handle it
        // returns holds its own reference, released in `drop`.
        let queue = unsafe { rdkafka::bindings::rd_kafka_queue_get_consumer(consumer.client().native_ptr()) };
        if queue.is_null() {
            return Err(Error::Storage("the kafka consumer has no consumer queue".into()));
        }
        Ok(FetchedQueue { queue, messages: Vec::new() })
    }

    /// Copies up to `room` fetched records into `records`, waiting up to `wait` for the
    /// queue to fill. Returns how many were taken and the first error a fetch reported
    /// (records around an error are still taken: the consumer has moved past them).
    fn take(&mut self, wait: Duration, room: usize, records: &mut Records) -> (usize, Option<String>) {
        use rdkafka::bindings as rd;
        self.messages.resize(room, std::ptr::null_mut());
        let wait_ms = i32::try_from(wait.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: `messages` has room for `room` pointers; librdkafka fills the first `n`.
        let n = unsafe { rd::rd_kafka_consume_batch_queue(self.queue, wait_ms, self.messages.as_mut_ptr(), room) };
        let Ok(n) = usize::try_from(n) else {
            // SAFETY: both calls only read librdkafka's thread-local last error and its
            // static description.
            let reason = unsafe { std::ffi::CStr::from_ptr(rd::rd_kafka_err2str(rd::rd_kafka_last_error())) };
            return (0, Some(format!("reading the consumer queue failed: {}", reason.to_string_lossy())));
        };
        let mut error = None;
        let mut taken = 0;
        for &message in &self.messages[..n] {
            // SAFETY: each returned message is valid until destroyed just below, and its
            // key and payload slices are copied out before that.
            unsafe {
                let m = &*message;
                if m.err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
                    if error.is_none() {
                        let text = rd::rd_kafka_message_errstr(message);
                        error = Some(if text.is_null() {
                            format!("{:?}", m.err)
                        } else {
                            std::ffi::CStr::from_ptr(text).to_string_lossy().into_owned()
                        });
                    }
                } else {
                    let bytes = |pointer: *mut std::ffi::c_void, len: usize| {
                        (!pointer.is_null()).then(|| std::slice::from_raw_parts(pointer as *const u8, len))
                    };
                    let mut kind = rd::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_NOT_AVAILABLE;
                    let timestamp = rd::rd_kafka_message_timestamp(message, &mut kind);
                    let timestamp = (kind != rd::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_NOT_AVAILABLE
                        && timestamp >= 0)
                        .then_some(timestamp);
                    records.push(m.partition, m.offset, timestamp, bytes(m.key, m.key_len), bytes(m.payload, m.len));
                    taken += 1;
                }
                rd::rd_kafka_message_destroy(message);
            }
        }
        (taken, error)
    }
}

impl Drop for FetchedQueue {
    fn drop(&mut self) {
        // SAFETY: the handle came from `rd_kafka_queue_get_consumer` and is released once.
        unsafe { rdkafka::bindings::rd_kafka_queue_destroy(self.queue) }
    }
}

/// Polled records, copied out of the consumer into one buffer.
#[derive(Default)]
pub(crate) struct Records {
    data: Vec<u8>,
    /// Per record: partition, offset, timestamp, key range, payload range (None = null).
    meta: Vec<RecordMeta>,
}

struct RecordMeta {
    partition: i32,
    offset: i64,
    timestamp: Option<i64>,
    key: Option<(usize, usize)>,
    payload: Option<(usize, usize)>,
}

impl Records {
    pub(crate) fn push(
        &mut self,
        partition: i32,
        offset: i64,
        timestamp: Option<i64>,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
    ) {
        let mut copy = |bytes: Option<&[u8]>| {
            bytes.map(|b| {
                let start = self.data.len();
                self.data.extend_from_slice(b);
                (start, self.data.len())
            })
        };
        let key = copy(key);
        let payload = copy(payload);
        self.meta.push(RecordMeta { partition, offset, timestamp, key, payload });
    }

    pub(crate) fn len(&self) -> usize {
        self.meta.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.meta.is_empty()
    }

    pub(crate) fn bytes(&self) -> usize {
        self.data.len()
    }

    pub(crate) fn clear(&mut self) {
        self.data.clear();
        self.meta.clear();
    }

    fn payload(&self, i: usize) -> Option<&[u8]> {
        self.meta[i].payload.map(|(a, b)| &self.data[a..b])
    }

    fn key(&self, i: usize) -> Option<&[u8]> {
        self.meta[i].key.map(|(a, b)| &self.data[a..b])
    }

    /// The highest offset read per partition.
    fn last_offsets(&self) -> BTreeMap<i32, i64> {
        let mut last = BTreeMap::new();
        for m in &self.meta {
            let entry = last.entry(m.partition).or_insert(m.offset);
            *entry = (*entry).max(m.offset);
        }
        last
    }

    fn dead_letter(&self, i: usize, error: String) -> DeadLetter {
        let m = &self.meta[i];
        DeadLetter::new(Some(m.partition), Some(m.offset), error, self.payload(i).unwrap_or_default())
    }
}

/// Decoded values, the records they came from, and the records that did not decode.
type Decoded = (RecordBatch, Vec<usize>, Vec<DeadLetter>);

/// Decodes polled records into the source's rows.
pub(crate) struct RecordDecoder {
    format: Format,
    /// The columns decoded from the value.
    value_schema: SchemaRef,
    schema: SchemaRef,
    include: Vec<Metadata>,
    avro: Option<AvroValues>,
}

impl RecordDecoder {
    /// Decodes into `schema`: the value's columns, then one column per `include`.
    pub(crate) fn new(format: Format, schema: &SchemaRef, include: Vec<Metadata>) -> RecordDecoder {
        let values = schema.fields().len() - include.len();
        let value_schema = Arc::new(Schema::new(schema.fields()[..values].to_vec()));
        RecordDecoder { format, value_schema, schema: schema.clone(), include, avro: None }
    }

    /// Decodes FORMAT AVRO values written with `schema`.
    pub(crate) fn with_avro(mut self, schema: &str) -> Result<RecordDecoder> {
        self.avro = Some(AvroValues::new(schema, &self.value_schema)?);
        Ok(self)
    }

    /// Rows for the records that decode, and a dead letter for each that does not.
    pub(crate) fn decode(&self, records: &Records) -> Result<(RecordBatch, Vec<DeadLetter>)> {
        let mut dead = Vec::new();
        let mut good: Vec<usize> = Vec::with_capacity(records.len());
        for i in 0..records.len() {
            if records.payload(i).is_none() {
                dead.push(records.dead_letter(i, "the record has no value (a tombstone)".into()));
            } else {
                good.push(i);
            }
        }
        // Large batches are decoded in slices on as many threads as there are cores (the
        // consumer thread's own slice included); rows keep the records' order.
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let slices = (good.len() / PARALLEL_SLICE).clamp(1, threads);
        let decoded: Vec<Result<Decoded>> = if slices == 1 {
            vec![self.decode_slice(records, good)]
        } else {
            let size = good.len().div_ceil(slices);
            std::thread::scope(|scope| {
                let mut parts = good.chunks(size);
                let first = parts.next().unwrap_or_default();
                let others: Vec<_> =
                    parts.map(|part| scope.spawn(move || self.decode_slice(records, part.to_vec()))).collect();
                let mut decoded = vec![self.decode_slice(records, first.to_vec())];
                decoded.extend(others.into_iter().map(|handle| {
                    handle.join().unwrap_or_else(|_| Err(Error::Internal("a kafka decode thread panicked".into())))
                }));
                decoded
            })
        };
        let mut parts = Vec::with_capacity(decoded.len());
        good = Vec::with_capacity(records.len());
        for result in decoded {
            let (values, kept, bad) = result?;
            parts.push(values);
            good.extend(kept);
            dead.extend(bad);
        }
        let values = concat_batches(&self.value_schema, &parts)?;
        let mut columns: Vec<ArrayRef> = values.columns().to_vec();
        for metadata in &self.include {
            columns.push(match metadata {
                Metadata::Partition => {
                    Arc::new(Int32Array::from_iter_values(good.iter().map(|&i| records.meta[i].partition)))
                }
                Metadata::Offset => {
                    Arc::new(Int64Array::from_iter_values(good.iter().map(|&i| records.meta[i].offset)))
                }
                Metadata::Timestamp => Arc::new(
                    TimestampNanosecondArray::from_iter(
                        good.iter().map(|&i| records.meta[i].timestamp.map(|ms| ms * 1_000_000)),
                    )
                    .with_timezone("+00:00"),
                ),
                Metadata::Key => Arc::new(StringArray::from_iter(
                    good.iter().map(|&i| records.key(i).map(|k| String::from_utf8_lossy(k).into_owned())),
                )),
            });
        }
        Ok((RecordBatch::try_new(self.schema.clone(), columns)?, dead))
    }

    /// Decodes the values of records `which` together; if that fails, finds the records at
    /// fault one by one. Returns the values, the records they came from, and the dead
    /// letters.
    fn decode_slice(&self, records: &Records, which: Vec<usize>) -> Result<Decoded> {
        if let Ok(values) = self.decode_values(records, &which) {
            return Ok((values, which, Vec::new()));
        }
        let mut kept = Vec::with_capacity(which.len());
        let mut dead = Vec::new();
        for i in which {
            match self.decode_values(records, &[i]) {
                Ok(_) => kept.push(i),
                Err(e) => dead.push(records.dead_letter(i, e.to_string())),
            }
        }
        Ok((self.decode_values(records, &kept)?, kept, dead))
    }

    /// The value columns of records `which`, exactly one row per record.
    fn decode_values(&self, records: &Records, which: &[usize]) -> Result<RecordBatch> {
        let schema = &self.value_schema;
        let batch = match self.format {
            Format::Text => {
                let texts = which
                    .iter()
                    .map(|&i| {
                        std::str::from_utf8(records.payload(i).unwrap_or_default()).map_err(|e| Error::InvalidValue {
                            code: "22021",
                            message: format!("the value is not UTF-8: {e}"),
                        })
                    })
                    .collect::<Result<Vec<&str>>>()?;
                RecordBatch::try_new(schema.clone(), vec![Arc::new(StringArray::from(texts))])?
            }
            Format::Bytes => {
                let bytes: Vec<&[u8]> = which.iter().map(|&i| records.payload(i).unwrap_or_default()).collect();
                RecordBatch::try_new(schema.clone(), vec![Arc::new(BinaryArray::from(bytes))])?
            }
            Format::Json | Format::Csv { .. } => {
                let mut body = Vec::with_capacity(which.len() * 64);
                for &i in which {
                    let payload = records.payload(i).unwrap_or_default();
                    if payload.contains(&b'\n') && self.format != Format::Json {
                        return Err(Error::InvalidValue {
                            code: "22P02",
                            message: "a CSV record holds a line break".into(),
                        });
                    }
                    body.extend_from_slice(payload);
                    body.push(b'\n');
                }
                let format = match self.format {
                    Format::Csv { .. } => Format::Csv { header: false },
                    other => other,
                };
                let batches = super::decode(format, schema, &body)?;
                concat_batches(schema, &batches)?
            }
            Format::Avro => match &self.avro {
                Some(avro) => avro.decode(which.iter().map(|&i| records.payload(i).unwrap_or_default()))?,
                None => return Err(Error::Internal("FORMAT AVRO without a schema".into())),
            },
            Format::Parquet => return Err(Error::not_supported("FORMAT PARQUET for Kafka records")),
        };
        if batch.num_rows() != which.len() {
            return Err(Error::InvalidValue {
                code: "22P02",
                message: format!("the value holds {} records, expected one", batch.num_rows()),
            });
        }
        Ok(batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(format: Format, include: &str) -> KafkaSource {
        let mut options = Options::new();
        options.insert("connector".into(), "kafka".into());
        options.insert("brokers".into(), "127.0.0.1:1".into());
        options.insert("topic".into(), "t".into());
        if !include.is_empty() {
            options.insert("include".into(), include.into());
        }
        KafkaSource::from_options(&options, format).expect("valid options")
    }

    #[test]
    fn bad_records_become_dead_letters_and_the_rest_decode() {
        let spec = spec(Format::Json, "partition, offset AS pos");
        let declared = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("name", DataType::Utf8, true),
        ]));
        let schema = spec.schema(Some(&declared)).expect("schema");
        assert_eq!(schema.field(3).name(), "pos");
        let decoder = RecordDecoder::new(spec.format, &schema, spec.include.iter().map(|(m, _)| *m).collect());
        let mut records = Records::default();
        records.push(0, 10, None, None, Some(br#"{"id": 1, "name": "a"}"#));
        records.push(0, 11, None, None, Some(br#"{"id": "x"}"#));
        records.push(1, 5, None, None, None);
        records.push(1, 6, None, None, Some(br#"{"id": 2}"#));
        records.push(2, 0, None, None, Some(br#"{"name": "no id"}"#));
        let (rows, dead) = decoder.decode(&records).expect("decoded");
        assert_eq!(rows.num_rows(), 2);
        let ids = rows.column(0).as_any().downcast_ref::<Int64Array>().expect("ids");
        assert_eq!(ids.values().as_ref(), &[1, 2]);
        let positions = rows.column(3).as_any().downcast_ref::<Int64Array>().expect("offsets");
        assert_eq!(positions.values().as_ref(), &[10, 6]);
        let at: Vec<(Option<i32>, Option<i64>)> = dead.iter().map(|d| (d.partition, d.offset)).collect();
        assert_eq!(at.len(), 3);
        assert!(
            at.contains(&(Some(0), Some(11))) && at.contains(&(Some(1), Some(5))) && at.contains(&(Some(2), Some(0)))
        );
        assert_eq!(records.last_offsets(), BTreeMap::from([(0, 11), (1, 6), (2, 0)]));
    }

    #[test]
    fn a_large_batch_decodes_on_several_threads_in_record_order() {
        let spec = spec(Format::Json, "offset");
        let declared = Arc::new(Schema::new(vec![Field::new("id", DataType::Int64, false)]));
        let schema = spec.schema(Some(&declared)).expect("schema");
        let decoder = RecordDecoder::new(spec.format, &schema, vec![Metadata::Offset]);
        let mut records = Records::default();
        let total = 5 * PARALLEL_SLICE as i64;
        // Every 1000th record is bad, so every slice holds some.
        for i in 0..total {
            let value = if i % 1000 == 999 { format!("{{\"id\": \"bad {i}\"}}") } else { format!("{{\"id\": {i}}}") };
            records.push((i % 3) as i32, i, None, None, Some(value.as_bytes()));
        }
        let (rows, dead) = decoder.decode(&records).expect("decoded");
        let expected: Vec<i64> = (0..total).filter(|i| i % 1000 != 999).collect();
        let ids = rows.column(0).as_any().downcast_ref::<Int64Array>().expect("ids");
        assert_eq!(ids.values().as_ref(), expected.as_slice());
        let offsets = rows.column(1).as_any().downcast_ref::<Int64Array>().expect("offsets");
        assert_eq!(offsets.values().as_ref(), expected.as_slice());
        let bad: Vec<i64> = dead.iter().filter_map(|d| d.offset).collect();
        assert_eq!(bad, (0..total).filter(|i| i % 1000 == 999).collect::<Vec<_>>());
    }

    #[test]
    fn text_sources_default_to_one_value_column() {
        let spec = spec(Format::Text, "key");
        let schema = spec.schema(None).expect("schema");
        assert_eq!(schema.fields().iter().map(|f| f.name().as_str()).collect::<Vec<_>>(), ["value", "_key"]);
        let wrong = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, true)]));
        assert!(spec.schema(Some(&wrong)).is_err());
    }
}
