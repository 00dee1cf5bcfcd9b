//! Point lookups: `SELECT columns FROM relation WHERE key = value` answered from the
//! relation's key index ([`TableVersion::lookup`]) instead of a DataFusion plan that scans
//! every row.
//!
//! [`answer`] recognises the lookup shape in a query's logical plan (with parameters
//! already bound) and reads the rows in the statement's snapshot; anything else, and any
//! lookup it cannot answer exactly as DataFusion would, is left to the general path by
//! returning `None`. [`view_key`] names the columns a materialized view is looked up by.
//! Nothing here changes data.

use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, RecordBatch};
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::common::{Column, Dependency, ScalarValue};
use datafusion::logical_expr::{BinaryExpr, Expr, LogicalPlan, Operator, TableScan};

use super::table::{Snapshot, TableVersion, planned_table_id};
use crate::error::Result;

/// The columns a view's query guarantees to be unique: the smallest key among the
/// functional dependencies DataFusion derives (a GROUP BY's columns, a primary key carried
/// through). Empty when there is none; lookups on such a view scan.
pub(super) fn view_key(plan: &LogicalPlan) -> Vec<usize> {
    let dependencies = plan.schema().functional_dependencies();
    let covers_all = |targets: &[usize]| (0..plan.schema().fields().len()).all(|i| targets.contains(&i));
    dependencies
        .iter()
        .filter(|d| d.mode == Dependency::Single && !d.source_indices.is_empty() && covers_all(&d.target_indices))
        .map(|d| d.source_indices.clone())
        .min_by_key(|key| key.len())
        .unwrap_or_default()
}

/// The rows of `plan` read from `snapshot` when it is a lookup by a relation's whole lookup
/// key with constant values; `None` for every other plan.
pub(super) fn answer(plan: &LogicalPlan, snapshot: &Snapshot) -> Result<Option<(SchemaRef, RecordBatch)>> {
    let LogicalPlan::Projection(projection) = plan else { return Ok(None) };
    let LogicalPlan::Filter(filter) = projection.input.as_ref() else { return Ok(None) };
    let LogicalPlan::TableScan(scan) = filter.input.as_ref() else { return Ok(None) };
    if scan.projection.is_some() || !scan.filters.is_empty() || scan.fetch.is_some() {
        return Ok(None);
    }
    let Some(version) = relation(scan, snapshot) else { return Ok(None) };
    let key_columns = &version.def.lookup_key;
    if key_columns.is_empty() {
        return Ok(None);
    }
    // Every key column exactly once, nothing else.
    let mut key: Vec<Option<ArrayRef>> = vec![None; key_columns.len()];
    for conjunct in conjuncts(&filter.predicate) {
        let Some((column, value)) = column_equals_literal(conjunct) else { return Ok(None) };
        let Ok(index) = scan.projected_schema.index_of_column(column) else { return Ok(None) };
        let Some(slot) = key_columns.iter().position(|&k| k == index) else { return Ok(None) };
        let field = version.def.schema.field(index);
        let Some(value) = exact_cast(value, field.data_type()) else { return Ok(None) };
        if key[slot].replace(value.to_array()?).is_some() {
            return Ok(None);
        }
    }
    let Some(key) = key.into_iter().collect::<Option<Vec<ArrayRef>>>() else { return Ok(None) };
    // Output columns: plain (possibly renamed) columns of the relation.
    let mut outputs = Vec::with_capacity(projection.expr.len());
    for expr in &projection.expr {
        let column = match expr {
            Expr::Column(column) => column,
            Expr::Alias(alias) => match alias.expr.as_ref() {
                Expr::Column(column) => column,
                _ => return Ok(None),
            },
            _ => return Ok(None),
        };
        let Ok(index) = scan.projected_schema.index_of_column(column) else { return Ok(None) };
        outputs.push(index);
    }
    let Some(rows) = version.lookup(&key)? else { return Ok(None) };
    let schema: SchemaRef = Arc::new(plan.schema().as_arrow().clone());
    let columns = outputs.iter().map(|&i| rows.column(i).clone()).collect();
    // A schema that disagrees (a type the planner changed) goes the general way.
    Ok(RecordBatch::try_new(schema.clone(), columns).ok().map(|batch| (schema, batch)))
}

/// The relation `scan` reads, as it is in `snapshot`; `None` if it is not a freshet table or
/// view, or was recreated since the plan was made (the general path reports that).
fn relation<'a>(scan: &TableScan, snapshot: &'a Snapshot) -> Option<&'a TableVersion> {
    let id = planned_table_id(&scan.source)?;
    snapshot.relation(scan.table_name.table()).filter(|version| version.def.id == id)
}

/// The terms of a chain of ANDs.
fn conjuncts(predicate: &Expr) -> Vec<&Expr> {
    match predicate {
        Expr::BinaryExpr(BinaryExpr { left, op: Operator::And, right }) => {
            let mut terms = conjuncts(left);
            terms.extend(conjuncts(right));
            terms
        }
        other => vec![other],
    }
}

/// `column = literal` or `literal = column`.
fn column_equals_literal(expr: &Expr) -> Option<(&Column, &ScalarValue)> {
    let Expr::BinaryExpr(BinaryExpr { left, op: Operator::Eq, right }) = expr else { return None };
    match (left.as_ref(), right.as_ref()) {
        (Expr::Column(column), Expr::Literal(value, _)) | (Expr::Literal(value, _), Expr::Column(column)) => {
            Some((column, value))
        }
        _ => None,
    }
}

/// `value` as the column's type, when that loses nothing (so comparing in the column's
/// type gives what comparing after DataFusion's coercion would); `None` otherwise.
fn exact_cast(value: &ScalarValue, to: &datafusion::arrow::datatypes::DataType) -> Option<ScalarValue> {
    if &value.data_type() == to {
        return Some(value.clone());
    }
    if value.is_null() {
        return ScalarValue::try_from(to).ok();
    }
    let cast = value.cast_to(to).ok()?;
    let back = cast.cast_to(&value.data_type()).ok()?;
    (back == *value).then_some(cast)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use datafusion::datasource::MemTable;
    use datafusion::prelude::SessionContext;

    use datafusion::common::ScalarValue;

    use super::{answer, view_key};
    use crate::catalog::Database;
    use crate::sql::Planned;

    async fn key_of(query: &str) -> Vec<usize> {
        let ctx = SessionContext::new();
        let schema =
            Arc::new(Schema::new(vec![Field::new("k", DataType::Utf8, true), Field::new("v", DataType::Int64, false)]));
        let table = MemTable::try_new(schema, vec![vec![]]).expect("an empty table");
        ctx.register_table("t", Arc::new(table)).expect("registers");
        // Views are created from the optimised plan.
        let plan = ctx.sql(query).await.expect("plans").into_unoptimized_plan();
        let optimized = ctx.state().optimize(&plan).expect("optimises");
        assert_eq!(view_key(&plan), view_key(&optimized), "{query}");
        view_key(&optimized)
    }

    #[tokio::test]
    async fn a_views_key_is_its_group_by_columns_where_they_are() {
        assert_eq!(key_of("SELECT k, count(*) AS n FROM t GROUP BY k").await, vec![0]);
        assert_eq!(key_of("SELECT sum(v) AS s, k FROM t GROUP BY k").await, vec![1]);
        assert_eq!(key_of("SELECT k, v % 2 AS parity, count(*) AS n FROM t GROUP BY k, v % 2").await, vec![0, 1]);
        // Without its GROUP BY column in the output a view has no key; nor does a projection.
        assert_eq!(key_of("SELECT count(*) AS n FROM t GROUP BY k").await, Vec::<usize>::new());
        assert_eq!(key_of("SELECT k, v FROM t").await, Vec::<usize>::new());
    }

    /// What a lookup returns, through the index, or `None` when it is not answered there.
    async fn looked_up(db: &Database, query: &str) -> Option<Vec<String>> {
        looked_up_with(db, query, vec![]).await
    }

    /// The same for a prepared statement given `parameters`.
    async fn looked_up_with(db: &Database, query: &str, parameters: Vec<ScalarValue>) -> Option<Vec<String>> {
        let statement = crate::sql::parse(query).expect("parses").pop_front().expect("a statement");
        let planned = db.plan(&statement, query).await.expect("plans");
        let Planned::Query(plan) = planned.with_parameters(parameters.into()).expect("binds") else {
            panic!("not a query")
        };
        let (_, batch) = answer(&plan, &db.shared.cell.serving()).expect("answers")?;
        let text = datafusion::arrow::util::pretty::pretty_format_batches(&[batch]).expect("formats").to_string();
        Some(text.lines().map(str::to_string).collect())
    }

    #[tokio::test]
    async fn lookups_by_a_views_key_are_answered_from_its_index() {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = Database::open(crate::state::open_local_store(dir.path()).expect("store")).await.expect("opens");
        db.run(
            "CREATE TABLE t (id BIGINT PRIMARY KEY, k TEXT, v BIGINT);
             INSERT INTO t VALUES (1, 'a', 10), (2, 'a', 20), (3, 'b', 30);
             CREATE MATERIALIZED VIEW per_k AS SELECT k, count(*) AS n, sum(v) AS s FROM t GROUP BY k;",
        )
        .await
        .expect("creates");
        let rows = looked_up(&db, "SELECT n, s AS total FROM per_k WHERE k = 'a'").await;
        let expected = ["+---+-------+", "| n | total |", "+---+-------+", "| 2 | 30    |", "+---+-------+"];
        assert_eq!(rows, Some(expected.map(str::to_string).to_vec()));
        let rows = looked_up(&db, "SELECT v FROM t WHERE id = 3").await;
        assert_eq!(rows, Some(["+----+", "| v  |", "+----+", "| 30 |", "+----+"].map(str::to_string).to_vec()));
        let rows = looked_up_with(&db, "SELECT n FROM per_k WHERE k = $1", vec![ScalarValue::from("b")]).await;
        assert_eq!(rows, Some(["+---+", "| n |", "+---+", "| 1 |", "+---+"].map(str::to_string).to_vec()));
        let rows = looked_up_with(&db, "SELECT k FROM t WHERE id = $1", vec![ScalarValue::Int64(Some(2))]).await;
        assert_eq!(rows, Some(["+---+", "| k |", "+---+", "| a |", "+---+"].map(str::to_string).to_vec()));
        db.run(
            "CREATE TABLE readings (id BIGINT PRIMARY KEY, device BIGINT, v BIGINT);
             INSERT INTO readings SELECT value, value % 10, (value * 7919) % 1000 FROM range(0, 40);
             CREATE MATERIALIZED VIEW per_device AS
                 SELECT device, count(*) AS readings, sum(v) AS total FROM readings GROUP BY device;",
        )
        .await
        .expect("creates");
        let query = "SELECT readings, total FROM per_device WHERE device = $1";
        let rows = looked_up_with(&db, query, vec![ScalarValue::Int64(Some(3))]).await;
        assert_eq!(rows.map(|r| r.len()), Some(5));
        // Not by the whole key, or not only by it: the general path answers.
        assert_eq!(looked_up(&db, "SELECT n FROM per_k WHERE n = 2").await, None);
        assert_eq!(looked_up(&db, "SELECT n FROM per_k WHERE k = 'a' AND n = 2").await, None);
        assert_eq!(looked_up(&db, "SELECT k FROM t WHERE v = 30").await, None);
    }
}
