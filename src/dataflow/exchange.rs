//! Hash exchange: the edge in front of an operator that runs as several parallel instances.
//!
//! Each row goes to the instance chosen by a hash of its key, so every key (a group, a join
//! key) lives in exactly one instance and the instances' outputs never overlap. Barriers
//! and watermarks are broadcast to every instance; a merge node behind the instances
//! aligns their barriers again, so downstream sees each barrier once.

use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, UInt32Array};
use datafusion::arrow::compute::{cast, take, take_record_batch};
use datafusion::arrow::datatypes::DataType;
use datafusion::common::hash_utils::{RandomState, create_hashes};
use datafusion::physical_plan::PhysicalExpr;

use super::ChangeBatch;
use super::operator::Message;
use super::runtime::{EdgeReceiver, EdgeSender, FailureSlot};
use crate::error::{Error, Result};

/// The key a stateful operator's input is partitioned by: expressions over the input and
/// the type each is hashed as (both sides of a join hash their keys as the same types).
#[derive(Clone)]
pub struct PartitionKey {
    pub exprs: Vec<Arc<dyn PhysicalExpr>>,
    pub types: Vec<DataType>,
}

impl PartitionKey {
    /// Splits `change` into one part per instance (`None` where no row goes).
    pub fn split(&self, change: &ChangeBatch, parts: usize) -> Result<Vec<Option<ChangeBatch>>> {
        let rows = change.num_rows();
        let mut keys: Vec<ArrayRef> = Vec::with_capacity(self.exprs.len());
        for (expr, key_type) in self.exprs.iter().zip(&self.types) {
            let values = expr.evaluate(change.batch())?.into_array(rows)?;
            keys.push(if values.data_type() == key_type { values } else { cast(&values, key_type)? });
        }
        let mut hashes = vec![0u64; rows];
        // A fixed seed: both inputs of a join must send equal keys to the same instance.
        create_hashes(&keys, &RandomState::with_seed(0), &mut hashes)?;
        let mut indices: Vec<Vec<u32>> = vec![Vec::new(); parts];
        for (row, hash) in hashes.iter().enumerate() {
            let row = u32::try_from(row).map_err(|_| Error::Internal("change batch over 4G rows".into()))?;
            indices[(hash % parts as u64) as usize].push(row);
        }
        indices
            .into_iter()
            .map(|rows_of_part| {
                if rows_of_part.is_empty() {
                    return Ok(None);
                }
                if rows_of_part.len() == rows {
                    return Ok(Some(change.clone()));
                }
                let rows_of_part = UInt32Array::from(rows_of_part);
                let batch = take_record_batch(change.batch(), &rows_of_part)?;
                let weights = take(change.weights(), &rows_of_part, None)?;
                let weights = weights
                    .as_any()
                    .downcast_ref::<datafusion::arrow::array::Int64Array>()
                    .ok_or_else(|| Error::Internal("taken weights are not Int64".into()))?
                    .clone();
                ChangeBatch::try_new(batch, weights).map(Some)
            })
            .collect()
    }
}

/// Starts the task that routes `input` to `outputs` (one per instance) by `key`.
pub fn spawn(key: PartitionKey, mut input: EdgeReceiver, outputs: Vec<EdgeSender>, failures: Arc<FailureSlot>) {
    // An epoch scope, like every operator's: the key may call a model function.
    tokio::spawn(crate::ml::epoch::scope(async move {
        while let Some(message) = input.recv().await {
            match message {
                Message::Data(change) => {
                    let parts = match key.split(&change, outputs.len()) {
                        Ok(parts) => parts,
                        Err(e) => {
                            tracing::error!("hash exchange failed: {e}");
                            failures.set(format!("hash exchange: {e}"));
                            return;
                        }
                    };
                    for (part, output) in parts.into_iter().zip(&outputs) {
                        if let Some(part) = part {
                            let _ = output.send(Message::Data(part)).await;
                        }
                    }
                }
                other => {
                    if let Message::Barrier(barrier) = &other {
                        crate::ml::epoch::passed(barrier.epoch);
                    }
                    for output in &outputs {
                        let _ = output.send(other.clone()).await;
                    }
                }
            }
        }
    }));
}
