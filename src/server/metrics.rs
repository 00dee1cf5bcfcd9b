//! Counters the server keeps and `/metrics` exports in Prometheus text format.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::catalog::Database;

/// Server-wide counters. Cheap atomics, updated on every statement and connection.
#[derive(Debug, Default)]
pub struct Metrics {
    pub connections_accepted: AtomicU64,
    pub connections_open: AtomicU64,
    pub connection_errors: AtomicU64,
    pub statements: AtomicU64,
    pub statement_errors: AtomicU64,
    pub statements_running: AtomicU64,
    pub rows_inserted: AtomicU64,
}

/// Decrements `statements_running` when a statement ends, however it ends.
pub struct RunningStatement<'a>(&'a AtomicU64);

impl Drop for RunningStatement<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Metrics {
    /// Marks a statement as running until the returned guard is dropped.
    pub fn statement_started(&self) -> RunningStatement<'_> {
        self.statements_running.fetch_add(1, Ordering::AcqRel);
        RunningStatement(&self.statements_running)
    }

    /// Renders every metric, including the database's, in Prometheus text format.
    pub fn render(&self, db: &Database) -> String {
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
        };
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        metric(
            "freshet_connections_accepted_total",
            "counter",
            "Postgres connections accepted.",
            get(&self.connections_accepted),
        );
        metric(
            "freshet_connections_open",
            "gauge",
            "Postgres connections currently open.",
            get(&self.connections_open),
        );
        metric(
            "freshet_connection_errors_total",
            "counter",
            "Connections that ended with a protocol or I/O error.",
            get(&self.connection_errors),
        );
        metric("freshet_statements_total", "counter", "Statements received.", get(&self.statements));
        metric("freshet_statement_errors_total", "counter", "Statements that failed.", get(&self.statement_errors));
        metric("freshet_statements_running", "gauge", "Statements executing now.", get(&self.statements_running));
        metric("freshet_rows_inserted_total", "counter", "Rows inserted into tables.", get(&self.rows_inserted));
        let log = db.log_stats();
        metric(
            "freshet_log_segments_written_total",
            "counter",
            "Write-ahead log segments stored (one per group commit).",
            get(&log.segments_written),
        );
        metric(
            "freshet_log_appends_committed_total",
            "counter",
            "Writes made durable by the log.",
            get(&log.appends_committed),
        );
        metric(
            "freshet_log_bytes_written_total",
            "counter",
            "Bytes written to the log and snapshots.",
            get(&log.bytes_written),
        );
        metric("freshet_log_last_sequence", "gauge", "Sequence number of the newest log segment.", get(&log.last_seq));
        metric(
            "freshet_snapshot_sequence",
            "gauge",
            "Log sequence covered by the newest snapshot.",
            get(&log.snapshot_seq),
        );
        let _ = writeln!(out, "# HELP freshet_table_rows Rows in each table.\n# TYPE freshet_table_rows gauge");
        for (table, rows) in db.table_rows() {
            let _ = writeln!(
                out,
                "freshet_table_rows{{table=\"{}\"}} {rows}",
                table.replace('\\', "\\\\").replace('"', "\\\"")
            );
        }
        out
    }
}
