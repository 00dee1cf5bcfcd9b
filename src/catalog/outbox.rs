//! Outboxes of exactly-once sinks: a view's committed changes that a sink has yet to
//! deliver, cut into segments at checkpoint barriers.
//!
//! A sink with `exactly_once = true` does not write epochs as they commit. The view keeps,
//! per such sink, the changes it committed since the sink last delivered, and seals them
//! into a segment named after each checkpoint barrier. The segments are part of the view's
//! checkpoint state. Once a checkpoint holding the view is stored, the sink delivers the
//! segments up to it, oldest first (Kafka messages tagged with the segment's epoch and
//! their place in it, or one Parquet file named after the segment), and the view forgets
//! them.
//!
//! After a crash the view comes back from its checkpoint with the segments that were not
//! known to be delivered, and goes on recording from there (the changes after the
//! checkpoint are replayed into it). The sink delivers those segments again, skipping each
//! message or file the target already holds: a Kafka sink reads the tags at the end of
//! each partition back from the broker and writes only what is missing, and a file is
//! written again under the same name (`connectors::sink` says why not Kafka
//! transactions). So every change reaches the target once, a checkpoint interval after it
//! was committed. When the newest checkpoint is damaged and the view comes back from an
//! older one, the replayed changes include some the sink delivered from the newer one: a
//! file sink reads those segments back and takes them off the next one it writes
//! (`catalog::sink`); a Kafka sink delivers them again and warns.

use std::collections::BTreeMap;

use datafusion::arrow::datatypes::SchemaRef;

use crate::dataflow::ChangeBatch;
use crate::dataflow::checkpoint::{self, StateReader, StateWriter};
use crate::error::Result;

/// One exactly-once sink's undelivered changes.
#[derive(Default)]
pub struct Outbox {
    /// Changes committed since the last checkpoint barrier.
    open: Vec<ChangeBatch>,
    /// Sealed segments by the epoch of the checkpoint barrier that closed them.
    sealed: BTreeMap<u64, ChangeBatch>,
}

impl Outbox {
    /// A new outbox whose first segment starts with `rows` (the view's rows when the sink
    /// was created).
    pub fn starting_with(rows: Option<ChangeBatch>) -> Outbox {
        Outbox { open: rows.into_iter().filter(|r| r.num_rows() > 0).collect(), sealed: BTreeMap::new() }
    }

    /// Records an epoch's change; a checkpoint barrier seals what has gathered since the
    /// last one.
    pub fn record(&mut self, schema: &SchemaRef, epoch: u64, checkpoint: bool, parts: &[ChangeBatch]) -> Result<()> {
        self.open.extend(parts.iter().filter(|part| part.num_rows() > 0).cloned());
        if checkpoint && !self.open.is_empty() {
            let segment = ChangeBatch::concat(schema, &std::mem::take(&mut self.open))?.consolidate()?;
            self.sealed.insert(epoch, segment);
        }
        Ok(())
    }

    /// The sealed segments up to checkpoint `epoch`, oldest first.
    pub fn sealed_through(&self, epoch: u64) -> Vec<(u64, ChangeBatch)> {
        self.sealed.range(..=epoch).map(|(e, c)| (*e, c.clone())).collect()
    }

    /// Forgets the segments up to checkpoint `epoch`: they are delivered.
    pub fn delivered(&mut self, epoch: u64) {
        self.sealed = self.sealed.split_off(&(epoch + 1));
    }

    /// Rows waiting, sealed or not.
    pub fn rows(&self) -> usize {
        self.open.iter().chain(self.sealed.values()).map(ChangeBatch::num_rows).sum()
    }
}

/// Writes the sealed segments of every outbox (a checkpoint comes right after its barrier
/// sealed them, so nothing is open).
pub fn write(w: &mut StateWriter, outboxes: &BTreeMap<String, Outbox>) -> Result<()> {
    w.u64(outboxes.len() as u64);
    for (sink, outbox) in outboxes {
        w.bytes(sink.as_bytes());
        w.u64(outbox.sealed.len() as u64);
        for (epoch, change) in &outbox.sealed {
            w.u64(*epoch);
            let flat = change.to_flat()?;
            w.bytes(&checkpoint::rows_to_bytes(&flat.schema(), &[flat])?);
        }
    }
    Ok(())
}

/// Reads what [`write`] wrote, for a view with columns `schema`.
pub fn read(r: &mut StateReader, schema: &SchemaRef) -> Result<BTreeMap<String, Outbox>> {
    let mut outboxes = BTreeMap::new();
    for _ in 0..r.len(16)? {
        let sink = String::from_utf8(r.bytes()?.to_vec()).map_err(|_| crate::error::Error::Corrupt {
            location: "the outbox of an exactly-once sink".into(),
            reason: "a sink name is not UTF-8".into(),
        })?;
        let mut outbox = Outbox::default();
        for _ in 0..r.len(16)? {
            let epoch = r.u64()?;
            let flats = checkpoint::rows_from_bytes(r.bytes()?, &format!("the outbox of sink \"{sink}\""))?;
            let changes =
                flats.iter().map(|f| ChangeBatch::from_flat(f, schema.clone())).collect::<Result<Vec<_>>>()?;
            outbox.sealed.insert(epoch, ChangeBatch::concat(schema, &changes)?);
        }
        outboxes.insert(sink, outbox);
    }
    Ok(outboxes)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use datafusion::arrow::array::{Int64Array, RecordBatch};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};

    use super::*;

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, false)]))
    }

    fn change(rows: &[(i64, i64)]) -> ChangeBatch {
        let batch =
            RecordBatch::try_new(schema(), vec![Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.0)))])
                .expect("batch");
        ChangeBatch::try_new(batch, Int64Array::from_iter_values(rows.iter().map(|r| r.1))).expect("change")
    }

    fn rows(change: &ChangeBatch) -> Vec<(i64, i64)> {
        let values = change.batch().column(0).as_any().downcast_ref::<Int64Array>().expect("ints").clone();
        let mut rows: Vec<_> = values.values().iter().copied().zip(change.weights().values().iter().copied()).collect();
        rows.sort();
        rows
    }

    #[test]
    fn checkpoint_barriers_seal_segments_that_survive_a_checkpoint_until_delivered() {
        let mut outbox = Outbox::starting_with(Some(change(&[(1, 1)])));
        outbox.record(&schema(), 5, false, &[change(&[(2, 1)])]).expect("recorded");
        outbox.record(&schema(), 6, true, &[change(&[(1, -1)])]).expect("sealed");
        outbox.record(&schema(), 7, false, &[change(&[])]).expect("recorded");
        outbox.record(&schema(), 8, true, &[change(&[])]).expect("nothing to seal");
        outbox.record(&schema(), 9, true, &[change(&[(3, 2)])]).expect("sealed");
        // The insertion and retraction of 1 in one segment cancel out.
        let sealed = outbox.sealed_through(9);
        assert_eq!(
            sealed.iter().map(|(e, c)| (*e, rows(c))).collect::<Vec<_>>(),
            [(6, vec![(2, 1)]), (9, vec![(3, 2)])]
        );
        assert_eq!(outbox.sealed_through(8).len(), 1, "only segments up to the stored checkpoint");

        let mut w = StateWriter::default();
        write(&mut w, &BTreeMap::from([("out".to_string(), outbox)])).expect("written");
        let bytes = w.finish();
        let mut r = StateReader::new(&bytes, "test");
        let mut restored = read(&mut r, &schema()).expect("read back");
        r.finish().expect("all read");
        let outbox = restored.get_mut("out").expect("the sink's outbox");
        assert_eq!(outbox.rows(), 2);
        outbox.delivered(6);
        assert_eq!(outbox.sealed_through(u64::MAX).iter().map(|(e, _)| *e).collect::<Vec<_>>(), [9]);

        let truncated = &bytes[..bytes.len() - 3];
        assert!(read(&mut StateReader::new(truncated, "test"), &schema()).is_err(), "a truncated outbox is an error");
    }
}
