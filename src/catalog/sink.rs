//! Sinks at run time: each sink follows its materialized view like `SUBSCRIBE` (the view's
//! rows first, then every epoch's change) and writes each epoch through its connector
//! before taking the next, so delivery is at least once: after a restart, or when the sink
//! fell so far behind that its subscription was cut off, it starts again from the view's
//! current rows.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::{Database, Outcome, Record};
use crate::connectors::sink::SinkSpec;
use crate::connectors::{Options, Progress};
use crate::error::{Error, Result};

/// A sink in the catalog.
pub struct SinkHandle {
    /// Creation order.
    pub id: u64,
    /// The materialized view it writes out.
    pub from: String,
    pub options: Options,
    pub progress: Arc<Progress>,
    task: Option<tokio::task::AbortHandle>,
}

impl SinkHandle {
    pub fn stop(&self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// Backoff between attempts to deliver an epoch, doubling up to the maximum.
const BACKOFF_START: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

impl Database {
    /// CREATE SINK name FROM view WITH (…).
    pub(super) async fn create_sink(
        &self,
        name: String,
        if_not_exists: bool,
        from: String,
        options: BTreeMap<String, String>,
    ) -> Result<Outcome> {
        let spec = SinkSpec::from_options(&options)?;
        let writer = self.shared.writer.lock().await;
        if self.shared.exists_already(&writer, &name, if_not_exists)? {
            return Ok(Outcome::Command { tag: "CREATE SINK", rows: None });
        }
        // A sink that cannot be opened is an error now, not in the log later.
        let schema = self.check_sink_input(&writer, &from)?;
        drop(spec.open(&name, &schema)?);
        let id = self.shared.sinks().values().map(|s| s.id + 1).max().unwrap_or(0);
        let entries =
            vec![Record::CreateSink { name: name.clone(), from: from.clone(), options: options.clone() }.entry(None)?];
        let ack = self.shared.log.enqueue(entries, Box::new(|_| {})).await?;
        drop(writer);
        ack.durable().await?;
        self.start_sink(id, name, from, options, spec);
        Ok(Outcome::Command { tag: "CREATE SINK", rows: None })
    }

    /// Starts a sink recorded in the log.
    pub(super) fn restore_sink(
        &self,
        id: u64,
        name: &str,
        from: &str,
        options: BTreeMap<String, String>,
    ) -> Result<()> {
        let spec = SinkSpec::from_options(&options)?;
        if !self.shared.views().contains_key(from) {
            return Err(Error::UndefinedTable { name: from.to_string(), position: None });
        }
        self.start_sink(id, name.to_string(), from.to_string(), options, spec);
        Ok(())
    }

    /// The view a sink reads must be materialized; returns its columns.
    fn check_sink_input(&self, writer: &super::Writer, from: &str) -> Result<datafusion::arrow::datatypes::SchemaRef> {
        match self.shared.kind_of(writer, from) {
            Some(crate::sql::RelationKind::MaterializedView) => {}
            Some(kind) => {
                return Err(Error::Plan {
                    code: "42809",
                    message: format!(
                        "\"{from}\" is a {}; a sink writes out a materialized view (CREATE MATERIALIZED VIEW … AS SELECT * FROM {from})",
                        kind.noun()
                    ),
                    position: None,
                });
            }
            None => return Err(Error::UndefinedTable { name: from.to_string(), position: None }),
        }
        let snapshot = self.shared.cell.committed();
        snapshot
            .views
            .get(from)
            .map(|v| v.def.schema.clone())
            .ok_or_else(|| Error::Internal(format!("materialized view \"{from}\" has no rows published yet")))
    }

    fn start_sink(&self, id: u64, name: String, from: String, options: BTreeMap<String, String>, spec: SinkSpec) {
        let progress = Arc::new(Progress::new());
        let task = tokio::spawn(run_sink(self.clone_weak(), name.clone(), from.clone(), spec, progress.clone()));
        let handle = SinkHandle { id, from, options, progress, task: Some(task.abort_handle()) };
        if let Some(old) = self.shared.sinks().insert(name, handle) {
            old.stop();
        }
    }
}

/// Follows view `from` and writes every epoch through the sink, until the sink is
/// dropped, the view goes away, or the database closes.
async fn run_sink(
    (ctx, shared): (datafusion::prelude::SessionContext, std::sync::Weak<super::Shared>),
    name: String,
    from: String,
    spec: SinkSpec,
    progress: Arc<Progress>,
) {
    loop {
        let (mut subscription, writer) = {
            let Some(shared) = shared.upgrade() else { return };
            let db = Database { ctx: ctx.clone(), shared };
            let view = db.shared.views().get(&from).cloned();
            let schema = db.shared.cell.committed().views.get(&from).map(|v| v.def.schema.clone());
            let (Some(view), Some(schema)) = (view, schema) else {
                progress.stopped(&format!("materialized view \"{from}\" is gone"));
                return;
            };
            let writer = match spec.open(&name, &schema) {
                Ok(writer) => writer,
                Err(e) => {
                    progress.stopped(&e.to_string());
                    return;
                }
            };
            match view.subscribers.subscribe(&from, &db.shared.cell, true) {
                Ok(subscription) => (subscription, writer),
                Err(e) => {
                    progress.failed_attempt(&e.to_string());
                    tokio::time::sleep(BACKOFF_START).await;
                    continue;
                }
            }
        };
        progress.set_status("running");
        tracing::info!(sink = %name, view = %from, to = %spec.target(), mode = spec.mode().name(), "sink writing");
        while let Some((epoch, change)) = subscription.changes.recv().await {
            let mut backoff = BACKOFF_START;
            let written = loop {
                match writer.write(epoch, &change).await {
                    Ok(written) => break written,
                    Err(e) => {
                        progress.failed_attempt(&e.to_string());
                        tracing::warn!(sink = %name, epoch, "sink could not write, retrying in {backoff:?}: {e}");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                    }
                }
            };
            progress.read(written.records, written.bytes);
            progress.skipped(written.skipped);
            progress.set_status("running");
        }
        if subscription.lagged.swap(false, Ordering::AcqRel) {
            tracing::warn!(sink = %name, "sink fell behind its view; writing the view's rows again, then following it");
            continue;
        }
        progress.stopped(&format!("materialized view \"{from}\" is gone"));
        return;
    }
}
