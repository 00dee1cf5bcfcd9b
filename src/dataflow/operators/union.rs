//! [`UnionOperator`]: `UNION ALL` of its inputs. Every input's changes pass through with
//! their weights, so the output is the sum of the inputs. (`UNION` is `UNION ALL` under a
//! DISTINCT, which the planner turns into an aggregate.)

use async_trait::async_trait;
use datafusion::arrow::array::RecordBatchOptions;
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;

use crate::dataflow::operator::{Operator, Output};
use crate::dataflow::watermark::MinimumOverInputs;
use crate::dataflow::{ChangeBatch, Watermark};
use crate::error::Result;

/// Passes every input's changes through, cast to the union's column types. A column's
/// watermark is the least of its inputs'.
pub struct UnionOperator {
    schema: SchemaRef,
    watermarks: MinimumOverInputs,
}

impl UnionOperator {
    pub fn new(schema: SchemaRef, inputs: usize) -> Self {
        UnionOperator { schema, watermarks: MinimumOverInputs::new(inputs) }
    }
}

#[async_trait]
impl Operator for UnionOperator {
    fn name(&self) -> &str {
        "union_all"
    }

    /// Stateless but for its inputs' watermarks.
    fn checkpoint(&mut self) -> Result<Option<Vec<u8>>> {
        Ok(Some(self.watermarks.checkpoint()))
    }

    fn restore(&mut self, state: &[u8]) -> Result<()> {
        self.watermarks.restore(state)
    }

    async fn process(&mut self, _port: usize, input: ChangeBatch, out: &mut Output) -> Result<()> {
        let columns = input
            .batch()
            .columns()
            .iter()
            .zip(self.schema.fields())
            .map(|(c, f)| if c.data_type() == f.data_type() { Ok(c.clone()) } else { cast(c, f.data_type()) })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let options = RecordBatchOptions::new().with_row_count(Some(input.num_rows()));
        let batch = RecordBatch::try_new_with_options(self.schema.clone(), columns, &options)?;
        out.push(ChangeBatch::try_new(batch, input.weights().clone())?);
        Ok(())
    }

    async fn on_watermark(&mut self, port: usize, watermark: Watermark, out: &mut Output) -> Result<()> {
        if let Some(least) = self.watermarks.update(port, watermark) {
            out.watermark(least);
        }
        Ok(())
    }
}

/// Merges the outputs of an operator's parallel instances into one stream. The runtime
/// aligns the instances' barriers, so downstream sees each barrier once, and a watermark
/// moves once every instance has passed it.
pub struct MergeOperator {
    watermarks: MinimumOverInputs,
}

impl MergeOperator {
    pub fn new(instances: usize) -> Self {
        MergeOperator { watermarks: MinimumOverInputs::new(instances) }
    }
}

#[async_trait]
impl Operator for MergeOperator {
    fn name(&self) -> &str {
        "merge"
    }

    /// Stateless but for its inputs' watermarks.
    fn checkpoint(&mut self) -> Result<Option<Vec<u8>>> {
        Ok(Some(self.watermarks.checkpoint()))
    }

    fn restore(&mut self, state: &[u8]) -> Result<()> {
        self.watermarks.restore(state)
    }

    async fn process(&mut self, _port: usize, input: ChangeBatch, out: &mut Output) -> Result<()> {
        out.push(input);
        Ok(())
    }

    async fn on_watermark(&mut self, port: usize, watermark: Watermark, out: &mut Output) -> Result<()> {
        if let Some(least) = self.watermarks.update(port, watermark) {
            out.watermark(least);
        }
        Ok(())
    }
}
