//! Avro record values (`FORMAT AVRO`): each Kafka value is one binary-encoded Avro datum
//! written with the record schema given inline (`avro.schema = '{"type": "record", …}'`).
//! Declared columns are matched to the schema's fields by name and cast to their declared
//! types; that they fit is checked when the source is created.

use std::sync::Arc;

use arrow_avro::reader::ReaderBuilder;
use arrow_avro::schema::{AvroSchema, Fingerprint, FingerprintAlgorithm, SchemaStore};
use datafusion::arrow::compute::{can_cast_types, cast};
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;

use super::option_error;
use crate::error::{Error, Result};

/// The decoder frames each datum as a Confluent message of this schema id (a header the
/// bytes on the wire do not have), which is how arrow-avro decodes datums one by one.
const ID: u32 = 0;
const FRAME: [u8; 5] = [0, 0, 0, 0, 0];

/// Decodes values written with one Avro record schema into a source's declared columns.
#[derive(Debug)]
pub struct AvroValues {
    schema: AvroSchema,
    declared: SchemaRef,
}

impl AvroValues {
    /// Checks that `schema` is a valid Avro record schema with a field for each declared
    /// column, of a type that casts to the column's.
    pub fn new(schema: &str, declared: &SchemaRef) -> Result<AvroValues> {
        let values = AvroValues { schema: AvroSchema::new(schema.to_string()), declared: declared.clone() };
        let written = values
            .decoder(1)
            .map_err(|e| option_error(format!("avro.schema is not a valid Avro record schema: {e}")))?
            .schema();
        for field in declared.fields() {
            let Some((_, given)) = written.column_with_name(field.name()) else {
                let fields: Vec<&str> = written.fields().iter().map(|f| f.name().as_str()).collect();
                return Err(option_error(format!(
                    "column {} is not a field of avro.schema (its fields: {})",
                    field.name(),
                    fields.join(", ")
                )));
            };
            if !can_cast_types(given.data_type(), field.data_type()) {
                return Err(option_error(format!(
                    "column {} is declared {} but avro.schema's field is {}, which does not convert to it",
                    field.name(),
                    field.data_type(),
                    given.data_type()
                )));
            }
        }
        Ok(values)
    }

    fn decoder(&self, rows: usize) -> std::result::Result<arrow_avro::reader::Decoder, String> {
        let mut store = SchemaStore::new_with_type(FingerprintAlgorithm::Id);
        store.set(Fingerprint::Id(ID), self.schema.clone()).map_err(|e| e.to_string())?;
        ReaderBuilder::new()
            .with_batch_size(rows.max(1))
            .with_writer_schema_store(store)
            .with_active_fingerprint(Fingerprint::Id(ID))
            .build_decoder()
            .map_err(|e| e.to_string())
    }

    /// The declared columns of `values`, one row each; fails (naming the reason) if any
    /// value is not exactly one datum of the schema.
    pub fn decode<'a>(&self, values: impl ExactSizeIterator<Item = &'a [u8]>) -> Result<RecordBatch> {
        let invalid = |message: String| Error::InvalidValue { code: "22P02", message };
        let mut decoder = self.decoder(values.len()).map_err(invalid)?;
        for value in values {
            let framed = decoder.decode(&FRAME).map_err(|e| invalid(e.to_string()))?;
            let taken = decoder.decode(value).map_err(|e| invalid(format!("not an Avro datum of avro.schema: {e}")))?;
            if framed != FRAME.len() || taken != value.len() {
                return Err(invalid(format!(
                    "not one Avro datum of avro.schema: {} of its {} bytes decode",
                    taken,
                    value.len()
                )));
            }
        }
        let Some(batch) = decoder.flush().map_err(|e| invalid(e.to_string()))? else {
            return Ok(RecordBatch::new_empty(self.declared.clone()));
        };
        let mut columns = Vec::with_capacity(self.declared.fields().len());
        for field in self.declared.fields() {
            let column = batch
                .column_by_name(field.name())
                .ok_or_else(|| Error::Internal(format!("the decoded Avro rows lack field {}", field.name())))?;
            columns.push(cast(column, field.data_type())?);
        }
        Ok(RecordBatch::try_new(Arc::new(self.declared.as_ref().clone()), columns)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{Array, Float64Array, Int64Array, StringArray};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};

    const SCHEMA: &str = r#"{"type": "record", "name": "Reading", "fields": [
        {"name": "device", "type": "string"},
        {"name": "seq", "type": "long"},
        {"name": "temperature", "type": ["null", "double"]}]}"#;

    fn declared() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("seq", DataType::Int64, true),
            Field::new("device", DataType::Utf8, true),
            Field::new("temperature", DataType::Float64, true),
        ]))
    }

    /// An Avro datum of SCHEMA, encoded by hand: zig-zag varints, length-prefixed strings,
    /// a union branch index, little-endian doubles.
    fn datum(device: &str, seq: i64, temperature: Option<f64>) -> Vec<u8> {
        fn varint(mut n: u64, out: &mut Vec<u8>) {
            while n >= 0x80 {
                out.push((n as u8) | 0x80);
                n >>= 7;
            }
            out.push(n as u8);
        }
        let zigzag = |n: i64| ((n << 1) ^ (n >> 63)) as u64;
        let mut out = Vec::new();
        varint(zigzag(device.len() as i64), &mut out);
        out.extend_from_slice(device.as_bytes());
        varint(zigzag(seq), &mut out);
        match temperature {
            None => varint(zigzag(0), &mut out),
            Some(t) => {
                varint(zigzag(1), &mut out);
                out.extend_from_slice(&t.to_le_bytes());
            }
        }
        out
    }

    #[test]
    fn datums_decode_into_the_declared_columns_by_name() {
        let values = AvroValues::new(SCHEMA, &declared()).expect("schema fits");
        let (a, b) = (datum("pump-1", 7, Some(21.5)), datum("pump-2", -300, None));
        let batch = values.decode([a.as_slice(), b.as_slice()].into_iter()).expect("decoded");
        let seq = batch.column(0).as_any().downcast_ref::<Int64Array>().expect("seq");
        let device = batch.column(1).as_any().downcast_ref::<StringArray>().expect("device");
        let temperature = batch.column(2).as_any().downcast_ref::<Float64Array>().expect("temperature");
        assert_eq!((seq.value(0), seq.value(1)), (7, -300));
        assert_eq!((device.value(0), device.value(1)), ("pump-1", "pump-2"));
        assert_eq!((temperature.value(0), temperature.is_null(1)), (21.5, true));
    }

    #[test]
    fn truncated_or_overlong_values_are_errors() {
        let values = AvroValues::new(SCHEMA, &declared()).expect("schema fits");
        let whole = datum("pump-1", 7, Some(21.5));
        let truncated = &whole[..whole.len() - 3];
        let e = values.decode([truncated].into_iter()).expect_err("truncated");
        assert!(e.to_string().contains("Avro datum"), "{e}");
        let mut longer = whole.clone();
        longer.extend_from_slice(b"xyz");
        let e = values.decode([longer.as_slice()].into_iter()).expect_err("trailing bytes");
        assert!(e.to_string().contains("Avro datum"), "{e}");
    }

    #[test]
    fn schemas_that_do_not_fit_the_columns_are_refused() {
        let e = AvroValues::new("{not json", &declared()).expect_err("invalid");
        assert!(e.to_string().contains("not a valid Avro record schema"), "{e}");
        let other = Arc::new(Schema::new(vec![Field::new("pressure", DataType::Float64, true)]));
        let e = AvroValues::new(SCHEMA, &other).expect_err("no such field");
        assert!(e.to_string().contains("pressure is not a field") && e.to_string().contains("device"), "{e}");
        let wrong = Arc::new(Schema::new(vec![Field::new("temperature", DataType::Date32, true)]));
        let e = AvroValues::new(SCHEMA, &wrong).expect_err("no conversion");
        assert!(e.to_string().contains("does not convert"), "{e}");
    }
}
