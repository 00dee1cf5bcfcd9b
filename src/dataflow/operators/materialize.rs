//! [`MaterializeOperator`]: the last node of a view's graph. It collects an epoch's changes
//! and hands them, consolidated, to an [`EpochSink`] when the epoch's barrier arrives.
//! The sink (owned by the catalog) applies them to the view's arrangement and publishes it.

use async_trait::async_trait;
use datafusion::arrow::array::Int64Array;
use datafusion::arrow::compute::concat_batches;
use datafusion::arrow::datatypes::SchemaRef;

use crate::dataflow::ChangeBatch;
use crate::dataflow::operator::{Barrier, Operator, Output};
use crate::error::Result;

/// Receives each epoch's net change to a view.
pub trait EpochSink: Send {
    /// Called once per barrier, in epoch order, with the epoch's consolidated change.
    fn commit(&mut self, barrier: &Barrier, change: ChangeBatch) -> Result<()>;

    /// The view's rows as of the last commit, for a checkpoint (`None`: not kept).
    fn checkpoint(&mut self) -> Result<Option<Vec<u8>>> {
        Ok(None)
    }

    /// Loads rows [`EpochSink::checkpoint`] wrote, before the first commit.
    fn restore(&mut self, _state: &[u8]) -> Result<()> {
        Err(crate::error::Error::Internal("this sink keeps no checkpointed rows".into()))
    }
}

/// Buffers changes until the barrier, then commits them to the sink.
pub struct MaterializeOperator {
    schema: SchemaRef,
    buffered: Vec<ChangeBatch>,
    sink: Box<dyn EpochSink>,
}

impl MaterializeOperator {
    pub fn new(schema: SchemaRef, sink: Box<dyn EpochSink>) -> Self {
        MaterializeOperator { schema, buffered: Vec::new(), sink }
    }
}

#[async_trait]
impl Operator for MaterializeOperator {
    fn name(&self) -> &str {
        "materialize"
    }

    async fn process(&mut self, _port: usize, input: ChangeBatch, _out: &mut Output) -> Result<()> {
        self.buffered.push(input);
        Ok(())
    }

    async fn on_barrier(&mut self, barrier: &Barrier, _out: &mut Output) -> Result<()> {
        let batches: Vec<_> = self.buffered.iter().map(|c| c.batch().clone()).collect();
        let weights: Vec<i64> = self.buffered.iter().flat_map(|c| c.weights().values().iter().copied()).collect();
        self.buffered.clear();
        let batch = concat_batches(&self.schema, &batches)?;
        let change = ChangeBatch::try_new(batch, Int64Array::from(weights))?;
        // Only retractions can cancel out: an epoch of insertions is already its own net
        // change (a row inserted twice is two rows either way), so it skips the row
        // encoding consolidation costs.
        let retracts = change.weights().values().iter().any(|&w| w < 0);
        let change = if retracts { change.consolidate()? } else { change };
        self.sink.commit(barrier, change)
    }

    /// Checkpoints come after the epoch's commit, so nothing is buffered: the state is the
    /// sink's rows.
    fn checkpoint(&mut self) -> Result<Option<Vec<u8>>> {
        self.sink.checkpoint()
    }

    fn restore(&mut self, state: &[u8]) -> Result<()> {
        self.sink.restore(state)
    }
}
