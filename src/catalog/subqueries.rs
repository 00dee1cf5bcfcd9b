//! Scalar subqueries in catalog queries, which clients use to fetch one fact per row (a
//! column's default, collation or sequence).
//!
//! datafusion-pg-catalog's rewriting parser replaces every such subquery it thinks is
//! correlated with NULL (`RemoveSubqueryFromProjection`) and stamps `LIMIT 1` on the rest,
//! so a subquery DataFusion cannot plan silently answers NULL, and one that returns several
//! rows answers its first. freshet runs the crate's other rules itself ([`rewrite`]) and
//! puts [`ScalarSubqueries`] in that one's place: a scalar subquery is turned into the
//! one-aggregate form DataFusion decorrelates, with the same answer as in Postgres (NULL
//! for no row, the value for one, 21000 for more), or left for DataFusion to plan or refuse
//! (0A000, see `error`); one in a CASE result that does not aggregate is refused only where
//! its branch is taken. No subquery is ever answered with a NULL it did not compute.
//! Nothing here changes data.

use std::ops::ControlFlow;
use std::sync::{Arc, LazyLock};

use datafusion::arrow::datatypes::DataType;
use datafusion::error::Result as DfResult;
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility, create_udf,
};
use datafusion::prelude::SessionContext;
use datafusion::sql::sqlparser::ast::{
    Expr as SqlExpr, GroupByExpr, LimitClause, OrderBy, OrderByKind, Query, SelectItem, SetExpr,
    Statement as SqlStatement, Value as SqlValue, VisitMut, VisitorMut,
};
use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
use datafusion::sql::sqlparser::parser::{Parser, ParserError};
use datafusion_pg_catalog::sql::PostgresCompatibilityParser;
use datafusion_pg_catalog::sql::rules::{
    AliasDuplicatedProjectionRewrite, CurrentUserVariableToSessionUserFunctionCall, FixArrayLiteral,
    FixVersionColumnName, PrependUnqualifiedPgTableName, ResolveUnqualifiedIdentifier, RewriteArrayAnyAllOperation,
    RewritePgCatalogOperator, RewriteRegCastToSubquery, SqlStatementRewriteRule, StripCallableQualifier, StripCollate,
};

use crate::error::Error;

/// The crate's parser: its whole-query replacements of known client queries, and the
/// reference for [`rewrite`].
static PARSER: LazyLock<PostgresCompatibilityParser> = LazyLock::new(PostgresCompatibilityParser::new);

/// A column only the crate's stub for DBeaver's relation-size query projects (as
/// `NULL::INT AS total_rel_size … WHERE false`), whatever the relations.
const SIZE_STUB_COLUMN: &str = "NULL::INT AS total_rel_size";

/// The crate's rewrite rules (`PostgresCompatibilityParser::new`, datafusion-pg-catalog
/// 0.19) in the crate's order, without `RemoveSubqueryFromProjection`.
static RULES: LazyLock<Vec<Arc<dyn SqlStatementRewriteRule>>> = LazyLock::new(|| {
    vec![
        Arc::new(AliasDuplicatedProjectionRewrite),
        Arc::new(ResolveUnqualifiedIdentifier),
        Arc::new(RewriteArrayAnyAllOperation),
        Arc::new(PrependUnqualifiedPgTableName),
        Arc::new(StripCallableQualifier),
        Arc::new(FixArrayLiteral),
        Arc::new(CurrentUserVariableToSessionUserFunctionCall),
        Arc::new(StripCollate),
        Arc::new(RewritePgCatalogOperator),
        Arc::new(RewriteRegCastToSubquery::new()),
        Arc::new(FixVersionColumnName),
    ]
});

/// Parses a catalog query as the crate's parser does, but with [`ScalarSubqueries`] in
/// place of the crate's rule for select-list subqueries.
///
/// A query the crate replaces wholesale (its list of known client queries it answers
/// with an empty stub) keeps the crate's result: when the crate's rules over the plain
/// parse do not reproduce the crate's answer, a replacement happened. Those stubs answer
/// psql's `\d` lookups of row policies, extended statistics and publications, and pgcli's
/// of foreign keys and user-defined types, none of which freshet has, so empty is the
/// right answer. The one exception is DBeaver's relation sizes in a namespace given by
/// name ([`SIZE_STUB_COLUMN`]), which freshet plans itself: freshet's `public` has
/// relations, and Postgres refuses the name where an OID is expected (22P02).
pub(super) fn rewrite(text: &str) -> Result<Vec<SqlStatement>, ParserError> {
    let crates = PARSER.parse(text)?;
    let Ok(plain) = Parser::parse_sql(&PostgreSqlDialect {}, text) else { return Ok(crates) };
    let replaced =
        plain.len() != crates.len() || plain.iter().cloned().map(|s| PARSER.rewrite(s)).ne(crates.iter().cloned());
    let wrong_stub = crates.iter().any(|s| s.to_string().contains(SIZE_STUB_COLUMN));
    if replaced && !wrong_stub {
        return Ok(crates);
    }
    Ok(plain
        .into_iter()
        .map(|statement| {
            let mut statement = RULES.iter().fold(statement, |s, rule| rule.rewrite(s));
            let _ = VisitMut::visit(&mut statement, &mut ScalarSubqueries);
            statement
        })
        .collect())
}

/// Turns a scalar subquery into one DataFusion plans with Postgres' answer.
/// `(SELECT e FROM … WHERE …)` becomes
/// `(SELECT freshet_single_row(count(*), first_value(e)) FROM … WHERE …)`: NULL when no
/// row matches, `e` when one does, and 21000 when several do, as in Postgres; DataFusion
/// decorrelates it like any one-aggregate subquery, in a select list, a WHERE clause (pgjdbc's
/// `getTypeInfo`: `typrelid = 0 OR (SELECT c.relkind = 'c' FROM pg_class c WHERE c.oid =
/// t.typrelid)`) or a CASE condition (SQLAlchemy's collation test: `attcollation != 0 AND
/// (SELECT typcollation FROM pg_type WHERE oid = atttypid) != attcollation`).
/// `… LIMIT 1` (with or without ORDER BY) becomes `first_value(e [ORDER BY …])`.
///
/// A subquery that already aggregates, or has any other shape (GROUP BY, DISTINCT, UNION,
/// OFFSET, …), is left as written: DataFusion answers it if it is uncorrelated (and
/// refuses more than one row), and refuses it otherwise, which `error` reports as 0A000.
///
/// A subquery in a CASE result (THEN or ELSE) that does not aggregate becomes
/// [`UNSUPPORTED_SUBQUERY`] instead, which is NULL where the branch is not taken (Postgres
/// does not evaluate it there either) and refuses (0A000) where it is. Clients put such
/// subqueries behind a test for what they fetch (`atthasdef`, `attidentity != ''`,
/// `attcollation <> 0`), which freshet's columns mostly fail, and DataFusion cannot plan
/// every one of them (psql's collation lookup compares an outer column with `<>`); as
/// results they cost a query its answer only where they are needed.
pub(super) struct ScalarSubqueries;

impl VisitorMut for ScalarSubqueries {
    type Break = ();

    fn pre_visit_query(&mut self, query: &mut Query) -> ControlFlow<()> {
        let SetExpr::Select(select) = query.body.as_mut() else { return ControlFlow::Continue(()) };
        for item in &mut select.projection {
            if let SelectItem::UnnamedExpr(expr) | SelectItem::ExprWithAlias { expr, .. } = item {
                outside_subqueries(expr, exists_as_count);
            }
        }
        ControlFlow::Continue(())
    }

    // Before the children: a CASE's results are dealt with before the subqueries in them
    // are reached as subqueries.
    fn pre_visit_expr(&mut self, expr: &mut SqlExpr) -> ControlFlow<()> {
        match expr {
            SqlExpr::Subquery(query) => answer_one_row(query),
            SqlExpr::Case { conditions, else_result, .. } => {
                let results =
                    conditions.iter_mut().map(|when| &mut when.result).chain(else_result.iter_mut().map(|e| &mut **e));
                for result in results {
                    // Subqueries inside one that aggregates are left to this visitor's later steps.
                    outside_subqueries(result, refuse_where_taken);
                }
            }
            _ => {}
        }
        ControlFlow::Continue(())
    }
}

/// Applies `rewrite` to every expression of a tree that is not inside a query nested in
/// it (the expression itself first, then what it contains).
fn outside_subqueries(expr: &mut SqlExpr, rewrite: impl FnMut(&mut SqlExpr)) {
    let _ = VisitMut::visit(expr, &mut OutsideSubqueries { depth: 0, rewrite });
}

struct OutsideSubqueries<F> {
    /// How many queries deep the visit is.
    depth: usize,
    rewrite: F,
}

impl<F: FnMut(&mut SqlExpr)> VisitorMut for OutsideSubqueries<F> {
    type Break = ();

    fn pre_visit_query(&mut self, _: &mut Query) -> ControlFlow<()> {
        self.depth += 1;
        ControlFlow::Continue(())
    }

    fn post_visit_query(&mut self, _: &mut Query) -> ControlFlow<()> {
        self.depth -= 1;
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, expr: &mut SqlExpr) -> ControlFlow<()> {
        if self.depth == 0 {
            (self.rewrite)(expr);
        }
        ControlFlow::Continue(())
    }
}

/// `[NOT] EXISTS (SELECT … FROM … WHERE …)` in a select list, which DataFusion plans
/// only in a WHERE clause, becomes `[NOT] ((SELECT count(*) FROM … WHERE …) > 0)`: the
/// same truth value, and a one-aggregate subquery DataFusion decorrelates (psql's `\d`
/// of an index asks whether its constraint is deferrable this way). Other shapes are left
/// as written.
fn exists_as_count(expr: &mut SqlExpr) {
    let SqlExpr::Exists { subquery, negated } = expr else { return };
    if subquery.with.is_some() || subquery.limit_clause.is_some() || subquery.fetch.is_some() {
        return;
    }
    let SetExpr::Select(select) = subquery.body.as_ref() else { return };
    let ungrouped = matches!(&select.group_by, GroupByExpr::Expressions(keys, modifiers) if keys.is_empty() && modifiers.is_empty());
    if select.from.is_empty() || !ungrouped || select.having.is_some() || select.distinct.is_some() {
        return;
    }
    let mut counted = subquery.clone();
    counted.order_by = None;
    let SetExpr::Select(counting) = counted.body.as_mut() else { return };
    let Ok(count) = Parser::new(&PostgreSqlDialect {}).try_with_sql("count(*)").and_then(|mut p| p.parse_expr()) else {
        return;
    };
    counting.projection = vec![SelectItem::UnnamedExpr(count)];
    let not = if *negated { "NOT " } else { "" };
    if let Ok(replacement) = Parser::new(&PostgreSqlDialect {})
        .try_with_sql(&format!("{not}(({counted}) > 0)"))
        .and_then(|mut p| p.parse_expr())
    {
        *expr = replacement;
    }
}

/// A scalar subquery of a CASE result that does not aggregate becomes
/// [`UNSUPPORTED_SUBQUERY`] (see [`ScalarSubqueries`]).
fn refuse_where_taken(expr: &mut SqlExpr) {
    let SqlExpr::Subquery(query) = expr else { return };
    if aggregates(query) {
        return;
    }
    let text = SqlExpr::Value(SqlValue::SingleQuotedString(query.to_string()).with_empty_span());
    if let Some(refusal) = super::system::call(UNSUPPORTED_SUBQUERY, vec![text]) {
        *expr = refusal;
    }
}

/// Rewrites `query` to the one-aggregate form (see [`SelectListSubqueries`]) when it has
/// the plain shape `SELECT e FROM … [WHERE …] [ORDER BY …] [LIMIT 1]`.
fn answer_one_row(query: &mut Query) {
    let limit_one = match &query.limit_clause {
        None => false,
        Some(LimitClause::LimitOffset { limit: Some(SqlExpr::Value(v)), offset: None, limit_by })
            if limit_by.is_empty() && matches!(&v.value, SqlValue::Number(n, _) if n == "1") =>
        {
            true
        }
        Some(_) => return,
    };
    if query.with.is_some() || query.fetch.is_some() || !query.locks.is_empty() || aggregates(query) {
        return;
    }
    let SetExpr::Select(select) = query.body.as_mut() else { return };
    // Without FROM there is one row, and nothing to decorrelate.
    if select.from.is_empty() {
        return;
    }
    let ungrouped = matches!(&select.group_by, GroupByExpr::Expressions(keys, modifiers) if keys.is_empty() && modifiers.is_empty());
    if select.distinct.is_some()
        || !ungrouped
        || select.having.is_some()
        || !select.named_window.is_empty()
        || select.qualify.is_some()
    {
        return;
    }
    let [item] = select.projection.as_mut_slice() else { return };
    let (SelectItem::UnnamedExpr(value) | SelectItem::ExprWithAlias { expr: value, .. }) = item else { return };
    let Some(order_by) = aggregate_order(query.order_by.as_ref(), value) else { return };
    let text = if limit_one {
        format!("first_value({value}{order_by})")
    } else {
        format!("{SINGLE_ROW}(count(*), first_value({value}))")
    };
    let Ok(one_row) = Parser::new(&PostgreSqlDialect {}).try_with_sql(&text).and_then(|mut p| p.parse_expr()) else {
        return;
    };
    *value = one_row;
    query.order_by = None;
    query.limit_clause = None;
}

/// A subquery's ORDER BY as the ORDER BY of an aggregate over its one select-list item
/// `value` (" ORDER BY …", or "" without one): `ORDER BY 1` names that item. None when it
/// names an item by another number.
fn aggregate_order(order_by: Option<&OrderBy>, value: &SqlExpr) -> Option<String> {
    let Some(order_by) = order_by else { return Some(String::new()) };
    let OrderByKind::Expressions(keys) = &order_by.kind else { return None };
    let mut keys = keys.clone();
    for key in &mut keys {
        if let SqlExpr::Value(v) = &key.expr
            && let SqlValue::Number(n, _) = &v.value
        {
            if n != "1" {
                return None;
            }
            key.expr = value.clone();
        }
    }
    Some(format!(" ORDER BY {}", keys.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")))
}

/// Whether a subquery computes one aggregate (`SELECT max(…) FROM …`, no GROUP BY), the
/// form of correlated scalar subquery DataFusion plans.
pub(super) fn aggregates(query: &Query) -> bool {
    let SetExpr::Select(select) = query.body.as_ref() else { return false };
    if !matches!(&select.group_by, GroupByExpr::Expressions(keys, _) if keys.is_empty()) {
        return false;
    }
    let [item] = select.projection.as_slice() else { return false };
    let (SelectItem::UnnamedExpr(SqlExpr::Function(f)) | SelectItem::ExprWithAlias { expr: SqlExpr::Function(f), .. }) =
        item
    else {
        return false;
    };
    let name = f.name.to_string().to_ascii_lowercase();
    ["max", "min", "count", "sum", "bool_and", "bool_or", "string_agg", "array_agg", "first_value", SINGLE_ROW]
        .contains(&name.as_str())
}

/// `freshet_single_row(rows, value)`: `value`, or 21000 when `rows` (the number of rows a
/// scalar subquery found) is more than one.
const SINGLE_ROW: &str = "freshet_single_row";

/// A function that refuses (0A000) to compute a value for any row: what a subquery in a
/// CASE result that DataFusion could not plan becomes. Volatile, so it is never folded away.
const UNSUPPORTED_SUBQUERY: &str = "freshet_unsupported_subquery";

/// Registers [`SINGLE_ROW`] and [`UNSUPPORTED_SUBQUERY`].
pub(super) fn register(ctx: &SessionContext) {
    ctx.register_udf(ScalarUDF::new_from_impl(SingleRow { signature: Signature::any(2, Volatility::Volatile) }));
    let refuse = |args: &[ColumnarValue]| -> DfResult<ColumnarValue> {
        let arrays = ColumnarValue::values_to_arrays(args)?;
        let Some(query) = arrays.first().filter(|a| !a.is_empty()) else {
            return Ok(ColumnarValue::Array(datafusion::arrow::array::new_null_array(&DataType::Utf8, 0)));
        };
        let text = datafusion::arrow::util::display::array_value_to_string(query, 0)?;
        Err(datafusion::error::DataFusionError::External(Box::new(Error::NotSupported {
            feature: format!("the correlated subquery ({text}) in a catalog query"),
            hint: Some("freshet answers it only where the CASE branch holding it is not taken".into()),
        })))
    };
    ctx.register_udf(create_udf(
        UNSUPPORTED_SUBQUERY,
        vec![DataType::Utf8],
        DataType::Utf8,
        Volatility::Volatile,
        Arc::new(refuse),
    ));
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct SingleRow {
    signature: Signature,
}

impl ScalarUDFImpl for SingleRow {
    fn name(&self) -> &str {
        SINGLE_ROW
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, arg_types: &[DataType]) -> DfResult<DataType> {
        Ok(arg_types.get(1).cloned().unwrap_or(DataType::Null))
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DfResult<ColumnarValue> {
        let [rows, value] = args.args.as_slice() else {
            return Err(datafusion::error::DataFusionError::Internal(format!("{SINGLE_ROW} takes two arguments")));
        };
        let rows = rows.to_array(args.number_rows)?;
        let rows = datafusion::arrow::compute::cast(&rows, &DataType::Int64)?;
        let rows = datafusion::common::cast::as_int64_array(&rows)?;
        if rows.iter().flatten().any(|n| n > 1) {
            return Err(datafusion::error::DataFusionError::External(Box::new(Error::InvalidValue {
                code: "21000",
                message: "more than one row returned by a subquery used as an expression".into(),
            })));
        }
        Ok(value.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rewritten(sql: &str) -> String {
        rewrite(sql).expect("parses").iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
    }

    #[test]
    fn other_queries_are_rewritten_as_the_crate_does() {
        for sql in [
            "SELECT c.relname FROM pg_class c WHERE c.relkind = ANY(ARRAY['r', 'v'])",
            "SELECT n.nspname FROM pg_namespace n WHERE n.nspname OPERATOR(pg_catalog.~) '^(public)$'",
            "select version()",
        ] {
            let crates = PARSER.parse(sql).expect("parses").iter().map(ToString::to_string).collect::<Vec<_>>();
            assert_eq!(rewritten(sql), crates.join("; "), "{sql}");
        }
    }

    #[test]
    fn select_list_subqueries_answer_one_row_or_refuse() {
        let sql = "SELECT a.attname, (SELECT d.adbin FROM pg_attrdef d WHERE d.adrelid = a.attrelid) AS def FROM pg_attribute a";
        assert!(
            rewritten(sql)
                .contains("(SELECT freshet_single_row(count(*), first_value(d.adbin)) FROM pg_catalog.pg_attrdef d"),
            "{}",
            rewritten(sql)
        );
        let sql =
            "SELECT (SELECT c.relname FROM pg_class c WHERE c.oid = a.attrelid ORDER BY 1 LIMIT 1) FROM pg_attribute a";
        assert!(
            rewritten(sql).contains("(SELECT first_value(c.relname ORDER BY c.relname) FROM"),
            "{}",
            rewritten(sql)
        );
        // Shapes with no one-row form stay as written for DataFusion to plan or refuse.
        let sql = "SELECT (SELECT c.relname FROM pg_class c WHERE c.oid = a.attrelid LIMIT 2) FROM pg_attribute a";
        assert!(rewritten(sql).contains("LIMIT 2)"), "{}", rewritten(sql));
        let sql = "SELECT (SELECT max(c.relname) FROM pg_class c WHERE c.oid = a.attrelid) FROM pg_attribute a";
        assert!(rewritten(sql).contains("(SELECT max(c.relname) FROM"), "{}", rewritten(sql));
    }

    #[test]
    fn where_clause_subqueries_answer_one_row() {
        // pgjdbc's getTypeInfo.
        let sql = "SELECT t.typname,t.oid FROM pg_catalog.pg_type t JOIN pg_catalog.pg_namespace n ON (t.typnamespace = n.oid) WHERE n.nspname != 'pg_toast' AND (t.typrelid = 0 OR (SELECT c.relkind = 'c' FROM pg_catalog.pg_class c WHERE c.oid = t.typrelid))";
        let out = rewritten(sql);
        assert!(out.contains("OR (SELECT freshet_single_row(count(*), first_value(c.relkind = 'c')) FROM"), "{out}");
        // `'name'::regclass` is a subquery by name, which must find one relation.
        let out = rewritten("SELECT relname FROM pg_class WHERE oid = 'readings'::regclass");
        assert!(
            out.contains("oid = (SELECT freshet_single_row(count(*), first_value(c.oid)) FROM pg_catalog.pg_class c"),
            "{out}"
        );
        // Without FROM there is nothing to decorrelate.
        assert!(rewritten("SELECT (SELECT 1) FROM pg_class").contains("(SELECT 1)"));
    }

    #[test]
    fn exists_in_a_select_list_counts() {
        // psql 15 `\d index`.
        let sql = "SELECT (NOT i.indimmediate) AND EXISTS (SELECT 1 FROM pg_catalog.pg_constraint WHERE conrelid = i.indrelid AND conindid = i.indexrelid AND contype IN ('p','u','x') AND condeferrable) AS condeferrable, NOT EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = i.indrelid) FROM pg_catalog.pg_index i WHERE EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = i.indexrelid)";
        let out = rewritten(sql);
        assert!(
            out.contains(
                "(NOT i.indimmediate) AND ((SELECT count(*) FROM pg_catalog.pg_constraint WHERE conrelid = i.indrelid"
            ),
            "{out}"
        );
        assert!(
            out.contains("NOT ((SELECT count(*) FROM pg_catalog.pg_class c WHERE c.oid = i.indrelid) > 0)"),
            "{out}"
        );
        assert!(out.contains("WHERE EXISTS (SELECT 1 FROM pg_catalog.pg_class c"), "a WHERE clause's stays: {out}");
    }

    #[test]
    fn case_conditions_are_answered_and_results_refused_where_taken() {
        // SQLAlchemy 2's collation column (dialects/postgresql/base.py, _columns_query).
        let sql = "SELECT CASE WHEN (pg_catalog.pg_attribute.attcollation != 0 AND (SELECT pg_catalog.pg_type.typcollation FROM pg_catalog.pg_type WHERE pg_catalog.pg_type.oid = pg_catalog.pg_attribute.atttypid) != pg_catalog.pg_attribute.attcollation) THEN (SELECT json_build_object('name', pg_catalog.pg_collation.collname) FROM pg_catalog.pg_collation WHERE pg_catalog.pg_collation.oid = pg_catalog.pg_attribute.attcollation) END AS collation FROM pg_catalog.pg_attribute";
        let out = rewritten(sql);
        assert!(
            out.contains("(SELECT freshet_single_row(count(*), first_value(pg_catalog.pg_type.typcollation)) FROM"),
            "the condition's subquery is planned: {out}"
        );
        assert!(out.contains("THEN freshet_unsupported_subquery('SELECT json_build_object("), "{out}");
        assert!(!out.contains("NULL"), "nothing becomes NULL: {out}");
        // A subquery deeper inside a result is refused where taken, not the whole CASE.
        let sql = "SELECT CASE WHEN a.atthasdef THEN upper((SELECT d.adbin FROM pg_attrdef d WHERE d.adrelid = a.attrelid)) ELSE a.attname END FROM pg_attribute a";
        let out = rewritten(sql);
        assert!(out.contains("THEN upper(freshet_unsupported_subquery('SELECT d.adbin FROM"), "{out}");
        assert!(out.contains("ELSE a.attname END"), "{out}");
        // Aggregating results are DataFusion's to plan, nested subqueries included.
        let sql = "SELECT CASE WHEN a.atthasdef THEN (SELECT max(d.adbin) FROM pg_attrdef d WHERE d.adnum = (SELECT 1)) END FROM pg_attribute a";
        assert!(rewritten(sql).contains("THEN (SELECT max(d.adbin) FROM"), "{}", rewritten(sql));
    }

    #[test]
    fn the_relation_size_stub_is_not_used() {
        // datafusion-pg-catalog answers this text with an empty stub.
        let sql = "select c.oid,pg_catalog.pg_total_relation_size(c.oid) as total_rel_size,pg_catalog.pg_relation_size(c.oid) as rel_size\n     FROM pg_class c\n     WHERE c.relnamespace='public'";
        let crates = PARSER.parse(sql).expect("parses").iter().map(ToString::to_string).collect::<Vec<_>>().join("; ");
        assert!(crates.contains(SIZE_STUB_COLUMN), "the crate's stub: {crates}");
        let out = rewritten(sql);
        assert!(out.contains("pg_relation_size(c.oid)") && !out.contains("WHERE false"), "{out}");
        // Stubs whose empty answer is right for freshet stay (psql's publications of a table).
        let sql = "SELECT pubname , NULL , NULL FROM pg_catalog.pg_publication p JOIN pg_catalog.pg_publication_namespace pn ON p.oid = pn.pnpubid JOIN pg_catalog.pg_class pc ON pc.relnamespace = pn.pnnspid WHERE pc.oid = '16384' and pg_catalog.pg_relation_is_publishable('16384') UNION SELECT pubname , pg_get_expr(pr.prqual, c.oid) , (CASE WHEN pr.prattrs IS NOT NULL THEN (SELECT string_agg(attname, ', ') FROM pg_catalog.generate_series(0, pg_catalog.array_upper(pr.prattrs::pg_catalog.int2[], 1)) s, pg_catalog.pg_attribute WHERE attrelid = pr.prrelid AND attnum = prattrs[s]) ELSE NULL END) FROM pg_catalog.pg_publication p JOIN pg_catalog.pg_publication_rel pr ON p.oid = pr.prpubid JOIN pg_catalog.pg_class c ON c.oid = pr.prrelid WHERE pr.prrelid = '16384' UNION SELECT pubname , NULL , NULL FROM pg_catalog.pg_publication p WHERE p.puballtables AND pg_catalog.pg_relation_is_publishable('16384') ORDER BY 1;";
        assert!(rewritten(sql).contains("WHERE false"), "{}", rewritten(sql));
    }
}
