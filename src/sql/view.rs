//! Lowering a view's query to a dataflow: DataFusion's optimised `LogicalPlan` becomes a
//! tree of incremental operators whose leaves are tables.
//!
//! Every plan node either has an incremental operator or is rejected with 0A000 naming the
//! construct: a view is never created if freshet cannot keep it exactly right.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use datafusion::arrow::compute::SortOptions;
use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::arrow::row::SortField;
use datafusion::common::NullEquality;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::execution::context::SessionState;
use datafusion::logical_expr::{Expr, ExprSchemable, FetchType, JoinType, LogicalPlan, SkipType};
use datafusion::physical_expr::expressions::Column as ColumnExpr;
use datafusion::physical_plan::PhysicalExpr;

use crate::catalog::session_window::SessionTable;
use crate::dataflow::Operator;
use crate::dataflow::exchange::PartitionKey;
use crate::dataflow::operators::{
    AggregateFunction, AggregateOperator, AggregateSpec, JoinKind, JoinOperator, ProjectFilterOperator,
    SessionOperator, TemporalFilterOperator, TopNOperator, TopNSpec, UnionOperator,
};
use crate::error::{Error, Result};

/// A dataflow tree: operators whose leaves read tables.
pub enum Node {
    /// The change stream of a table (backfilled with its contents when the view starts).
    Table(String),
    /// The change stream of a table with a `WATERMARK`: late rows dropped, watermarks
    /// emitted on `column` (see [`crate::dataflow::operators::EventTimeOperator`]).
    EventTime { table: String, column: usize, delay_ms: i64, units_per_ms: i64 },
    /// An operator over its inputs, in port order.
    Operator(Box<dyn Operator>, Vec<Node>),
    /// A stateful operator run as several instances; each input is hash-partitioned by its
    /// key, so each key lives in one instance.
    Parallel { instances: Vec<Box<dyn Operator>>, keys: Vec<PartitionKey>, inputs: Vec<Node> },
    /// A relation that never changes (a table function such as `range(10)`, or `VALUES`),
    /// computed when the view is lowered: its rows arrive once, as the view's starting point.
    Constant { what: String, rows: Vec<RecordBatch> },
    /// A part of the plan the query holds more than once (nexmark q5 counts bids per
    /// auction and window twice): every place holds the same `Shared`, and its operators run
    /// once, their output going to each place that reads it.
    Shared(Arc<Shared>),
}

/// A subtree several parents read. Whoever starts the dataflow first takes the tree and
/// starts it; the others connect to its top operator.
pub struct Shared {
    /// Numbers the shared subtrees of one view, in the order they were lowered.
    pub id: usize,
    node: std::sync::Mutex<Option<Node>>,
}

impl Shared {
    /// The subtree, for the first place that starts it; `None` once taken.
    pub fn take(&self) -> Option<Node> {
        self.node.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// Calls `f` with the subtree unless it has been taken.
    fn with<T>(&self, f: impl FnOnce(&Node) -> T) -> Option<T> {
        self.node.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map(f)
    }
}

/// The most rows a constant relation in a view may have: it is computed whole and kept in
/// the view's starting point.
const MAX_CONSTANT_ROWS: usize = 1_000_000;

impl Node {
    /// The tables this tree reads, in leaf order.
    pub fn tables(&self) -> Vec<String> {
        match self {
            Node::Table(name) | Node::EventTime { table: name, .. } => vec![name.clone()],
            Node::Operator(_, inputs) | Node::Parallel { inputs, .. } => {
                inputs.iter().flat_map(|n| n.tables()).collect()
            }
            Node::Constant { .. } => Vec::new(),
            Node::Shared(shared) => shared.with(Node::tables).unwrap_or_default(),
        }
    }

    /// An indented description, for EXPLAIN and logs.
    pub fn describe(&self) -> String {
        fn walk(node: &Node, depth: usize, out: &mut String, shown: &mut Vec<usize>) {
            let pad = "  ".repeat(depth);
            match node {
                Node::Shared(shared) if shown.contains(&shared.id) => {
                    out.push_str(&format!("{pad}shared #{} (the same operators as above)\n", shared.id));
                }
                Node::Shared(shared) => {
                    shown.push(shared.id);
                    out.push_str(&format!("{pad}shared #{} (run once, read in several places)\n", shared.id));
                    shared.with(|node| walk(node, depth + 1, out, shown));
                }
                Node::Table(name) => out.push_str(&format!("{pad}table {name}\n")),
                Node::Constant { what, rows } => {
                    let n: usize = rows.iter().map(RecordBatch::num_rows).sum();
                    out.push_str(&format!("{pad}constant {what} ({n} rows)\n"));
                }
                Node::EventTime { table, column, delay_ms, .. } => {
                    out.push_str(&format!("{pad}event_time (column {column}, delay {delay_ms} ms; drops late rows)\n"));
                    out.push_str(&format!("{pad}  table {table}\n"));
                }
                Node::Operator(op, inputs) => {
                    out.push_str(&format!("{pad}{}\n", op.name()));
                    for input in inputs {
                        walk(input, depth + 1, out, shown);
                    }
                }
                Node::Parallel { instances, inputs, .. } => {
                    let name = instances.first().map(|op| op.name()).unwrap_or_default();
                    out.push_str(&format!("{pad}{name} x{} (hash exchange on its key)\n", instances.len()));
                    for input in inputs {
                        walk(input, depth + 1, out, shown);
                    }
                }
            }
        }
        let mut out = String::new();
        walk(self, 0, &mut out, &mut Vec::new());
        out
    }
}

/// Functions whose value changes on their own; a view using them could not be kept equal to
/// its query.
const NON_DETERMINISTIC: &[&str] = &[
    "now",
    "current_timestamp",
    "current_date",
    "current_time",
    "localtime",
    "localtimestamp",
    "random",
    "uuid",
    "statement_timestamp",
    "transaction_timestamp",
    "clock_timestamp",
];

/// Rejects non-deterministic functions; call on the plan before optimisation, which would
/// fold `now()` into a constant.
pub fn check_deterministic(plan: &LogicalPlan) -> Result<()> {
    let mut found: Option<String> = None;
    plan.apply_with_subqueries(|node| {
        for expr in node.expressions() {
            expr.apply(|e| {
                if let Expr::ScalarFunction(f) = e
                    // Model functions are volatile only so that planning never folds them
                    // into constants: in a view they follow the model's versions at barriers.
                    // The temporal filter marker stands for `ts > now() - window`.
                    && f.name() != super::temporal::FUNCTION
                    && (NON_DETERMINISTIC.contains(&f.name())
                        || (e.is_volatile() && !crate::ml::udf::FUNCTION_NAMES.contains(&f.name())))
                {
                    found = Some(f.name().to_string());
                    return Ok(TreeNodeRecursion::Stop);
                }
                Ok(TreeNodeRecursion::Continue)
            })?;
        }
        Ok(if found.is_some() { TreeNodeRecursion::Stop } else { TreeNodeRecursion::Continue })
    })?;
    match found {
        Some(name) => Err(Error::NotSupported {
            feature: format!("{name}() in a materialized view"),
            hint: Some(
                "a view must be deterministic; compute the value in the table instead (now() is allowed only as a                  temporal filter, WHERE ts > now() - INTERVAL '1 hour')"
                    .into(),
            ),
        }),
        None => Ok(()),
    }
}

/// A stateful operator: `workers` instances behind a hash exchange on `keys` (one per
/// input), or one instance when there is one worker or no key to partition by.
fn stateful<F>(workers: usize, make: F, keys: Vec<PartitionKey>, inputs: Vec<Node>) -> Result<Node>
where
    F: Fn() -> Result<Box<dyn Operator>>,
{
    if workers <= 1 || keys.iter().any(|k| k.exprs.is_empty()) {
        return Ok(Node::Operator(make()?, inputs));
    }
    let instances = (0..workers).map(|_| make()).collect::<Result<Vec<_>>>()?;
    Ok(Node::Parallel { instances, keys, inputs })
}

/// Lowers a materialized view's optimised plan; with `EMIT ON WINDOW CLOSE`, rows are held
/// back at the root by the first output column with a watermark (a window bound).
pub fn lower_view(state: &SessionState, plan: &LogicalPlan, emit_on_window_close: bool) -> Result<Node> {
    let aligned = align_group_orders(plan.clone())?;
    let root = lower(&mut Lowering::new(state, &aligned)?, &aligned)?;
    if !emit_on_window_close {
        return Ok(root);
    }
    let Some(column) = watermarked(plan).iter().position(|w| *w) else {
        return Err(Error::NotSupported {
            feature: "EMIT ON WINDOW CLOSE on a view without an event-time column".into(),
            hint: Some(
                "group by window_start or window_end of TUMBLE, HOP or SESSION over a source or table with a WATERMARK"
                    .into(),
            ),
        });
    };
    let schema = Arc::new(plan.schema().as_arrow().clone());
    let operator = crate::dataflow::operators::EmitOnCloseOperator::new(column, schema)?;
    Ok(Node::Operator(Box::new(operator), vec![root]))
}

/// One view's lowering: the session that plans expressions, and the parts of the plan it
/// holds more than once, each lowered once and shared.
struct Lowering<'a> {
    state: &'a SessionState,
    /// Joins, aggregates and table scans the plan holds more than once.
    repeated: HashSet<LogicalPlan>,
    shared: HashMap<LogicalPlan, Arc<Shared>>,
}

impl<'a> Lowering<'a> {
    fn new(state: &'a SessionState, plan: &LogicalPlan) -> Result<Self> {
        Ok(Lowering { state, repeated: repeated_subplans(plan)?, shared: HashMap::new() })
    }

    /// The shared subtree for `plan`, lowered the first time it is asked for.
    fn shared(&mut self, plan: &LogicalPlan) -> Result<Node> {
        if let Some(shared) = self.shared.get(plan) {
            return Ok(Node::Shared(shared.clone()));
        }
        let node = lower_plan(self, plan)?;
        if matches!(node, Node::Table(_) | Node::Constant { .. }) {
            // A leaf has no operator to share; each place reads the table itself.
            return Ok(node);
        }
        let shared = Arc::new(Shared { id: self.shared.len(), node: std::sync::Mutex::new(Some(node)) });
        self.shared.insert(plan.clone(), shared.clone());
        Ok(Node::Shared(shared))
    }
}

/// The joins, aggregates and table scans `plan` holds more than once (a HOP window reads
/// its table once per window it puts a row in). Below a repeated one nothing more is
/// counted: its inside is lowered once with it.
fn repeated_subplans(plan: &LogicalPlan) -> Result<HashSet<LogicalPlan>> {
    let mut seen = HashSet::new();
    let mut repeated = HashSet::new();
    plan.apply(|node| {
        if !matches!(node, LogicalPlan::Aggregate(_) | LogicalPlan::Join(_) | LogicalPlan::TableScan(_)) {
            return Ok(TreeNodeRecursion::Continue);
        }
        if seen.insert(node.clone()) {
            return Ok(TreeNodeRecursion::Continue);
        }
        repeated.insert(node.clone());
        Ok(TreeNodeRecursion::Jump)
    })?;
    Ok(repeated)
}

/// Makes aggregates that differ only in the order of their groups (the same input and
/// aggregates, the same groups) group in the order of the first, with a projection
/// putting the columns back in the order the query asked for, so that
/// [`repeated_subplans`] finds them equal and the aggregate runs once.
fn align_group_orders(plan: LogicalPlan) -> Result<LogicalPlan> {
    let mut aggregates: Vec<datafusion::logical_expr::Aggregate> = Vec::new();
    let aligned = plan.transform_up(|node| {
        let LogicalPlan::Aggregate(aggregate) = &node else { return Ok(Transformed::no(node)) };
        let same_groups = |a: &datafusion::logical_expr::Aggregate| {
            a.input == aggregate.input
                && a.aggr_expr == aggregate.aggr_expr
                && a.group_expr != aggregate.group_expr
                && a.group_expr.len() == aggregate.group_expr.len()
                && aggregate.group_expr.iter().all(|g| a.group_expr.contains(g))
        };
        let Some(first) = aggregates.iter().find(|a| same_groups(a)) else {
            aggregates.push(aggregate.clone());
            return Ok(Transformed::no(node));
        };
        let regrouped = datafusion::logical_expr::Aggregate::try_new(
            aggregate.input.clone(),
            first.group_expr.clone(),
            aggregate.aggr_expr.clone(),
        )?;
        let columns = aggregate.schema.columns().into_iter().map(Expr::Column).collect();
        let projection =
            datafusion::logical_expr::Projection::try_new(columns, Arc::new(LogicalPlan::Aggregate(regrouped)))?;
        Ok(Transformed::yes(LogicalPlan::Projection(projection)))
    })?;
    Ok(aligned.data)
}

/// Lowers an optimised plan into a dataflow tree. Stateful operators run as
/// `target_partitions` instances (freshet's `--workers`).
fn lower(cx: &mut Lowering<'_>, plan: &LogicalPlan) -> Result<Node> {
    if cx.repeated.contains(plan) {
        return cx.shared(plan);
    }
    lower_plan(cx, plan)
}

/// Lowers `plan` itself (whether or not it is shared).
fn lower_plan(cx: &mut Lowering<'_>, plan: &LogicalPlan) -> Result<Node> {
    let state = cx.state;
    match plan {
        LogicalPlan::TableScan(scan) => {
            if !scan.filters.is_empty() || scan.fetch.is_some() {
                return Err(Error::Internal("table scan with pushed-down filters or limit in a view".into()));
            }
            if table_function(state, scan) {
                return constant(state, plan, scan.table_name.table());
            }
            let source = match session_window(scan) {
                Some(session) => lower_session(state, session)?,
                None => table_input(scan.table_name.table(), &scan.source.schema())?,
            };
            let width = scan.source.schema().fields().len();
            match &scan.projection {
                Some(columns) if *columns != (0..width).collect::<Vec<_>>() => {
                    let schema = scan.source.schema();
                    let exprs = columns
                        .iter()
                        .map(|&i| Arc::new(ColumnExpr::new(schema.field(i).name(), i)) as Arc<dyn PhysicalExpr>)
                        .collect();
                    let schema: SchemaRef = Arc::new(scan.projected_schema.as_arrow().clone());
                    let operator =
                        ProjectFilterOperator::new(None, Some(exprs), schema)?.with_watermarks_from(scan.source.schema());
                    Ok(Node::Operator(Box::new(operator), vec![source]))
                }
                _ => Ok(source),
            }
        }
        LogicalPlan::Projection(projection) => {
            let input = lower(cx, &projection.input)?;
            let exprs = projection
                .expr
                .iter()
                .map(|e| state.create_physical_expr(e.clone(), projection.input.schema()))
                .collect::<datafusion::error::Result<Vec<_>>>()?;
            let schema: SchemaRef = Arc::new(projection.schema.as_arrow().clone());
            let input_schema: SchemaRef = Arc::new(projection.input.schema().as_arrow().clone());
            let operator = ProjectFilterOperator::new(None, Some(exprs), schema)?.with_watermarks_from(input_schema);
            Ok(Node::Operator(Box::new(operator), vec![input]))
        }
        LogicalPlan::Filter(filter) => {
            if let Some(node) = top_n_per_group(cx, filter)? {
                return Ok(node);
            }
            let mut node = lower(cx, &filter.input)?;
            let schema: SchemaRef = Arc::new(filter.input.schema().as_arrow().clone());
            let (temporal, rest) = super::temporal::split(&filter.predicate)?;
            if let Some(rest) = rest {
                let predicate = state.create_physical_expr(rest, filter.input.schema())?;
                node = Node::Operator(Box::new(ProjectFilterOperator::new(Some(predicate), None, schema.clone())?), vec![node]);
            }
            if let Some((column, window_ms)) = temporal {
                let Expr::Column(column) = column.unalias() else {
                    return Err(Error::not_supported("now() compared with a computed value in a materialized view"));
                };
                let index = filter.input.schema().index_of_column(&column)?;
                let data_type = schema.field(index).data_type();
                let scale = super::temporal::micros_per_unit(data_type).ok_or_else(|| Error::NotSupported {
                    feature: format!("comparing now() with a {data_type} column in a materialized view"),
                    hint: Some("a temporal filter compares a TIMESTAMP column: WHERE ts > now() - INTERVAL '1 hour'".into()),
                })?;
                let operator = TemporalFilterOperator::new(index, scale, window_ms, schema)?;
                node = Node::Operator(Box::new(operator), vec![node]);
            }
            Ok(node)
        }
        LogicalPlan::SubqueryAlias(alias) => lower(cx, &alias.input),
        LogicalPlan::Aggregate(aggregate) => {
            if let Some(hoisted) = hoist_model_calls(aggregate)? {
                return lower(cx, &hoisted);
            }
            let input_schema = aggregate.input.schema();
            let input = lower(cx, &aggregate.input)?;
            let mut groups = Vec::new();
            let mut group_types = Vec::new();
            for expr in &aggregate.group_expr {
                if matches!(expr, Expr::GroupingSet(_)) {
                    return Err(Error::not_supported("GROUPING SETS, CUBE and ROLLUP in a materialized view"));
                }
                group_types.push(expr.get_type(input_schema)?);
                groups.push(state.create_physical_expr(expr.clone(), input_schema)?);
            }
            let output = aggregate.schema.as_arrow();
            let mut specs = Vec::new();
            for (i, expr) in aggregate.aggr_expr.iter().enumerate() {
                let output_type = output.field(aggregate.group_expr.len() + i).data_type().clone();
                specs.push(aggregate_spec(state, expr, &aggregate.input, output_type)?);
            }
            if append_only(&aggregate.input) {
                specs.iter_mut().for_each(|spec| spec.append_only = true);
            }
            let schema: SchemaRef = Arc::new(output.clone());
            let key = PartitionKey { exprs: groups.clone(), types: group_types.clone() };
            // The first group column with a watermark closes groups.
            let event_time = watermarked(plan).iter().take(groups.len()).position(|w| *w);
            let input_arrow: SchemaRef = Arc::new(input_schema.as_arrow().clone());
            let make = || -> Result<Box<dyn Operator>> {
                let mut operator =
                    AggregateOperator::new(groups.clone(), group_types.clone(), specs.clone(), schema.clone())?;
                if let Some(group) = event_time {
                    operator = operator.with_event_time(group, input_arrow.clone());
                }
                Ok(Box::new(operator))
            };
            stateful(workers(state), make, vec![key], vec![input])
        }
        LogicalPlan::Sort(sort) if sort.fetch.is_none() => lower(cx, &sort.input), // a view is a set
        LogicalPlan::Sort(sort) => top_n(cx, sort, 0, sort.fetch),
        LogicalPlan::Limit(limit) => {
            let skip = match limit.get_skip_type()? {
                SkipType::Literal(n) => n,
                SkipType::UnsupportedExpr => {
                    return Err(Error::not_supported("a computed OFFSET in a materialized view"));
                }
            };
            let fetch = match limit.get_fetch_type()? {
                FetchType::Literal(n) => n,
                FetchType::UnsupportedExpr => {
                    return Err(Error::not_supported("a computed LIMIT in a materialized view"));
                }
            };
            match limit.input.as_ref() {
                LogicalPlan::Sort(sort) => {
                    let fetch = match (fetch, sort.fetch) {
                        (Some(f), Some(s)) => Some(f.min(s.saturating_sub(skip))),
                        (f, s) => f.or(s.map(|s| s.saturating_sub(skip))),
                    };
                    top_n(cx, sort, skip, fetch)
                }
                _ => Err(Error::NotSupported {
                    feature: "LIMIT without ORDER BY in a materialized view".into(),
                    hint: Some("which rows a bare LIMIT keeps is arbitrary; add ORDER BY".into()),
                }),
            }
        }
        LogicalPlan::Union(union) => {
            let inputs = union.inputs.iter().map(|input| lower(cx, input)).collect::<Result<Vec<_>>>()?;
            let schema: SchemaRef = Arc::new(union.schema.as_arrow().clone());
            Ok(Node::Operator(Box::new(UnionOperator::new(schema, inputs.len())), inputs))
        }
        LogicalPlan::Join(join) => {
            if let Some(hoisted) = hoist_join_model_calls(join)? {
                return lower(cx, &hoisted);
            }
            if join.null_equality != NullEquality::NullEqualsNothing || join.null_aware {
                return Err(Error::not_supported("NOT IN over a subquery in a materialized view (use NOT EXISTS)"));
            }
            let kind = match join.join_type {
                JoinType::Inner => JoinKind::Inner,
                JoinType::Left => JoinKind::Left,
                JoinType::Right => JoinKind::Right,
                JoinType::Full => JoinKind::Full,
                JoinType::LeftSemi => JoinKind::LeftSemi,
                JoinType::LeftAnti => JoinKind::LeftAnti,
                other => return Err(Error::not_supported(format!("{other} joins in a materialized view"))),
            };
            let (left_schema, right_schema) = (join.left.schema(), join.right.schema());
            let mut left_keys = Vec::new();
            let mut right_keys = Vec::new();
            let mut key_types = Vec::new();
            for (l, r) in &join.on {
                let left_type = l.get_type(left_schema)?;
                let right_type = r.get_type(right_schema)?;
                key_types.push(if left_type == right_type {
                    left_type
                } else {
                    datafusion::arrow::compute::kernels::cast::can_cast_types(&right_type, &left_type)
                        .then_some(left_type)
                        .ok_or_else(|| Error::not_supported("join keys of different types"))?
                });
                left_keys.push(state.create_physical_expr(l.clone(), left_schema)?);
                right_keys.push(state.create_physical_expr(r.clone(), right_schema)?);
            }
            // The condition sees the left columns, then the right ones.
            let filter = match &join.filter {
                Some(f) => Some(state.create_physical_expr(f.clone(), &left_schema.join(right_schema)?)?),
                None => None,
            };
            let types = |schema: &datafusion::common::DFSchema| -> Vec<DataType> {
                schema.fields().iter().map(|f| f.data_type().clone()).collect()
            };
            let schema: SchemaRef = Arc::new(join.schema.as_arrow().clone());
            let event_time = window_join_columns(join);
            let interval = interval_join(join);
            let constant_input = [&join.right, &join.left]
                .into_iter()
                .position(|input| never_changes(state, input))
                .map(|i| 1 - i);
            let make = || -> Result<Box<dyn Operator>> {
                let mut operator = JoinOperator::new(
                    kind,
                    left_keys.clone(),
                    right_keys.clone(),
                    key_types.clone(),
                    types(left_schema),
                    types(right_schema),
                    filter.clone(),
                    schema.clone(),
                )?;
                if let Some((left, right)) = event_time {
                    operator = operator.with_event_time(left, right);
                }
                if let Some(bounds) = &interval {
                    operator = operator.with_interval(bounds.left, bounds.right, bounds.right_after_left, bounds.left_after_right);
                }
                if let Some(port) = constant_input {
                    operator = operator.with_fixed_input(port);
                }
                Ok(Box::new(operator))
            };
            let keys = vec![
                PartitionKey { exprs: left_keys.clone(), types: key_types.clone() },
                PartitionKey { exprs: right_keys.clone(), types: key_types.clone() },
            ];
            let inputs = vec![lower(cx, &join.left)?, lower(cx, &join.right)?];
            stateful(workers(state), make, keys, inputs)
        }
        LogicalPlan::Values(_) => constant(state, plan, "VALUES"),
        LogicalPlan::EmptyRelation(_) => constant(state, plan, "a query that reads no table"),
        other => Err(Error::NotSupported {
            feature: format!("{} in a materialized view", construct_name(other)),
            hint: Some("views support projections, WHERE, joins, subqueries, UNION, DISTINCT, GROUP BY, top-N and top-N per group (row_number() <= n)".into()),
        }),
    }
}

/// Which output columns of `plan` carry watermarks: the same rules the operators follow
/// at run time (see [`crate::dataflow::watermark`]), worked out on the plan so a view can
/// be checked before it starts.
pub fn watermarked(plan: &LogicalPlan) -> Vec<bool> {
    let width = plan.schema().fields().len();
    let timestamp = |i: usize| crate::dataflow::watermark::carries_watermark(plan.schema().field(i).data_type());
    let derived = |exprs: &[Expr], input: &LogicalPlan| -> Vec<bool> {
        let marked = watermarked(input);
        exprs
            .iter()
            .enumerate()
            .map(|(i, e)| timestamp(i) && monotone_input(e, input.schema()).is_some_and(|c| marked[c]))
            .collect()
    };
    let mut columns = match plan {
        LogicalPlan::TableScan(scan) => {
            let source = scan.source.schema();
            // A session window's end carries its input's watermark.
            let marked = match session_window(scan) {
                Some(session) => super::watermark_of(&session.input_schema).map(|_| source.fields().len() - 1),
                None => super::watermark_of(&source).map(|(c, _)| c),
            };
            match &scan.projection {
                Some(columns) => columns.iter().map(|&i| marked == Some(i)).collect(),
                None => (0..source.fields().len()).map(|i| marked == Some(i)).collect(),
            }
        }
        LogicalPlan::Projection(projection) => derived(&projection.expr, &projection.input),
        LogicalPlan::Aggregate(aggregate) => derived(&aggregate.group_expr, &aggregate.input),
        LogicalPlan::Filter(filter) if !matches!(filter.input.as_ref(), LogicalPlan::Window(_)) => {
            watermarked(&filter.input)
        }
        LogicalPlan::SubqueryAlias(alias) => watermarked(&alias.input),
        LogicalPlan::Sort(sort) if sort.fetch.is_none() => watermarked(&sort.input),
        LogicalPlan::Join(join) => {
            let mut columns = vec![false; width];
            if let Some((left, right)) = window_join_columns(join) {
                columns[left] = true;
                if !matches!(join.join_type, JoinType::LeftSemi | JoinType::LeftAnti) {
                    columns[join.left.schema().fields().len() + right] = true;
                }
            }
            columns
        }
        LogicalPlan::Union(union) => {
            let inputs: Vec<Vec<bool>> = union.inputs.iter().map(|i| watermarked(i)).collect();
            (0..width).map(|c| inputs.iter().all(|marks| marks.get(c).copied().unwrap_or(false))).collect()
        }
        _ => Vec::new(),
    };
    columns.resize(width, false);
    columns
}

/// A window join's event-time columns (left input column, right input column): the first
/// key pair that equates two plain columns of one timestamp type with watermarks.
fn window_join_columns(join: &datafusion::logical_expr::Join) -> Option<(usize, usize)> {
    if !matches!(
        join.join_type,
        JoinType::Inner | JoinType::Left | JoinType::Right | JoinType::Full | JoinType::LeftSemi | JoinType::LeftAnti
    ) {
        return None;
    }
    let (left_marks, right_marks) = (watermarked(&join.left), watermarked(&join.right));
    join.on.iter().find_map(|(l, r)| {
        let (Expr::Column(l), Expr::Column(r)) = (l, r) else { return None };
        let left = join.left.schema().index_of_column(l).ok()?;
        let right = join.right.schema().index_of_column(r).ok()?;
        let same_type = join.left.schema().field(left).data_type() == join.right.schema().field(right).data_type();
        (same_type && left_marks[left] && right_marks[right]).then_some((left, right))
    })
}

/// An interval join's event-time columns and how far apart matches can be, in the
/// columns' unit (see `JoinOperator::with_interval`).
struct IntervalBounds {
    left: usize,
    right: usize,
    right_after_left: Option<i64>,
    left_after_right: Option<i64>,
}

/// The interval an inner join's condition puts between a watermarked time column of each
/// side: conjuncts such as `r.ts >= l.ts - INTERVAL '1 minute'`, `r.ts <= l.ts + INTERVAL '1
/// hour'` or `r.ts BETWEEN l.ts AND l.ts + INTERVAL '1 hour'`.
fn interval_join(join: &datafusion::logical_expr::Join) -> Option<IntervalBounds> {
    use datafusion::logical_expr::Operator as Cmp;
    if join.join_type != JoinType::Inner {
        return None;
    }
    let filter = join.filter.as_ref()?;
    let (left_marks, right_marks) = (watermarked(&join.left), watermarked(&join.right));
    // (side: 0 left / 1 right, column) of a watermarked time column.
    let column = |e: &Expr| -> Option<(usize, usize)> {
        let Expr::Column(c) = e else { return None };
        if let Ok(i) = join.left.schema().index_of_column(c) {
            return left_marks[i].then_some((0, i));
        }
        let i = join.right.schema().index_of_column(c).ok()?;
        right_marks[i].then_some((1, i))
    };
    // A column plus a constant (in ms).
    let shifted = |e: &Expr| -> Option<((usize, usize), i64)> {
        match e {
            Expr::BinaryExpr(b) if matches!(b.op, Cmp::Plus | Cmp::Minus) => {
                let Expr::Literal(value, _) = b.right.as_ref() else { return None };
                let ms = super::temporal::interval_ms(value)?;
                Some((column(&b.left)?, if b.op == Cmp::Plus { ms } else { -ms }))
            }
            other => Some((column(other)?, 0)),
        }
    };
    // Constraints x - y <= c, as ((x side, x col), (y side, y col), c).
    let mut constraints = Vec::new();
    // (A strict `<` is the same bound: the bound only has to hold, not be tight.)
    let mut at_most = |x: ((usize, usize), i64), y: ((usize, usize), i64)| {
        // x.col + x.c <= y.col + y.c  ⇒  x.col - y.col <= y.c - x.c
        constraints.push((x.0, y.0, y.1 - x.1));
    };
    for conjunct in datafusion::logical_expr::utils::split_conjunction(filter) {
        match conjunct {
            Expr::BinaryExpr(b) => {
                let (Some(l), Some(r)) = (shifted(&b.left), shifted(&b.right)) else { continue };
                match b.op {
                    Cmp::LtEq | Cmp::Lt => at_most(l, r),
                    Cmp::GtEq | Cmp::Gt => at_most(r, l),
                    _ => {}
                }
            }
            Expr::Between(between) if !between.negated => {
                let (Some(x), Some(low), Some(high)) =
                    (shifted(&between.expr), shifted(&between.low), shifted(&between.high))
                else {
                    continue;
                };
                at_most(low, x);
                at_most(x, high);
            }
            _ => {}
        }
    }
    // The first pair of a left and a right time column, and its bounds.
    let pair = constraints.iter().find_map(|(x, y, _)| match (x.0, y.0) {
        (0, 1) => Some((x.1, y.1)),
        (1, 0) => Some((y.1, x.1)),
        _ => None,
    })?;
    let (left, right) = pair;
    let (left_type, right_type) =
        (join.left.schema().field(left).data_type(), join.right.schema().field(right).data_type());
    if left_type != right_type {
        return None;
    }
    let units = crate::dataflow::watermark::units_per_ms(left_type)?;
    let (mut right_after_left, mut left_after_right): (Option<i64>, Option<i64>) = (None, None);
    for (x, y, c) in constraints {
        let c = c.saturating_mul(units);
        if x == (1, right) && y == (0, left) {
            right_after_left = Some(right_after_left.map_or(c, |b| b.min(c)));
        } else if x == (0, left) && y == (1, right) {
            left_after_right = Some(left_after_right.map_or(c, |b| b.min(c)));
        }
    }
    (right_after_left.is_some() || left_after_right.is_some()).then_some(IntervalBounds {
        left,
        right,
        right_after_left,
        left_after_right,
    })
}

/// The input column `expr` is a non-decreasing function of (the logical twin of
/// [`crate::dataflow::watermark::monotone_input`]).
fn monotone_input(expr: &Expr, schema: &datafusion::common::DFSchema) -> Option<usize> {
    use crate::dataflow::watermark::is_time_or_integer;
    use datafusion::logical_expr::Operator as BinaryOp;
    let constant = |e: &Expr| matches!(e, Expr::Literal(..));
    match expr {
        Expr::Column(column) => schema.index_of_column(column).ok(),
        Expr::Alias(alias) => monotone_input(&alias.expr, schema),
        Expr::Cast(cast) if is_time_or_integer(cast.field.data_type()) => monotone_input(&cast.expr, schema),
        Expr::TryCast(cast) if is_time_or_integer(cast.field.data_type()) => monotone_input(&cast.expr, schema),
        Expr::BinaryExpr(b) => match b.op {
            BinaryOp::Plus if constant(&b.left) => monotone_input(&b.right, schema),
            BinaryOp::Plus | BinaryOp::Minus if constant(&b.right) => monotone_input(&b.left, schema),
            _ => None,
        },
        Expr::ScalarFunction(f) if matches!(f.name(), "date_bin" | "date_trunc") => {
            let others_constant = f.args.iter().enumerate().all(|(i, a)| i == 1 || constant(a));
            if others_constant { f.args.get(1).and_then(|a| monotone_input(a, schema)) } else { None }
        }
        _ => None,
    }
}

/// The change stream of relation `table`: with its watermark, if it has one.
fn table_input(table: &str, schema: &SchemaRef) -> Result<Node> {
    let table = table.to_string();
    let Some((column, delay_ms)) = super::watermark_of(schema) else { return Ok(Node::Table(table)) };
    let units_per_ms = crate::dataflow::watermark::units_per_ms(schema.field(column).data_type())
        .ok_or_else(|| Error::not_supported(format!("a watermark on a {} column", schema.field(column).data_type())))?;
    Ok(Node::EventTime { table, column, delay_ms, units_per_ms })
}

/// Whether a scan reads the result of a table function (`range(…)`, `generate_series(…)`)
/// other than SESSION: a relation fixed by its arguments.
fn table_function(state: &SessionState, scan: &datafusion::logical_expr::TableScan) -> bool {
    scan.table_name.schema().is_none()
        && session_window(scan).is_none()
        && crate::catalog::table::planned_def(&scan.source).is_none()
        && scan.table_name.table().split('(').next().is_some_and(|name| state.table_functions().contains_key(name))
}

/// Whether `plan` never changes: it reads only table functions and `VALUES`, and calls
/// nothing whose value moves (a model's score follows the model's versions; the temporal
/// filter, the clock).
fn never_changes(state: &SessionState, plan: &LogicalPlan) -> bool {
    let mut moves = false;
    let walked = plan.apply_with_subqueries(|node| {
        moves = match node {
            LogicalPlan::TableScan(scan) => !table_function(state, scan),
            _ => node.expressions().iter().any(|e| {
                e.is_volatile()
                    || e.exists(|e| Ok(matches!(e, Expr::ScalarFunction(f) if f.name() == super::temporal::FUNCTION)))
                        .unwrap_or(true)
            }),
        };
        Ok(if moves { TreeNodeRecursion::Stop } else { TreeNodeRecursion::Continue })
    });
    walked.is_ok() && !moves
}

/// A relation that never changes, computed now by the batch engine (on a thread of its own,
/// as lowering is synchronous).
fn constant(state: &SessionState, plan: &LogicalPlan, what: &str) -> Result<Node> {
    let limited = datafusion::logical_expr::LogicalPlanBuilder::from(plan.clone())
        .limit(0, Some(MAX_CONSTANT_ROWS + 1))?
        .build()?;
    let run = || -> Result<Vec<RecordBatch>> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .map_err(|e| Error::Internal(format!("a runtime to compute {what}: {e}")))?;
        runtime.block_on(async {
            let physical = state.create_physical_plan(&limited).await?;
            Ok(datafusion::physical_plan::collect(physical, state.task_ctx()).await?)
        })
    };
    let rows = std::thread::scope(|scope| scope.spawn(run).join())
        .map_err(|_| Error::Internal(format!("computing {what} for a view panicked")))??;
    if rows.iter().map(RecordBatch::num_rows).sum::<usize>() > MAX_CONSTANT_ROWS {
        return Err(Error::NotSupported {
            feature: format!("{what} with more than {MAX_CONSTANT_ROWS} rows in a materialized view"),
            hint: Some("put the rows in a table and read the table".into()),
        });
    }
    Ok(Node::Constant { what: what.to_string(), rows })
}

/// The SESSION window a scan reads, if it reads one.
fn session_window(scan: &datafusion::logical_expr::TableScan) -> Option<SessionTable> {
    let provider = datafusion::datasource::source_as_provider(&scan.source).ok()?;
    (provider.as_ref() as &dyn std::any::Any).downcast_ref::<SessionTable>().cloned()
}

/// Session windows over their input's change stream, one instance per key hash.
fn lower_session(state: &SessionState, session: SessionTable) -> Result<Node> {
    let input = table_input(&session.input, &session.input_schema)?;
    let schema = datafusion::catalog::TableProvider::schema(&session);
    let key_exprs: Vec<Arc<dyn PhysicalExpr>> = session
        .keys
        .iter()
        .map(|&k| Arc::new(ColumnExpr::new(session.input_schema.field(k).name(), k)) as Arc<dyn PhysicalExpr>)
        .collect();
    let key_types = session.keys.iter().map(|&k| session.input_schema.field(k).data_type().clone()).collect();
    let make = || -> Result<Box<dyn Operator>> {
        let operator = SessionOperator::new(
            session.time,
            session.gap_in_units(),
            session.keys.clone(),
            session.input_schema.clone(),
            schema.clone(),
        )?;
        Ok(Box::new(operator))
    };
    stateful(workers(state), make, vec![PartitionKey { exprs: key_exprs, types: key_types }], vec![input])
}

/// How many instances a stateful operator runs as.
fn workers(state: &SessionState) -> usize {
    state.config().target_partitions().max(1)
}

/// `ORDER BY … [OFFSET skip] LIMIT fetch` over `sort.input`.
fn top_n(
    cx: &mut Lowering<'_>,
    sort: &datafusion::logical_expr::Sort,
    skip: usize,
    fetch: Option<usize>,
) -> Result<Node> {
    let state = cx.state;
    let Some(limit) = fetch else { return lower(cx, &sort.input) };
    let input_schema = sort.input.schema();
    let (sort_exprs, sort_fields) = sort_keys(state, &sort.expr, input_schema)?;
    let spec = TopNSpec {
        partition: Vec::new(),
        partition_types: Vec::new(),
        sort: sort_exprs,
        sort_fields,
        offset: skip,
        limit,
        numbered: false,
        append_only: append_only(&sort.input),
    };
    let schema: SchemaRef = Arc::new(input_schema.as_arrow().clone());
    let operator = TopNOperator::new(spec, schema)?;
    Ok(Node::Operator(Box::new(operator), vec![lower(cx, &sort.input)?]))
}

/// Sort expressions and their encodings (type and direction).
type SortKeys = (Vec<Arc<dyn PhysicalExpr>>, Vec<SortField>);

/// Sort expressions compiled over `schema`, and their encodings with direction.
fn sort_keys(
    state: &SessionState,
    sort: &[datafusion::logical_expr::SortExpr],
    schema: &datafusion::common::DFSchema,
) -> Result<SortKeys> {
    let mut exprs = Vec::new();
    let mut fields = Vec::new();
    for s in sort {
        exprs.push(state.create_physical_expr(s.expr.clone(), schema)?);
        let options = SortOptions { descending: !s.asc, nulls_first: s.nulls_first };
        fields.push(SortField::new_with_options(s.expr.get_type(schema)?, options));
    }
    Ok((exprs, fields))
}

/// Top-N per group: a filter bounding `row_number() OVER (PARTITION BY … ORDER BY …)`,
/// directly over the window or over a projection of it. `None` when `filter` is not that
/// shape; other window functions are refused here with a message naming them.
fn top_n_per_group(cx: &mut Lowering<'_>, filter: &datafusion::logical_expr::Filter) -> Result<Option<Node>> {
    let state = cx.state;
    let (projection, window) = match filter.input.as_ref() {
        LogicalPlan::Window(window) => (None, window),
        LogicalPlan::Projection(projection) => match projection.input.as_ref() {
            LogicalPlan::Window(window) => (Some(projection), window),
            _ => return Ok(None),
        },
        _ => return Ok(None),
    };
    let refused = |what: String| Error::NotSupported {
        feature: format!("{what} in a materialized view"),
        hint: Some("for top-N per group, filter on row_number() OVER (PARTITION BY … ORDER BY …) <= n".into()),
    };
    let [window_expr] = window.window_expr.as_slice() else {
        return Err(refused("several window functions".into()));
    };
    let Expr::WindowFunction(function) = window_expr.clone().unalias() else {
        return Err(refused(format!("window expression {window_expr}")));
    };
    let name = function.fun.name().to_ascii_lowercase();
    let params = &function.params;
    if name != "row_number" || !params.args.is_empty() {
        return Err(refused(format!("{name}() OVER (…)")));
    }
    if params.order_by.is_empty() {
        return Err(refused("row_number() without ORDER BY".into()));
    }
    // Where the row number is among the filter's input columns.
    let width = window.schema.fields().len();
    let rank_in_window = Expr::Column(datafusion::common::Column::from(window.schema.qualified_field(width - 1)));
    let rank_index = match projection {
        None => width - 1,
        Some(p) => {
            if !p.expr.iter().all(|e| matches!(e.clone().unalias(), Expr::Column(_))) {
                return Ok(None);
            }
            match p.expr.iter().position(|e| e.clone().unalias() == rank_in_window) {
                Some(i) => i,
                None => return Ok(None),
            }
        }
    };
    let input_schema = filter.input.schema();
    let is_rank = |e: &Expr| match e {
        Expr::Column(c) => input_schema.index_of_column(c).ok() == Some(rank_index),
        _ => false,
    };
    let number = |e: &Expr| match e {
        Expr::Literal(value, _) => match value.cast_to(&DataType::Int64) {
            Ok(datafusion::common::ScalarValue::Int64(Some(n))) => Some(n),
            _ => None,
        },
        _ => None,
    };
    // Ranks kept: [first, last], from the conjuncts on the row number.
    let (mut first, mut last): (i64, Option<i64>) = (1, None);
    let mut rest = Vec::new();
    for conjunct in datafusion::logical_expr::utils::split_conjunction(&filter.predicate) {
        let bound = match conjunct {
            Expr::BinaryExpr(b) if is_rank(&b.left) => number(&b.right).map(|n| (b.op, n)),
            Expr::BinaryExpr(b) if is_rank(&b.right) => number(&b.left).and_then(|n| b.op.swap().map(|op| (op, n))),
            _ => None,
        };
        use datafusion::logical_expr::Operator as Cmp;
        match bound {
            Some((Cmp::LtEq, n)) => last = Some(last.map_or(n, |l| l.min(n))),
            Some((Cmp::Lt, n)) => last = Some(last.map_or(n - 1, |l| l.min(n - 1))),
            Some((Cmp::GtEq, n)) => first = first.max(n),
            Some((Cmp::Gt, n)) => first = first.max(n + 1),
            Some((Cmp::Eq, n)) => {
                first = first.max(n);
                last = Some(last.map_or(n, |l| l.min(n)));
            }
            _ => rest.push(conjunct.clone()),
        }
    }
    let Some(last) = last else {
        return Err(refused("row_number() without an upper bound (such as rn <= 10)".into()));
    };
    let offset = usize::try_from(first.max(1) - 1).unwrap_or(0);
    let limit = usize::try_from(last - first.max(1) + 1).unwrap_or(0);

    let window_input = window.input.schema();
    let mut partition = Vec::new();
    let mut partition_types = Vec::new();
    for expr in &params.partition_by {
        partition.push(state.create_physical_expr(expr.clone(), window_input)?);
        partition_types.push(expr.get_type(window_input)?);
    }
    let (sort, sort_fields) = sort_keys(state, &params.order_by, window_input)?;
    let append_only = append_only(&window.input);
    let spec = TopNSpec { partition, partition_types, sort, sort_fields, offset, limit, numbered: true, append_only };
    let schema: SchemaRef = Arc::new(window.schema.as_arrow().clone());
    let key = PartitionKey { exprs: spec.partition.clone(), types: spec.partition_types.clone() };
    let make = || -> Result<Box<dyn Operator>> { Ok(Box::new(TopNOperator::new(spec.clone(), schema.clone())?)) };
    let mut node = stateful(workers(state), make, vec![key], vec![lower(cx, &window.input)?])?;
    if let Some(p) = projection {
        let exprs = p
            .expr
            .iter()
            .map(|e| state.create_physical_expr(e.clone(), p.input.schema()))
            .collect::<datafusion::error::Result<Vec<_>>>()?;
        let schema: SchemaRef = Arc::new(p.schema.as_arrow().clone());
        node = Node::Operator(Box::new(ProjectFilterOperator::new(None, Some(exprs), schema)?), vec![node]);
    }
    if let Some(predicate) = datafusion::logical_expr::utils::conjunction(rest) {
        let predicate = state.create_physical_expr(predicate, input_schema)?;
        let schema: SchemaRef = Arc::new(input_schema.as_arrow().clone());
        node = Node::Operator(Box::new(ProjectFilterOperator::new(Some(predicate), None, schema)?), vec![node]);
    }
    Ok(Some(node))
}

/// An aggregate whose expressions call model functions, rewritten so that a projection
/// below computes each call as a column and the aggregate reads the columns (keeping its
/// output names). The projection remembers what each row was given (see
/// `ProjectFilterOperator`), so a retraction after a model swap takes back the score the
/// row was aggregated with. `None` when no expression calls a model.
fn hoist_model_calls(aggregate: &datafusion::logical_expr::Aggregate) -> Result<Option<LogicalPlan>> {
    use datafusion::common::tree_node::Transformed;
    let mut calls: Vec<Expr> = Vec::new();
    let column = |i: usize| format!("__freshet_model_{i}");
    let mut rewrite = |expr: &Expr| -> Result<Expr> {
        let rewritten = expr.clone().transform_up(|e| {
            if let Expr::ScalarFunction(f) = &e
                && crate::ml::udf::FUNCTION_NAMES.contains(&f.name())
            {
                let i = calls.iter().position(|c| *c == e).unwrap_or_else(|| {
                    calls.push(e.clone());
                    calls.len() - 1
                });
                return Ok(Transformed::yes(Expr::Column(datafusion::common::Column::from_name(column(i)))));
            }
            Ok(Transformed::no(e))
        })?;
        Ok(rewritten.data)
    };
    let fields = aggregate.schema.fields();
    let mut renamed = |exprs: &[Expr], offset: usize| -> Result<Vec<Expr>> {
        let mut out = Vec::with_capacity(exprs.len());
        for (i, expr) in exprs.iter().enumerate() {
            let rewritten = rewrite(expr)?;
            out.push(if rewritten == *expr {
                rewritten
            } else {
                rewritten.unalias_nested().data.alias(fields[offset + i].name())
            });
        }
        Ok(out)
    };
    let groups = renamed(&aggregate.group_expr, 0)?;
    let aggregates = renamed(&aggregate.aggr_expr, aggregate.group_expr.len())?;
    if calls.is_empty() {
        return Ok(None);
    }
    let mut exprs: Vec<Expr> = aggregate.input.schema().columns().into_iter().map(Expr::Column).collect();
    exprs.extend(calls.into_iter().enumerate().map(|(i, call)| call.alias(column(i))));
    let projection = datafusion::logical_expr::Projection::try_new(exprs, aggregate.input.clone())?;
    let input = Arc::new(LogicalPlan::Projection(projection));
    let hoisted = datafusion::logical_expr::Aggregate::try_new(input, groups, aggregates)?;
    Ok(Some(LogicalPlan::Aggregate(hoisted)))
}

/// Whether `expr` calls `score`, `predict` or `score_version`.
fn calls_model(expr: &Expr) -> bool {
    expr.exists(|e| Ok(matches!(e, Expr::ScalarFunction(f) if crate::ml::udf::FUNCTION_NAMES.contains(&f.name()))))
        .unwrap_or(false)
}

/// A join whose keys or condition call model functions, rewritten so that every call is
/// made by a remembering projection or filter (see `hoist_model_calls`), never by the join
/// operator, which would re-score a pair when it is taken back after a swap: a key that
/// calls a model is computed as a column by a projection below its side, and the
/// condition's conjuncts that call one move into a filter above an inner join. Outer, semi
/// and anti joins cannot move their condition, so a model function there is refused.
/// `None` when nothing calls a model.
fn hoist_join_model_calls(join: &datafusion::logical_expr::Join) -> Result<Option<LogicalPlan>> {
    use datafusion::logical_expr::utils::{conjunction, split_conjunction_owned};
    let keys_call = join.on.iter().any(|(l, r)| calls_model(l) || calls_model(r));
    let (moved, kept): (Vec<Expr>, Vec<Expr>) =
        join.filter.clone().map(split_conjunction_owned).unwrap_or_default().into_iter().partition(calls_model);
    if !keys_call && moved.is_empty() {
        return Ok(None);
    }
    if !moved.is_empty() && join.join_type != JoinType::Inner {
        return Err(Error::NotSupported {
            feature: format!(
                "a model function in the condition of a {} join in a materialized view",
                join.join_type.to_string().to_uppercase()
            ),
            hint: Some("score in a subquery below the join, or make it an inner join".into()),
        });
    }
    // Each side gains a column per key expression that calls a model.
    let side = |plan: &Arc<LogicalPlan>, keys: Vec<&Expr>, prefix: &str| -> Result<(Arc<LogicalPlan>, Vec<Expr>)> {
        if !keys.iter().any(|k| calls_model(k)) {
            return Ok((plan.clone(), keys.into_iter().cloned().collect()));
        }
        let mut exprs: Vec<Expr> = plan.schema().columns().into_iter().map(Expr::Column).collect();
        let mut columns = Vec::with_capacity(keys.len());
        for (i, key) in keys.into_iter().enumerate() {
            if calls_model(key) {
                let name = format!("__freshet_model_{prefix}{i}");
                exprs.push(key.clone().alias(&name));
                columns.push(Expr::Column(datafusion::common::Column::from_name(name)));
            } else {
                columns.push(key.clone());
            }
        }
        let projection = datafusion::logical_expr::Projection::try_new(exprs, plan.clone())?;
        Ok((Arc::new(LogicalPlan::Projection(projection)), columns))
    };
    let (left, left_keys) = side(&join.left, join.on.iter().map(|(l, _)| l).collect(), "left_")?;
    let (right, right_keys) = side(&join.right, join.on.iter().map(|(_, r)| r).collect(), "right_")?;
    let rewritten = datafusion::logical_expr::Join::try_new(
        left,
        right,
        left_keys.into_iter().zip(right_keys).collect(),
        conjunction(kept),
        join.join_type,
        join.join_constraint,
        join.null_equality,
        join.null_aware,
    )?;
    let mut plan = LogicalPlan::Join(rewritten);
    if let Some(predicate) = conjunction(moved) {
        plan = LogicalPlan::Filter(datafusion::logical_expr::Filter::try_new(predicate, Arc::new(plan))?);
    }
    // The join's own columns, without the computed keys.
    let columns = join.schema.columns().into_iter().map(Expr::Column).collect();
    let projection = datafusion::logical_expr::Projection::try_new(columns, Arc::new(plan))?;
    Ok(Some(LogicalPlan::Projection(projection)))
}

/// Whether `plan` only ever gains rows: it reads append-only relations (sources, tables
/// with a watermark) through projections, filters, unions and inner joins.
pub fn append_only(plan: &LogicalPlan) -> bool {
    match plan {
        LogicalPlan::TableScan(scan) => {
            session_window(scan).is_none()
                // Constant relations (table functions) never retract either.
                && crate::catalog::table::planned_def(&scan.source).is_none_or(|def| def.append_only)
        }
        // A constant relation never retracts a row.
        LogicalPlan::Values(_) | LogicalPlan::EmptyRelation(_) => true,
        LogicalPlan::Projection(p) => append_only(&p.input),
        LogicalPlan::Filter(f) => {
            let temporal = super::temporal::split(&f.predicate).map(|(t, _)| t.is_some()).unwrap_or(true);
            !temporal && append_only(&f.input)
        }
        LogicalPlan::SubqueryAlias(a) => append_only(&a.input),
        LogicalPlan::Union(u) => u.inputs.iter().all(|i| append_only(i)),
        LogicalPlan::Join(j) if j.join_type == JoinType::Inner => append_only(&j.left) && append_only(&j.right),
        _ => false,
    }
}

/// An aggregate freshet has no accumulator of its own for, run with DataFusion's.
fn datafusion_aggregate(
    state: &SessionState,
    expr: &Expr,
    input: &LogicalPlan,
    output_type: DataType,
) -> Result<AggregateSpec> {
    let name = match expr {
        Expr::AggregateFunction(f) => f.func.name().to_string(),
        _ => expr.to_string(),
    };
    let physical_input = input.schema().as_arrow();
    let planning = datafusion::logical_expr::physical_planning_context::PhysicalPlanningContext::default();
    let lowered = datafusion::physical_expr::aggregate::LoweredAggregateBuilder::new(
        expr,
        input.schema(),
        physical_input,
        state.execution_props(),
        &planning,
    )
    .with_name(name.clone())
    .build()?;
    let (aggregate, filter) = (lowered.aggregate, lowered.filter);
    if filter.is_some() {
        return Err(Error::not_supported(format!("{name}(…) FILTER (WHERE …) in a materialized view")));
    }
    if !aggregate.create_accumulator()?.supports_retract_batch() && !append_only(input) {
        return Err(Error::NotSupported {
            feature: format!("{name}() over rows that can be updated or deleted, in a materialized view"),
            hint: Some(format!(
                "{name} cannot take a row back; read an append-only input (a source, or a table with a WATERMARK)"
            )),
        });
    }
    let mut spec = AggregateSpec::new(AggregateFunction::DataFusion, None, output_type);
    spec.datafusion = Some(aggregate);
    Ok(spec)
}

fn aggregate_spec(
    state: &SessionState,
    expr: &Expr,
    input: &LogicalPlan,
    output_type: DataType,
) -> Result<AggregateSpec> {
    let input_schema = input.schema().as_ref();
    let expr = match expr {
        Expr::Alias(alias) => alias.expr.as_ref(),
        other => other,
    };
    let Expr::AggregateFunction(aggregate) = expr else {
        return Err(Error::not_supported(format!("aggregate expression {expr} in a materialized view")));
    };
    let name = aggregate.func.name().to_ascii_lowercase();
    const BUILT_IN: &[&str] = &[
        "count",
        "sum",
        "avg",
        "bool_and",
        "bool_or",
        "min",
        "max",
        "var",
        "var_samp",
        "var_sample",
        "variance",
        "var_pop",
        "var_population",
        "stddev",
        "stddev_samp",
        "stddev_pop",
        "string_agg",
        "array_agg",
    ];
    if !BUILT_IN.contains(&name.as_str()) {
        return datafusion_aggregate(state, expr, input, output_type);
    }
    let params = &aggregate.params;
    if params.distinct && name != "count" {
        return Err(Error::not_supported(format!("{name}(DISTINCT …) in a materialized view")));
    }
    let collects = matches!(name.as_str(), "string_agg" | "array_agg");
    let argument = match (params.args.as_slice(), name.as_str()) {
        ([], _) => None,
        ([arg], _) | ([arg, _], "string_agg") => Some(arg),
        _ => return Err(Error::not_supported(format!("{name} with several arguments in a materialized view"))),
    };
    // `agg(x) FILTER (WHERE p)` is `agg(CASE WHEN p THEN x END)` for every aggregate that
    // skips NULLs (all but array_agg); `count(*) FILTER (WHERE p)` counts `CASE WHEN p THEN 1 END`.
    let filtered = match &params.filter {
        None => None,
        Some(_) if name == "array_agg" => {
            return Err(Error::not_supported("array_agg(…) FILTER (WHERE …) in a materialized view"));
        }
        Some(predicate) => {
            let value = match argument {
                None | Some(Expr::Literal(..)) => datafusion::logical_expr::lit(1i64),
                Some(arg) => arg.clone(),
            };
            Some(datafusion::logical_expr::when(predicate.as_ref().clone(), value).end()?)
        }
    };
    let argument = filtered.as_ref().or(argument);
    // ORDER BY inside string_agg/array_agg: only by the aggregated value itself.
    let uncast = |e: &Expr| -> Expr {
        match e {
            Expr::Cast(c) => c.expr.as_ref().clone(),
            Expr::TryCast(c) => c.expr.as_ref().clone(),
            other => other.clone(),
        }
    };
    let (descending, nulls_first) = match params.order_by.as_slice() {
        [] => (false, false),
        [order] if collects && argument.is_some_and(|a| uncast(a) == uncast(&order.expr)) => {
            (!order.asc, order.nulls_first)
        }
        _ => {
            return Err(Error::NotSupported {
                feature: format!("{name}(… ORDER BY …) in a materialized view"),
                hint: Some("string_agg and array_agg may be ordered by the aggregated value only".into()),
            });
        }
    };
    let delimiter = match params.args.get(1) {
        None => String::new(),
        Some(Expr::Literal(value, _)) if name == "string_agg" => match value {
            datafusion::common::ScalarValue::Utf8(Some(s))
            | datafusion::common::ScalarValue::LargeUtf8(Some(s))
            | datafusion::common::ScalarValue::Utf8View(Some(s)) => s.clone(),
            _ => {
                return Err(Error::not_supported(
                    "string_agg with a NULL or non-text delimiter in a materialized view",
                ));
            }
        },
        Some(_) => return Err(Error::not_supported("string_agg with a computed delimiter in a materialized view")),
    };
    let is_number = |t: &DataType| t.is_integer() || t.is_floating();
    let variance = |population, root| AggregateFunction::Variance { population, root };
    let function = match name.as_str() {
        "count" if params.distinct => match argument {
            Some(_) => AggregateFunction::CountDistinct,
            None => return Err(Error::not_supported("count(DISTINCT *) in a materialized view")),
        },
        "count" => match argument {
            None | Some(Expr::Literal(..)) => AggregateFunction::CountRows,
            Some(_) => AggregateFunction::Count,
        },
        "sum" if matches!(output_type, DataType::Int64 | DataType::Float64) => AggregateFunction::Sum,
        "avg" if output_type == DataType::Float64 => AggregateFunction::Avg,
        "bool_and" if output_type == DataType::Boolean => AggregateFunction::BoolAnd,
        "bool_or" if output_type == DataType::Boolean => AggregateFunction::BoolOr,
        "min" => AggregateFunction::Min,
        "max" => AggregateFunction::Max,
        "var" | "var_samp" | "var_sample" | "variance" if output_type == DataType::Float64 => variance(false, false),
        "var_pop" | "var_population" if output_type == DataType::Float64 => variance(true, false),
        "stddev" | "stddev_samp" if output_type == DataType::Float64 => variance(false, true),
        "stddev_pop" if output_type == DataType::Float64 => variance(true, true),
        "string_agg" => AggregateFunction::StringAgg,
        "array_agg" if matches!(output_type, DataType::List(_)) => AggregateFunction::ArrayAgg,
        _ => return Err(Error::not_supported(format!("{name}() returning {output_type} in a materialized view"))),
    };
    if let (AggregateFunction::Sum | AggregateFunction::Avg | AggregateFunction::Variance { .. }, Some(arg)) =
        (function, argument)
    {
        let arg_type = arg.get_type(input_schema)?;
        if !is_number(&arg_type) {
            return Err(Error::not_supported(format!("{name}() over {arg_type} in a materialized view")));
        }
    }
    let argument_type = argument.map(|a| a.get_type(input_schema)).transpose()?;
    let argument = match (function, argument) {
        (AggregateFunction::CountRows, _) | (_, None) => None,
        (_, Some(arg)) => Some(state.create_physical_expr(arg.clone(), input_schema)?),
    };
    Ok(AggregateSpec {
        function,
        argument,
        output_type,
        delimiter,
        descending,
        nulls_first,
        argument_type,
        datafusion: None,
        append_only: false,
    })
}

fn construct_name(plan: &LogicalPlan) -> &'static str {
    match plan {
        LogicalPlan::Distinct(_) => "DISTINCT",
        LogicalPlan::Window(_) => "window functions",
        LogicalPlan::Values(_) => "VALUES",
        LogicalPlan::EmptyRelation(_) => "a query that reads no table",
        LogicalPlan::Subquery(_) => "subqueries",
        LogicalPlan::Unnest(_) => "UNNEST",
        LogicalPlan::RecursiveQuery(_) => "WITH RECURSIVE",
        _ => "this query shape",
    }
}
