//! Connectors: where a source's rows come from.
//!
//! Today: the built-in generators (`nexmark` and `telemetry`), for demos, tests and
//! benchmarks; `kafka` (every partition of a topic, see [`kafka`]); `mqtt` (a topic
//! filter, acknowledged once durable, see [`mqtt`]); `http` (records
//! posted to `/ingest/<source>`, decoded here from JSON lines or CSV); and `file` (local
//! files matching a glob: CSV, JSON lines or Parquet). A source's rows are appended to the
//! source's relation through the write-ahead log, together with the connector's position
//! (generator position, Kafka offsets), so a restart resumes exactly after the last
//! durable event: nothing is lost and nothing is read twice. Sinks ([`sink`]) write a
//! materialized view's changes out.

pub mod avro;
pub mod files;
pub mod generator;
pub mod kafka;
pub mod mqtt;
mod nexmark_columns;
pub mod sink;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};

/// A source's `WITH (…)` options, by lower-case name.
pub type Options = BTreeMap<String, String>;

/// An invalid or unknown connector option.
pub fn option_error(message: impl Into<String>) -> Error {
    Error::InvalidValue { code: "22023", message: message.into() }
}

/// Reads option `name` as a number, if given.
fn number<T: std::str::FromStr>(options: &Options, name: &str) -> Result<Option<T>> {
    options
        .get(name)
        .map(|v| {
            v.trim().parse::<T>().map_err(|_| option_error(format!("option {name} = '{v}' is not a valid number")))
        })
        .transpose()
}

/// How a connector's records are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One JSON object per line.
    Json,
    /// Comma-separated values, with or without a header line.
    Csv { header: bool },
    /// Parquet files (file sources only); columns are matched by name.
    Parquet,
    /// Each record is one UTF-8 text value (Kafka and MQTT).
    Text,
    /// Each record is one binary value (Kafka and MQTT).
    Bytes,
    /// Each record is one Avro datum of the schema in `avro.schema` (Kafka).
    Avro,
}

/// What a source's options describe.
#[derive(Debug, Clone, PartialEq)]
pub enum ConnectorSpec {
    /// A built-in generator: its own columns, rows appended by an ingest task.
    Generator(generator::GeneratorSpec),
    /// `POST /ingest/<source>` on the HTTP listener: records in the body, in `format`.
    Http { format: Format },
    /// Files matching `path` (a glob, local or an `s3://` URL), each read whole; with
    /// `watch`, new files are picked up as they appear.
    File { path: String, format: Format, watch: bool },
    /// Every partition of a Kafka topic.
    Kafka(kafka::KafkaSource),
    /// Messages on an MQTT topic filter.
    Mqtt(mqtt::MqttSource),
}

/// The column a file source adds: the file each row came from. Files are appended whole,
/// so the files a source has read are the distinct values of this column.
pub const FILE_COLUMN: &str = "_file";

/// The option saying how long a source keeps its rows.
pub const RETENTION: &str = "retention";

/// Whether a source keeps every row (`retention = 'all'`, the default) rather than only
/// those a checkpoint does not yet hold for its views (`retention = 'none'`).
pub fn retains_rows(options: &Options) -> Result<bool> {
    match options.get(RETENTION).map(|r| r.trim().to_ascii_lowercase()).as_deref() {
        None | Some("all") => Ok(true),
        Some("none") => Ok(false),
        Some(other) => Err(option_error(format!(
            "retention = '{other}' is not known: 'all' keeps every row (the default), 'none' forgets rows once a checkpoint holds them for every view reading the source"
        ))),
    }
}

impl ConnectorSpec {
    /// Parses a source's options; `declared` is whether the source lists its columns.
    pub fn from_options(options: &Options, declared: bool) -> Result<ConnectorSpec> {
        // `retention` is the source's, not the connector's.
        retains_rows(options)?;
        let mut options = options.clone();
        options.remove(RETENTION);
        let options = &options;
        if let Some(generator) = generator::GeneratorSpec::from_options(options)? {
            if declared {
                let connector = options.get("connector").cloned().unwrap_or_default();
                return Err(option_error(format!(
                    "the {connector} connector defines its own columns; leave out the column list"
                )));
            }
            return Ok(ConnectorSpec::Generator(generator));
        }
        match options.get("connector").map(|c| c.to_ascii_lowercase()).as_deref() {
            None => Err(option_error(
                "CREATE SOURCE needs WITH (connector = '…'); available: kafka, mqtt, nexmark, telemetry, http, file",
            )),
            Some("http") => {
                if !declared {
                    return Err(option_error("an http source needs its columns: CREATE SOURCE name (col TYPE, …)"));
                }
                let known = ["connector", "format", "header"];
                if let Some(unknown) = options.keys().find(|k| !known.contains(&k.as_str())) {
                    return Err(option_error(format!(
                        "option {unknown} is unknown for the http connector (known: format, header)"
                    )));
                }
                Ok(ConnectorSpec::Http { format: format(options)? })
            }
            Some("file") => {
                if !declared {
                    return Err(option_error("a file source needs its columns: CREATE SOURCE name (col TYPE, …)"));
                }
                let known = ["connector", "format", "header", "path", "watch"];
                if let Some(unknown) = options.keys().find(|k| !known.contains(&k.as_str())) {
                    return Err(option_error(format!(
                        "option {unknown} is unknown for the file connector (known: path, format, header, watch)"
                    )));
                }
                let path =
                    options.get("path").cloned().ok_or_else(|| option_error("a file source needs path = '…'"))?;
                // Checks the glob and, for an object-store URL, its scheme and bucket.
                files::FileSet::open(&path)?;
                let watch = flag(options, "watch")?;
                Ok(ConnectorSpec::File { path, format: format(options)?, watch })
            }
            Some("kafka") => Ok(ConnectorSpec::Kafka(kafka::KafkaSource::from_options(options, format(options)?)?)),
            Some("mqtt") => Ok(ConnectorSpec::Mqtt(mqtt::MqttSource::from_options(options, format(options)?)?)),
            Some(other) => Err(Error::NotSupported {
                feature: format!("the {other} connector"),
                hint: Some("connectors available today: kafka, mqtt, nexmark, telemetry, http, file".into()),
            }),
        }
    }
}

/// Option `name = 'true' | 'false'`, false when absent.
pub fn flag(options: &Options, name: &str) -> Result<bool> {
    match options.get(name).map(|v| v.to_ascii_lowercase()).as_deref() {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(other) => Err(option_error(format!("{name} = '{other}' must be 'true' or 'false'"))),
    }
}

/// `FORMAT JSON | CSV | PARQUET | TEXT | BYTES` (default JSON), with `header = 'true'` for CSV.
fn format(options: &Options) -> Result<Format> {
    let connector_is = |name: &str| options.get("connector").is_some_and(|c| c.eq_ignore_ascii_case(name));
    let header = flag(options, "header")?;
    match options.get("format").map(|f| f.to_ascii_lowercase()).as_deref() {
        None | Some("json") => Ok(Format::Json),
        Some("csv") => Ok(Format::Csv { header }),
        Some("parquet") if connector_is("file") => Ok(Format::Parquet),
        Some("text") if connector_is("kafka") || connector_is("mqtt") => Ok(Format::Text),
        Some("bytes") if connector_is("kafka") || connector_is("mqtt") => Ok(Format::Bytes),
        Some("avro") if connector_is("kafka") => Ok(Format::Avro),
        Some(other) => Err(Error::NotSupported {
            feature: format!("FORMAT {}", other.to_ascii_uppercase()),
            hint: Some(
                "formats available today: JSON (one object per line), CSV, Parquet for files, TEXT and BYTES for Kafka and MQTT, AVRO for Kafka"
                    .into(),
            ),
        }),
    }
}

/// JSON lines decoded together (a failing chunk is decoded line by line to name the line).
const JSON_CHUNK: usize = 4096;

/// Most bad records [`bad_records`] lists.
pub const MAX_LISTED_ERRORS: usize = 100;

/// A body that is one JSON array of objects, as JSON lines; other bodies as they are.
pub fn json_array_as_lines(body: &[u8]) -> Result<std::borrow::Cow<'_, [u8]>> {
    let start = body.iter().position(|b| !b.is_ascii_whitespace());
    if start.is_none_or(|i| body[i] != b'[') {
        return Ok(std::borrow::Cow::Borrowed(body));
    }
    let values: Vec<serde_json::Value> = serde_json::from_slice(body).map_err(|e| Error::InvalidValue {
        code: "22P02",
        message: format!("the body is not a JSON array of objects: {e}"),
    })?;
    let mut lines = Vec::with_capacity(body.len());
    for value in values {
        serde_json::to_writer(&mut lines, &value).map_err(|e| Error::Internal(format!("re-encoding JSON: {e}")))?;
        lines.push(b'\n');
    }
    Ok(std::borrow::Cow::Owned(lines))
}

/// Every record of `body` that does not decode (up to [`MAX_LISTED_ERRORS`]), as (line,
/// error); for error responses that list them all rather than the first.
pub fn bad_records(
    format: Format,
    schema: &datafusion::arrow::datatypes::SchemaRef,
    body: &[u8],
) -> Vec<(usize, String)> {
    use datafusion::arrow::json::ReaderBuilder as JsonReader;
    let mut bad = Vec::new();
    match format {
        Format::Json => {
            for (i, line) in body.split(|b| *b == b'\n').enumerate() {
                if line.iter().all(|b| b.is_ascii_whitespace()) {
                    continue;
                }
                let decoded = JsonReader::new(schema.clone())
                    .with_strict_mode(true)
                    .build_decoder()
                    .and_then(|mut d| d.decode(line).and_then(|_| d.flush()));
                if let Err(e) = decoded {
                    bad.push((i + 1, e.to_string()));
                    if bad.len() == MAX_LISTED_ERRORS {
                        break;
                    }
                }
            }
        }
        Format::Csv { header } => {
            for (i, line) in body.split(|b| *b == b'\n').enumerate().skip(usize::from(header)) {
                if line.iter().all(|b| b.is_ascii_whitespace()) {
                    continue;
                }
                if let Err(e) = decode(Format::Csv { header: false }, schema, line) {
                    let message = e.to_string();
                    bad.push((i + 1, message.strip_prefix("line 1: ").unwrap_or(&message).to_string()));
                    if bad.len() == MAX_LISTED_ERRORS {
                        break;
                    }
                }
            }
        }
        _ => {}
    }
    bad
}

/// Decodes `body` into rows of `schema`. A record that does not fit fails the whole body,
/// with its line number and what is wrong, so nothing is half ingested.
pub fn decode(
    format: Format,
    schema: &datafusion::arrow::datatypes::SchemaRef,
    body: &[u8],
) -> Result<Vec<datafusion::arrow::record_batch::RecordBatch>> {
    use datafusion::arrow::csv::ReaderBuilder as CsvReader;
    use datafusion::arrow::json::ReaderBuilder as JsonReader;
    let bad = |line: usize, e: &dyn std::fmt::Display| Error::InvalidValue {
        code: "22P02",
        message: if line == 0 { format!("invalid Parquet file: {e}") } else { format!("line {line}: {e}") },
    };
    match format {
        Format::Json => {
            let lines: Vec<(usize, &[u8])> = body
                .split(|b| *b == b'\n')
                .enumerate()
                .filter(|(_, line)| !line.iter().all(|b| b.is_ascii_whitespace()))
                .map(|(i, line)| (i + 1, line))
                .collect();
            let mut batches = Vec::new();
            for chunk in lines.chunks(JSON_CHUNK) {
                let mut decoder = JsonReader::new(schema.clone())
                    .with_strict_mode(true)
                    .with_batch_size(JSON_CHUNK)
                    .build_decoder()?;
                let mut decoded = Vec::new();
                // The decoder stops taking bytes when its batch is full: flush and go on.
                let fed = chunk.iter().try_for_each(|(_, line)| {
                    let mut rest: &[u8] = line;
                    while !rest.is_empty() {
                        let taken = decoder.decode(rest)?;
                        if taken == 0 {
                            decoded.extend(decoder.flush()?);
                        }
                        rest = &rest[taken..];
                    }
                    Ok(())
                });
                match fed.and_then(|_| decoder.flush()) {
                    Ok(batch) => {
                        batches.extend(decoded);
                        batches.extend(batch);
                    }
                    Err(_) => {
                        // Find the offending line: decode the chunk's lines one by one.
                        for (number, line) in chunk {
                            let mut single = JsonReader::new(schema.clone()).with_strict_mode(true).build_decoder()?;
                            single.decode(line).and_then(|_| single.flush()).map_err(|e| bad(*number, &e))?;
                        }
                        return Err(Error::Internal("a JSON chunk failed but none of its lines did".into()));
                    }
                }
            }
            Ok(batches)
        }
        Format::Parquet => {
            use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
            let reader = ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::copy_from_slice(body))
                .map_err(|e| bad(0, &e))?
                .build()
                .map_err(|e| bad(0, &e))?;
            let mut batches = Vec::new();
            for batch in reader {
                let batch = batch.map_err(|e| bad(0, &e))?;
                // Columns by name, cast to the declared types.
                let mut columns = Vec::with_capacity(schema.fields().len());
                for field in schema.fields() {
                    let column = batch.column_by_name(field.name()).ok_or_else(|| Error::InvalidValue {
                        code: "22P02",
                        message: format!("the Parquet file has no column \"{}\"", field.name()),
                    })?;
                    columns.push(datafusion::arrow::compute::cast(column, field.data_type())?);
                }
                batches.push(datafusion::arrow::record_batch::RecordBatch::try_new(schema.clone(), columns)?);
            }
            Ok(batches)
        }
        Format::Text | Format::Bytes | Format::Avro => {
            Err(Error::not_supported("FORMAT TEXT, BYTES and AVRO outside Kafka sources"))
        }
        Format::Csv { header } => {
            let reader = CsvReader::new(schema.clone()).with_header(header).build(std::io::Cursor::new(body))?;
            let mut batches = Vec::new();
            let mut line = usize::from(header) + 1;
            for batch in reader {
                let batch = batch.map_err(|e| bad(line, &e))?;
                line += batch.num_rows();
                batches.push(batch);
            }
            Ok(batches)
        }
    }
}

/// Most of a bad record kept in a dead letter.
pub const DEAD_LETTER_BYTES: usize = 1024;

/// A record a source could not decode: kept, with where it came from and why.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    pub partition: Option<i32>,
    pub offset: Option<i64>,
    pub error: String,
    /// The record's first [`DEAD_LETTER_BYTES`] bytes.
    pub raw: Vec<u8>,
    /// When it was read, in milliseconds since the epoch.
    pub at_ms: i64,
}

impl DeadLetter {
    pub fn new(partition: Option<i32>, offset: Option<i64>, error: String, raw: &[u8]) -> DeadLetter {
        DeadLetter {
            partition,
            offset,
            error,
            raw: raw[..raw.len().min(DEAD_LETTER_BYTES)].to_vec(),
            at_ms: chrono::Utc::now().timestamp_millis(),
        }
    }
}

/// What a connector has done since the server started, for `freshet_catalog.source_progress`
/// and `freshet_catalog.sinks`.
#[derive(Debug, Default)]
pub struct Progress {
    /// Records read (sources) or written (sinks).
    records: AtomicU64,
    bytes: AtomicU64,
    /// Failed attempts to reach a peer, or records a sink could not write.
    errors: AtomicU64,
    /// Sinks: retractions an append-only sink left out.
    skipped: AtomicU64,
    state: std::sync::Mutex<ProgressState>,
}

#[derive(Debug, Default, Clone)]
pub struct ProgressState {
    /// starting, running, retrying, stopped, finished.
    pub status: String,
    pub last_error: Option<String>,
    /// Kafka: each partition's high watermark (the durable next offsets are in the
    /// source's ledger).
    pub highs: BTreeMap<i32, i64>,
}

/// A snapshot of [`Progress`].
#[derive(Debug, Clone)]
pub struct ProgressReport {
    pub records: u64,
    pub bytes: u64,
    pub errors: u64,
    pub skipped: u64,
    pub state: ProgressState,
}

impl Progress {
    pub fn new() -> Progress {
        let progress = Progress::default();
        progress.state().status = "starting".into();
        progress
    }

    fn state(&self) -> std::sync::MutexGuard<'_, ProgressState> {
        match self.state.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// `records` records of `bytes` bytes read or written.
    pub fn read(&self, records: u64, bytes: u64) {
        self.records.fetch_add(records, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn set_status(&self, status: &str) {
        self.state().status = status.into();
    }

    pub fn skipped(&self, count: u64) {
        self.skipped.fetch_add(count, Ordering::Relaxed);
    }

    pub fn set_highs(&self, highs: BTreeMap<i32, i64>) {
        self.state().highs = highs;
    }

    /// A failed attempt that will be retried.
    pub fn failed_attempt(&self, error: &str) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut state = self.state();
        state.status = "retrying".into();
        state.last_error = Some(error.to_string());
    }

    /// Stopped for good, with why.
    pub fn stopped(&self, error: &str) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut state = self.state();
        state.status = "stopped".into();
        state.last_error = Some(error.to_string());
    }

    pub fn report(&self) -> ProgressReport {
        ProgressReport {
            records: self.records.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            skipped: self.skipped.load(Ordering::Relaxed),
            state: self.state().clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use datafusion::arrow::datatypes::{DataType, Field, Schema};

    use super::*;

    #[test]
    fn large_bodies_decode_every_record() {
        let schema = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false)]));
        for lines in [1, 1023, 1024, 1025, 4096, 4097, 10_000] {
            let body: String = (0..lines).map(|n| format!("{{\"n\": {n}}}\n")).collect();
            let rows: usize =
                decode(Format::Json, &schema, body.as_bytes()).expect("decodes").iter().map(|b| b.num_rows()).sum();
            assert_eq!(rows, lines, "JSON lines");
            let csv: String = (0..lines).map(|n| format!("{n}\n")).collect();
            let rows: usize = decode(Format::Csv { header: false }, &schema, csv.as_bytes())
                .expect("decodes")
                .iter()
                .map(|b| b.num_rows())
                .sum();
            assert_eq!(rows, lines, "CSV");
        }
    }
}
