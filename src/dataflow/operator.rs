//! What flows between operators, and the [`Operator`] trait each dataflow node implements.
//!
//! Three kinds of [`Message`] travel on every edge: data (change batches), barriers and
//! watermarks. The runtime ([`super::runtime`]) aligns barriers across an operator's
//! inputs before calling [`Operator::on_barrier`]; operators never see a barrier early.

use async_trait::async_trait;

use super::ChangeBatch;
use crate::error::Result;
use crate::state::spill::{LocalState, StateFile};

/// What flows on every edge of the dataflow graph.
#[derive(Debug, Clone)]
pub enum Message {
    Data(ChangeBatch),
    Barrier(Barrier),
    Watermark(Watermark),
}

/// A marker every source injects at the same epoch. All data before it belongs to
/// `epoch`; operators flush pending output when they see it on all inputs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Barrier {
    pub epoch: u64,
    /// Whether operators persist their state for this epoch (see [`Operator::checkpoint`]).
    pub checkpoint: bool,
    /// A change to the running graph that takes effect at this barrier.
    pub mutation: Option<Mutation>,
}

/// Reconfiguration carried by a barrier, so there is no second control channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mutation {
    /// Every operator finishes after handling this barrier (DROP, shutdown).
    Stop,
}

/// "No event with event time below `value` will arrive" for column `column`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Watermark {
    pub column: usize,
    pub value: i64,
}

/// Where an operator puts what it emits; the runtime sends it downstream after each call.
#[derive(Debug, Default)]
pub struct Output {
    messages: Vec<Message>,
}

impl Output {
    /// Emits a change batch (empty batches are dropped).
    pub fn push(&mut self, batch: ChangeBatch) {
        if batch.num_rows() > 0 {
            self.messages.push(Message::Data(batch));
        }
    }

    /// Emits a watermark.
    pub fn watermark(&mut self, watermark: Watermark) {
        self.messages.push(Message::Watermark(watermark));
    }

    /// Removes and returns what was emitted so far (the runtime sends it downstream).
    pub fn take_messages(&mut self) -> Vec<Message> {
        std::mem::take(&mut self.messages)
    }
}

/// One node of a dataflow graph. Every method receives and produces change batches; an
/// operator is defined by what it does to weights: the sum of its outputs must equal the
/// change in its answer.
#[async_trait]
pub trait Operator: Send {
    /// A short name for EXPLAIN and errors.
    fn name(&self) -> &str;

    /// Input `port` delivered a change batch; push any output into `out`.
    async fn process(&mut self, port: usize, input: ChangeBatch, out: &mut Output) -> Result<()>;

    /// Input `port` delivered a watermark. Default: forward it, which is right for an
    /// operator with one input whose output keeps its input's columns and never holds
    /// changes back past a watermark. Others override it (see [`super::watermark`]).
    async fn on_watermark(&mut self, _port: usize, watermark: Watermark, out: &mut Output) -> Result<()> {
        out.watermark(watermark);
        Ok(())
    }

    /// All inputs reached `barrier`: emit pending output. The runtime forwards the barrier
    /// after this returns.
    async fn on_barrier(&mut self, _barrier: &Barrier, _out: &mut Output) -> Result<()> {
        Ok(())
    }

    /// A checkpoint barrier passed (after [`Operator::on_barrier`]): the operator's whole
    /// state, such that [`Operator::restore`] on a freshly built operator of the same plan
    /// continues exactly from here. `None` says the operator cannot be checkpointed; its view
    /// is then rebuilt from its inputs after a restart. That is the default, so an operator
    /// that holds state is never restored without it; stateless operators return an empty
    /// state.
    fn checkpoint(&mut self) -> Result<Option<Vec<u8>>> {
        Ok(None)
    }

    /// The files of spilled state the last [`Operator::checkpoint`] refers to (see
    /// [`crate::state::spill`]); the checkpoint uploads those not uploaded before.
    fn checkpoint_files(&mut self) -> Vec<StateFile> {
        Vec::new()
    }

    /// Loads a state [`Operator::checkpoint`] wrote, before the first message.
    fn restore(&mut self, _state: &[u8]) -> Result<()> {
        Err(crate::error::Error::Internal(format!("operator {} has no state to restore", self.name())))
    }

    /// Before [`Operator::restore`]: the directory the checkpoint's files were downloaded
    /// into, by their names.
    fn restore_files(&mut self, _dir: std::path::PathBuf) -> Result<()> {
        Err(crate::error::Error::Internal(format!("operator {} has no files to restore", self.name())))
    }

    /// Where the operator may spill state to local disk, and the memory pool it counts
    /// against. Called once, before anything else; operators that never spill ignore it.
    fn set_local_state(&mut self, _local: LocalState) {}
}
