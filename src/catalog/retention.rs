//! Sources that forget rows: `retention = 'none'` keeps a source's rows only until a
//! checkpoint holds them for every view that reads the source.
//!
//! Once checkpoint E is stored, each such source whose every reading view is in E forgets
//! the rows before E's log entry (a `Trim` record in the log, so a restart forgets the
//! same rows). Views restored from E need only the rows after its entry, which the log
//! keeps: log snapshots are cut at a stored checkpoint's entry ([`super::checkpoint::Cut`])
//! and end with that entry, so restarting after a snapshot still restores from a
//! checkpoint. A view that cannot be checkpointed (DataFusion's own aggregates) or that
//! is missing from the checkpoint keeps its sources' rows. After a restart a view reading a
//! source that forgot rows must come back from a checkpoint; if it cannot, it is marked
//! failed with the reason instead of being rebuilt from part of its input.

use std::collections::HashSet;
use std::sync::Arc;

use super::checkpoint::Cut;
use super::{Record, Shared};
use crate::connectors::retains_rows;
use crate::error::Result;

/// The last stored checkpoint's cut, and the sources it let forget their rows.
pub(super) type StoredCut = (Arc<Cut>, HashSet<String>);

impl Shared {
    /// Sources with `retention = 'none'`.
    pub(super) fn forgetting_sources(&self) -> Vec<(String, u64)> {
        self.sources()
            .iter()
            .filter(|(_, s)| retains_rows(&s.options).is_ok_and(|keeps| !keeps))
            .map(|(name, s)| (name.clone(), s.id))
            .collect()
    }

    /// After a checkpoint is stored: the sources whose every reading view it holds forget
    /// the rows before its entry.
    pub(super) async fn trim_sources(&self) -> Result<()> {
        let Some((cut, stored)) = self.checkpoints.take_stored() else { return Ok(()) };
        let mut trimmable = HashSet::new();
        {
            let views = self.views();
            for (name, id) in self.forgetting_sources() {
                let Some(version) = cut.tables.relation(&name) else { continue };
                let readers_held = views.values().filter(|v| v.inputs.contains(&name)).all(|v| stored.contains(&v.id));
                if version.def.id == id && readers_held {
                    trimmable.insert(name);
                }
            }
        }
        *self.stored_cut.lock().unwrap_or_else(|p| p.into_inner()) = Some((cut.clone(), trimmable.clone()));
        let mut writer = self.writer.lock().await;
        let mut entries = Vec::new();
        for name in &trimmable {
            let before = cut.tables.relation(name).map_or(0, |v| v.appended());
            if writer.tables.get(name).is_none_or(|t| t.trimmed() >= before) {
                continue;
            }
            writer.trim(name, before)?;
            entries.push(Record::Trim { table: name.clone(), before }.entry(None)?);
        }
        if entries.is_empty() {
            return Ok(());
        }
        let working = writer.working.clone();
        let cell = self.cell.clone();
        let publish = Box::new(move |seq| cell.publish_tables(working.tables.clone(), seq));
        let ack = self.log.enqueue(entries, publish).await?;
        drop(writer);
        ack.durable().await?;
        Ok(())
    }
}
