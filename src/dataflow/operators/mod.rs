//! The incremental operators. Each keeps its output equal to the change in its query's
//! answer; see each type's docs for how it treats weights.

pub mod aggregate;
pub mod event_time;
pub mod join;
pub mod materialize;
pub mod project;
pub mod session;
pub mod temporal;
pub mod topn;
pub mod union;

pub use aggregate::{AggregateFunction, AggregateOperator, AggregateSpec};
pub use event_time::{EmitOnCloseOperator, EventTimeOperator, LateCounter};
pub use join::{JoinKind, JoinOperator};
pub use materialize::{EpochSink, MaterializeOperator};
pub use project::ProjectFilterOperator;
pub use session::SessionOperator;
pub use temporal::TemporalFilterOperator;
pub use topn::{TopNOperator, TopNSpec};
pub use union::{MergeOperator, UnionOperator};

/// What the operators' unit tests share.
#[cfg(test)]
pub(crate) mod testing {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use datafusion::arrow::array::Int64Array;
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use datafusion::arrow::record_batch::RecordBatch;

    use super::super::operator::{Barrier, Operator, Output};
    use super::super::{ChangeBatch, Message};
    use crate::state::spill::LocalState;

    /// Adds the rows (as text) and weights of the changes in `messages` into `into`,
    /// which keeps the rows of non-zero weight.
    pub fn net(messages: Vec<Message>, into: &mut BTreeMap<String, i64>) {
        use datafusion::arrow::util::display::array_value_to_string;
        for message in messages {
            let Message::Data(change) = message else { continue };
            let batch = change.batch();
            for row in 0..batch.num_rows() {
                let text: Vec<String> =
                    batch.columns().iter().map(|c| array_value_to_string(c, row).expect("displayable")).collect();
                let weight = into.entry(text.join("|")).or_insert(0);
                *weight += change.weights().value(row);
                if *weight == 0 {
                    into.remove(&text.join("|"));
                }
            }
        }
    }

    /// Feeds `change` into `port` of `operator`, then `barrier` if there is one, and adds
    /// what it emits into `into` (as [`net`]).
    pub async fn feed(
        operator: &mut dyn Operator,
        port: usize,
        change: ChangeBatch,
        barrier: Option<&Barrier>,
        into: &mut BTreeMap<String, i64>,
    ) {
        let mut out = Output::default();
        operator.process(port, change, &mut out).await.expect("process");
        if let Some(barrier) = barrier {
            operator.on_barrier(barrier, &mut out).await.expect("barrier");
        }
        net(out.take_messages(), into);
    }

    /// A change of `inserts` new rows (k below `keys`, v below `values`) over the integer
    /// columns (k, v), and retractions of `retracts` rows of `live` (as many as it has),
    /// which it keeps up to date.
    pub fn random_change(
        rng: &mut rand::rngs::SmallRng,
        live: &mut Vec<(i64, i64)>,
        (inserts, keys, values): (usize, i64, i64),
        retracts: usize,
    ) -> ChangeBatch {
        use rand::Rng;
        let mut rows: Vec<(i64, i64, i64)> =
            (0..inserts).map(|_| (rng.gen_range(0..keys), rng.gen_range(0..values), 1)).collect();
        for _ in 0..retracts {
            if !live.is_empty() {
                let (k, v) = live.swap_remove(rng.gen_range(0..live.len()));
                rows.push((k, v, -1));
            }
        }
        live.extend(rows.iter().filter(|r| r.2 == 1).map(|r| (r.0, r.1)));
        let schema = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Int64, false),
            Field::new("v", DataType::Int64, false),
        ]));
        let batch = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(Int64Array::from(rows.iter().map(|r| r.0).collect::<Vec<_>>())),
                Arc::new(Int64Array::from(rows.iter().map(|r| r.1).collect::<Vec<_>>())),
            ],
        )
        .expect("batch");
        let weights = Int64Array::from(rows.iter().map(|r| r.2).collect::<Vec<_>>());
        ChangeBatch::try_new(batch, weights).expect("change")
    }

    /// Checkpoints `operator` through its spill store, "downloads" the files under `dir`
    /// as a restore from the object store would, and restores them into `fresh` (an
    /// operator of the same plan) in `local`.
    pub fn checkpointed_and_restored<O: Operator>(
        mut operator: O,
        dir: &std::path::Path,
        local: LocalState,
        mut fresh: O,
    ) -> O {
        let state = operator.checkpoint().expect("checkpoint").expect("checkpointable");
        let files = operator.checkpoint_files();
        assert!(!files.is_empty(), "the state went through the spill store");
        let downloaded = dir.join("download");
        std::fs::create_dir_all(&downloaded).expect("mkdir");
        for file in &files {
            std::fs::copy(&file.local, downloaded.join(&file.name)).expect("copy");
        }
        drop(operator);
        fresh.set_local_state(local);
        fresh.restore_files(downloaded).expect("files");
        fresh.restore(&state).expect("restore");
        fresh
    }
}
