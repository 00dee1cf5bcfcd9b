//! The system catalog clients introspect: `pg_catalog` (and the functions that go with it,
//! such as `format_type`, `pg_get_userbyid`, `version()`), next to DataFusion's own
//! `information_schema`.
//!
//! Most of `pg_catalog` comes from the `datafusion-pg-catalog` crate, which derives
//! `pg_class`, `pg_attribute`, `pg_namespace`, … from DataFusion's catalog, so tables and
//! views created after a client connected appear at once. freshet wraps it ([`PgCatalog`])
//! where freshet knows more: materialized views are `relkind = 'm'` in `pg_class` and rows
//! of `pg_matviews`, plain views are rows of `pg_views`, and `pg_roles` names the user
//! clients log in as.
//!
//! [`parse`] sends catalog queries through the same crate's rewriting rules, which turn
//! the Postgres-only syntax clients use (`'t'::regclass`, `OPERATOR(pg_catalog.~)`, …) into
//! SQL DataFusion plans; `subqueries` answers the scalar subqueries of select lists and
//! CASE expressions in place of the crate's rule that makes them NULL. Nothing here changes data.

use std::collections::{HashMap, HashSet, VecDeque};
use std::ops::ControlFlow;
use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use datafusion::arrow::array::{Array, ArrayRef, BooleanArray, RecordBatch, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::catalog::information_schema::{INFORMATION_SCHEMA_TABLES, InformationSchemaProvider};
use datafusion::catalog::{SchemaProvider, Session, TableProvider};
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::error::Result as DfResult;
use datafusion::logical_expr::{ColumnarValue, Expr, ScalarUDF, TableType, Volatility, create_udf};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::prelude::SessionContext;
use datafusion::sql::parser::Statement as DFStatement;
use datafusion::sql::sqlparser::ast::{
    AccessExpr, Expr as SqlExpr, Subscript, Value as SqlValue, VisitMut, VisitorMut,
};
use datafusion_pg_catalog::pg_catalog::context::{PgCatalogContextProvider, Role};

use super::table::SnapshotCell;
use super::{CATALOG_NAME, SCHEMA_NAME};
use crate::error::{Error, Result};
use crate::sql::{self, Statement};

/// What `version()` answers. Drivers parse the leading "PostgreSQL <major>.<minor>".
pub const VERSION: &str = concat!("PostgreSQL 16.6 (freshet ", env!("CARGO_PKG_VERSION"), ") on Arrow and DataFusion");

/// The user clients log in as until [`set_user`] says otherwise.
const DEFAULT_USER: &str = "freshet";

/// Registers `pg_catalog` in freshet's catalog and the catalog functions in `ctx`.
pub fn install(ctx: &SessionContext, cell: Arc<SnapshotCell>) -> Result<()> {
    let user = Arc::new(RwLock::new(DEFAULT_USER.to_string()));
    datafusion_pg_catalog::setup_pg_catalog(ctx, CATALOG_NAME, LoginRoles { user: user.clone() })
        .map_err(|e| Error::Internal(format!("cannot set up pg_catalog: {e}")))?;
    let catalog =
        ctx.catalog(CATALOG_NAME).ok_or_else(|| Error::Internal("the freshet catalog is not registered".into()))?;
    let inner = catalog.schema("pg_catalog").ok_or_else(|| Error::Internal("pg_catalog was not registered".into()))?;
    let hidden = Hidden::default();
    let view_queries = ViewQueries::default();
    catalog.register_schema(
        "pg_catalog",
        Arc::new(PgCatalog {
            inner: inner.clone(),
            cell: cell.clone(),
            user,
            hidden: hidden.clone(),
            view_queries: view_queries.clone(),
        }),
    )?;
    // information_schema is not on the search path, so its relations are not visible.
    let known = hidden.clone();
    ctx.register_udf(unary_udf("pg_table_is_visible", DataType::Int32, DataType::Boolean, move |oids| {
        let oids = datafusion::common::cast::as_int32_array(oids)?;
        let known = read(&known);
        let visible: BooleanArray = oids.iter().map(|oid| oid.map(|oid| !known.hidden.contains(&oid))).collect();
        Ok(Arc::new(visible))
    }));
    // A view's query text (plain or materialized); NULL for anything else.
    let view_cell = cell.clone();
    let known_views = hidden.clone();
    let queries = view_queries.clone();
    ctx.register_udf(TextFunction::udf("pg_get_viewdef", move |arrays, rows| {
        let Some(oids) = arrays.first() else { return null_text(arrays, rows) };
        let snapshot = view_cell.current();
        let plain_definition = |name: &str| {
            let view = snapshot.plain_views.get(name)?;
            (view.as_ref() as &dyn std::any::Any)
                .downcast_ref::<datafusion::catalog::view::ViewTable>()
                .and_then(|v| v.definition().cloned())
        };
        // `pg_get_viewdef('name')`: the older form, by (optionally schema-qualified) name.
        if matches!(oids.data_type(), DataType::Utf8 | DataType::Utf8View | DataType::LargeUtf8) {
            let names = datafusion::arrow::compute::cast(oids, &DataType::Utf8)?;
            let names = datafusion::common::cast::as_string_array(&names)?;
            let definitions: StringArray = names
                .iter()
                .map(|name| {
                    let name = name?.trim_start_matches("public.").trim_matches('"');
                    queries.query(name).or_else(|| plain_definition(name))
                })
                .collect();
            return Ok(Arc::new(definitions));
        }
        let oids = datafusion::common::cast::as_int32_array(oids)?;
        let known = read(&known_views);
        let definitions: StringArray = oids
            .iter()
            .map(|oid| {
                let oid = oid?;
                if let Some(name) = known.matviews.get(&oid) {
                    return queries.query(name);
                }
                let view = snapshot.plain_views.get(known.plain_views.get(&oid)?)?;
                (view.as_ref() as &dyn std::any::Any)
                    .downcast_ref::<datafusion::catalog::view::ViewTable>()
                    .and_then(|v| v.definition().cloned())
            })
            .collect();
        Ok(Arc::new(definitions))
    }));
    register_key_functions(ctx, hidden.clone());
    register_size_functions(ctx, cell.clone(), hidden.clone());
    register_database_size(ctx, cell.clone());
    let information_schema = InformationSchemaProvider::new(ctx.state().catalog_list().clone());
    catalog.register_schema(
        "information_schema",
        Arc::new(InformationSchema { inner: information_schema, cell, catalogs: ctx.state().catalog_list().clone() }),
    )?;
    ctx.register_udf(constant_text_udf("version", VERSION));
    register_user_functions(ctx, DEFAULT_USER);
    register_functions(ctx);
    Ok(())
}

/// The catalog functions that do not depend on the database's state.
fn register_functions(ctx: &SessionContext) {
    // Everything is visible: freshet has one schema on the search path.
    for name in ["pg_function_is_visible", "pg_type_is_visible", "pg_collation_is_visible"] {
        ctx.register_udf(unary_udf(name, DataType::Int32, DataType::Boolean, |oids| {
            Ok(Arc::new(BooleanArray::from(vec![true; oids.len()])))
        }));
    }
    ctx.register_udf(TextFunction::udf("json_build_object", json_build_object));
    super::subqueries::register(ctx);
    ctx.register_udf(TextFunction::udf("format", pg_format));
    register_like_escape(ctx);
    // Descriptions, comments and definitions freshet does not keep: NULL, as in Postgres
    // for an object without a comment.
    for name in [
        "obj_description",
        "col_description",
        "shobj_description",
        "pg_get_triggerdef",
        "pg_get_function_result",
        "pg_get_function_arguments",
        "pg_get_function_identity_arguments",
        "pg_get_serial_sequence",
    ] {
        ctx.register_udf(TextFunction::udf(name, null_text));
    }
    ctx.register_udf(unary_udf("to_regtype", DataType::Utf8, DataType::Int32, |names| {
        let names = datafusion::common::cast::as_string_array(names)?;
        let oids: datafusion::arrow::array::Int32Array = names.iter().map(|n| n.and_then(type_oid)).collect();
        Ok(Arc::new(oids))
    }));
    ctx.register_udf(unary_udf("pg_size_pretty", DataType::Int64, DataType::Utf8, |sizes| {
        let sizes = datafusion::common::cast::as_int64_array(sizes)?;
        let pretty: StringArray = sizes.iter().map(|size| size.map(pretty_size)).collect();
        Ok(Arc::new(pretty))
    }));
}

/// A catalog function of one argument, computed column by column.
fn unary_udf(
    name: &str,
    argument: DataType,
    returns: DataType,
    f: impl Fn(&ArrayRef) -> DfResult<ArrayRef> + Send + Sync + 'static,
) -> ScalarUDF {
    let call = move |args: &[ColumnarValue]| -> DfResult<ColumnarValue> {
        let arrays = ColumnarValue::values_to_arrays(args)?;
        match arrays.first() {
            Some(input) => Ok(ColumnarValue::Array(f(input)?)),
            None => Err(datafusion::error::DataFusionError::Plan("a catalog function missed its argument".into())),
        }
    };
    create_udf(name, vec![argument], returns, Volatility::Stable, Arc::new(call))
}

/// The OID of a built-in type by any of its SQL names (what `to_regtype` answers), or
/// `None` for types freshet does not have, such as extension types.
fn type_oid(name: &str) -> Option<i32> {
    let name = name.trim().trim_start_matches("pg_catalog.").to_ascii_lowercase();
    Some(match name.as_str() {
        "bool" | "boolean" => 16,
        "bytea" => 17,
        "char" | "\"char\"" => 18,
        "name" => 19,
        "int8" | "bigint" => 20,
        "int2" | "smallint" => 21,
        "int4" | "integer" | "int" => 23,
        "text" => 25,
        "oid" => 26,
        "json" => 114,
        "float4" | "real" => 700,
        "float8" | "double precision" => 701,
        "varchar" | "character varying" => 1043,
        "date" => 1082,
        "time" | "time without time zone" => 1083,
        "timestamp" | "timestamp without time zone" => 1114,
        "timestamptz" | "timestamp with time zone" => 1184,
        "interval" => 1186,
        "numeric" | "decimal" => 1700,
        "uuid" => 2950,
        "jsonb" => 3802,
        _ => return None,
    })
}

/// Postgres' `pg_size_pretty`: bytes in the largest unit that keeps at least 10 of them.
fn pretty_size(bytes: i64) -> String {
    let mut value = bytes;
    for unit in ["bytes", "kB", "MB", "GB", "TB"] {
        if value.abs() < 10 * 1024 || unit == "TB" {
            return format!("{value} {unit}");
        }
        value = (value + 512) / 1024;
    }
    format!("{value} PB")
}

/// A catalog function of any arguments that returns text (or `returns`): one type for the
/// functions below, which differ only in how they compute their value.
struct TextFunction {
    name: &'static str,
    signature: datafusion::logical_expr::Signature,
    returns: DataType,
    /// Computes `rows` values from the argument columns.
    body: Box<TextBody>,
}

type TextBody = dyn Fn(&[ArrayRef], usize) -> DfResult<ArrayRef> + Send + Sync;

impl TextFunction {
    fn udf(
        name: &'static str,
        body: impl Fn(&[ArrayRef], usize) -> DfResult<ArrayRef> + Send + Sync + 'static,
    ) -> ScalarUDF {
        Self::typed_udf(name, DataType::Utf8, body)
    }

    fn typed_udf(
        name: &'static str,
        returns: DataType,
        body: impl Fn(&[ArrayRef], usize) -> DfResult<ArrayRef> + Send + Sync + 'static,
    ) -> ScalarUDF {
        let signature = datafusion::logical_expr::Signature::variadic_any(Volatility::Stable);
        ScalarUDF::new_from_impl(TextFunction { name, signature, returns, body: Box::new(body) })
    }
}

/// Reads a lock a panicking writer left behind as it was.
fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    match lock.read() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}

// Functions are told apart by name (DataFusion compares and hashes UDFs).
impl PartialEq for TextFunction {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
    }
}

impl Eq for TextFunction {}

impl std::hash::Hash for TextFunction {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.name.hash(state);
    }
}

impl std::fmt::Debug for TextFunction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextFunction").field("name", &self.name).finish()
    }
}

impl datafusion::logical_expr::ScalarUDFImpl for TextFunction {
    fn name(&self) -> &str {
        self.name
    }

    fn signature(&self) -> &datafusion::logical_expr::Signature {
        &self.signature
    }

    fn return_type(&self, _: &[DataType]) -> DfResult<DataType> {
        Ok(self.returns.clone())
    }

    fn invoke_with_args(&self, args: datafusion::logical_expr::ScalarFunctionArgs) -> DfResult<ColumnarValue> {
        let arrays = ColumnarValue::values_to_arrays(&args.args)?;
        Ok(ColumnarValue::Array((self.body)(&arrays, args.number_rows)?))
    }
}

/// NULL whatever the arguments: for comments and definitions freshet does not keep.
fn null_text(_: &[ArrayRef], rows: usize) -> DfResult<ArrayRef> {
    Ok(datafusion::arrow::array::new_null_array(&DataType::Utf8, rows))
}

/// The functions that describe primary keys and column defaults by OID, from what the
/// last `pg_class` scan learnt (`known`).
fn register_key_functions(ctx: &SessionContext, known: Hidden) {
    // pg_get_indexdef(index) is the CREATE INDEX statement; pg_get_indexdef(index, column,
    // pretty) names the key's column-th column (0 again means the whole statement).
    let indexes = known.clone();
    ctx.register_udf(TextFunction::udf("pg_get_indexdef", move |arrays, rows| {
        let Some(oids) = arrays.first() else { return null_text(arrays, rows) };
        let oids = datafusion::arrow::compute::cast(oids, &DataType::Int32)?;
        let oids = datafusion::common::cast::as_int32_array(&oids)?;
        let columns = match arrays.get(1) {
            Some(c) => Some(datafusion::arrow::compute::cast(c, &DataType::Int32)?),
            None => None,
        };
        let columns = columns.as_ref().map(|c| datafusion::common::cast::as_int32_array(c)).transpose()?;
        let known = read(&indexes);
        let definitions: StringArray = (0..oids.len())
            .map(|row| {
                let key = known.keys.iter().find(|k| oids.is_valid(row) && k.index_oid() == oids.value(row))?;
                match columns.filter(|c| c.is_valid(row)).map(|c| c.value(row)).unwrap_or(0) {
                    0 => Some(key.index_definition()),
                    column => {
                        let (_, name) = key.columns.get(usize::try_from(column - 1).ok()?)?;
                        Some(quote_ident(name))
                    }
                }
            })
            .collect();
        Ok(Arc::new(definitions))
    }));
    ctx.register_udf(TextFunction::udf("pg_get_constraintdef", move |arrays, rows| {
        let Some(oids) = arrays.first() else { return null_text(arrays, rows) };
        let oids = datafusion::arrow::compute::cast(oids, &DataType::Int32)?;
        let oids = datafusion::common::cast::as_int32_array(&oids)?;
        let known = read(&known);
        let definitions: StringArray = oids
            .iter()
            .map(|oid| known.keys.iter().find(|k| Some(k.constraint_oid()) == oid).map(|k| k.constraint_definition()))
            .collect();
        Ok(Arc::new(definitions))
    }));
    // freshet's pg_attrdef.adbin holds the expression's SQL text, so that is its
    // decompiled form; NULL stays NULL (no expression).
    ctx.register_udf(TextFunction::udf("pg_get_expr", |arrays, rows| {
        let Some(expressions) = arrays.first() else { return null_text(arrays, rows) };
        Ok(datafusion::arrow::compute::cast(expressions, &DataType::Utf8)?)
    }));
    let expanded =
        DataType::List(Arc::new(Field::new_list_field(DataType::Struct(super::keys::expanded_fields()), true)));
    ctx.register_udf(TextFunction::typed_udf(EXPAND_ARRAY, expanded, super::keys::expand_array));
}

/// `pg_relation_size`, `pg_table_size`, `pg_total_relation_size` and `pg_indexes_size`
/// by OID, from what the last `pg_class` scan learnt (`known`) and the current snapshot.
///
/// freshet keeps a relation's rows as Arrow arrays in memory (the durable copy is the log
/// and snapshots in object storage), so a table's, source's or materialized view's size is
/// the bytes of those arrays ([`super::table::TableVersion::memory_bytes`]), and all four
/// functions report the same number for it but `pg_indexes_size`, which is 0: the key
/// index a lookup builds is not counted. Relations that hold no rows of their own (plain
/// views, primary-key indexes, system catalogs) are 0; an OID no relation has is NULL, as
/// in Postgres.
fn register_size_functions(ctx: &SessionContext, cell: Arc<SnapshotCell>, known: Hidden) {
    for name in ["pg_relation_size", "pg_table_size", "pg_total_relation_size", "pg_indexes_size"] {
        let (cell, known) = (cell.clone(), known.clone());
        let indexes_only = name == "pg_indexes_size";
        ctx.register_udf(TextFunction::typed_udf(name, DataType::Int64, move |arrays, rows| {
            let Some(oids) = arrays.first() else {
                return Ok(datafusion::arrow::array::new_null_array(&DataType::Int64, rows));
            };
            let oids = datafusion::arrow::compute::cast(oids, &DataType::Int32)?;
            let oids = datafusion::common::cast::as_int32_array(&oids)?;
            let snapshot = cell.current();
            let known = read(&known);
            let sizes: datafusion::arrow::array::Int64Array = oids
                .iter()
                .map(|oid| {
                    let oid = oid?;
                    if !known.relations.contains(&oid) {
                        return None;
                    }
                    let held = known.public.get(&oid).and_then(|name| snapshot.relation(name));
                    Some(match held {
                        Some(version) if !indexes_only => i64::try_from(version.memory_bytes()).unwrap_or(i64::MAX),
                        _ => 0,
                    })
                })
                .collect();
            Ok(Arc::new(sizes))
        }));
    }
}

/// `pg_database_size(name)`: the bytes of every table's, source's and materialized view's
/// rows (see [`register_size_functions`]) for freshet's database, 0 for the other
/// databases `pg_database` lists, which hold no rows (other DataFusion catalogs, and the
/// `postgres` entry datafusion-pg-catalog always adds), 3D000 for a name it does not
/// list, as in Postgres. By OID it is refused (0A000).
fn register_database_size(ctx: &SessionContext, cell: Arc<SnapshotCell>) {
    let catalogs = ctx.state().catalog_list().clone();
    ctx.register_udf(TextFunction::typed_udf("pg_database_size", DataType::Int64, move |arrays, rows| {
        let Some(names) = arrays.first() else {
            return Ok(datafusion::arrow::array::new_null_array(&DataType::Int64, rows));
        };
        if !matches!(names.data_type(), DataType::Utf8 | DataType::Utf8View | DataType::LargeUtf8) {
            return Err(datafusion::error::DataFusionError::External(Box::new(Error::not_supported(
                "pg_database_size by OID (name the database instead)".to_string(),
            ))));
        }
        let names = datafusion::arrow::compute::cast(names, &DataType::Utf8)?;
        let names = datafusion::common::cast::as_string_array(&names)?;
        let snapshot = cell.current();
        // Views share Arrow buffers with their sources: each allocation counts once.
        let mut allocations = crate::dataflow::FastMap::default();
        for relation in snapshot.tables.values().chain(snapshot.views.values()) {
            relation.allocations(&mut allocations);
        }
        let total: usize = allocations.values().sum();
        let sizes = names
            .iter()
            .map(|name| match name {
                None => Ok(None),
                Some(CATALOG_NAME) => Ok(Some(i64::try_from(total).unwrap_or(i64::MAX))),
                Some(other) if other == "postgres" || catalogs.catalog(other).is_some() => Ok(Some(0)),
                Some(other) => Err(datafusion::error::DataFusionError::External(Box::new(Error::Plan {
                    code: "3D000",
                    message: format!("database \"{other}\" does not exist"),
                    position: None,
                }))),
            })
            .collect::<DfResult<datafusion::arrow::array::Int64Array>>()?;
        Ok(Arc::new(sizes))
    }));
}

/// The name the catalog rewrite gives `information_schema._pg_expandarray` (inside `unnest`).
const EXPAND_ARRAY: &str = "_pg_expandarray";

/// How the catalog finds a materialized view's query text, which lives with its
/// dataflow rather than in the snapshot. Set once the database is open.
#[derive(Clone, Default)]
struct ViewQueries(Arc<std::sync::OnceLock<ViewQuery>>);

/// A materialized view's query text by name.
pub type ViewQuery = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

impl ViewQueries {
    fn query(&self, name: &str) -> Option<String> {
        self.0.get().and_then(|lookup| lookup(name))
    }
}

impl std::fmt::Debug for ViewQueries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ViewQueries")
    }
}

/// Makes `pg_get_viewdef` and `pg_matviews.definition` answer materialized views' queries
/// through `lookup`.
pub fn serve_view_queries(ctx: &SessionContext, lookup: ViewQuery) -> Result<()> {
    let schema = ctx
        .catalog(CATALOG_NAME)
        .and_then(|c| c.schema("pg_catalog"))
        .ok_or_else(|| Error::Internal("pg_catalog is not registered".into()))?;
    let pg_catalog = (schema.as_ref() as &dyn std::any::Any)
        .downcast_ref::<PgCatalog>()
        .ok_or_else(|| Error::Internal("pg_catalog is not freshet's".into()))?;
    pg_catalog
        .view_queries
        .0
        .set(lookup)
        .map_err(|_| Error::Internal("materialized view queries are served already".into()))
}

/// `json_build_object(key, value, …)` as JSON text (SQLAlchemy's column inspection uses it).
fn json_build_object(arrays: &[ArrayRef], rows: usize) -> DfResult<ArrayRef> {
    use datafusion::arrow::util::display::array_value_to_string;
    if !arrays.len().is_multiple_of(2) {
        return Err(datafusion::error::DataFusionError::Plan(
            "json_build_object needs an even number of arguments (key, value, …)".into(),
        ));
    }
    let mut out = Vec::with_capacity(rows);
    for row in 0..rows {
        let mut object = serde_json::Map::new();
        for pair in arrays.chunks(2) {
            let key = array_value_to_string(&pair[0], row)?;
            let value = &pair[1];
            let json = if value.is_null(row) {
                serde_json::Value::Null
            } else {
                let text = array_value_to_string(value, row)?;
                match value.data_type() {
                    DataType::Boolean => serde_json::Value::Bool(text == "true"),
                    t if t.is_numeric() => serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
                    _ => serde_json::Value::String(text),
                }
            };
            object.insert(key, json);
        }
        out.push(serde_json::Value::Object(object).to_string());
    }
    Ok(Arc::new(StringArray::from(out)))
}

/// Postgres' `format(formatstr, args…)` with `%s`, `%I`, `%L` and `%%` (no widths or
/// positions), which catalog queries use to build type and relation names.
fn pg_format(arrays: &[ArrayRef], rows: usize) -> DfResult<ArrayRef> {
    use datafusion::arrow::util::display::array_value_to_string;
    let Some((template, values)) = arrays.split_first() else {
        return Err(datafusion::error::DataFusionError::Plan("format needs a format string".into()));
    };
    let mut out: Vec<Option<String>> = Vec::with_capacity(rows);
    for row in 0..rows {
        if template.is_null(row) {
            out.push(None);
            continue;
        }
        let template = array_value_to_string(template, row)?;
        let value = |i: usize| -> DfResult<Option<String>> {
            let array = values
                .get(i)
                .ok_or_else(|| datafusion::error::DataFusionError::Plan("too few arguments for format()".into()))?;
            if array.is_null(row) { Ok(None) } else { Ok(Some(array_value_to_string(array, row)?)) }
        };
        let (mut text, mut next, mut chars) = (String::new(), 0, template.chars());
        while let Some(c) = chars.next() {
            if c != '%' {
                text.push(c);
                continue;
            }
            match chars.next() {
                Some('%') => text.push('%'),
                Some('s') => {
                    text.push_str(&value(next)?.unwrap_or_default());
                    next += 1;
                }
                Some('I') => {
                    let ident = value(next)?.ok_or_else(|| {
                        datafusion::error::DataFusionError::Execution(
                            "null values cannot be formatted as an SQL identifier".into(),
                        )
                    })?;
                    text.push_str(&quote_ident(&ident));
                    next += 1;
                }
                Some('L') => {
                    match value(next)? {
                        Some(v) => text.push_str(&format!("'{}'", v.replace('\'', "''"))),
                        None => text.push_str("NULL"),
                    }
                    next += 1;
                }
                other => {
                    return Err(datafusion::error::DataFusionError::Plan(format!(
                        "unrecognized format() type specifier \"{}\"",
                        other.map(String::from).unwrap_or_default()
                    )));
                }
            }
        }
        out.push(Some(text));
    }
    Ok(Arc::new(StringArray::from(out)))
}

/// An identifier as Postgres quotes it: bare when it is lower-case letters, digits and
/// underscores (not starting with a digit), double-quoted otherwise.
pub(super) fn quote_ident(ident: &str) -> String {
    let plain = ident.chars().next().is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && ident.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if plain { ident.to_string() } else { format!("\"{}\"", ident.replace('"', "\"\"")) }
}

/// Makes `current_user`, `session_user`, `pg_get_userbyid` and `pg_roles` name `user`.
pub fn set_user(ctx: &SessionContext, user: &str) -> Result<()> {
    let schema = ctx
        .catalog(CATALOG_NAME)
        .and_then(|c| c.schema("pg_catalog"))
        .ok_or_else(|| Error::Internal("pg_catalog is not registered".into()))?;
    let pg_catalog = (schema.as_ref() as &dyn std::any::Any)
        .downcast_ref::<PgCatalog>()
        .ok_or_else(|| Error::Internal("pg_catalog is not freshet's".into()))?;
    match pg_catalog.user.write() {
        Ok(mut guard) => *guard = user.to_string(),
        Err(poisoned) => *poisoned.into_inner() = user.to_string(),
    }
    register_user_functions(ctx, user);
    Ok(())
}

fn register_user_functions(ctx: &SessionContext, user: &str) {
    ctx.register_udf(constant_text_udf("session_user", user));
    ctx.register_udf(constant_text_udf("current_user", user));
    let user = user.to_string();
    ctx.register_udf(unary_udf("pg_get_userbyid", DataType::Int32, DataType::Utf8, move |oids| {
        Ok(Arc::new(StringArray::from(vec![user.as_str(); oids.len()])))
    }));
}

/// A function of no arguments that always returns `value`.
fn constant_text_udf(name: &str, value: &str) -> ScalarUDF {
    let value = value.to_string();
    let f = move |_: &[ColumnarValue]| -> DfResult<ColumnarValue> {
        Ok(ColumnarValue::Scalar(datafusion::scalar::ScalarValue::Utf8(Some(value.clone()))))
    };
    create_udf(name, vec![], DataType::Utf8, Volatility::Stable, Arc::new(f))
}

/// Splits `sql` into statements. Catalog queries (those naming `pg_…` relations or
/// functions, `information_schema`, or Postgres' special user functions) are rewritten
/// into SQL DataFusion can plan; anything else, and anything the rewriting parser cannot
/// read, goes to freshet's own parser, which reports errors with positions.
///
/// `current_setting('name')` is replaced by the value `setting` gives for `name` (the
/// session's settings live with the connection, not in the planner).
pub fn parse(text: &str, setting: &dyn Fn(&str) -> Result<String>) -> Result<VecDeque<Statement>> {
    if !is_catalog_query(text) {
        return sql::parse(text);
    }
    let mut text = text.to_string();
    for (from, to) in CLIENT_REWRITES {
        text = replace_ignoring_whitespace(&text, from, to);
    }
    let text = inline_settings(&text, setting)?;
    let text = text.as_str();
    match super::subqueries::rewrite(text) {
        Ok(statements) => Ok(statements
            .into_iter()
            .map(|mut s| {
                let _ = VisitMut::visit(&mut s, &mut CompositeValues);
                let _ = VisitMut::visit(&mut s, &mut UnnamedLiterals);
                Statement::Sql(DFStatement::Statement(Box::new(s)))
            })
            .collect()),
        Err(_) => sql::parse(text),
    }
}

/// Postgres' composite values, as pgjdbc's `getPrimaryKeys` uses them:
/// `information_schema._pg_expandarray(a)` returns a set of `(x, n)` records, and
/// `(record).field` reads a field. They become `unnest` of a list of structs and
/// `get_field(record, 'field')`, which DataFusion plans; several `unnest`s in one select
/// list step together, as several set-returning functions do in Postgres.
///
/// `generate_subscripts(array, dim)`, the positions of an array's elements as a set
/// (SQLAlchemy numbers primary-key columns with it next to `unnest(indkey)`), becomes
/// `unnest` of the list of those positions, so that it steps together with that `unnest`.
///
/// Also: `obj_description`, `col_description` and `shobj_description` become NULL before
/// their arguments are planned. freshet keeps no comments, so NULL is their value for any
/// object, and clients name the object with casts DataFusion cannot evaluate (Metabase:
/// `format('%I.%I', schema, table)::regclass::oid`).
struct CompositeValues;

impl VisitorMut for CompositeValues {
    type Break = ();

    // After the children, so a replacement is not visited (and wrapped) again.
    fn post_visit_expr(&mut self, expr: &mut SqlExpr) -> ControlFlow<()> {
        let replacement = match expr {
            SqlExpr::Function(f)
                if f.name
                    .0
                    .last()
                    .and_then(|p| p.as_ident())
                    .is_some_and(|i| i.value.eq_ignore_ascii_case(EXPAND_ARRAY)) =>
            {
                function_args(f).and_then(|args| call(EXPAND_ARRAY, args)).and_then(|inner| call("unnest", vec![inner]))
            }
            SqlExpr::Function(f)
                if f.name
                    .0
                    .last()
                    .and_then(|p| p.as_ident())
                    .is_some_and(|i| i.value.eq_ignore_ascii_case("generate_subscripts")) =>
            {
                match function_args(f).as_deref() {
                    // A vector's subscripts start at 0, an array's at 1.
                    Some([array, dimension]) => {
                        let first = if is_vector_column(array) { 0 } else { 1 };
                        parse_expr(&format!(
                            "unnest(range({first}, CAST(array_length({array}, {dimension}) AS BIGINT) + {first}))"
                        ))
                    }
                    _ => None,
                }
            }
            // `vector[i]` reads the element Postgres numbers i, which the array holds at i + 1.
            SqlExpr::CompoundFieldAccess { root, access_chain } if vector_subscript(root, access_chain).is_some() => {
                let mut access_chain = access_chain.clone();
                if let Some(AccessExpr::Subscript(Subscript::Index { index })) = access_chain.last_mut()
                    && let Some(shifted) = parse_expr(&format!("({index}) + 1"))
                {
                    *index = shifted;
                }
                Some(SqlExpr::CompoundFieldAccess { root: root.clone(), access_chain })
            }
            // DataFusion's LIKE escapes with backslash only (Postgres' default); another
            // escape character is turned into backslashes in the pattern, when it is known.
            SqlExpr::Like { pattern, escape_char: escape @ Some(_), .. }
            | SqlExpr::ILike { pattern, escape_char: escape @ Some(_), .. } => {
                let other = match escape.as_ref().map(|e| &e.value) {
                    Some(SqlValue::SingleQuotedString(c)) if c != "\\" => Some(c.clone()),
                    _ => None,
                };
                if let Some(c) = other {
                    let c = SqlExpr::Value(SqlValue::SingleQuotedString(c).with_empty_span());
                    if let Some(converted) = call(LIKE_ESCAPE, vec![(**pattern).clone(), c]) {
                        **pattern = converted;
                        *escape = None;
                    }
                }
                None
            }
            SqlExpr::Function(f)
                if f.name.0.last().and_then(|p| p.as_ident()).is_some_and(|i| {
                    ["obj_description", "col_description", "shobj_description"]
                        .contains(&i.value.to_ascii_lowercase().as_str())
                }) =>
            {
                Some(SqlExpr::Value(SqlValue::Null.with_empty_span()))
            }
            SqlExpr::CompoundFieldAccess { root, access_chain } => {
                let mut value = Some((**root).clone());
                for access in access_chain.iter() {
                    value = match (value, access) {
                        (Some(v), datafusion::sql::sqlparser::ast::AccessExpr::Dot(SqlExpr::Identifier(field))) => {
                            call(
                                "get_field",
                                vec![
                                    v,
                                    SqlExpr::Value(SqlValue::SingleQuotedString(field.value.clone()).with_empty_span()),
                                ],
                            )
                        }
                        _ => None,
                    };
                }
                value
            }
            _ => None,
        };
        if let Some(replacement) = replacement {
            *expr = replacement;
        }
        ControlFlow::Continue(())
    }
}

/// The columns that are int2vectors or oidvectors in Postgres (`pg_index`'s), whose
/// elements Postgres numbers from 0; freshet holds them as arrays, numbered from 1 (see
/// [`super::keys::with_arrays`]). pgjdbc's `getIndexInfo` reads `indoption[position - 1]`.
const VECTOR_COLUMNS: [&str; 4] = ["indkey", "indoption", "indclass", "indcollation"];

/// Whether `expr` names one of the [`VECTOR_COLUMNS`] (`indoption`, `i.indoption`, …).
fn is_vector_column(expr: &SqlExpr) -> bool {
    let name = match expr {
        SqlExpr::Identifier(ident) => ident,
        SqlExpr::CompoundIdentifier(parts) => match parts.last() {
            Some(ident) => ident,
            None => return false,
        },
        _ => return false,
    };
    VECTOR_COLUMNS.iter().any(|c| name.value.eq_ignore_ascii_case(c))
}

/// The subscript of `root[access…][i]` when what it subscripts is one of the
/// [`VECTOR_COLUMNS`] (`i.indoption[0]` parses as a root and one subscript, or as a root
/// and a field access before the subscript).
fn vector_subscript<'a>(root: &SqlExpr, chain: &'a [AccessExpr]) -> Option<&'a SqlExpr> {
    let (AccessExpr::Subscript(Subscript::Index { index }), before) = chain.split_last()? else { return None };
    let vector = match before.last() {
        None => is_vector_column(root),
        Some(AccessExpr::Dot(field)) => is_vector_column(field),
        Some(_) => false,
    };
    vector.then_some(index)
}

/// `freshet_like_escape(pattern, escape)`: a LIKE pattern written with `escape` as its
/// escape character, rewritten with backslash as the escape character.
const LIKE_ESCAPE: &str = "freshet_like_escape";

/// Registers [`LIKE_ESCAPE`].
fn register_like_escape(ctx: &SessionContext) {
    ctx.register_udf(TextFunction::udf(LIKE_ESCAPE, |arrays, rows| {
        use datafusion::arrow::util::display::array_value_to_string;
        let [pattern, escape] = arrays else {
            return Err(datafusion::error::DataFusionError::Plan(format!("{LIKE_ESCAPE} takes two arguments")));
        };
        let mut out = Vec::with_capacity(rows);
        for row in 0..rows {
            if pattern.is_null(row) || escape.is_null(row) {
                out.push(None);
                continue;
            }
            let escape = array_value_to_string(escape, row)?;
            let mut escape_chars = escape.chars();
            let (Some(escape), None) = (escape_chars.next(), escape_chars.next()) else {
                return Err(datafusion::error::DataFusionError::External(Box::new(Error::InvalidValue {
                    code: "22025",
                    message: "invalid escape string: escape string must be empty or one character".into(),
                })));
            };
            out.push(Some(backslash_escaped(&array_value_to_string(pattern, row)?, escape)));
        }
        Ok(Arc::new(StringArray::from(out)))
    }));
}

/// `pattern`, whose escape character is `escape`, with backslash as its escape character.
fn backslash_escaped(pattern: &str, escape: char) -> String {
    let mut out = String::with_capacity(pattern.len() + 2);
    let mut chars = pattern.chars();
    while let Some(c) = chars.next() {
        if c == escape {
            if let Some(next) = chars.next() {
                out.push('\\');
                out.push(next);
            }
        } else if c == '\\' {
            out.push_str("\\\\");
        } else {
            out.push(c);
        }
    }
    out
}

/// Literals without a name in a select list (pgjdbc's `getProcedures` selects `NULL, NULL,
/// NULL` for columns Postgres does not fill). Postgres names each `?column?`; DataFusion
/// names them by their text and refuses two of the same name, so each gets the name
/// `?column?`, numbered from the second on. Clients read these columns by position.
struct UnnamedLiterals;

impl VisitorMut for UnnamedLiterals {
    type Break = ();

    fn pre_visit_query(&mut self, query: &mut datafusion::sql::sqlparser::ast::Query) -> ControlFlow<()> {
        use datafusion::sql::sqlparser::ast::{Ident, SelectItem, SetExpr};
        let SetExpr::Select(select) = query.body.as_mut() else { return ControlFlow::Continue(()) };
        let literals =
            select.projection.iter().filter(|i| matches!(i, SelectItem::UnnamedExpr(SqlExpr::Value(_)))).count();
        if literals < 2 {
            return ControlFlow::Continue(());
        }
        let mut numbered = 0;
        for item in &mut select.projection {
            if let SelectItem::UnnamedExpr(expr @ SqlExpr::Value(_)) = item {
                let name = if numbered == 0 { "?column?".to_string() } else { format!("?column?{numbered}") };
                numbered += 1;
                *item = SelectItem::ExprWithAlias { expr: expr.clone(), alias: Ident::with_quote('"', name) };
            }
        }
        ControlFlow::Continue(())
    }
}

/// The arguments of a call, when all are plain expressions (no names, no `*`).
fn function_args(f: &datafusion::sql::sqlparser::ast::Function) -> Option<Vec<SqlExpr>> {
    use datafusion::sql::sqlparser::ast::{FunctionArg, FunctionArgExpr, FunctionArguments};
    let FunctionArguments::List(list) = &f.args else { return None };
    list.args
        .iter()
        .map(|arg| match arg {
            FunctionArg::Unnamed(FunctionArgExpr::Expr(e)) => Some(e.clone()),
            _ => None,
        })
        .collect()
}

/// An expression from its Postgres SQL text.
fn parse_expr(text: &str) -> Option<SqlExpr> {
    let dialect = datafusion::sql::sqlparser::dialect::PostgreSqlDialect {};
    datafusion::sql::sqlparser::parser::Parser::new(&dialect).try_with_sql(text).ok()?.parse_expr().ok()
}

/// A call of the function `name` with `args`.
pub(super) fn call(name: &str, args: Vec<SqlExpr>) -> Option<SqlExpr> {
    use datafusion::sql::sqlparser::ast::{FunctionArg, FunctionArgExpr, FunctionArguments};
    let template = format!("{name}({})", vec!["NULL"; args.len()].join(", "));
    let dialect = datafusion::sql::sqlparser::dialect::PostgreSqlDialect {};
    let mut parsed =
        datafusion::sql::sqlparser::parser::Parser::new(&dialect).try_with_sql(&template).ok()?.parse_expr().ok()?;
    let SqlExpr::Function(f) = &mut parsed else { return None };
    let FunctionArguments::List(list) = &mut f.args else { return None };
    list.args = args.into_iter().map(|a| FunctionArg::Unnamed(FunctionArgExpr::Expr(a))).collect();
    Some(parsed)
}

/// Fragments of known client queries that DataFusion cannot plan, and what they become.
/// Each replacement keeps the column the client reads, with the value it has in freshet.
///
/// Column defaults are read with a correlated subquery over `pg_attrdef`, which has at
/// most one row per (adrelid, adnum); as `max(…)` over that row, behind the client's own
/// `atthasdef` test, DataFusion plans it and the value is the same.
const CLIENT_REWRITES: &[(&str, &str)] = &[
    // psql 15/16 `\d name`: the Default column.
    (
        "(SELECT pg_catalog.pg_get_expr(d.adbin, d.adrelid, true) FROM pg_catalog.pg_attrdef d WHERE d.adrelid = a.attrelid AND d.adnum = a.attnum AND a.atthasdef)",
        "CASE WHEN a.atthasdef THEN (SELECT max(pg_catalog.pg_get_expr(d.adbin, d.adrelid, true)) FROM pg_catalog.pg_attrdef d WHERE d.adrelid = a.attrelid AND d.adnum = a.attnum) END",
    ),
    // SQLAlchemy 2 `Inspector.get_columns` (dialects/postgresql/base.py, _columns_query):
    // the `default` column, already inside CASE WHEN atthasdef.
    (
        "(SELECT pg_catalog.pg_get_expr(pg_catalog.pg_attrdef.adbin, pg_catalog.pg_attrdef.adrelid) AS pg_get_expr_1 FROM pg_catalog.pg_attrdef WHERE pg_catalog.pg_attribute.atthasdef AND pg_catalog.pg_attrdef.adrelid = pg_catalog.pg_attribute.attrelid AND pg_catalog.pg_attrdef.adnum = pg_catalog.pg_attribute.attnum)",
        "(SELECT max(pg_catalog.pg_get_expr(pg_catalog.pg_attrdef.adbin, pg_catalog.pg_attrdef.adrelid)) FROM pg_catalog.pg_attrdef WHERE pg_catalog.pg_attrdef.adrelid = pg_catalog.pg_attribute.attrelid AND pg_catalog.pg_attrdef.adnum = pg_catalog.pg_attribute.attnum)",
    ),
    // psql 15/16 `\d name`: the Collation column. The subquery compares the outer
    // column with `<>`, which DataFusion cannot decorrelate; behind `attcollation <> 0`
    // (no collation has OID 0, so the answer is the same) it is refused only where a
    // column has a collation, and freshet's have none.
    (
        "(SELECT c.collname FROM pg_catalog.pg_collation c, pg_catalog.pg_type t WHERE c.oid = a.attcollation AND t.oid = a.atttypid AND a.attcollation <> t.typcollation) AS attcollation",
        "CASE WHEN a.attcollation <> 0 THEN (SELECT c.collname FROM pg_catalog.pg_collation c, pg_catalog.pg_type t WHERE c.oid = a.attcollation AND t.oid = a.atttypid AND a.attcollation <> t.typcollation) END AS attcollation",
    ),
    // pgjdbc `DatabaseMetaData.getIndexInfo` (PgDatabaseMetaData): ASC_OR_DESC reads the
    // option of key column ORDINAL_POSITION (counted from 1) from `indoption`, an
    // int2vector Postgres numbers from 0. Through the alias I_INDOPTION the catalog
    // rewrite cannot tell it is one, so the subscript is shifted here.
    ("tmp.I_INDOPTION[tmp.ORDINAL_POSITION - 1]", "tmp.I_INDOPTION[tmp.ORDINAL_POSITION]"),
    // pgjdbc's TypeInfoCache (getTypeInfo, getColumns of unknown types): whether a type is
    // an array. The crate's `pg_type.typinput` holds the function's name, as Postgres
    // displays a regproc, so the name is compared rather than the function's OID.
    ("typinput='pg_catalog.array_in'::regproc", "typinput='array_in'"),
    // psql 15/16 `\d+ name`: table storage options (freshet has none). ARRAY(subquery)
    // is not supported by DataFusion.
    (
        "pg_catalog.array_to_string(c.reloptions || array(select 'toast.' || x from pg_catalog.unnest(tc.reloptions) x), ', ')",
        "''",
    ),
    // Grafana's PostgreSQL data source (public/app/plugins/datasource/
    // grafana-postgresql-datasource/postgresMetaQuery.ts, buildSchemaConstraint): the
    // schemas on the search path. freshet resolves names in `public` only.
    (
        "SELECT CASE WHEN trim(s[i]) = '\"$user\"' THEN user ELSE trim(s[i]) END FROM generate_series( array_lower(string_to_array(current_setting('search_path'),','),1), array_upper(string_to_array(current_setting('search_path'),','),1) ) as i, string_to_array(current_setting('search_path'),',') s",
        "'public'",
    ),
    // psql `\du`: the roles a role is a member of (freshet has one role, a member of none).
    (
        "ARRAY(SELECT b.rolname FROM pg_catalog.pg_auth_members m JOIN pg_catalog.pg_roles b ON (m.roleid = b.oid) WHERE m.member = r.oid) as memberof",
        "'{}' as memberof",
    ),
];

/// Replaces `current_setting('name' [, missing_ok])` with the value of `name` as a string
/// literal. An unknown name is refused (42704) unless `missing_ok` is true (then NULL).
fn inline_settings(sql: &str, setting: &dyn Fn(&str) -> Result<String>) -> Result<String> {
    const CALL: &str = "current_setting(";
    let lower = sql.to_ascii_lowercase();
    let mut out = String::with_capacity(sql.len());
    let (mut copied, mut from) = (0, 0);
    while let Some(found) = lower[from..].find(CALL) {
        let call = from + found;
        let args = call + CALL.len();
        from = args;
        // Only `'name')` and `'name', true|false)` are inlined; anything else is left to
        // the planner, which reports the function as unknown.
        let Some(quoted) = lower[args..].strip_prefix('\'') else { continue };
        let Some(name_len) = quoted.find('\'') else { continue };
        let after_name = args + 1 + name_len + 1;
        let Some(close) = lower[after_name..].find(')') else { continue };
        let extra = lower[after_name..after_name + close].trim();
        let missing_ok = match extra.strip_prefix(',').map(str::trim) {
            None if extra.is_empty() => false,
            Some("true") => true,
            Some("false") => false,
            _ => continue,
        };
        let name = &sql[args + 1..args + 1 + name_len];
        let value = match setting(name) {
            Ok(value) => format!("'{}'", value.replace('\'', "''")),
            Err(_) if missing_ok => "NULL".to_string(),
            Err(e) => return Err(e),
        };
        let start = if lower[..call].ends_with("pg_catalog.") { call - "pg_catalog.".len() } else { call };
        out.push_str(&sql[copied..start]);
        out.push_str(&value);
        copied = after_name + close + 1;
        from = copied;
    }
    out.push_str(&sql[copied..]);
    Ok(out)
}

/// Replaces every occurrence of `pattern` in `text`, where any run of whitespace in the
/// pattern matches any run of whitespace (or none) in the text: clients indent the same
/// query differently from version to version.
fn replace_ignoring_whitespace(text: &str, pattern: &str, replacement: &str) -> String {
    let pattern: Vec<char> = pattern.chars().collect();
    let chars: Vec<char> = text.chars().collect();
    let matches_at = |start: usize| -> Option<usize> {
        let (mut i, mut j) = (start, 0);
        while j < pattern.len() {
            if pattern[j].is_whitespace() {
                while j < pattern.len() && pattern[j].is_whitespace() {
                    j += 1;
                }
                while i < chars.len() && chars[i].is_whitespace() {
                    i += 1;
                }
            } else if i < chars.len() && chars[i] == pattern[j] {
                i += 1;
                j += 1;
            } else {
                return None;
            }
        }
        Some(i)
    };
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        match matches_at(i) {
            Some(end) if end > i => {
                out.push_str(replacement);
                i = end;
            }
            _ => {
                out.push(chars[i]);
                i += 1;
            }
        }
    }
    out
}

fn is_catalog_query(text: &str) -> bool {
    const MARKERS: &[&str] = &[
        "pg_",
        "information_schema",
        "::reg",
        "current_schema",
        "current_user",
        "session_user",
        "current_role",
        "format_type",
        "has_table_privilege",
        "has_schema_privilege",
        "array_upper",
        "array_lower",
        "quote_ident",
        "current_setting",
    ];
    // A marker counts only where a word starts, so a user column such as `mpg_avg` does
    // not send an ordinary query through the catalog rewrites.
    let lower = text.to_ascii_lowercase();
    let starts_word = |at: usize| lower[..at].chars().next_back().is_none_or(|c| !(c.is_alphanumeric() || c == '_'));
    MARKERS.iter().any(|marker| {
        let word = marker.starts_with(|c: char| c.is_alphanumeric());
        lower.match_indices(marker).any(|(at, _)| !word || starts_word(at))
    })
}

/// `pg_roles` lists the one login role.
#[derive(Debug, Clone)]
struct LoginRoles {
    user: Arc<RwLock<String>>,
}

impl LoginRoles {
    fn name(&self) -> String {
        read(&self.user).clone()
    }
}

#[async_trait]
impl PgCatalogContextProvider for LoginRoles {
    async fn roles(&self) -> Vec<String> {
        vec![self.name()]
    }

    async fn role(&self, name: &str) -> Option<Role> {
        (name == self.name()).then(|| Role {
            name: name.to_string(),
            is_superuser: true,
            can_login: true,
            can_create_db: false,
            can_create_role: false,
            can_create_user: false,
            can_replication: false,
            grants: Vec::new(),
            inherited_roles: Vec::new(),
        })
    }
}

/// What the last `pg_class` scan learnt about OIDs, for the functions that take one.
type Hidden = Arc<RwLock<KnownOids>>;

#[derive(Debug, Default)]
struct KnownOids {
    /// Relations not on the search path (information_schema's and freshet_catalog's): `pg_table_is_visible`
    /// answers false for them.
    hidden: HashSet<i32>,
    /// Plain views by OID, for `pg_get_viewdef`.
    plain_views: std::collections::HashMap<i32, String>,
    /// Materialized views by OID, for `pg_get_viewdef`.
    matviews: std::collections::HashMap<i32, String>,
    /// Primary keys, for `pg_get_indexdef` and `pg_get_constraintdef`.
    keys: Vec<super::keys::PrimaryKey>,
    /// Every relation's OID, for the size functions.
    relations: HashSet<i32>,
    /// The relations of `public` by OID, for the size functions.
    public: HashMap<i32, String>,
}

/// `pg_catalog` as the crate builds it, with the relations freshet knows better replaced.
#[derive(Debug)]
struct PgCatalog {
    inner: Arc<dyn SchemaProvider>,
    cell: Arc<SnapshotCell>,
    user: Arc<RwLock<String>>,
    hidden: Hidden,
    view_queries: ViewQueries,
}

#[async_trait]
impl SchemaProvider for PgCatalog {
    fn table_names(&self) -> Vec<String> {
        self.inner.table_names()
    }

    async fn table(&self, name: &str) -> DfResult<Option<Arc<dyn TableProvider>>> {
        let owner = LoginRoles { user: self.user.clone() }.name();
        match name.to_ascii_lowercase().as_str() {
            "pg_class" => {
                let Some(inner) = self.inner.table(name).await? else { return Ok(None) };
                let correction = RelationKinds {
                    pg_catalog: self.inner.clone(),
                    cell: self.cell.clone(),
                    hidden: self.hidden.clone(),
                };
                Ok(Some(Arc::new(Corrected { inner, correction })))
            }
            table @ ("pg_index" | "pg_constraint" | "pg_attrdef") => {
                let Some(inner) = self.inner.table(name).await? else { return Ok(None) };
                let table = match table {
                    "pg_index" => KeyTable::Index,
                    "pg_constraint" => KeyTable::Constraint,
                    _ => KeyTable::Default,
                };
                let correction = KeyRows { table, pg_catalog: self.inner.clone(), cell: self.cell.clone() };
                Ok(Some(Arc::new(Corrected { inner, correction })))
            }
            "pg_attribute" => {
                let (Some(inner), Some(classes)) = (self.inner.table(name).await?, self.inner.table("pg_class").await?)
                else {
                    return Ok(None);
                };
                let correction = ColumnFacts { classes, pg_catalog: self.inner.clone(), cell: self.cell.clone() };
                Ok(Some(Arc::new(Corrected { inner, correction })))
            }
            "pg_settings" => {
                let Some(inner) = self.inner.table(name).await? else { return Ok(None) };
                Ok(Some(Arc::new(Corrected { inner, correction: PresetSettings })))
            }
            "pg_views" => Ok(Some(Arc::new(ViewList {
                kind: ViewKind::Plain,
                owner,
                cell: self.cell.clone(),
                queries: self.view_queries.clone(),
            }))),
            "pg_matviews" => Ok(Some(Arc::new(ViewList {
                kind: ViewKind::Materialized,
                owner,
                cell: self.cell.clone(),
                queries: self.view_queries.clone(),
            }))),
            _ => self.inner.table(name).await,
        }
    }

    fn table_exist(&self, name: &str) -> bool {
        self.inner.table_exist(name)
    }
}

/// A catalog table as the crate computes it, with the rows passed through a
/// [`Correction`] where freshet knows better.
#[derive(Debug)]
struct Corrected<C> {
    inner: Arc<dyn TableProvider>,
    correction: C,
}

/// How freshet corrects the rows of one of the crate's catalog tables.
#[async_trait]
trait Correction: std::fmt::Debug + Send + Sync + 'static {
    /// The schema of the corrected table; the crate's unless the correction changes it.
    fn schema(&self, inner: SchemaRef) -> SchemaRef {
        inner
    }

    /// The rows clients should see instead of `rows` (all of the table, of `schema`, the
    /// crate's schema); they have the corrected [`Correction::schema`].
    async fn correct(
        &self,
        state: &dyn Session,
        schema: &SchemaRef,
        rows: Vec<RecordBatch>,
    ) -> DfResult<Vec<RecordBatch>>;
}

#[async_trait]
impl<C: Correction> TableProvider for Corrected<C> {
    fn schema(&self) -> SchemaRef {
        self.correction.schema(self.inner.schema())
    }

    fn table_type(&self) -> TableType {
        self.inner.table_type()
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let schema = self.inner.schema();
        let rows = scan_all(self.inner.as_ref(), state).await?;
        let rows = self.correction.correct(state, &schema, rows).await?;
        Ok(MemorySourceConfig::try_new_exec(&[rows], self.schema(), projection.cloned())?)
    }
}

/// `pg_class`: `relkind = 'm'` for materialized views (the crate only knows DataFusion's
/// base tables and views), the index relations of primary keys, and which relations
/// `pg_table_is_visible`.
#[derive(Debug)]
struct RelationKinds {
    /// The crate's `pg_catalog`, for the OIDs of `public` and its relations.
    pg_catalog: Arc<dyn SchemaProvider>,
    cell: Arc<SnapshotCell>,
    hidden: Hidden,
}

#[async_trait]
impl Correction for RelationKinds {
    /// The crate's columns and `reloptions` (a text array, NULL: freshet relations take no
    /// storage parameters), which SQLAlchemy's `get_indexes` reads.
    fn schema(&self, inner: SchemaRef) -> SchemaRef {
        if inner.index_of(RELOPTIONS).is_ok() {
            return inner;
        }
        let mut fields: Vec<Field> = inner.fields().iter().map(|f| f.as_ref().clone()).collect();
        fields.push(Field::new(
            RELOPTIONS,
            DataType::List(Arc::new(Field::new_list_field(DataType::Utf8, true))),
            true,
        ));
        Arc::new(Schema::new(fields))
    }

    async fn correct(
        &self,
        state: &dyn Session,
        schema: &SchemaRef,
        batches: Vec<RecordBatch>,
    ) -> DfResult<Vec<RecordBatch>> {
        let snapshot = self.cell.current();
        let public = super::keys::public_oids(self.pg_catalog.as_ref(), state).await?;
        let keys = super::keys::primary_keys(&snapshot, &public);
        let materialized: HashSet<String> = snapshot.views.keys().cloned().collect();
        let keyed: HashSet<i32> = keys.iter().map(|k| k.table_oid).collect();
        let mut patched = Vec::with_capacity(batches.len() + 1);
        let corrected = self.schema(schema.clone());
        for batch in batches {
            let batch = mark_indexed(&mark_materialized(&batch, &materialized)?, &keyed)?;
            if let Some(indexes) = super::keys::index_classes(&batch, &keys)? {
                patched.push(with_null_columns(&indexes, &corrected)?);
            }
            patched.push(with_null_columns(&batch, &corrected)?);
        }
        let mut known = KnownOids::default();
        for batch in &patched {
            let oids = schema
                .index_of("oid")
                .ok()
                .and_then(|i| batch.column(i).as_any().downcast_ref::<datafusion::arrow::array::Int32Array>().cloned());
            let names = schema
                .index_of("relname")
                .ok()
                .and_then(|i| batch.column(i).as_any().downcast_ref::<StringArray>().cloned());
            let (Some(oids), Some(names)) = (oids, names) else { continue };
            for (oid, name) in oids.iter().zip(names.iter()) {
                let (Some(oid), Some(name)) = (oid, name) else { continue };
                known.relations.insert(oid);
                if snapshot.plain_views.contains_key(name) {
                    known.plain_views.insert(oid, name.to_string());
                } else if materialized.contains(name) && public.relations.get(name) == Some(&oid) {
                    known.matviews.insert(oid, name.to_string());
                } else if (INFORMATION_SCHEMA_TABLES.contains(&name)
                    || KEY_RELATIONS.contains(&name)
                    || super::status::TABLES.contains(&name))
                    && snapshot.relation(name).is_none()
                {
                    known.hidden.insert(oid);
                }
            }
        }
        known.keys = keys;
        known.public = public.relations.iter().map(|(name, &oid)| (oid, name.clone())).collect();
        match self.hidden.write() {
            Ok(mut guard) => *guard = known,
            Err(poisoned) => *poisoned.into_inner() = known,
        }
        Ok(patched)
    }
}

/// `pg_class.reloptions`, which the crate does not have.
const RELOPTIONS: &str = "reloptions";

/// `batch` with the columns of `schema` it lacks (at the end), all NULL.
fn with_null_columns(batch: &RecordBatch, schema: &SchemaRef) -> DfResult<RecordBatch> {
    let mut columns = batch.columns().to_vec();
    for field in schema.fields().iter().skip(columns.len()) {
        columns.push(datafusion::arrow::array::new_null_array(field.data_type(), batch.num_rows()));
    }
    Ok(RecordBatch::try_new(schema.clone(), columns)?)
}

/// `pg_settings`: the crate's rows and Postgres' preset options, which describe how the
/// server was built and never change (pgjdbc's `getMaxIndexKeys` reads `max_index_keys`).
/// The values are Postgres 16's defaults, the limits freshet's catalog follows.
#[derive(Debug)]
struct PresetSettings;

/// `(name, setting, vartype, short_desc)` of a preset option.
type Preset = (&'static str, &'static str, &'static str, &'static str);

const PRESET_SETTINGS: [Preset; 5] = [
    ("max_index_keys", "32", "integer", "Shows the maximum number of index keys."),
    ("max_identifier_length", "63", "integer", "Shows the maximum identifier length."),
    ("max_function_args", "100", "integer", "Shows the maximum number of function arguments."),
    ("block_size", "8192", "integer", "Shows the size of a disk block."),
    ("server_encoding", "UTF8", "string", "Shows the server (database) character set encoding."),
];

#[async_trait]
impl Correction for PresetSettings {
    async fn correct(&self, _: &dyn Session, schema: &SchemaRef, rows: Vec<RecordBatch>) -> DfResult<Vec<RecordBatch>> {
        let named: HashSet<String> = rows
            .iter()
            .filter_map(|b| b.column_by_name("name")?.as_any().downcast_ref::<StringArray>().cloned())
            .flat_map(|names| names.iter().flatten().map(str::to_string).collect::<Vec<_>>())
            .collect();
        let presets: Vec<&Preset> = PRESET_SETTINGS.iter().filter(|(name, ..)| !named.contains(*name)).collect();
        let n = presets.len();
        let columns = schema
            .fields()
            .iter()
            .map(|field| {
                let text = |value: &dyn Fn(&Preset) -> &'static str| -> ArrayRef {
                    Arc::new(StringArray::from_iter_values(presets.iter().map(|p| value(p))))
                };
                let column: Option<ArrayRef> = match field.name().as_str() {
                    "name" => Some(text(&|p| p.0)),
                    "setting" | "reset_val" => Some(text(&|p| p.1)),
                    "vartype" => Some(text(&|p| p.2)),
                    "short_desc" => Some(text(&|p| p.3)),
                    "category" => Some(text(&|_| "Preset Options")),
                    "context" => Some(text(&|_| "internal")),
                    "source" => Some(text(&|_| "default")),
                    "pending_restart" => Some(Arc::new(BooleanArray::from(vec![false; n]))),
                    _ => None,
                };
                match column {
                    Some(column) if column.data_type() == field.data_type() => column,
                    _ => datafusion::arrow::array::new_null_array(field.data_type(), n),
                }
            })
            .collect();
        let mut rows = rows;
        rows.push(RecordBatch::try_new(schema.clone(), columns)?);
        Ok(rows)
    }
}

/// `relhasindex` is true for the tables in `keyed` (those with a primary key).
fn mark_indexed(batch: &RecordBatch, keyed: &HashSet<i32>) -> DfResult<RecordBatch> {
    use datafusion::arrow::array::Int32Array;
    let schema = batch.schema();
    let (Ok(oid_at), Ok(index_at)) = (schema.index_of("oid"), schema.index_of("relhasindex")) else {
        return Ok(batch.clone());
    };
    let oids = batch.column(oid_at).as_any().downcast_ref::<Int32Array>();
    let flags = batch.column(index_at).as_any().downcast_ref::<BooleanArray>();
    let (Some(oids), Some(flags)) = (oids, flags) else { return Ok(batch.clone()) };
    let patched: BooleanArray = oids
        .iter()
        .zip(flags.iter())
        .map(|(oid, flag)| if oid.is_some_and(|o| keyed.contains(&o)) { Some(true) } else { flag })
        .collect();
    let mut columns = batch.columns().to_vec();
    columns[index_at] = Arc::new(patched);
    Ok(RecordBatch::try_new(schema, columns)?)
}

#[derive(Debug, Clone, Copy)]
enum KeyTable {
    Index,
    Constraint,
    Default,
}

/// `pg_index`, `pg_constraint` and `pg_attrdef`: the crate's rows (Postgres' own system
/// catalogs) plus those of freshet's primary keys and column defaults.
#[derive(Debug)]
struct KeyRows {
    table: KeyTable,
    /// The crate's `pg_catalog`, for the OIDs of `public` and its relations.
    pg_catalog: Arc<dyn SchemaProvider>,
    cell: Arc<SnapshotCell>,
}

#[async_trait]
impl Correction for KeyRows {
    fn schema(&self, inner: SchemaRef) -> SchemaRef {
        match self.table {
            KeyTable::Constraint => super::keys::with_arrays(&inner, super::keys::CONSTRAINT_ARRAYS),
            KeyTable::Index => super::keys::with_arrays(&inner, super::keys::INDEX_ARRAYS),
            KeyTable::Default => inner,
        }
    }

    async fn correct(
        &self,
        state: &dyn Session,
        schema: &SchemaRef,
        batches: Vec<RecordBatch>,
    ) -> DfResult<Vec<RecordBatch>> {
        let snapshot = self.cell.current();
        let oids = super::keys::public_oids(self.pg_catalog.as_ref(), state).await?;
        let keys = super::keys::primary_keys(&snapshot, &oids);
        let schema = self.schema(schema.clone());
        let mut rows = match self.table {
            KeyTable::Constraint | KeyTable::Index => {
                batches.iter().map(|b| super::keys::convert_arrays(b, &schema)).collect::<DfResult<Vec<_>>>()?
            }
            KeyTable::Default => batches,
        };
        rows.push(match self.table {
            KeyTable::Index => {
                let opclasses = super::keys::default_btree_opclasses(self.pg_catalog.as_ref(), state).await?;
                super::keys::index_rows(&schema, &keys, &opclasses)?
            }
            KeyTable::Constraint => super::keys::constraint_rows(&schema, &keys)?,
            KeyTable::Default => super::keys::default_rows(&schema, &snapshot, &oids)?,
        });
        Ok(rows)
    }
}

/// `pg_attribute`: primary-key and NOT NULL columns are `attnotnull`, JSON columns have
/// the json type, as on the wire, and primary-key indexes have their key columns.
#[derive(Debug)]
struct ColumnFacts {
    /// The crate's `pg_class`, to name the relation of each `attrelid`.
    classes: Arc<dyn TableProvider>,
    /// The crate's `pg_catalog`, for the OIDs of `public` and its relations.
    pg_catalog: Arc<dyn SchemaProvider>,
    cell: Arc<SnapshotCell>,
}

#[async_trait]
impl Correction for ColumnFacts {
    async fn correct(
        &self,
        state: &dyn Session,
        schema: &SchemaRef,
        batches: Vec<RecordBatch>,
    ) -> DfResult<Vec<RecordBatch>> {
        use datafusion::arrow::array::Int32Array;
        let classes = scan_all(self.classes.as_ref(), state).await?;
        let snapshot = self.cell.current();
        // attrelid → the freshet relation it describes.
        let mut relations = std::collections::HashMap::new();
        for batch in &classes {
            let class_schema = batch.schema();
            let oids = class_schema
                .index_of("oid")
                .ok()
                .and_then(|i| batch.column(i).as_any().downcast_ref::<Int32Array>().cloned());
            let names = class_schema
                .index_of("relname")
                .ok()
                .and_then(|i| batch.column(i).as_any().downcast_ref::<StringArray>().cloned());
            let (Some(oids), Some(names)) = (oids, names) else { continue };
            for (oid, name) in oids.iter().zip(names.iter()) {
                if let (Some(oid), Some(version)) = (oid, name.and_then(|n| snapshot.relation(n))) {
                    relations.insert(oid, version.def.clone());
                }
            }
        }
        let at = |name: &str| schema.index_of(name).ok();
        let (Some(rel_at), Some(name_at), Some(type_at), Some(notnull_at), Some(hasdef_at)) =
            (at("attrelid"), at("attname"), at("atttypid"), at("attnotnull"), at("atthasdef"))
        else {
            return Ok(batches);
        };
        let mut patched = Vec::with_capacity(batches.len());
        for batch in batches {
            let rels = batch.column(rel_at).as_any().downcast_ref::<Int32Array>().cloned();
            let names = batch.column(name_at).as_any().downcast_ref::<StringArray>().cloned();
            let types = batch.column(type_at).as_any().downcast_ref::<Int32Array>().cloned();
            let notnulls = batch.column(notnull_at).as_any().downcast_ref::<BooleanArray>().cloned();
            let (Some(rels), Some(names), Some(types), Some(notnulls)) = (rels, names, types, notnulls) else {
                patched.push(batch);
                continue;
            };
            let mut new_types = Vec::with_capacity(batch.num_rows());
            let mut new_notnulls = Vec::with_capacity(batch.num_rows());
            let mut has_defaults = Vec::with_capacity(batch.num_rows());
            let hasdefs = batch.column(hasdef_at).as_any().downcast_ref::<BooleanArray>().cloned();
            for row in 0..batch.num_rows() {
                let def = rels.is_valid(row).then(|| relations.get(&rels.value(row))).flatten();
                let column = def.and_then(|def| def.schema.index_of(names.value(row)).ok().map(|i| (def, i)));
                let (typ, notnull) = (
                    types.is_valid(row).then(|| types.value(row)),
                    notnulls.is_valid(row).then(|| notnulls.value(row)),
                );
                match column {
                    Some((def, i)) => {
                        let field = def.schema.field(i);
                        new_types.push(if sql::is_json(field) { Some(super::keys::JSON_TYPE_OID) } else { typ });
                        new_notnulls.push(Some(!field.is_nullable() || def.primary_key.contains(&i)));
                        has_defaults.push(Some(def.default_texts.iter().any(|(c, _)| c == field.name())));
                    }
                    None => {
                        new_types.push(typ);
                        new_notnulls.push(notnull);
                        has_defaults.push(hasdefs.as_ref().and_then(|h| h.is_valid(row).then(|| h.value(row))));
                    }
                }
            }
            let mut arrays = batch.columns().to_vec();
            arrays[type_at] = Arc::new(Int32Array::from(new_types));
            arrays[notnull_at] = Arc::new(BooleanArray::from(new_notnulls));
            arrays[hasdef_at] = Arc::new(BooleanArray::from(has_defaults));
            patched.push(RecordBatch::try_new(schema.clone(), arrays)?);
        }
        let public = super::keys::public_oids(self.pg_catalog.as_ref(), state).await?;
        let keys = super::keys::primary_keys(&snapshot, &public);
        if let Some(indexes) = super::keys::index_attributes(&patched, &keys)? {
            patched.push(indexes);
        }
        Ok(patched)
    }
}

/// All rows of `table` (catalog tables are small, and the wrappers here patch them whole).
async fn scan_all(table: &dyn TableProvider, state: &dyn Session) -> DfResult<Vec<RecordBatch>> {
    let plan = table.scan(state, None, &[], None).await?;
    datafusion::physical_plan::collect(plan, state.task_ctx()).await
}

fn mark_materialized(batch: &RecordBatch, materialized: &HashSet<String>) -> DfResult<RecordBatch> {
    let schema = batch.schema();
    let (Ok(name_at), Ok(kind_at)) = (schema.index_of("relname"), schema.index_of("relkind")) else {
        return Ok(batch.clone());
    };
    let names = batch.column(name_at).as_any().downcast_ref::<StringArray>();
    let kinds = batch.column(kind_at).as_any().downcast_ref::<StringArray>();
    let (Some(names), Some(kinds)) = (names, kinds) else { return Ok(batch.clone()) };
    let patched: StringArray = names
        .iter()
        .zip(kinds.iter())
        .map(|(name, kind)| match name {
            Some(name) if materialized.contains(name) && kind == Some("r") => Some("m"),
            _ => kind,
        })
        .collect();
    let mut columns = batch.columns().to_vec();
    columns[kind_at] = Arc::new(patched);
    Ok(RecordBatch::try_new(schema, columns)?)
}

/// DataFusion's `information_schema`, with `columns` as Postgres describes columns
/// (`data_type` spelled `integer`, `timestamp without time zone`, …, `udt_name`,
/// defaults) since BI tools read column types from there, and the primary keys in
/// `table_constraints` and `key_column_usage`.
#[derive(Debug)]
struct InformationSchema {
    inner: InformationSchemaProvider,
    cell: Arc<SnapshotCell>,
    /// Every catalog, to find the fields of relations outside `public`.
    catalogs: Arc<dyn datafusion::catalog::CatalogProviderList>,
}

/// The relations freshet adds to DataFusion's `information_schema`.
const KEY_RELATIONS: [&str; 2] = ["table_constraints", "key_column_usage"];

#[async_trait]
impl SchemaProvider for InformationSchema {
    fn table_names(&self) -> Vec<String> {
        let mut names = self.inner.table_names();
        names.extend(KEY_RELATIONS.iter().map(|n| n.to_string()));
        names
    }

    async fn table(&self, name: &str) -> DfResult<Option<Arc<dyn TableProvider>>> {
        let lower = name.to_ascii_lowercase();
        if KEY_RELATIONS.contains(&lower.as_str()) {
            let snapshot = self.cell.current();
            let batch = if lower == "table_constraints" {
                super::keys::table_constraints(&snapshot)?
            } else {
                super::keys::key_column_usage(&snapshot)?
            };
            return Ok(Some(Arc::new(datafusion::datasource::MemTable::try_new(batch.schema(), vec![vec![batch]])?)));
        }
        let Some(table) = self.inner.table(name).await? else { return Ok(None) };
        if lower == "columns" {
            return Ok(Some(Arc::new(Corrected {
                inner: table,
                correction: PgColumnTypes { cell: self.cell.clone(), catalogs: self.catalogs.clone() },
            })));
        }
        Ok(Some(table))
    }

    fn table_exist(&self, name: &str) -> bool {
        KEY_RELATIONS.contains(&name.to_ascii_lowercase().as_str()) || self.inner.table_exist(name)
    }
}

/// `information_schema.columns`: Postgres type names (`data_type` and `udt_name`),
/// primary keys are not nullable, defaults as written, and no identity or generated
/// columns (freshet has neither).
#[derive(Debug)]
struct PgColumnTypes {
    cell: Arc<SnapshotCell>,
    catalogs: Arc<dyn datafusion::catalog::CatalogProviderList>,
}

/// The columns Postgres has in `information_schema.columns` that DataFusion's lacks.
const PG_ONLY_COLUMNS: [&str; 6] =
    ["udt_catalog", "udt_schema", "udt_name", "is_identity", "is_generated", "is_updatable"];

impl PgColumnTypes {
    /// The Arrow field of every column outside `public` (information_schema, freshet_catalog, …).
    async fn other_fields(&self, batch: &RecordBatch) -> HashMap<(String, String, String), Field> {
        let mut fields = HashMap::new();
        let text = |name: &str| {
            batch
                .schema()
                .index_of(name)
                .ok()
                .and_then(|i| batch.column(i).as_any().downcast_ref::<StringArray>().cloned())
        };
        let (Some(catalogs), Some(schemas), Some(tables)) =
            (text("table_catalog"), text("table_schema"), text("table_name"))
        else {
            return fields;
        };
        let mut seen = HashSet::new();
        for row in 0..batch.num_rows() {
            let key = (catalogs.value(row).to_string(), schemas.value(row).to_string(), tables.value(row).to_string());
            if key.1 == SCHEMA_NAME || !seen.insert(key.clone()) {
                continue;
            }
            let Some(schema) = self.catalogs.catalog(&key.0).and_then(|c| c.schema(&key.1)) else { continue };
            let Ok(Some(table)) = schema.table(&key.2).await else { continue };
            for field in table.schema().fields() {
                fields.insert((key.1.clone(), key.2.clone(), field.name().clone()), field.as_ref().clone());
            }
        }
        fields
    }
}

#[async_trait]
impl Correction for PgColumnTypes {
    fn schema(&self, inner: SchemaRef) -> SchemaRef {
        let mut fields: Vec<Field> = inner.fields().iter().map(|f| f.as_ref().clone()).collect();
        fields.extend(PG_ONLY_COLUMNS.iter().map(|name| Field::new(*name, DataType::Utf8, true)));
        Arc::new(Schema::new(fields))
    }

    async fn correct(
        &self,
        _state: &dyn Session,
        schema: &SchemaRef,
        batches: Vec<RecordBatch>,
    ) -> DfResult<Vec<RecordBatch>> {
        let corrected = self.schema(schema.clone());
        let snapshot = self.cell.current();
        // The column's field, and whether it may hold NULL (primary keys may not).
        let field_of = |table: &str, column: &str| -> Option<(Field, bool)> {
            let (schema, key) = match snapshot.relation(table) {
                Some(version) => (version.def.schema.clone(), version.def.primary_key.clone()),
                None => (snapshot.plain_views.get(table)?.schema(), Vec::new()),
            };
            let i = schema.index_of(column).ok()?;
            let field = schema.field(i).clone();
            let nullable = field.is_nullable() && !key.contains(&i);
            Some((field, nullable))
        };
        // The column's default as written, for freshet's tables.
        let default_of = |table: &str, column: &str| -> Option<String> {
            let version = snapshot.tables.get(table)?;
            version.def.default_texts.iter().find(|(c, _)| c == column).map(|(_, text)| text.clone())
        };
        let mut patched = Vec::with_capacity(batches.len());
        for batch in batches {
            let others = self.other_fields(&batch).await;
            let text = |name: &str| -> DfResult<(usize, StringArray)> {
                let i = schema.index_of(name)?;
                let array = batch.column(i).as_any().downcast_ref::<StringArray>().cloned().ok_or_else(|| {
                    datafusion::error::DataFusionError::Internal(format!(
                        "information_schema.columns.{name} is not text"
                    ))
                })?;
                Ok((i, array))
            };
            let ((_, schemas), (_, tables), (_, columns)) =
                (text("table_schema")?, text("table_name")?, text("column_name")?);
            let ((type_at, types), (nullable_at, nullables), (default_at, defaults)) =
                (text("data_type")?, text("is_nullable")?, text("column_default")?);
            let n = batch.num_rows();
            let (mut renamed, mut is_nullable, mut column_default) =
                (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
            let mut udt_names = Vec::with_capacity(n);
            for row in 0..n {
                let value = |array: &StringArray| array.is_valid(row).then(|| array.value(row).to_string());
                let (table, column) = (tables.value(row), columns.value(row));
                let ours = schemas.value(row) == SCHEMA_NAME;
                let found = if ours {
                    field_of(table, column)
                } else {
                    others
                        .get(&(schemas.value(row).to_string(), table.to_string(), column.to_string()))
                        .map(|field| (field.clone(), field.is_nullable()))
                };
                match found {
                    Some((field, nullable)) => {
                        renamed.push(Some(pg_type_name(&field)));
                        udt_names.push(Some(pg_udt_name(&field)));
                        is_nullable.push(Some(if nullable { "YES" } else { "NO" }.to_string()));
                    }
                    None => {
                        renamed.push(value(&types));
                        udt_names.push(None);
                        is_nullable.push(value(&nullables));
                    }
                }
                column_default.push(if ours { default_of(table, column) } else { value(&defaults) });
            }
            let mut arrays = batch.columns().to_vec();
            arrays[type_at] = Arc::new(StringArray::from(renamed));
            arrays[nullable_at] = Arc::new(StringArray::from(is_nullable));
            arrays[default_at] = Arc::new(StringArray::from(column_default));
            // DataFusion counts columns from 0; Postgres (and every client) from 1.
            let position_at = schema.index_of("ordinal_position")?;
            let positions = datafusion::common::cast::as_uint64_array(&arrays[position_at])?;
            arrays[position_at] = Arc::new(datafusion::arrow::compute::kernels::numeric::add(
                positions,
                &datafusion::arrow::array::UInt64Array::new_scalar(1),
            )?);
            let catalogs = text("table_catalog")?.1;
            arrays.push(Arc::new(catalogs));
            arrays.push(Arc::new(StringArray::from(vec!["pg_catalog"; n])));
            arrays.push(Arc::new(StringArray::from(udt_names)));
            arrays.push(Arc::new(StringArray::from(vec!["NO"; n])));
            arrays.push(Arc::new(StringArray::from(vec!["NEVER"; n])));
            arrays.push(Arc::new(StringArray::from(vec![None::<&str>; n])));
            patched.push(RecordBatch::try_new(corrected.clone(), arrays)?);
        }
        Ok(patched)
    }
}

/// The name of the type Postgres reports in `udt_name` (`pg_type.typname`) for `field`.
fn pg_udt_name(field: &Field) -> String {
    use datafusion_postgres::arrow_pg::datatypes::into_pg_type;
    if sql::is_json(field) {
        return "json".into();
    }
    match into_pg_type(field.data_type()) {
        Ok(pg) => pg.name().to_string(),
        Err(_) => field.data_type().to_string(),
    }
}

/// The SQL-standard name Postgres reports in `information_schema.columns.data_type` for
/// the type the wire protocol sends for `field`.
fn pg_type_name(field: &Field) -> String {
    use datafusion_postgres::arrow_pg::datatypes::into_pg_type;
    use pgwire::api::Type;
    if sql::is_json(field) {
        return "json".into();
    }
    let Ok(pg) = into_pg_type(field.data_type()) else { return field.data_type().to_string() };
    let name = match pg {
        Type::BOOL => "boolean",
        Type::INT2 => "smallint",
        Type::INT4 => "integer",
        Type::INT8 => "bigint",
        Type::FLOAT4 => "real",
        Type::FLOAT8 => "double precision",
        Type::NUMERIC => "numeric",
        Type::TEXT => "text",
        Type::VARCHAR => "character varying",
        Type::BYTEA => "bytea",
        Type::DATE => "date",
        Type::TIME => "time without time zone",
        Type::TIMESTAMP => "timestamp without time zone",
        Type::TIMESTAMPTZ => "timestamp with time zone",
        Type::INTERVAL => "interval",
        Type::JSON => "json",
        ref t if t.name().starts_with('_') => "ARRAY",
        ref t => return t.name().to_string(),
    };
    name.to_string()
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum ViewKind {
    Plain,
    Materialized,
}

/// `pg_views` or `pg_matviews`, from the current snapshot.
#[derive(Debug)]
struct ViewList {
    kind: ViewKind,
    owner: String,
    cell: Arc<SnapshotCell>,
    /// Materialized views' query texts.
    queries: ViewQueries,
}

impl ViewList {
    fn build_schema(&self) -> SchemaRef {
        let text = |name: &str| Field::new(name, DataType::Utf8, true);
        Arc::new(Schema::new(match self.kind {
            ViewKind::Plain => vec![text("schemaname"), text("viewname"), text("viewowner"), text("definition")],
            ViewKind::Materialized => vec![
                text("schemaname"),
                text("matviewname"),
                text("matviewowner"),
                text("tablespace"),
                Field::new("hasindexes", DataType::Boolean, true),
                Field::new("ispopulated", DataType::Boolean, true),
                text("definition"),
            ],
        }))
    }

    fn rows(&self) -> DfResult<RecordBatch> {
        let snapshot = self.cell.current();
        let (names, definitions): (Vec<String>, Vec<Option<String>>) = match self.kind {
            ViewKind::Plain => snapshot
                .plain_views
                .iter()
                .map(|(name, provider)| {
                    let definition = (provider.as_ref() as &dyn std::any::Any)
                        .downcast_ref::<datafusion::catalog::view::ViewTable>()
                        .and_then(|v| v.definition().cloned());
                    (name.clone(), definition)
                })
                .unzip(),
            ViewKind::Materialized => {
                snapshot.views.keys().map(|name| (name.clone(), self.queries.query(name))).unzip()
            }
        };
        let n = names.len();
        let schemas: ArrayRef = Arc::new(StringArray::from(vec![SCHEMA_NAME; n]));
        let owners: ArrayRef = Arc::new(StringArray::from(vec![self.owner.as_str(); n]));
        let names: ArrayRef = Arc::new(StringArray::from(names));
        let definitions: ArrayRef = Arc::new(StringArray::from(definitions));
        let columns = match self.kind {
            ViewKind::Plain => vec![schemas, names, owners, definitions],
            ViewKind::Materialized => vec![
                schemas,
                names,
                owners,
                Arc::new(StringArray::from(vec![None::<&str>; n])),
                Arc::new(BooleanArray::from(vec![false; n])),
                Arc::new(BooleanArray::from(vec![true; n])),
                definitions,
            ],
        };
        Ok(RecordBatch::try_new(self.build_schema(), columns)?)
    }
}

#[async_trait]
impl TableProvider for ViewList {
    fn schema(&self) -> SchemaRef {
        self.build_schema()
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
        Ok(MemorySourceConfig::try_new_exec(&[vec![self.rows()?]], self.build_schema(), projection.cloned())?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_catalog_queries_are_rewritten() {
        assert!(is_catalog_query("SELECT * FROM pg_catalog.pg_class"));
        assert!(is_catalog_query("select current_schema()"));
        assert!(!is_catalog_query("SELECT * FROM orders"));
        assert!(!is_catalog_query("SELECT mpg_avg FROM cars"));
        assert!(is_catalog_query("SELECT 'x'::regclass"));
        let no_settings = |name: &str| -> Result<String> { Err(Error::not_supported(name.to_string())) };
        let statements =
            parse("SELECT relname FROM pg_class WHERE oid = 'orders'::regclass", &no_settings).expect("parses");
        assert_eq!(statements.len(), 1);
        // Freshet's own statements still parse when they appear in a catalog-looking string.
        let statements = parse("SUBSCRIBE TO pg_stats_view", &no_settings).expect("parses");
        assert!(matches!(statements[0], Statement::Subscribe { .. }));
    }

    fn catalog_sql(text: &str) -> String {
        let no_settings = |name: &str| -> Result<String> { Err(Error::not_supported(name.to_string())) };
        let statements = parse(text, &no_settings).expect("parses");
        statements
            .iter()
            .map(|s| match s {
                Statement::Sql(s) => s.to_string(),
                _ => panic!("a catalog query is SQL"),
            })
            .collect()
    }

    #[test]
    fn vectors_are_subscripted_from_zero() {
        let out = catalog_sql("SELECT i.indoption[0], indkey[k.n - 1], i.conkey[1] FROM pg_index i, k");
        assert!(out.contains("i.indoption[(0) + 1]") && out.contains("indkey[(k.n - 1) + 1]"), "{out}");
        assert!(out.contains("i.conkey[1]"), "an int2 array counts from 1: {out}");
        let out = catalog_sql(
            "SELECT generate_subscripts(pg_index.indkey, 1), generate_subscripts(c.conkey, 1) FROM pg_index, c",
        );
        assert!(out.contains("range(0, CAST(array_length(pg_index.indkey, 1) AS BIGINT) + 0)"), "{out}");
        assert!(out.contains("range(1, CAST(array_length(c.conkey, 1) AS BIGINT) + 1)"), "{out}");
    }

    #[test]
    fn like_escapes_become_backslashes() {
        assert_eq!(backslash_escaped("pg/_%", '/'), "pg\\_%");
        assert_eq!(backslash_escaped("a//b\\c", '/'), "a\\/b\\\\c");
        let out = catalog_sql("SELECT nspname FROM pg_namespace WHERE nspname NOT LIKE 'pg/_' || '%' ESCAPE '/'");
        assert!(out.contains("NOT LIKE freshet_like_escape('pg/_' || '%', '/')") && !out.contains("ESCAPE"), "{out}");
    }

    #[test]
    fn settings_are_inlined() {
        let setting = |name: &str| -> Result<String> {
            match name {
                "search_path" => Ok("\"$user\", public".into()),
                other => Err(Error::Plan { code: "42704", message: format!("unknown {other}"), position: None }),
            }
        };
        assert_eq!(
            inline_settings("SELECT pg_catalog.current_setting('search_path'), 1", &setting).expect("known"),
            "SELECT '\"$user\", public', 1"
        );
        assert_eq!(
            inline_settings("SELECT current_setting('nope', true)", &setting).expect("missing ok"),
            "SELECT NULL"
        );
        let err = inline_settings("SELECT current_setting('nope')", &setting).expect_err("unknown");
        assert_eq!(err.sqlstate(), "42704");
        assert_eq!(
            inline_settings("SELECT current_setting(x)", &setting).expect("left alone"),
            "SELECT current_setting(x)"
        );
    }

    #[test]
    fn rewrites_ignore_indentation() {
        let text = "SELECT a,\n  ARRAY(SELECT b.x\n    FROM y) AS z FROM w";
        assert_eq!(
            replace_ignoring_whitespace(text, "ARRAY(SELECT b.x FROM y)", "NULL"),
            "SELECT a,\n  NULL AS z FROM w"
        );
        assert_eq!(replace_ignoring_whitespace("abc", "x", "y"), "abc");
    }

    #[test]
    fn sizes_read_like_postgres() {
        assert_eq!(pretty_size(0), "0 bytes");
        assert_eq!(pretty_size(10 * 1024), "10 kB");
        assert_eq!(pretty_size(5 * 1024 * 1024 * 1024), "5120 MB");
    }
}
