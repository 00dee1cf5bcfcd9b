//! `freshet_catalog`: what the connectors are doing, as relations to query.
//!
//! - `source_progress`: one row per source, or per partition of a Kafka source: the durable
//!   position (next offset), the partition's high watermark and the lag between them, rows
//!   held, records and bytes read since the server started, dead letters, errors, status
//!   and the last error.
//! - `dead_letters`: the latest records each source could not decode (up to
//!   [`super::source::DEAD_LETTERS_KEPT`] per source), with where they came from and why.
//! - `sinks`: per sink, messages and bytes written, retractions left out by append mode,
//!   errors, status and the last error.
//! - `snapshots`: the state snapshots written (or attempted) since the server started: the
//!   log position each covers, when, how long it took, its size, the rows it holds, and the
//!   error of a failed one.
//! - `checkpoints`: the checkpoints of views' operator states taken (or attempted) since the
//!   server started: the barrier epoch, when, how long it took, the views it holds and
//!   those left out (rebuilt from their inputs after a restart), its size, and the error of
//!   a failed one.
//! - `views`: per materialized view, the epoch of the last checkpoint that holds it (NULL:
//!   none since start; its operators may not be checkpointable), the checkpoint epoch it
//!   was restored from when the server started (NULL: rebuilt from its inputs, or created
//!   since), and why it failed, if it did.
//! - `late_events`: per materialized view and input with a watermark, the rows dropped as
//!   late (event time below the watermark), the input's current watermark and the event
//!   time of the last late row.
//!
//! Each relation is computed when a query plans it.

use std::sync::{Arc, Weak};

use async_trait::async_trait;
use datafusion::arrow::array::{
    ArrayRef, BooleanArray, Int32Array, Int64Array, RecordBatch, StringArray, TimestampMillisecondArray,
};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::catalog::{SchemaProvider, TableProvider};
use datafusion::datasource::MemTable;
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::prelude::SessionContext;

use super::{CATALOG_NAME, Shared};
use crate::connectors::ConnectorSpec;
use crate::error::{Error, Result};

/// The schema's name.
pub const SCHEMA: &str = "freshet_catalog";
pub(super) const TABLES: [&str; 7] =
    ["source_progress", "dead_letters", "sinks", "snapshots", "checkpoints", "views", "late_events"];

/// Most snapshot attempts `snapshots` remembers.
pub(super) const SNAPSHOT_HISTORY: usize = 100;

/// One snapshot attempt.
pub(super) struct SnapshotRecord {
    /// The log segment it covers up to.
    pub seq: u64,
    pub started_at: chrono::DateTime<chrono::Utc>,
    pub duration: std::time::Duration,
    /// Rows of tables and sources it holds.
    pub rows: u64,
    /// Its size in bytes, or why it failed.
    pub result: std::result::Result<u64, String>,
}

pub fn install(ctx: &SessionContext, shared: Weak<Shared>) -> Result<()> {
    let catalog =
        ctx.catalog(CATALOG_NAME).ok_or_else(|| Error::Internal("the freshet catalog is not registered".into()))?;
    catalog.register_schema(SCHEMA, Arc::new(Status { shared }))?;
    Ok(())
}

#[derive(Debug)]
struct Status {
    shared: Weak<Shared>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Shared")
    }
}

#[async_trait]
impl SchemaProvider for Status {
    fn table_names(&self) -> Vec<String> {
        TABLES.iter().map(|t| t.to_string()).collect()
    }

    async fn table(&self, name: &str) -> DfResult<Option<Arc<dyn TableProvider>>> {
        let Some(shared) = self.shared.upgrade() else { return Ok(None) };
        let batch = match name {
            "source_progress" => source_progress(&shared),
            "dead_letters" => dead_letters(&shared),
            "sinks" => sinks(&shared),
            "snapshots" => snapshots(&shared),
            "checkpoints" => checkpoints(&shared),
            "views" => views(&shared),
            "late_events" => late_events(&shared),
            _ => return Ok(None),
        }
        .map_err(|e| DataFusionError::External(Box::new(e)))?;
        Ok(Some(Arc::new(MemTable::try_new(batch.schema(), vec![vec![batch]])?)))
    }

    fn table_exist(&self, name: &str) -> bool {
        TABLES.contains(&name)
    }
}

fn text(name: &str, nullable: bool) -> Field {
    Field::new(name, DataType::Utf8, nullable)
}

fn big(name: &str, nullable: bool) -> Field {
    Field::new(name, DataType::Int64, nullable)
}

fn source_progress(shared: &Shared) -> Result<RecordBatch> {
    let schema: SchemaRef = Arc::new(Schema::new(vec![
        text("source", false),
        text("connector", false),
        Field::new("partition", DataType::Int32, true),
        big("next_offset", true),
        big("high_watermark", true),
        big("lag", true),
        big("rows", false),
        big("records_read", false),
        big("bytes_read", false),
        big("dead_letters", false),
        big("errors", false),
        text("status", false),
        text("last_error", true),
    ]));
    let snapshot = shared.cell.committed();
    let mut rows: Vec<Row> = Vec::new();
    for (name, source) in shared.sources().iter() {
        let report = source.progress.report();
        let version = snapshot.tables.get(name);
        let held = version.map_or(0, |v| v.num_rows() as i64);
        let ledger = version.and_then(|v| v.ledger.clone());
        let connector = source.options.get("connector").cloned().unwrap_or_default().to_ascii_lowercase();
        let generator = matches!(ConnectorSpec::from_options(&source.options, false), Ok(ConnectorSpec::Generator(_)));
        let base = Row {
            source: name.clone(),
            connector,
            partition: None,
            next_offset: generator.then_some(held),
            high: None,
            rows: held,
            read: report.records as i64,
            bytes: report.bytes as i64,
            dead: ledger.as_ref().map_or(0, |l| l.dead_letter_count as i64),
            errors: report.errors as i64,
            status: report.state.status.clone(),
            last_error: report.state.last_error.clone(),
        };
        match ledger.as_ref().filter(|l| !l.offsets.is_empty()) {
            Some(ledger) => {
                for (&partition, &offset) in &ledger.offsets {
                    rows.push(Row {
                        partition: Some(partition),
                        next_offset: Some(offset),
                        high: report.state.highs.get(&partition).copied(),
                        ..base.clone()
                    });
                }
            }
            None => rows.push(base),
        }
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.source.as_str()))),
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.connector.as_str()))),
        Arc::new(Int32Array::from_iter(rows.iter().map(|r| r.partition))),
        Arc::new(Int64Array::from_iter(rows.iter().map(|r| r.next_offset))),
        Arc::new(Int64Array::from_iter(rows.iter().map(|r| r.high))),
        Arc::new(Int64Array::from_iter(rows.iter().map(|r| Some((r.high? - r.next_offset?).max(0))))),
        Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.rows))),
        Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.read))),
        Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.bytes))),
        Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.dead))),
        Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.errors))),
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.status.as_str()))),
        Arc::new(StringArray::from_iter(rows.iter().map(|r| r.last_error.as_deref()))),
    ];
    Ok(RecordBatch::try_new(schema, columns)?)
}

#[derive(Clone)]
struct Row {
    source: String,
    connector: String,
    partition: Option<i32>,
    next_offset: Option<i64>,
    high: Option<i64>,
    rows: i64,
    read: i64,
    bytes: i64,
    dead: i64,
    errors: i64,
    status: String,
    last_error: Option<String>,
}

fn dead_letters(shared: &Shared) -> Result<RecordBatch> {
    let schema: SchemaRef = Arc::new(Schema::new(vec![
        text("source", false),
        Field::new("partition", DataType::Int32, true),
        big("offset", true),
        text("error", false),
        text("raw", false),
        Field::new("received_at", DataType::Timestamp(TimeUnit::Millisecond, Some("+00:00".into())), false),
    ]));
    let snapshot = shared.cell.committed();
    let sources: Vec<String> = shared.sources().keys().cloned().collect();
    let mut letters = Vec::new();
    for name in sources {
        if let Some(ledger) = snapshot.tables.get(&name).and_then(|v| v.ledger.clone()) {
            letters.extend(ledger.dead_letters.iter().map(|d| (name.clone(), d.clone())));
        }
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(letters.iter().map(|(s, _)| s.as_str()))),
        Arc::new(Int32Array::from_iter(letters.iter().map(|(_, d)| d.partition))),
        Arc::new(Int64Array::from_iter(letters.iter().map(|(_, d)| d.offset))),
        Arc::new(StringArray::from_iter_values(letters.iter().map(|(_, d)| d.error.as_str()))),
        Arc::new(StringArray::from_iter_values(
            letters.iter().map(|(_, d)| String::from_utf8_lossy(&d.raw).into_owned()),
        )),
        Arc::new(
            TimestampMillisecondArray::from_iter_values(letters.iter().map(|(_, d)| d.at_ms)).with_timezone("+00:00"),
        ),
    ];
    Ok(RecordBatch::try_new(schema, columns)?)
}

fn sinks(shared: &Shared) -> Result<RecordBatch> {
    let schema: SchemaRef = Arc::new(Schema::new(vec![
        text("sink", false),
        text("view", false),
        text("connector", false),
        text("target", true),
        text("mode", false),
        big("messages_written", false),
        big("bytes_written", false),
        big("retractions_skipped", false),
        big("errors", false),
        text("status", false),
        text("last_error", true),
        Field::new("exactly_once", DataType::Boolean, false),
        big("delivered_epoch", true),
        big("waiting_rows", true),
    ]));
    // One lock at a time: sinks, then views.
    let outboxes: Vec<Option<(String, String)>> =
        shared.sinks().iter().map(|(name, s)| s.exactly_once.then(|| (name.clone(), s.from.clone()))).collect();
    let waiting: Vec<Option<i64>> = {
        let views = shared.views();
        let rows = |(name, from): &(String, String)| Some(views.get(from)?.subscribers.outbox_rows(name) as i64);
        outboxes.iter().map(|o| o.as_ref().and_then(rows)).collect()
    };
    let sinks = shared.sinks();
    let list: Vec<(&String, &super::sink::SinkHandle, crate::connectors::ProgressReport)> =
        sinks.iter().map(|(n, s)| (n, s, s.progress.report())).collect();
    let option = |s: &super::sink::SinkHandle, name: &str, default: &str| {
        s.options.get(name).cloned().unwrap_or_else(|| default.to_string())
    };
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(list.iter().map(|(n, _, _)| n.as_str()))),
        Arc::new(StringArray::from_iter_values(list.iter().map(|(_, s, _)| s.from.as_str()))),
        Arc::new(StringArray::from_iter_values(list.iter().map(|(_, s, _)| option(s, "connector", "")))),
        Arc::new(StringArray::from_iter(
            list.iter().map(|(_, s, _)| s.options.get("topic").or(s.options.get("path")).cloned()),
        )),
        Arc::new(StringArray::from_iter_values(list.iter().map(|(_, s, _)| option(s, "mode", "append")))),
        Arc::new(Int64Array::from_iter_values(list.iter().map(|(_, _, r)| r.records as i64))),
        Arc::new(Int64Array::from_iter_values(list.iter().map(|(_, _, r)| r.bytes as i64))),
        Arc::new(Int64Array::from_iter_values(list.iter().map(|(_, _, r)| r.skipped as i64))),
        Arc::new(Int64Array::from_iter_values(list.iter().map(|(_, _, r)| r.errors as i64))),
        Arc::new(StringArray::from_iter_values(list.iter().map(|(_, _, r)| r.state.status.clone()))),
        Arc::new(StringArray::from_iter(list.iter().map(|(_, _, r)| r.state.last_error.clone()))),
        Arc::new(BooleanArray::from_iter(list.iter().map(|(_, s, _)| Some(s.exactly_once)))),
        Arc::new(Int64Array::from_iter(list.iter().map(|(_, s, _)| {
            s.exactly_once.then(|| s.delivered.load(std::sync::atomic::Ordering::Acquire) as i64).filter(|&e| e > 0)
        }))),
        Arc::new(Int64Array::from(waiting)),
    ];
    Ok(RecordBatch::try_new(schema, columns)?)
}

fn snapshots(shared: &Shared) -> Result<RecordBatch> {
    let schema: SchemaRef = Arc::new(Schema::new(vec![
        big("log_position", false),
        Field::new("started_at", DataType::Timestamp(TimeUnit::Millisecond, Some("+00:00".into())), false),
        big("duration_ms", false),
        big("bytes", true),
        big("rows", false),
        text("status", false),
        text("error", true),
    ]));
    let history = shared.snapshots.lock().unwrap_or_else(|p| p.into_inner());
    let columns: Vec<ArrayRef> = vec![
        Arc::new(Int64Array::from_iter_values(history.iter().map(|r| r.seq as i64))),
        Arc::new(
            TimestampMillisecondArray::from_iter_values(history.iter().map(|r| r.started_at.timestamp_millis()))
                .with_timezone("+00:00"),
        ),
        Arc::new(Int64Array::from_iter_values(history.iter().map(|r| r.duration.as_millis() as i64))),
        Arc::new(Int64Array::from_iter(history.iter().map(|r| r.result.as_ref().ok().map(|b| *b as i64)))),
        Arc::new(Int64Array::from_iter_values(history.iter().map(|r| r.rows as i64))),
        Arc::new(StringArray::from_iter_values(history.iter().map(|r| if r.result.is_ok() { "ok" } else { "failed" }))),
        Arc::new(StringArray::from_iter(history.iter().map(|r| r.result.as_ref().err().cloned()))),
    ];
    Ok(RecordBatch::try_new(schema, columns)?)
}

fn checkpoints(shared: &Shared) -> Result<RecordBatch> {
    let schema: SchemaRef = Arc::new(Schema::new(vec![
        big("epoch", false),
        Field::new("started_at", DataType::Timestamp(TimeUnit::Millisecond, Some("+00:00".into())), false),
        big("duration_ms", false),
        big("views", false),
        big("views_left_out", false),
        big("bytes", true),
        big("state_bytes", true),
        text("status", false),
        text("error", true),
    ]));
    let history = shared.checkpoints.history();
    let columns: Vec<ArrayRef> = vec![
        Arc::new(Int64Array::from_iter_values(history.iter().map(|r| r.epoch as i64))),
        Arc::new(
            TimestampMillisecondArray::from_iter_values(history.iter().map(|r| r.started_at.timestamp_millis()))
                .with_timezone("+00:00"),
        ),
        Arc::new(Int64Array::from_iter_values(history.iter().map(|r| r.duration.as_millis() as i64))),
        Arc::new(Int64Array::from_iter_values(history.iter().map(|r| r.views as i64))),
        Arc::new(Int64Array::from_iter_values(history.iter().map(|r| r.views_left_out as i64))),
        Arc::new(Int64Array::from_iter(history.iter().map(|r| r.result.as_ref().ok().map(|b| b.0 as i64)))),
        Arc::new(Int64Array::from_iter(history.iter().map(|r| r.result.as_ref().ok().map(|b| b.1 as i64)))),
        Arc::new(StringArray::from_iter_values(history.iter().map(|r| if r.result.is_ok() { "ok" } else { "failed" }))),
        Arc::new(StringArray::from_iter(history.iter().map(|r| r.result.as_ref().err().cloned()))),
    ];
    Ok(RecordBatch::try_new(schema, columns)?)
}

fn views(shared: &Shared) -> Result<RecordBatch> {
    let schema: SchemaRef = Arc::new(Schema::new(vec![
        text("view", false),
        big("last_checkpoint_epoch", true),
        big("restored_from_epoch", true),
        text("failure", true),
        big("state_memory_bytes", false),
        big("state_spilled_bytes", false),
    ]));
    let views = shared.views();
    let usage: Vec<(u64, u64)> = views.values().map(|v| shared.spill.pool.view_usage(v.id)).collect();
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(views.keys().cloned())),
        Arc::new(Int64Array::from_iter(
            views.values().map(|v| shared.checkpoints.last_holding(v.id).map(|e| e as i64)),
        )),
        Arc::new(Int64Array::from_iter(views.values().map(|v| v.restored_from.map(|e| e as i64)))),
        Arc::new(StringArray::from_iter(views.values().map(|v| v.failures.get()))),
        Arc::new(Int64Array::from_iter_values(usage.iter().map(|u| u.0 as i64))),
        Arc::new(Int64Array::from_iter_values(usage.iter().map(|u| u.1 as i64))),
    ];
    Ok(RecordBatch::try_new(schema, columns)?)
}

fn late_events(shared: &Shared) -> Result<RecordBatch> {
    let time = |name: &str| Field::new(name, DataType::Timestamp(TimeUnit::Millisecond, Some("+00:00".into())), true);
    let schema: SchemaRef = Arc::new(Schema::new(vec![
        text("source", false),
        text("view", false),
        big("late_rows", false),
        time("watermark"),
        time("last_late_event_time"),
    ]));
    // A view that reads an input twice (a self-join, HOP's shifted windows) has a counter
    // per read; each sees the same rows, so they are one line.
    type Line = (u64, Option<i64>, Option<i64>);
    let mut lines: std::collections::BTreeMap<(String, String), Line> = std::collections::BTreeMap::new();
    for counter in shared.views().values().flat_map(|v| v.late.iter().cloned()) {
        let line = (counter.rows(), counter.watermark(), counter.last_late());
        lines
            .entry((counter.input.clone(), counter.view.clone()))
            .and_modify(|(rows, watermark, last)| {
                *rows = (*rows).max(line.0);
                *watermark = (*watermark).min(line.1);
                *last = (*last).max(line.2);
            })
            .or_insert(line);
    }
    let timestamps =
        |values: Vec<Option<i64>>| Arc::new(TimestampMillisecondArray::from(values).with_timezone("+00:00"));
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(lines.keys().map(|(input, _)| input.clone()))),
        Arc::new(StringArray::from_iter_values(lines.keys().map(|(_, view)| view.clone()))),
        Arc::new(Int64Array::from_iter_values(lines.values().map(|l| l.0 as i64))),
        timestamps(lines.values().map(|l| l.1).collect()),
        timestamps(lines.values().map(|l| l.2).collect()),
    ];
    Ok(RecordBatch::try_new(schema, columns)?)
}
