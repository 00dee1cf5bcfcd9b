//! [`ProjectFilterOperator`]: stateless; keeps the rows a predicate accepts and computes
//! new columns. Weights pass through unchanged, which is why it is retraction-correct.

use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::array::BooleanArray;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::physical_plan::PhysicalExpr;

use crate::dataflow::ChangeBatch;
use crate::dataflow::operator::{Operator, Output};
use crate::error::{Error, Result};

/// `SELECT exprs FROM input WHERE predicate`, on change batches.
pub struct ProjectFilterOperator {
    predicate: Option<Arc<dyn PhysicalExpr>>,
    /// `None` keeps the input columns as they are.
    exprs: Option<Vec<Arc<dyn PhysicalExpr>>>,
    schema: SchemaRef,
}

impl ProjectFilterOperator {
    /// Keeps rows where `predicate` is true (NULL counts as false), then evaluates `exprs`
    /// into `schema`.
    pub fn new(
        predicate: Option<Arc<dyn PhysicalExpr>>,
        exprs: Option<Vec<Arc<dyn PhysicalExpr>>>,
        schema: SchemaRef,
    ) -> Self {
        ProjectFilterOperator { predicate, exprs, schema }
    }
}

#[async_trait]
impl Operator for ProjectFilterOperator {
    fn name(&self) -> &str {
        match (&self.predicate, &self.exprs) {
            (Some(_), Some(_)) => "project_filter",
            (Some(_), None) => "filter",
            _ => "project",
        }
    }

    async fn process(&mut self, _port: usize, input: ChangeBatch, out: &mut Output) -> Result<()> {
        let mut input = input;
        if let Some(predicate) = &self.predicate {
            let mask = predicate.evaluate(input.batch())?.into_array(input.num_rows())?;
            let mask = mask
                .as_any()
                .downcast_ref::<BooleanArray>()
                .ok_or_else(|| Error::Internal("filter predicate is not boolean".into()))?;
            input = input.filter(mask)?;
        }
        let (mut batch, weights) = (input.batch().clone(), input.weights().clone());
        if let Some(exprs) = &self.exprs {
            let columns = exprs
                .iter()
                .map(|e| e.evaluate(&batch).and_then(|v| v.into_array(batch.num_rows())))
                .collect::<datafusion::error::Result<Vec<_>>>()?;
            batch = RecordBatch::try_new_with_options(
                self.schema.clone(),
                columns,
                &datafusion::arrow::array::RecordBatchOptions::new().with_row_count(Some(batch.num_rows())),
            )?;
        }
        out.push(ChangeBatch::try_new(batch, weights)?);
        Ok(())
    }
}
