//! Primary keys and column defaults as Postgres' catalogs describe them, for the clients
//! that read them there: pgjdbc's `getPrimaryKeys` (`pg_index`), psql's `\d` (index
//! relations in `pg_class` and their key columns in `pg_attribute`, `pg_get_indexdef`,
//! `pg_get_constraintdef`), Metabase's field
//! sync (`information_schema.table_constraints` and `key_column_usage`) and SQLAlchemy's
//! column defaults (`pg_attrdef`).
//!
//! Every freshet table declared with a PRIMARY KEY has, as in Postgres, a unique index
//! relation `<table>_pkey` (relkind `i`, btree) and a constraint of the same name
//! (contype `p`). Neither exists as an object in freshet: the rows here are derived from
//! the table definitions of the current snapshot whenever a catalog is read, with OIDs
//! computed from the table's OID so that they stay stable between queries. Other
//! constraint kinds (UNIQUE, FOREIGN KEY, CHECK) do not exist in freshet, so they have no
//! rows. Nothing here changes data.

use std::collections::HashMap;
use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, BooleanArray, Int16Array, Int32Array, ListArray, RecordBatch, StringArray, StructArray,
    UInt64Array, new_null_array,
};
use datafusion::arrow::datatypes::{DataType, Field, Fields, Schema, SchemaRef};
use datafusion::catalog::{SchemaProvider, Session, TableProvider};
use datafusion::error::Result as DfResult;

use super::SCHEMA_NAME;
use super::table::Snapshot;

/// Index relations get `table OID + INDEX_OID_OFFSET`, constraints `+ CONSTRAINT_OID_OFFSET`
/// and column defaults `ATTRDEF_OID_BASE + …`. The crate hands out relation OIDs counting
/// up from 16384, so these ranges stay clear of them for any realistic number of relations.
const INDEX_OID_OFFSET: i32 = 0x2000_0000;
const CONSTRAINT_OID_OFFSET: i32 = 0x3000_0000;
const ATTRDEF_OID_BASE: i32 = 0x4000_0000;
/// The OID of the btree access method in `pg_am`.
pub(super) const BTREE_AM_OID: i32 = 403;

/// The OIDs the crate gave the `public` namespace and the relations in it.
#[derive(Debug, Default)]
pub(super) struct PublicOids {
    pub namespace: i32,
    pub relations: HashMap<String, i32>,
}

/// Reads the OIDs of `public` and its relations from the crate's own `pg_namespace` and
/// `pg_class` (`pg_catalog` before freshet's corrections).
pub(super) async fn public_oids(pg_catalog: &dyn SchemaProvider, state: &dyn Session) -> DfResult<PublicOids> {
    let mut oids = PublicOids::default();
    if let Some(namespaces) = pg_catalog.table("pg_namespace").await? {
        for batch in scan_all(namespaces.as_ref(), state).await? {
            let (Some(ids), Some(names)) = (int32_column(&batch, "oid"), text_column(&batch, "nspname")) else {
                continue;
            };
            for (id, name) in ids.iter().zip(names.iter()) {
                if let (Some(id), Some(SCHEMA_NAME)) = (id, name) {
                    oids.namespace = id;
                }
            }
        }
    }
    if let Some(classes) = pg_catalog.table("pg_class").await? {
        for batch in scan_all(classes.as_ref(), state).await? {
            let (Some(ids), Some(names), Some(spaces)) =
                (int32_column(&batch, "oid"), text_column(&batch, "relname"), int32_column(&batch, "relnamespace"))
            else {
                continue;
            };
            for row in 0..batch.num_rows() {
                if ids.is_valid(row)
                    && names.is_valid(row)
                    && spaces.is_valid(row)
                    && spaces.value(row) == oids.namespace
                {
                    oids.relations.insert(names.value(row).to_string(), ids.value(row));
                }
            }
        }
    }
    Ok(oids)
}

/// One table's primary key, named as Postgres names it.
#[derive(Debug, Clone)]
pub(super) struct PrimaryKey {
    pub table: String,
    pub table_oid: i32,
    pub namespace_oid: i32,
    /// `<table>_pkey`: the name of both the index and the constraint.
    pub name: String,
    /// `(attnum, column name)` in key order; attnums count from 1.
    pub columns: Vec<(i16, String)>,
    /// The OID of each key column's type (as `pg_attribute.atttypid` has it), in key order.
    pub types: Vec<i32>,
}

impl PrimaryKey {
    pub fn index_oid(&self) -> i32 {
        self.table_oid.wrapping_add(INDEX_OID_OFFSET)
    }

    pub fn constraint_oid(&self) -> i32 {
        self.table_oid.wrapping_add(CONSTRAINT_OID_OFFSET)
    }

    fn column_list(&self) -> String {
        self.columns.iter().map(|(_, name)| super::system::quote_ident(name)).collect::<Vec<_>>().join(", ")
    }

    /// What `pg_get_indexdef(oid)` answers.
    pub fn index_definition(&self) -> String {
        format!(
            "CREATE UNIQUE INDEX {} ON {}.{} USING btree ({})",
            super::system::quote_ident(&self.name),
            SCHEMA_NAME,
            super::system::quote_ident(&self.table),
            self.column_list()
        )
    }

    /// What `pg_get_constraintdef(oid)` answers.
    pub fn constraint_definition(&self) -> String {
        format!("PRIMARY KEY ({})", self.column_list())
    }
}

/// The primary keys of the tables in `snapshot`, with the OIDs in `oids`.
pub(super) fn primary_keys(snapshot: &Snapshot, oids: &PublicOids) -> Vec<PrimaryKey> {
    snapshot
        .tables
        .values()
        .filter(|version| !version.def.primary_key.is_empty())
        .filter_map(|version| {
            let def = &version.def;
            let table_oid = *oids.relations.get(&def.name)?;
            let columns = def.primary_key.iter().map(|&i| (attnum(i), def.schema.field(i).name().clone())).collect();
            let types = def.primary_key.iter().map(|&i| type_oid(def.schema.field(i))).collect();
            Some(PrimaryKey {
                table: def.name.clone(),
                table_oid,
                namespace_oid: oids.namespace,
                name: def.primary_key_name(),
                columns,
                types,
            })
        })
        .collect()
}

/// The OID of the Postgres type the wire protocol sends for `field` (0 when it has none).
fn type_oid(field: &Field) -> i32 {
    if crate::sql::is_json(field) {
        return JSON_TYPE_OID;
    }
    datafusion_postgres::arrow_pg::datatypes::into_pg_type(field.data_type())
        .ok()
        .and_then(|t| i32::try_from(t.oid()).ok())
        .unwrap_or(0)
}

/// The OID of Postgres' `json` type.
pub(super) const JSON_TYPE_OID: i32 = 114;

/// The default btree operator class of each type (`pg_opclass.opcintype` → `oid`), read
/// from the crate's `pg_opclass`: what `pg_index.indclass` lists for a key column.
pub(super) async fn default_btree_opclasses(
    pg_catalog: &dyn SchemaProvider,
    state: &dyn Session,
) -> DfResult<HashMap<i32, i32>> {
    let mut classes = HashMap::new();
    let Some(table) = pg_catalog.table("pg_opclass").await? else { return Ok(classes) };
    for batch in scan_all(table.as_ref(), state).await? {
        let column = |name: &str, to: &DataType| -> DfResult<Option<ArrayRef>> {
            let Ok(i) = batch.schema().index_of(name) else { return Ok(None) };
            Ok(Some(datafusion::arrow::compute::cast(batch.column(i), to)?))
        };
        let (Some(oids), Some(methods), Some(types), Some(defaults)) = (
            column("oid", &DataType::Int32)?,
            column("opcmethod", &DataType::Int32)?,
            column("opcintype", &DataType::Int32)?,
            column("opcdefault", &DataType::Boolean)?,
        ) else {
            continue;
        };
        let oids = datafusion::common::cast::as_int32_array(&oids)?;
        let methods = datafusion::common::cast::as_int32_array(&methods)?;
        let types = datafusion::common::cast::as_int32_array(&types)?;
        let defaults = datafusion::common::cast::as_boolean_array(&defaults)?;
        for row in 0..batch.num_rows() {
            if methods.is_valid(row)
                && methods.value(row) == BTREE_AM_OID
                && defaults.is_valid(row)
                && defaults.value(row)
                && types.is_valid(row)
                && oids.is_valid(row)
            {
                classes.insert(types.value(row), oids.value(row));
            }
        }
    }
    Ok(classes)
}

/// A column's attnum: its 1-based position (freshet tables never drop columns).
fn attnum(index: usize) -> i16 {
    i16::try_from(index + 1).unwrap_or(i16::MAX)
}

/// Row `row` of `batch` as a one-row batch, with each column that `replace` gives a value
/// of the column's type for replaced by it.
fn copy_row(batch: &RecordBatch, row: usize, replace: impl Fn(&str) -> Option<ArrayRef>) -> DfResult<RecordBatch> {
    let schema = batch.schema();
    let columns = schema
        .fields()
        .iter()
        .zip(batch.columns())
        .map(|(field, column)| match replace(field.name()) {
            Some(array) if array.data_type() == field.data_type() => array,
            _ => column.slice(row, 1),
        })
        .collect();
    Ok(RecordBatch::try_new(schema, columns)?)
}

/// `pg_class` rows for the index relations behind `keys`, cloned from the row of each
/// key's table in `batch` (rows of other relations are ignored).
pub(super) fn index_classes(batch: &RecordBatch, keys: &[PrimaryKey]) -> DfResult<Option<RecordBatch>> {
    let Some(ids) = int32_column(batch, "oid") else { return Ok(None) };
    let mut rows = Vec::new();
    for key in keys {
        let Some(row) = (0..batch.num_rows()).find(|&r| ids.is_valid(r) && ids.value(r) == key.table_oid) else {
            continue;
        };
        rows.push(copy_row(batch, row, |name| match name {
            "oid" | "relfilenode" => Some(Arc::new(Int32Array::from(vec![key.index_oid()]))),
            "relname" => Some(Arc::new(StringArray::from(vec![key.name.clone()]))),
            "relkind" => Some(Arc::new(StringArray::from(vec!["i"]))),
            "relam" => Some(Arc::new(Int32Array::from(vec![BTREE_AM_OID]))),
            "relnatts" => Some(Arc::new(Int16Array::from(vec![attnum(key.columns.len() - 1)]))),
            "reltype" | "reltoastrelid" => Some(Arc::new(Int32Array::from(vec![0]))),
            "relhasindex" => Some(Arc::new(BooleanArray::from(vec![false]))),
            _ => None,
        })?);
    }
    if rows.is_empty() {
        return Ok(None);
    }
    Ok(Some(datafusion::arrow::compute::concat_batches(&batch.schema(), &rows)?))
}

/// `pg_attribute` rows for the index relations behind `keys`, one per key column,
/// numbered from 1 in key order and otherwise copied from the table's row for that column
/// in `batches` (its name and type), as Postgres describes an index's columns. As there,
/// `attnotnull` and `atthasdef` are false: they belong to the table's columns.
pub(super) fn index_attributes(batches: &[RecordBatch], keys: &[PrimaryKey]) -> DfResult<Option<RecordBatch>> {
    let Some(schema) = batches.first().map(RecordBatch::schema) else { return Ok(None) };
    let mut rows = Vec::new();
    for key in keys {
        for (position, (_, column)) in key.columns.iter().enumerate() {
            let found = batches.iter().find_map(|batch| {
                let (relations, names) = (int32_column(batch, "attrelid")?, text_column(batch, "attname")?);
                let row = (0..batch.num_rows()).find(|&r| {
                    relations.is_valid(r)
                        && relations.value(r) == key.table_oid
                        && names.is_valid(r)
                        && names.value(r) == column
                })?;
                Some((batch, row))
            });
            let Some((batch, row)) = found else { continue };
            rows.push(copy_row(batch, row, |name| match name {
                "attrelid" => Some(Arc::new(Int32Array::from(vec![key.index_oid()]))),
                "attnum" => Some(Arc::new(Int16Array::from(vec![attnum(position)]))),
                "attnotnull" | "atthasdef" => Some(Arc::new(BooleanArray::from(vec![false]))),
                _ => None,
            })?);
        }
    }
    if rows.is_empty() {
        return Ok(None);
    }
    Ok(Some(datafusion::arrow::compute::concat_batches(&schema, &rows)?))
}

/// Rows for `pg_index` (schema `schema`), one per primary key; `opclasses` are the
/// default btree operator classes by type ([`default_btree_opclasses`]).
pub(super) fn index_rows(
    schema: &SchemaRef,
    keys: &[PrimaryKey],
    opclasses: &HashMap<i32, i32>,
) -> DfResult<RecordBatch> {
    let n = keys.len();
    let natts: Vec<i16> = keys.iter().map(|k| attnum(k.columns.len() - 1)).collect();
    build_rows(schema, n, |name| -> Option<ArrayRef> {
        Some(match name {
            "indexrelid" => Arc::new(Int32Array::from_iter_values(keys.iter().map(PrimaryKey::index_oid))),
            "indrelid" => Arc::new(Int32Array::from_iter_values(keys.iter().map(|k| k.table_oid))),
            "indnatts" | "indnkeyatts" => Arc::new(Int16Array::from(natts.clone())),
            "indisunique" | "indisprimary" | "indimmediate" | "indisvalid" | "indisready" | "indislive" => {
                Arc::new(BooleanArray::from(vec![true; n]))
            }
            "indnullsnotdistinct" | "indisexclusion" | "indisclustered" | "indcheckxmin" | "indisreplident" => {
                Arc::new(BooleanArray::from(vec![false; n]))
            }
            "indkey" => Arc::new(int2_lists(keys.iter().map(|k| Some(k.columns.iter().map(|(n, _)| *n).collect())))),
            // Every key column sorts ascending, NULLs last: option bits 0.
            "indoption" => Arc::new(int2_lists(keys.iter().map(|k| Some(vec![0; k.columns.len()])))),
            // No collations, as `pg_attribute.attcollation` says of freshet's columns.
            "indcollation" => Arc::new(oid_lists(keys.iter().map(|k| Some(vec![0; k.columns.len()])))),
            "indclass" => Arc::new(oid_lists(
                keys.iter().map(|k| Some(k.types.iter().map(|t| opclasses.get(t).copied().unwrap_or(0)).collect())),
            )),
            _ => return None,
        })
    })
}

/// Rows for `pg_constraint` (schema `schema`, whose `conkey` is a list of int2), one per
/// primary key.
pub(super) fn constraint_rows(schema: &SchemaRef, keys: &[PrimaryKey]) -> DfResult<RecordBatch> {
    let n = keys.len();
    build_rows(schema, n, |name| -> Option<ArrayRef> {
        Some(match name {
            "oid" => Arc::new(Int32Array::from_iter_values(keys.iter().map(PrimaryKey::constraint_oid))),
            "conname" => Arc::new(StringArray::from_iter_values(keys.iter().map(|k| k.name.clone()))),
            "connamespace" => Arc::new(Int32Array::from_iter_values(keys.iter().map(|k| k.namespace_oid))),
            "contype" => Arc::new(StringArray::from(vec!["p"; n])),
            "condeferrable" | "condeferred" | "connoinherit" => Arc::new(BooleanArray::from(vec![false; n])),
            "convalidated" | "conislocal" => Arc::new(BooleanArray::from(vec![true; n])),
            "conrelid" => Arc::new(Int32Array::from_iter_values(keys.iter().map(|k| k.table_oid))),
            "contypid" | "conparentid" | "confrelid" => Arc::new(Int32Array::from(vec![0; n])),
            "conindid" => Arc::new(Int32Array::from_iter_values(keys.iter().map(PrimaryKey::index_oid))),
            "coninhcount" => Arc::new(Int16Array::from(vec![0; n])),
            "confupdtype" | "confdeltype" | "confmatchtype" => Arc::new(StringArray::from(vec![" "; n])),
            "conkey" => Arc::new(int2_lists(keys.iter().map(|k| Some(k.columns.iter().map(|(n, _)| *n).collect())))),
            _ => return None,
        })
    })
}

/// The columns of `pg_constraint` that are int2 arrays in Postgres and text in the crate.
pub(super) const CONSTRAINT_ARRAYS: &[(&str, DataType)] = &[("conkey", DataType::Int16), ("confkey", DataType::Int16)];
/// The columns of `pg_index` that are int2vectors (`indkey`, `indoption`) or oidvectors
/// (`indclass`, `indcollation`) in Postgres and text in the crate.
pub(super) const INDEX_ARRAYS: &[(&str, DataType)] = &[
    ("indkey", DataType::Int16),
    ("indoption", DataType::Int16),
    ("indclass", DataType::Int32),
    ("indcollation", DataType::Int32),
];

/// `inner` with the `arrays` columns as arrays of their element types, as in Postgres
/// (the crate keeps them as text), so that clients' `attnum = ANY(conkey)`,
/// `unnest(indkey)` and `indoption[i]` plan.
///
/// An int2vector or oidvector becomes an array of the same elements in the same order.
/// Postgres numbers a vector's elements from 0 where an array counts from 1; the catalog
/// rewrite ([`super::system::parse`]) shifts subscripts and `generate_subscripts` of
/// these columns by one, so clients read the elements they mean.
pub(super) fn with_arrays(inner: &SchemaRef, arrays: &[(&str, DataType)]) -> SchemaRef {
    let fields: Vec<Field> = inner
        .fields()
        .iter()
        .map(|f| match arrays.iter().find(|(name, _)| name == f.name()) {
            Some((_, element)) => {
                Field::new(f.name(), DataType::List(Arc::new(Field::new_list_field(element.clone(), true))), true)
            }
            None => f.as_ref().clone(),
        })
        .collect();
    Arc::new(Schema::new(fields))
}

/// The crate's rows converted to `schema` (from [`with_arrays`]).
pub(super) fn convert_arrays(batch: &RecordBatch, schema: &SchemaRef) -> DfResult<RecordBatch> {
    let mut columns = Vec::with_capacity(batch.num_columns());
    for (field, column) in schema.fields().iter().zip(batch.columns()) {
        if field.data_type() == column.data_type() {
            columns.push(column.clone());
            continue;
        }
        let text = column.as_any().downcast_ref::<StringArray>();
        let lists = match text {
            Some(text) => int_lists(text.iter().map(|t| t.map(parse_ints::<i64>))),
            None => int_lists((0..column.len()).map(|_| None)),
        };
        columns.push(datafusion::arrow::compute::cast(&lists, field.data_type())?);
    }
    Ok(RecordBatch::try_new(schema.clone(), columns)?)
}

fn int2_lists(lists: impl Iterator<Item = Option<Vec<i16>>>) -> ListArray {
    ListArray::from_iter_primitive::<datafusion::arrow::datatypes::Int16Type, _, _>(
        lists.map(|list| list.map(|values| values.into_iter().map(Some).collect::<Vec<_>>())),
    )
}

fn oid_lists(lists: impl Iterator<Item = Option<Vec<i32>>>) -> ListArray {
    ListArray::from_iter_primitive::<datafusion::arrow::datatypes::Int32Type, _, _>(
        lists.map(|list| list.map(|values| values.into_iter().map(Some).collect::<Vec<_>>())),
    )
}

fn int_lists(lists: impl Iterator<Item = Option<Vec<i64>>>) -> ListArray {
    ListArray::from_iter_primitive::<datafusion::arrow::datatypes::Int64Type, _, _>(
        lists.map(|list| list.map(|values| values.into_iter().map(Some).collect::<Vec<_>>())),
    )
}

/// The integers of an array or vector in any of the text forms catalogs use:
/// `1 2` (int2vector), `{1,2}` (Postgres arrays), `[1, 2]`.
pub(super) fn parse_int_list(text: &str) -> Vec<i16> {
    parse_ints(text)
}

fn parse_ints<T: std::str::FromStr>(text: &str) -> Vec<T> {
    text.split(|c: char| c.is_whitespace() || matches!(c, ',' | '{' | '}' | '[' | ']'))
        .filter_map(|part| part.parse().ok())
        .collect()
}

/// `pg_attrdef` rows (schema `schema`) for the DEFAULT expressions of freshet's tables;
/// `adbin` holds the expression as the user wrote it, which `pg_get_expr` returns.
pub(super) fn default_rows(schema: &SchemaRef, snapshot: &Snapshot, oids: &PublicOids) -> DfResult<RecordBatch> {
    let mut rows: Vec<(i32, i32, i16, String)> = Vec::new();
    for version in snapshot.tables.values() {
        let def = &version.def;
        let Some(&table_oid) = oids.relations.get(&def.name) else { continue };
        for (column, text) in &def.default_texts {
            let Ok(i) = def.schema.index_of(column) else { continue };
            let number = attnum(i);
            let oid = table_oid.saturating_sub(16384).saturating_mul(1600).saturating_add(ATTRDEF_OID_BASE);
            rows.push((oid.saturating_add(i32::from(number)), table_oid, number, text.clone()));
        }
    }
    build_rows(schema, rows.len(), |name| -> Option<ArrayRef> {
        Some(match name {
            "oid" => Arc::new(Int32Array::from_iter_values(rows.iter().map(|r| r.0))),
            "adrelid" => Arc::new(Int32Array::from_iter_values(rows.iter().map(|r| r.1))),
            "adnum" => Arc::new(Int16Array::from_iter_values(rows.iter().map(|r| r.2))),
            "adbin" => Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.3.clone()))),
            _ => return None,
        })
    })
}

/// A batch of `n` rows of `schema`: each column from `column(name)` when it gives one of
/// the right type, NULL (or the type's zero value where NULL is not allowed) otherwise.
fn build_rows(schema: &SchemaRef, n: usize, column: impl Fn(&str) -> Option<ArrayRef>) -> DfResult<RecordBatch> {
    let columns = schema
        .fields()
        .iter()
        .map(|field| match column(field.name()) {
            Some(array) if array.data_type() == field.data_type() => Ok(array),
            _ if field.is_nullable() => Ok(new_null_array(field.data_type(), n)),
            // Columns the crate declares NOT NULL get the type's zero value ("", 0, false).
            _ => datafusion::scalar::ScalarValue::new_default(field.data_type())?.to_array_of_size(n),
        })
        .collect::<DfResult<Vec<_>>>()?;
    Ok(RecordBatch::try_new_with_options(
        schema.clone(),
        columns,
        &datafusion::arrow::array::RecordBatchOptions::new().with_row_count(Some(n)),
    )?)
}

/// `information_schema.table_constraints`: one PRIMARY KEY row per keyed table.
pub(super) fn table_constraints(snapshot: &Snapshot) -> DfResult<RecordBatch> {
    let keyed: Vec<_> = snapshot.tables.values().filter(|v| !v.def.primary_key.is_empty()).collect();
    let n = keyed.len();
    let text = |name: &str| Field::new(name, DataType::Utf8, true);
    let schema = Arc::new(Schema::new(vec![
        text("constraint_catalog"),
        text("constraint_schema"),
        text("constraint_name"),
        text("table_catalog"),
        text("table_schema"),
        text("table_name"),
        text("constraint_type"),
        text("is_deferrable"),
        text("initially_deferred"),
        text("enforced"),
        text("nulls_distinct"),
    ]));
    let constant = |value: &str| -> ArrayRef { Arc::new(StringArray::from(vec![value; n])) };
    let columns: Vec<ArrayRef> = vec![
        constant(super::CATALOG_NAME),
        constant(SCHEMA_NAME),
        Arc::new(StringArray::from_iter_values(keyed.iter().map(|v| v.def.primary_key_name()))),
        constant(super::CATALOG_NAME),
        constant(SCHEMA_NAME),
        Arc::new(StringArray::from_iter_values(keyed.iter().map(|v| v.def.name.clone()))),
        constant("PRIMARY KEY"),
        constant("NO"),
        constant("NO"),
        constant("YES"),
        Arc::new(StringArray::from(vec![None::<&str>; n])),
    ];
    Ok(RecordBatch::try_new(schema, columns)?)
}

/// `information_schema.key_column_usage`: one row per primary-key column.
pub(super) fn key_column_usage(snapshot: &Snapshot) -> DfResult<RecordBatch> {
    let mut rows: Vec<(String, String, String, u64)> = Vec::new();
    for version in snapshot.tables.values() {
        let def = &version.def;
        for (position, &i) in def.primary_key.iter().enumerate() {
            rows.push((
                def.primary_key_name(),
                def.name.clone(),
                def.schema.field(i).name().clone(),
                position as u64 + 1,
            ));
        }
    }
    let n = rows.len();
    let text = |name: &str| Field::new(name, DataType::Utf8, true);
    let schema = Arc::new(Schema::new(vec![
        text("constraint_catalog"),
        text("constraint_schema"),
        text("constraint_name"),
        text("table_catalog"),
        text("table_schema"),
        text("table_name"),
        text("column_name"),
        Field::new("ordinal_position", DataType::UInt64, true),
        Field::new("position_in_unique_constraint", DataType::UInt64, true),
    ]));
    let constant = |value: &str| -> ArrayRef { Arc::new(StringArray::from(vec![value; n])) };
    let columns: Vec<ArrayRef> = vec![
        constant(super::CATALOG_NAME),
        constant(SCHEMA_NAME),
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.0.clone()))),
        constant(super::CATALOG_NAME),
        constant(SCHEMA_NAME),
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.1.clone()))),
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.2.clone()))),
        Arc::new(UInt64Array::from_iter_values(rows.iter().map(|r| r.3))),
        Arc::new(UInt64Array::from(vec![None; n])),
    ];
    Ok(RecordBatch::try_new(schema, columns)?)
}

/// `information_schema._pg_expandarray(array)`: the elements of an array or int2vector
/// with their 1-based positions, as a list of `(x, n)` structs. The catalog rewrite wraps
/// each call in `unnest`, which makes it the set-returning function pgjdbc expects.
pub(super) fn expand_array(arrays: &[ArrayRef], rows: usize) -> DfResult<ArrayRef> {
    let Some(input) = arrays.first() else {
        return Err(datafusion::error::DataFusionError::Plan("_pg_expandarray needs an array".into()));
    };
    let lists: Vec<Option<Vec<i16>>> = if let Some(text) = input.as_any().downcast_ref::<StringArray>() {
        text.iter().map(|t| t.map(parse_int_list)).collect()
    } else if let Some(list) = input.as_any().downcast_ref::<ListArray>() {
        let values = datafusion::arrow::compute::cast(list.values(), &DataType::Int16)?;
        let values = datafusion::common::cast::as_int16_array(&values)?;
        (0..list.len())
            .map(|row| {
                list.is_valid(row).then(|| {
                    let (start, end) = (list.value_offsets()[row] as usize, list.value_offsets()[row + 1] as usize);
                    (start..end).map(|i| values.value(i)).collect()
                })
            })
            .collect()
    } else {
        return Err(datafusion::error::DataFusionError::Plan(format!(
            "_pg_expandarray of {} is not supported",
            input.data_type()
        )));
    };
    let fields = expanded_fields();
    let mut offsets = vec![0i32];
    let (mut xs, mut ns, mut valid) = (Vec::new(), Vec::new(), Vec::new());
    for row in 0..rows {
        let list = lists.get(row).cloned().flatten();
        valid.push(list.is_some());
        for (position, x) in list.unwrap_or_default().into_iter().enumerate() {
            xs.push(x);
            ns.push(i32::try_from(position + 1).unwrap_or(i32::MAX));
        }
        offsets.push(i32::try_from(xs.len()).unwrap_or(i32::MAX));
    }
    let structs = StructArray::try_new(
        fields.clone(),
        vec![Arc::new(Int16Array::from(xs)), Arc::new(Int32Array::from(ns))],
        None,
    )?;
    let list = ListArray::try_new(
        Arc::new(Field::new_list_field(DataType::Struct(fields), true)),
        datafusion::arrow::buffer::OffsetBuffer::new(offsets.into()),
        Arc::new(structs),
        Some(valid.into()),
    )?;
    Ok(Arc::new(list))
}

/// The fields of what `_pg_expandarray` returns: the element `x` and its position `n`.
pub(super) fn expanded_fields() -> Fields {
    Fields::from(vec![Field::new("x", DataType::Int16, true), Field::new("n", DataType::Int32, true)])
}

async fn scan_all(table: &dyn TableProvider, state: &dyn Session) -> DfResult<Vec<RecordBatch>> {
    let plan = table.scan(state, None, &[], None).await?;
    datafusion::physical_plan::collect(plan, state.task_ctx()).await
}

fn int32_column(batch: &RecordBatch, name: &str) -> Option<Int32Array> {
    let i = batch.schema().index_of(name).ok()?;
    batch.column(i).as_any().downcast_ref::<Int32Array>().cloned()
}

fn text_column(batch: &RecordBatch, name: &str) -> Option<StringArray> {
    let i = batch.schema().index_of(name).ok()?;
    batch.column(i).as_any().downcast_ref::<StringArray>().cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integer_lists_parse_in_every_catalog_spelling() {
        assert_eq!(parse_int_list("1 2"), vec![1, 2]);
        assert_eq!(parse_int_list("{3,1}"), vec![3, 1]);
        assert_eq!(parse_int_list("[2, 20, 3]"), vec![2, 20, 3]);
        assert_eq!(parse_int_list(""), Vec::<i16>::new());
    }

    #[test]
    fn expanded_arrays_number_their_elements_from_one() {
        let input: ArrayRef = Arc::new(StringArray::from(vec![Some("2 1"), None]));
        let out = expand_array(&[input], 2).expect("expands");
        let list = out.as_any().downcast_ref::<ListArray>().expect("a list");
        assert!(list.is_null(1));
        let first = list.value(0);
        let pairs = first.as_any().downcast_ref::<StructArray>().expect("structs");
        let xs = pairs.column(0).as_any().downcast_ref::<Int16Array>().expect("x");
        let ns = pairs.column(1).as_any().downcast_ref::<Int32Array>().expect("n");
        assert_eq!((xs.values().to_vec(), ns.values().to_vec()), (vec![2, 1], vec![1, 2]));
    }
}
