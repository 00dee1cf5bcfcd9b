//! [`ProjectFilterOperator`]: keeps the rows a predicate accepts and computes new columns.
//! Weights pass through unchanged, which is why it is retraction-correct when its
//! expressions give a row the same result every time: it is then stateless.
//!
//! Expressions that may answer differently later (model functions, whose version changes
//! at a barrier) are remembered instead: the operator keeps, per live input row, what each
//! copy produced (its output row, or that the predicate dropped it), and a retraction takes
//! back exactly that. So a row scored by version 1 and deleted after a swap to version 2 is
//! retracted with its version-1 score, as rows already emitted keep the scores they had.

use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::array::{Array, BooleanArray, Int64Array};
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::arrow::row::{RowConverter, SortField};
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::physical_expr::ScalarFunctionExpr;
use datafusion::physical_plan::PhysicalExpr;

use crate::dataflow::checkpoint::{StateReader, StateWriter};
use crate::dataflow::operator::{Operator, Output};
use crate::dataflow::watermark::Derivation;
use crate::dataflow::{ChangeBatch, FastMap, Watermark};
use crate::error::{Error, Result};

/// `SELECT exprs FROM input WHERE predicate`, on change batches.
pub struct ProjectFilterOperator {
    predicate: Option<Arc<dyn PhysicalExpr>>,
    /// `None` keeps the input columns as they are.
    exprs: Option<Vec<Arc<dyn PhysicalExpr>>>,
    schema: SchemaRef,
    /// What each live input row produced, when the expressions may change their answer.
    memo: Option<Memo>,
    /// How output columns get watermarks from input columns; `None` drops watermarks
    /// (unless there is no projection, which keeps the columns and their watermarks).
    derivation: Option<Derivation>,
}

/// Copies of one input row that produced the same output: how many, and the output row
/// in row format (`None`: the predicate dropped them).
type Copies = (i64, Option<Box<[u8]>>);

/// Per live input row (by value), each copy's output row (`None`: filtered out) with its
/// multiplicity, in the order they arrived.
struct Memo {
    /// Built at the first batch, from its columns.
    inputs: Option<RowConverter>,
    outputs: RowConverter,
    emitted: FastMap<Box<[u8]>, Vec<Copies>>,
}

impl ProjectFilterOperator {
    /// Keeps rows where `predicate` is true (NULL counts as false), then evaluates `exprs`
    /// into `schema`.
    pub fn new(
        predicate: Option<Arc<dyn PhysicalExpr>>,
        exprs: Option<Vec<Arc<dyn PhysicalExpr>>>,
        schema: SchemaRef,
    ) -> Result<Self> {
        let remembers = predicate.iter().chain(exprs.iter().flatten()).any(calls_model);
        let memo = if remembers {
            let fields = schema.fields().iter().map(|f| SortField::new(f.data_type().clone())).collect();
            Some(Memo { inputs: None, outputs: RowConverter::new(fields)?, emitted: FastMap::default() })
        } else {
            None
        };
        Ok(ProjectFilterOperator { predicate, exprs, schema, memo, derivation: None })
    }

    /// Derives watermarks of output columns from those of `input` (the input's schema).
    pub fn with_watermarks_from(mut self, input: SchemaRef) -> Self {
        if let Some(exprs) = &self.exprs {
            self.derivation = Some(Derivation::new(input, self.schema.clone(), exprs));
        }
        self
    }

    /// The rows of `input` the predicate keeps, projected; with the predicate's mask
    /// (`None`: no predicate, every row kept).
    fn evaluate(&self, input: &ChangeBatch) -> Result<(ChangeBatch, Option<BooleanArray>)> {
        let mut input = input.clone();
        let mut kept = None;
        if let Some(predicate) = &self.predicate {
            let mask = predicate.evaluate(input.batch())?.into_array(input.num_rows())?;
            let mask = mask
                .as_any()
                .downcast_ref::<BooleanArray>()
                .ok_or_else(|| Error::Internal("filter predicate is not boolean".into()))?;
            input = input.filter(mask)?;
            kept = Some(mask.clone());
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
        Ok((ChangeBatch::try_new(batch, weights)?, kept))
    }

    /// The remembering path: insertions are evaluated and remembered; retractions take
    /// back what the same input row produced before (evaluated afresh only if unknown).
    fn process_remembering(&mut self, input: ChangeBatch, out: &mut Output) -> Result<()> {
        let (inserted, retracted): (Vec<u32>, Vec<u32>) =
            (0..input.num_rows() as u32).partition(|&i| input.weights().value(i as usize) > 0);
        // The rows at `rows` (ascending), with their weights.
        let take = |rows: &[u32]| -> Result<ChangeBatch> {
            let mut mask = vec![false; input.num_rows()];
            rows.iter().for_each(|&i| mask[i as usize] = true);
            input.filter(&BooleanArray::from(mask))
        };
        let memo = self.memo.as_mut().expect("the remembering path has a memo");
        if memo.inputs.is_none() {
            let fields =
                input.batch().schema().fields().iter().map(|f| SortField::new(f.data_type().clone())).collect();
            memo.inputs = Some(RowConverter::new(fields)?);
        }
        let identities = memo.inputs.as_ref().expect("set above").convert_columns(input.batch().columns())?;

        // Retractions first: what the same row produced, newest copies first.
        let mut taken_back = Vec::new();
        let mut unknown = Vec::new();
        for &i in &retracted {
            let key = identities.row(i as usize);
            let mut wanted = -input.weights().value(i as usize);
            let copies = memo.emitted.get_mut(key.data());
            let Some(copies) = copies else {
                unknown.push(i);
                continue;
            };
            while wanted > 0 {
                let Some((count, output)) = copies.last_mut() else { break };
                let n = (*count).min(wanted);
                if let Some(output) = output {
                    taken_back.push((output.clone(), -n));
                }
                *count -= n;
                wanted -= n;
                if *count == 0 {
                    copies.pop();
                }
            }
            if copies.is_empty() {
                memo.emitted.remove(key.data());
            }
            if wanted > 0 {
                return Err(Error::Internal(format!("{}: a retracted row was never inserted", self.name())));
            }
        }
        if !taken_back.is_empty() {
            let parser = memo.outputs.parser();
            let rows: Vec<_> = taken_back.iter().map(|(bytes, _)| parser.parse(bytes)).collect();
            let columns = memo.outputs.convert_rows(rows)?;
            let batch = RecordBatch::try_new_with_options(
                self.schema.clone(),
                columns,
                &datafusion::arrow::array::RecordBatchOptions::new().with_row_count(Some(taken_back.len())),
            )?;
            let weights = Int64Array::from_iter_values(taken_back.iter().map(|(_, w)| *w));
            out.push(ChangeBatch::try_new(batch, weights)?);
        }
        if !unknown.is_empty() {
            let (evaluated, _) = self.evaluate(&take(&unknown)?)?;
            out.push(evaluated);
        }

        if !inserted.is_empty() {
            let (evaluated, mask) = self.evaluate(&take(&inserted)?)?;
            let memo = self.memo.as_mut().expect("the remembering path has a memo");
            let outputs = memo.outputs.convert_columns(evaluated.batch().columns())?;
            let mut next = 0;
            for (position, &i) in inserted.iter().enumerate() {
                // The input row's output row, if the predicate kept it (NULL: not kept).
                let output = mask.as_ref().is_none_or(|m| m.is_valid(position) && m.value(position)).then(|| {
                    next += 1;
                    Box::<[u8]>::from(outputs.row(next - 1).data())
                });
                let key = identities.row(i as usize);
                memo.emitted.entry(key.data().into()).or_default().push((input.weights().value(i as usize), output));
            }
            out.push(evaluated);
        }
        Ok(())
    }
}

/// Whether `expr` calls a model function (`score`, `predict`, `score_version`).
fn calls_model(expr: &Arc<dyn PhysicalExpr>) -> bool {
    let mut found = false;
    let _ = expr.apply(|e| {
        if let Some(function) = (e.as_ref() as &dyn std::any::Any).downcast_ref::<ScalarFunctionExpr>()
            && crate::ml::udf::FUNCTION_NAMES.contains(&function.name())
        {
            found = true;
            return Ok(TreeNodeRecursion::Stop);
        }
        Ok(TreeNodeRecursion::Continue)
    });
    found
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
        if self.memo.is_some() {
            return self.process_remembering(input, out);
        }
        let (evaluated, _) = self.evaluate(&input)?;
        out.push(evaluated);
        Ok(())
    }

    /// Stateless unless it remembers what model calls produced: then every live input row
    /// with the output each copy of it produced.
    fn checkpoint(&mut self) -> Result<Option<Vec<u8>>> {
        let mut w = StateWriter::default();
        if let Some(memo) = &self.memo {
            w.u64(memo.emitted.len() as u64);
            for (input, copies) in &memo.emitted {
                w.bytes(input);
                w.u64(copies.len() as u64);
                for (n, output) in copies {
                    w.i64(*n);
                    w.u64(output.is_some() as u64);
                    w.bytes(output.as_deref().unwrap_or_default());
                }
            }
        }
        Ok(Some(w.finish()))
    }

    fn restore(&mut self, state: &[u8]) -> Result<()> {
        let mut r = StateReader::new(state, "a projection");
        if let Some(memo) = &mut self.memo {
            memo.emitted.clear();
            for _ in 0..r.len(16)? {
                let input = Box::from(r.bytes()?);
                let copies = (0..r.len(24)?)
                    .map(|_| {
                        let (n, present, output) = (r.i64()?, r.u64()? != 0, r.bytes()?);
                        Ok((n, present.then(|| Box::from(output))))
                    })
                    .collect::<Result<Vec<Copies>>>()?;
                memo.emitted.insert(input, copies);
            }
        }
        r.finish()
    }

    async fn on_watermark(&mut self, _port: usize, watermark: Watermark, out: &mut Output) -> Result<()> {
        match (&self.exprs, &self.derivation) {
            (None, _) => out.watermark(watermark),
            (Some(_), Some(derivation)) => derivation.derive(watermark)?.into_iter().for_each(|w| out.watermark(w)),
            (Some(_), None) => {}
        }
        Ok(())
    }
}
