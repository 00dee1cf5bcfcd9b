//! Sinks at run time: each sink follows its materialized view like `SUBSCRIBE` (the view's
//! rows first, then every epoch's change) and writes each epoch through its connector
//! before taking the next, so delivery is at least once: after a restart, or when the sink
//! fell so far behind that its subscription was cut off, it starts again from the view's
//! current rows.
//!
//! An exactly-once sink instead takes what its view's outbox holds for it (see
//! [`super::outbox`]) each time a checkpoint holding the view is stored.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::{Database, Outcome, Record};
use crate::connectors::sink::{Resume, SinkSpec};
use crate::connectors::{Options, Progress};
use crate::dataflow::ChangeBatch;
use crate::error::{Error, Result};

/// A sink in the catalog.
pub struct SinkHandle {
    /// Creation order.
    pub id: u64,
    /// The materialized view it writes out.
    pub from: String,
    pub options: Options,
    pub progress: Arc<Progress>,
    pub exactly_once: bool,
    /// The checkpoint epoch through which an exactly-once sink delivered everything (0: none
    /// yet).
    pub delivered: Arc<AtomicU64>,
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
        let mut options = options;
        let mut spec = SinkSpec::from_options(&options)?;
        let writer = self.shared.writer.lock().await;
        if self.shared.exists_already(&writer, &name, if_not_exists)? {
            return Ok(Outcome::Command { tag: "CREATE SINK", rows: None });
        }
        // A sink that cannot be opened is an error now, not in the log later.
        let schema = self.check_sink_input(&writer, &from)?;
        if spec.exactly_once() {
            self.check_exactly_once(&from)?;
            if let SinkSpec::File(file) = &mut spec
                && file.prefix.is_none()
            {
                // Files are named the same after a restart, so a segment replaces its own file.
                let prefix = format!("{name}-{}", chrono::Utc::now().timestamp_millis());
                options.insert("prefix".into(), prefix.clone());
                file.prefix = Some(prefix);
            }
        }
        drop(spec.open(&name, &schema)?);
        let id = self.shared.sinks().values().map(|s| s.id + 1).max().unwrap_or(0);
        let entries =
            vec![Record::CreateSink { name: name.clone(), from: from.clone(), options: options.clone() }.entry(None)?];
        let ack = self.shared.log.enqueue(entries, Box::new(|_| {})).await?;
        drop(writer);
        ack.durable().await?;
        self.start_sink(id, name, from, options, spec, false);
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
        self.start_sink(id, name.to_string(), from.to_string(), options, spec, true);
        Ok(())
    }

    /// An exactly-once sink delivers at checkpoints, so checkpoints must be on and must
    /// hold the view.
    fn check_exactly_once(&self, from: &str) -> Result<()> {
        let refuse = |why: String| Error::Plan {
            code: "0A000",
            message: format!("an exactly_once sink cannot write \"{from}\": {why}"),
            position: None,
        };
        if self.shared.checkpoint_interval.is_none() {
            return Err(refuse(
                "checkpoints are off (--checkpoint-interval off), and it delivers at checkpoints".into(),
            ));
        }
        let reads_view = self.shared.views().get(from).is_some_and(|v| v.checkpointed.is_none());
        if reads_view {
            return Err(refuse(
                "it reads another materialized view, and such views are rebuilt rather than checkpointed".into(),
            ));
        }
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

    /// Starts a sink's task; `restarted` when it comes back from the log at start.
    fn start_sink(
        &self,
        id: u64,
        name: String,
        from: String,
        options: BTreeMap<String, String>,
        spec: SinkSpec,
        restarted: bool,
    ) {
        let progress = Arc::new(Progress::new());
        let delivered = Arc::new(AtomicU64::new(0));
        let exactly_once = spec.exactly_once();
        let task = match exactly_once {
            true => {
                let delivery = Delivery { progress: progress.clone(), delivered: delivered.clone(), restarted };
                tokio::spawn(run_exactly_once(self.clone_weak(), name.clone(), from.clone(), spec, delivery))
            }
            false => tokio::spawn(run_sink(self.clone_weak(), name.clone(), from.clone(), spec, progress.clone())),
        };
        let handle =
            SinkHandle { id, from, options, progress, exactly_once, delivered, task: Some(task.abort_handle()) };
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

/// What an exactly-once sink's task reports, and how it started.
struct Delivery {
    progress: Arc<Progress>,
    delivered: Arc<AtomicU64>,
    /// Restored from the log at start (not created just now).
    restarted: bool,
}

/// Stored checkpoints in a row that left the view out before an exactly-once sink gives up.
const LEFT_OUT_MAX: u32 = 3;

/// Delivers view `from`'s outbox for exactly-once sink `name`: each stored checkpoint that
/// holds the view releases the segments up to it, delivered oldest first, each skipped if
/// the target already holds it. Runs until the sink or the view is dropped.
async fn run_exactly_once(
    (ctx, shared): (datafusion::prelude::SessionContext, std::sync::Weak<super::Shared>),
    name: String,
    from: String,
    spec: SinkSpec,
    delivery: Delivery,
) {
    let progress = &delivery.progress;
    let attached = {
        let Some(shared) = shared.upgrade() else { return };
        let db = Database { ctx: ctx.clone(), shared };
        let view = db.shared.views().get(&from).map(|v| (v.id, v.subscribers.clone(), v.restored_from));
        let schema = db.shared.cell.committed().views.get(&from).map(|v| v.def.schema.clone());
        let (Some((id, subscribers, restored_from)), Some(schema)) = (view, schema) else {
            progress.stopped(&format!("materialized view \"{from}\" is gone"));
            return;
        };
        // The barrier after this one is the first whose checkpoint can hold a new outbox.
        let attached_after = db.shared.epoch.load(Ordering::Acquire);
        let restored = match subscribers.attach_outbox(&name, &from, &db.shared.cell) {
            Ok(restored) => restored,
            Err(e) => {
                progress.stopped(&format!("reading the rows of \"{from}\": {e}"));
                return;
            }
        };
        // A restored outbox holds segments the restored checkpoint stored.
        let stored_through = if restored { restored_from.unwrap_or(0) } else { 0 };
        let started_over = delivery.restarted && !restored;
        // Segments in the target sealed after the restored checkpoint were delivered from a
        // newer one that could not be used (damaged): the view replays their changes.
        let replayed_after = if restored { restored_from } else { None };
        let stored_checkpoints = db.shared.checkpoints.watch_stored();
        (id, subscribers, schema, attached_after, stored_through, started_over, replayed_after, stored_checkpoints)
    };
    let (id, subscribers, schema, attached_after, mut through, mut started_over, mut replayed_after, mut stored) =
        attached;
    // What the target holds of replayed changes (negated), taken off the first segment
    // sealed after them, and the last epoch it holds them up to.
    let mut owed: Option<(u64, ChangeBatch)> = None;
    tracing::info!(sink = %name, view = %from, to = %spec.target(), mode = spec.mode().name(), "exactly-once sink writing at checkpoints");
    let mut writer: Option<(crate::connectors::sink::SinkWriter, Resume)> = None;
    let mut left_out = 0;
    loop {
        if through > 0 {
            let segments = subscribers.outbox_through(&name, through);
            let mut backoff = BACKOFF_START;
            let mut remaining = segments.as_slice();
            while let Some((epoch, change)) = remaining.first() {
                let result = async {
                    let (open, resume) = match &mut writer {
                        Some(open) => open,
                        None => {
                            let opened = spec.open(&name, &schema)?;
                            let resume = opened.begin_exactly_once().await?;
                            let last = resume.epoch;
                            if std::mem::take(&mut started_over) && last > 0 {
                                // No checkpoint held this sink's outbox, yet the target has segments.
                                let warning = format!(
                                    "view \"{from}\" came back without this sink's outbox, so its rows are delivered again from the start after epoch {last}"
                                );
                                tracing::warn!(sink = %name, "{warning}");
                                progress.failed_attempt(&warning);
                            }
                            // Cleared only once read, so a failed read is tried again.
                            if let Some(restored) = replayed_after {
                                match opened.written_after(restored, &schema).await? {
                                    Some((epochs, written)) if !epochs.is_empty() => {
                                        let last = epochs.last().copied().unwrap_or(restored);
                                        tracing::info!(sink = %name, "view \"{from}\" came back from checkpoint {restored}, older than the segments up to {last} this sink wrote: their rows are taken off what it writes next");
                                        owed = Some((last, written.negated()));
                                    }
                                    Some(_) => {}
                                    None if last > restored => {
                                        let warning = format!(
                                            "view \"{from}\" came back from checkpoint {restored}, older than segment {last} this sink delivered (a newer checkpoint could not be used), so its changes after epoch {restored} are delivered again"
                                        );
                                        tracing::warn!(sink = %name, "{warning}");
                                        progress.failed_attempt(&warning);
                                    }
                                    None => {}
                                }
                                replayed_after = None;
                            }
                            writer.insert((opened, resume))
                        }
                    };
                    if *epoch < resume.epoch {
                        return Ok(None); // the target holds it whole
                    }
                    let settled;
                    let change = match &owed {
                        Some((last, written)) if epoch > last => {
                            settled = ChangeBatch::concat(&schema, &[change.clone(), written.clone()])?.consolidate()?;
                            &settled
                        }
                        _ => change,
                    };
                    let written = open.deliver_segment(*epoch, change, resume).await?;
                    if owed.as_ref().is_some_and(|(last, _)| epoch > last) {
                        owed = None;
                    }
                    *resume = Resume { epoch: *epoch + 1, present: Default::default() };
                    Ok::<_, Error>(Some(written))
                }
                .await;
                match result {
                    Ok(written) => {
                        if let Some(written) = written {
                            progress.read(written.records, written.bytes);
                            progress.skipped(written.skipped);
                        }
                        remaining = &remaining[1..];
                        backoff = BACKOFF_START;
                    }
                    Err(e) => {
                        // Opened again for the next try, reading back what the failed
                        // attempt delivered.
                        writer = None;
                        progress.failed_attempt(&e.to_string());
                        tracing::warn!(sink = %name, epoch, "sink could not deliver, retrying in {backoff:?}: {e}");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                    }
                }
            }
            subscribers.outbox_delivered(&name, through);
            delivery.delivered.store(through, Ordering::Release);
            progress.set_status("running");
        }
        // The next stored checkpoint holding the view; the view going away ends the sink.
        loop {
            let gone = match shared.upgrade() {
                None => true,
                Some(shared) => shared.views().get(&from).is_none_or(|v| v.id != id),
            };
            if gone {
                progress.stopped(&format!("materialized view \"{from}\" is gone"));
                return;
            }
            match tokio::time::timeout(Duration::from_secs(1), stored.changed()).await {
                Ok(Err(_)) => return, // the database closed
                Err(_) => continue,
                Ok(Ok(())) => {}
            }
            let last = stored.borrow_and_update().clone();
            if last.epoch <= attached_after.max(through) {
                continue;
            }
            if last.views.contains(&id) {
                left_out = 0;
                through = last.epoch;
                break;
            }
            left_out += 1;
            if left_out >= LEFT_OUT_MAX {
                let failure = format!(
                    "materialized view \"{from}\" was left out of {LEFT_OUT_MAX} checkpoints in a row (see freshet_catalog.checkpoints), so this sink cannot deliver exactly once; drop it and create it without exactly_once"
                );
                tracing::error!(sink = %name, "{failure}");
                subscribers.detach_outbox(&name);
                progress.stopped(&failure);
                return;
            }
        }
    }
}
