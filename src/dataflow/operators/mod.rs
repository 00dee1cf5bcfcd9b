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

    use super::super::Message;
    use super::super::operator::Operator;
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
