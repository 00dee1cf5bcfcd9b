//! Window table functions in `FROM`, rewritten into plain SQL before planning, so batch
//! queries and materialized views treat them like any other query:
//!
//! - `TUMBLE(input, ts, size)`: each row in the one window `[start, start + size)` where
//!   `start = date_bin(size, ts)` (windows aligned to 1970-01-01 UTC).
//! - `HOP(input, ts, slide, size)`: each row in the `size / slide` windows of length
//!   `size` starting every `slide` that contain it (`size` must be a multiple of `slide`):
//!   a `UNION ALL` of one shifted tumble per window a row falls in.
//!
//! - `SESSION(input, ts, gap)`: per key (the query's other GROUP BY columns), events closer
//!   than `gap` form one session `[first, last + gap)`. It becomes the table function
//!   `freshet_session('input', 'ts', gap_ms, 'key,…')` (see
//!   [`crate::catalog::session_window`]), since no plain query assigns sessions.
//!
//! All add `window_start` and `window_end` columns after the input's.

use std::ops::ControlFlow;

use datafusion::sql::parser::Statement as DFStatement;
use datafusion::sql::sqlparser::ast::{
    Expr, FunctionArg, FunctionArgExpr, GroupByExpr, Ident, ObjectName, Query, Select, SelectItem, SetExpr, TableAlias,
    TableFactor, Value, VisitMut, VisitorMut,
};
use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
use datafusion::sql::sqlparser::parser::Parser;

use crate::error::{Error, Result};

/// Most windows `HOP` may put one row in.
const MAX_HOPS: i64 = 1000;

/// Rewrites every window function in `FROM` clauses of `statement`.
pub fn rewrite(statement: &mut DFStatement) -> Result<()> {
    let mut rewriter = Rewriter;
    let flow = match statement {
        DFStatement::Statement(inner) => inner.visit(&mut rewriter),
        DFStatement::Explain(explain) => match explain.statement.as_mut() {
            DFStatement::Statement(inner) => inner.visit(&mut rewriter),
            _ => ControlFlow::Continue(()),
        },
        _ => ControlFlow::Continue(()),
    };
    match flow {
        ControlFlow::Break(e) => Err(e),
        ControlFlow::Continue(()) => Ok(()),
    }
}

struct Rewriter;

impl VisitorMut for Rewriter {
    type Break = Error;

    fn pre_visit_query(&mut self, query: &mut Query) -> ControlFlow<Error> {
        let SetExpr::Select(select) = query.body.as_mut() else { return ControlFlow::Continue(()) };
        let keys = match session_keys(select) {
            Ok(keys) => keys,
            Err(e) => return ControlFlow::Break(e),
        };
        for table in &mut select.from {
            for factor in std::iter::once(&mut table.relation).chain(table.joins.iter_mut().map(|j| &mut j.relation)) {
                if let Err(e) = session_call(factor, &keys) {
                    return ControlFlow::Break(e);
                }
            }
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_table_factor(&mut self, factor: &mut TableFactor) -> ControlFlow<Error> {
        let TableFactor::Table { name, alias, args: Some(args), .. } = factor else { return ControlFlow::Continue(()) };
        let function = name.to_string().to_ascii_lowercase();
        if !matches!(function.as_str(), "tumble" | "hop" | "session") {
            return ControlFlow::Continue(());
        }
        match window_query(&function, &args.args, alias.as_ref()) {
            Ok((subquery, alias)) => {
                *factor = TableFactor::Derived { lateral: false, subquery, alias: Some(alias), sample: None };
                ControlFlow::Continue(())
            }
            Err(e) => ControlFlow::Break(e),
        }
    }
}

/// The GROUP BY columns of `select` other than the window bounds: what sessions are per.
fn session_keys(select: &Select) -> Result<Vec<String>> {
    let GroupByExpr::Expressions(exprs, _) = &select.group_by else { return Ok(Vec::new()) };
    let mut keys = Vec::new();
    for expr in exprs {
        let expr = match expr {
            Expr::Value(value) => match &value.value {
                Value::Number(n, _) => {
                    let position: usize = n.parse().unwrap_or(0);
                    match position.checked_sub(1).and_then(|i| select.projection.get(i)) {
                        Some(SelectItem::UnnamedExpr(e)) | Some(SelectItem::ExprWithAlias { expr: e, .. }) => e,
                        _ => continue,
                    }
                }
                _ => continue,
            },
            other => other,
        };
        let name = match expr {
            Expr::Identifier(ident) => ident.value.to_ascii_lowercase(),
            Expr::CompoundIdentifier(idents) => idents.last().map(|i| i.value.to_ascii_lowercase()).unwrap_or_default(),
            _ => continue,
        };
        if name != "window_start" && name != "window_end" && !keys.contains(&name) {
            keys.push(name);
        }
    }
    Ok(keys)
}

/// Turns a `SESSION(input, ts, gap)` factor into `freshet_session('input', 'ts', gap_ms, 'keys')`.
fn session_call(factor: &mut TableFactor, keys: &[String]) -> Result<()> {
    let TableFactor::Table { name, alias, args: Some(args), .. } = factor else { return Ok(()) };
    if !name.to_string().eq_ignore_ascii_case("session") {
        return Ok(());
    }
    let usage = "SESSION(input, time_column, INTERVAL 'gap')";
    let exprs: Vec<&Expr> = args
        .args
        .iter()
        .filter_map(|arg| match arg {
            FunctionArg::Unnamed(FunctionArgExpr::Expr(expr)) => Some(expr),
            _ => None,
        })
        .collect();
    let [input, time, gap] = exprs.as_slice() else {
        return Err(window_error(format!("SESSION takes 3 arguments: {usage}")));
    };
    let input = match input {
        Expr::Identifier(ident) => ident.value.to_ascii_lowercase(),
        other => {
            return Err(window_error(format!("{usage}: the input must name a table, source or view, not {other}")));
        }
    };
    let time = match time {
        Expr::Identifier(ident) => ident.value.to_ascii_lowercase(),
        other => return Err(window_error(format!("{usage}: the time must be a column of the input, not {other}"))),
    };
    let gap = interval_millis(gap).filter(|ms| *ms > 0).ok_or_else(|| {
        window_error(format!("{usage}: {gap} is not a positive interval such as INTERVAL '30 seconds'"))
    })?;
    let text = |s: String| FunctionArg::Unnamed(FunctionArgExpr::Expr(Expr::value(Value::SingleQuotedString(s))));
    let number = FunctionArg::Unnamed(FunctionArgExpr::Expr(Expr::value(Value::Number(gap.to_string(), false))));
    args.args = vec![text(input.clone()), text(time), number, text(keys.join(","))];
    *name = ObjectName::from(vec![Ident::new(crate::catalog::session_window::FUNCTION)]);
    if alias.is_none() {
        *alias = Some(TableAlias { explicit: true, name: Ident::new(input), columns: Vec::new(), at: None });
    }
    Ok(())
}

fn window_error(message: String) -> Error {
    Error::Plan { code: "42883", message, position: None }
}

/// The query a window function stands for, and the alias it is known by.
fn window_query(function: &str, args: &[FunctionArg], alias: Option<&TableAlias>) -> Result<(Box<Query>, TableAlias)> {
    let exprs: Vec<&Expr> = args
        .iter()
        .map(|arg| match arg {
            FunctionArg::Unnamed(FunctionArgExpr::Expr(expr)) => Ok(expr),
            other => {
                Err(window_error(format!("{}: argument {other} must be a plain expression", function.to_uppercase())))
            }
        })
        .collect::<Result<_>>()?;
    let usage = match function {
        "tumble" => "TUMBLE(input, time_column, INTERVAL 'size')",
        "hop" => "HOP(input, time_column, INTERVAL 'slide', INTERVAL 'size')",
        _ => return Err(window_error("SESSION(input, time_column, INTERVAL 'gap') takes plain arguments".into())),
    };
    let wanted = if function == "tumble" { 3 } else { 4 };
    if exprs.len() != wanted {
        return Err(window_error(format!("{} takes {wanted} arguments: {usage}", function.to_uppercase())));
    }
    let input = match exprs[0] {
        Expr::Identifier(_) | Expr::CompoundIdentifier(_) => exprs[0].to_string(),
        other => {
            return Err(window_error(format!("{usage}: the input must name a table, source or view, not {other}")));
        }
    };
    let time = exprs[1].to_string();
    let millis = |expr: &Expr| {
        interval_millis(expr).filter(|ms| *ms > 0).ok_or_else(|| {
            window_error(format!("{usage}: {expr} is not a positive interval such as INTERVAL '1 minute'"))
        })
    };
    let alias = alias.cloned().unwrap_or_else(|| TableAlias {
        explicit: true,
        name: datafusion::sql::sqlparser::ast::Ident::new(input.rsplit('.').next().unwrap_or(&input)),
        columns: Vec::new(),
        at: None,
    });
    // Offsets are durations, not intervals: a timestamp minus a duration is integer
    // arithmetic, where minus an interval goes through calendar code per row (a fifth of
    // q5's CPU in perf). Both keep the timestamp's type; constants fold to literals, so
    // watermarks still pass (see `dataflow::watermark::monotone_input`).
    let duration = |ms: i64| format!("arrow_cast({ms}, 'Duration(Millisecond)')");
    let shifted = |shift: i64, size: i64, bin: i64| {
        let mut start = format!("date_bin(INTERVAL '{bin} milliseconds', {time})");
        if shift != 0 {
            start = format!("{start} - {}", duration(shift));
        }
        let end = duration(size);
        format!("SELECT *, {start} AS window_start, {start} + {end} AS window_end FROM {input}")
    };
    let sql = if function == "tumble" {
        let size = millis(exprs[2])?;
        shifted(0, size, size)
    } else {
        let (slide, size) = (millis(exprs[2])?, millis(exprs[3])?);
        if size % slide != 0 {
            return Err(window_error(format!("{usage}: the size must be a multiple of the slide")));
        }
        if size / slide > MAX_HOPS {
            return Err(window_error(format!("{usage}: at most {MAX_HOPS} windows per row (size / slide)")));
        }
        (0..size / slide).map(|j| shifted(j * slide, size, slide)).collect::<Vec<_>>().join(" UNION ALL ")
    };
    let query = Parser::new(&PostgreSqlDialect {})
        .try_with_sql(&sql)
        .and_then(|mut parser| parser.parse_query())
        .map_err(|e| Error::Internal(format!("window rewrite produced bad SQL ({sql}): {e}")))?;
    Ok((query, alias))
}

/// An interval literal in milliseconds: `INTERVAL '1 minute'`, `INTERVAL '10' SECOND`,
/// `INTERVAL '1 hour 30 minutes'`.
pub(crate) fn interval_millis(expr: &Expr) -> Option<i64> {
    let Expr::Interval(interval) = expr else { return None };
    let Expr::Value(value) = interval.value.as_ref() else { return None };
    let text = match &value.value {
        Value::SingleQuotedString(text) => text.clone(),
        Value::Number(number, _) => number.clone(),
        _ => return None,
    };
    let unit_millis = |unit: &str| -> Option<f64> {
        Some(match unit.trim_end_matches('s') {
            "m" | "min" | "minute" => 60_000.0,
            "ms" | "millisecond" | "msec" => 1.0,
            "" | "sec" | "second" => 1_000.0,
            "h" | "hr" | "hour" => 3_600_000.0,
            "d" | "day" => 86_400_000.0,
            _ => return None,
        })
    };
    let words: Vec<String> = text.split_whitespace().map(str::to_ascii_lowercase).collect();
    let mut total = 0.0;
    match (&interval.leading_field, words.as_slice()) {
        (Some(field), [number]) => {
            total = number.parse::<f64>().ok()? * unit_millis(&field.to_string().to_ascii_lowercase())?;
        }
        (None, words) if !words.is_empty() && words.len() % 2 == 0 => {
            for pair in words.chunks(2) {
                total += pair[0].parse::<f64>().ok()? * unit_millis(&pair[1])?;
            }
        }
        _ => return None,
    }
    (total.fract() == 0.0 && total.is_finite()).then_some(total as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rewritten(sql: &str) -> Result<String> {
        let mut statement = datafusion::sql::parser::DFParserBuilder::new(sql)
            .with_dialect(&PostgreSqlDialect {})
            .build()
            .and_then(|mut p| p.parse_statement())
            .expect("parses");
        rewrite(&mut statement)?;
        Ok(statement.to_string())
    }

    #[test]
    fn tumble_and_hop_become_queries_with_window_columns() {
        let sql =
            rewritten("SELECT window_start, count(*) FROM TUMBLE(bid, date_time, INTERVAL '10' SECOND) GROUP BY 1")
                .expect("tumble");
        assert!(sql.contains("date_bin(INTERVAL '10000 milliseconds', date_time)"), "{sql}");
        assert!(sql.contains("AS bid"), "{sql}");
        let sql = rewritten("SELECT * FROM HOP(bid, date_time, INTERVAL '2 seconds', INTERVAL '6 seconds') AS h")
            .expect("hop");
        assert_eq!(sql.matches("UNION ALL").count(), 2, "{sql}");
        assert!(sql.contains("arrow_cast(4000, 'Duration(Millisecond)')") && sql.ends_with("AS h"), "{sql}");
    }

    #[test]
    fn sessions_become_the_table_function_keyed_by_the_other_group_columns() {
        let sql = rewritten(
            "SELECT b.bidder, count(*), window_start FROM SESSION(bid, date_time, INTERVAL '10' SECOND) AS b \
             GROUP BY b.bidder, window_start, window_end",
        )
        .expect("session");
        assert!(sql.contains("freshet_session('bid', 'date_time', 10000, 'bidder') AS b"), "{sql}");
        // Positional GROUP BY and no keys at all.
        let sql = rewritten(
            "SELECT channel, window_end, count(*) FROM SESSION(bid, date_time, INTERVAL '1 minute') GROUP BY 1, 2",
        )
        .expect("session");
        assert!(sql.contains("freshet_session('bid', 'date_time', 60000, 'channel') AS bid"), "{sql}");
        let sql = rewritten("SELECT * FROM SESSION(bid, date_time, INTERVAL '1 minute')").expect("session");
        assert!(sql.contains("freshet_session('bid', 'date_time', 60000, '')"), "{sql}");
    }

    #[test]
    fn windows_that_do_not_fit_are_refused() {
        let e = rewritten("SELECT * FROM HOP(t, ts, INTERVAL '3 seconds', INTERVAL '10 seconds')")
            .expect_err("not a multiple");
        assert!(e.to_string().contains("multiple"), "{e}");
        let e = rewritten("SELECT * FROM TUMBLE(t, ts, INTERVAL '1 fortnight')").expect_err("unknown unit");
        assert!(e.to_string().contains("positive interval"), "{e}");
        let e = rewritten("SELECT * FROM SESSION(t, ts, INTERVAL '0 seconds')").expect_err("empty gap");
        assert!(e.to_string().contains("positive interval"), "{e}");
        let e = rewritten("SELECT * FROM TUMBLE(t, ts)").expect_err("arity");
        assert!(e.to_string().contains("3 arguments"), "{e}");
    }
}
