//! `SESSION(input, ts, gap)` as DataFusion sees it: the table function
//! `freshet_session('input', 'ts', gap_ms, 'key1,key2')` that [`crate::sql::windows`]
//! rewrites it to (the keys are the query's other GROUP BY columns). A batch query scans
//! the input's rows in the statement's snapshot and assigns sessions per key; a
//! materialized view lowers the scan to a [`crate::dataflow::operators::SessionOperator`]
//! over the input's change stream (see `crate::sql::view`).

use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::array::{Array, ArrayRef, Int64Array, UInt32Array};
use datafusion::arrow::compute::{cast, concat_batches, take};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::arrow::row::{RowConverter, SortField};
use datafusion::catalog::{Session, TableFunctionArgs, TableFunctionImpl, TableProvider};
use datafusion::common::ScalarValue;
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::logical_expr::{Expr, TableType};
use datafusion::physical_plan::ExecutionPlan;

use super::table::SnapshotCell;
use crate::dataflow::operators::session::assign_sessions;

/// The table function's name.
pub const FUNCTION: &str = "freshet_session";

/// What a SESSION window reads and how.
#[derive(Debug, Clone)]
pub struct SessionTable {
    /// The relation it reads (a table, source or materialized view).
    pub input: String,
    pub input_schema: SchemaRef,
    /// The event-time column of the input.
    pub time: usize,
    /// The gap in milliseconds.
    pub gap_ms: i64,
    /// The key columns of the input (sessions are per key).
    pub keys: Vec<usize>,
    schema: SchemaRef,
    cell: Arc<SnapshotCell>,
}

impl SessionTable {
    /// The gap in the event-time column's unit.
    pub fn gap_in_units(&self) -> i64 {
        // The time column is a timestamp: whole seconds when it has no smaller unit.
        match crate::dataflow::watermark::units_per_ms(self.input_schema.field(self.time).data_type()) {
            Some(units) => self.gap_ms.saturating_mul(units),
            None => self.gap_ms / 1_000,
        }
    }

    /// The input's rows with their sessions.
    fn sessions(&self, rows: &RecordBatch) -> DfResult<RecordBatch> {
        let times = cast(rows.column(self.time), &DataType::Int64)?;
        let times = times.as_any().downcast_ref::<Int64Array>().expect("cast to Int64");
        let key_columns: Vec<ArrayRef> = self.keys.iter().map(|&k| rows.column(k).clone()).collect();
        let fields =
            self.keys.iter().map(|&k| SortField::new(self.input_schema.field(k).data_type().clone())).collect();
        let keys =
            (!self.keys.is_empty()).then(|| RowConverter::new(fields)?.convert_columns(&key_columns)).transpose()?;
        let key = |i: u32| keys.as_ref().map(|k| k.row(i as usize));
        // Rows by key, then time; rows without a time are in no session.
        let mut order: Vec<u32> = (0..rows.num_rows() as u32).filter(|&i| times.is_valid(i as usize)).collect();
        order.sort_by(|&a, &b| key(a).cmp(&key(b)).then(times.value(a as usize).cmp(&times.value(b as usize))));
        let (mut starts, mut ends) = (Vec::with_capacity(order.len()), Vec::with_capacity(order.len()));
        let gap = self.gap_in_units();
        let mut first = 0;
        for i in 1..=order.len() {
            if i == order.len() || key(order[i]) != key(order[first]) {
                let run: Vec<i64> = order[first..i].iter().map(|&r| times.value(r as usize)).collect();
                for (start, end) in assign_sessions(&run, gap) {
                    starts.push(start);
                    ends.push(end);
                }
                first = i;
            }
        }
        let indices = UInt32Array::from(order);
        let mut columns = rows.columns().iter().map(|c| take(c, &indices, None)).collect::<Result<Vec<_>, _>>()?;
        let time_type = self.input_schema.field(self.time).data_type();
        columns.push(cast(&(Arc::new(Int64Array::from(starts)) as ArrayRef), time_type)?);
        columns.push(cast(&(Arc::new(Int64Array::from(ends)) as ArrayRef), time_type)?);
        Ok(RecordBatch::try_new(self.schema.clone(), columns)?)
    }
}

#[async_trait]
impl TableProvider for SessionTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::View
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let snapshot = self.cell.current();
        let version = snapshot
            .relation(&self.input)
            .ok_or_else(|| DataFusionError::Plan(format!("\"{}\" was dropped", self.input)))?;
        let batches = version.batches().map_err(|e| DataFusionError::External(Box::new(e)))?;
        let rows = concat_batches(&self.input_schema, &batches)?;
        let rows = RecordBatch::try_new(self.input_schema.clone(), rows.columns().to_vec())?;
        let with_sessions = self.sessions(&rows)?;
        Ok(MemorySourceConfig::try_new_exec(&[vec![with_sessions]], self.schema.clone(), projection.cloned())?)
    }
}

/// `freshet_session(input, time column, gap in ms, keys)`.
#[derive(Debug)]
pub struct SessionFunction {
    pub cell: Arc<SnapshotCell>,
}

impl TableFunctionImpl for SessionFunction {
    fn call_with_args(&self, args: TableFunctionArgs) -> DfResult<Arc<dyn TableProvider>> {
        let usage = "SESSION(input, time_column, INTERVAL 'gap')";
        let text = |i: usize| match args.exprs().get(i) {
            Some(Expr::Literal(ScalarValue::Utf8(Some(s)), _)) => Ok(s.clone()),
            _ => Err(DataFusionError::Plan(format!("{usage}: argument {} is missing", i + 1))),
        };
        let input = text(0)?;
        let time_name = text(1)?;
        let gap_ms = match args.exprs().get(2) {
            Some(Expr::Literal(value, _)) => match value.cast_to(&DataType::Int64)? {
                ScalarValue::Int64(Some(ms)) if ms > 0 => ms,
                _ => return Err(DataFusionError::Plan(format!("{usage}: the gap must be positive"))),
            },
            _ => return Err(DataFusionError::Plan(format!("{usage}: the gap is missing"))),
        };
        let key_names = text(3)?;
        let snapshot = self.cell.current();
        let version = snapshot.relation(&input).ok_or_else(|| {
            DataFusionError::Plan(format!(
                "{usage}: \"{input}\" is not a table, source or materialized view (SESSION reads one by name)"
            ))
        })?;
        let input_schema = version.def.schema.clone();
        let column = |name: &str| {
            input_schema
                .index_of(name)
                .map_err(|_| DataFusionError::Plan(format!("{usage}: \"{input}\" has no column {name}")))
        };
        let time = column(&time_name)?;
        if !matches!(input_schema.field(time).data_type(), DataType::Timestamp(..)) {
            return Err(DataFusionError::Plan(format!(
                "{usage}: the time column {time_name} is {}, not a TIMESTAMP",
                input_schema.field(time).data_type()
            )));
        }
        let keys = key_names.split(',').filter(|k| !k.is_empty()).map(column).collect::<DfResult<Vec<_>>>()?;
        let time_type = input_schema.field(time).data_type().clone();
        let mut fields: Vec<Field> =
            input_schema.fields().iter().map(|f| f.as_ref().clone().with_metadata(Default::default())).collect();
        fields.push(Field::new("window_start", time_type.clone(), true));
        fields.push(Field::new("window_end", time_type, true));
        let schema = Arc::new(Schema::new(fields));
        Ok(Arc::new(SessionTable { input, input_schema, time, gap_ms, keys, schema, cell: self.cell.clone() }))
    }
}
