//! Sinks: a materialized view's changes, epoch by epoch, written to Kafka.
//!
//! Three modes say how a change becomes messages:
//! - `append`: each inserted row is one message; retractions are not written (they are
//!   counted in `freshet_catalog.sinks`), so use it for views that only grow.
//! - `upsert`: messages are keyed by `key = 'column'`; an inserted row is written under its
//!   key, and a key whose rows were all retracted in the epoch gets a tombstone (a message
//!   with no value), so a compacted topic holds the view.
//! - `debezium`: each change is `{"before": …, "after": …, "op": "c" | "u" | "d"}`; with a
//!   key, a retraction and an insertion of the same key in one epoch are one update.
//!
//! Delivery is at least once: an epoch's messages are all acknowledged by the broker before
//! the next epoch is written, and after a restart (or when the sink fell behind) the sink
//! writes the view's current rows again before following its changes.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use datafusion::arrow::array::Array;
use datafusion::arrow::json::WriterBuilder;
use datafusion::arrow::json::writer::LineDelimited;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::arrow::util::display::array_value_to_string;
use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};

use super::kafka::brokers_and_topic;
use super::{Options, option_error};
use crate::dataflow::ChangeBatch;
use crate::error::{Error, Result};

/// How a change becomes messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Append,
    Upsert,
    Debezium,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Append => "append",
            Mode::Upsert => "upsert",
            Mode::Debezium => "debezium",
        }
    }
}

/// A Kafka sink's options.
#[derive(Debug, Clone, PartialEq)]
pub struct KafkaSink {
    pub brokers: String,
    pub topic: String,
    /// The column whose value is each message's key.
    pub key: Option<String>,
    pub mode: Mode,
    pub properties: Vec<(String, String)>,
}

const SINK_OPTIONS: &[&str] = &["connector", "brokers", "topic", "key", "mode", "format"];

impl KafkaSink {
    pub fn from_options(options: &Options) -> Result<KafkaSink> {
        match options.get("connector").map(|c| c.to_ascii_lowercase()).as_deref() {
            Some("kafka") => {}
            None => return Err(option_error("CREATE SINK needs WITH (connector = 'kafka', …)")),
            Some(other) => {
                return Err(Error::NotSupported {
                    feature: format!("sinks with connector {other}"),
                    hint: Some("sinks available today: kafka".into()),
                });
            }
        }
        if let Some(unknown) =
            options.keys().find(|k| !SINK_OPTIONS.contains(&k.as_str()) && !k.starts_with("properties."))
        {
            return Err(option_error(format!(
                "option {unknown} is unknown for a kafka sink (known: brokers, topic, key, mode, properties.<librdkafka setting>)"
            )));
        }
        match options.get("format").map(|f| f.to_ascii_lowercase()).as_deref() {
            None | Some("json") => {}
            Some(other) => {
                return Err(Error::NotSupported {
                    feature: format!("sinks with FORMAT {}", other.to_ascii_uppercase()),
                    hint: Some("sinks write FORMAT JSON".into()),
                });
            }
        }
        let (brokers, topic) = brokers_and_topic(options, "sink")?;
        let mode = match options.get("mode").map(|m| m.to_ascii_lowercase()).as_deref() {
            None | Some("append") => Mode::Append,
            Some("upsert") => Mode::Upsert,
            Some("debezium") => Mode::Debezium,
            Some(other) => {
                return Err(option_error(format!("mode = '{other}' must be 'append', 'upsert' or 'debezium'")));
            }
        };
        let key = options.get("key").map(|k| k.to_ascii_lowercase());
        if mode == Mode::Upsert && key.is_none() {
            return Err(option_error("an upsert sink needs key = 'column': tombstones and updates go by key"));
        }
        let properties = options
            .iter()
            .filter_map(|(k, v)| k.strip_prefix("properties.").map(|k| (k.to_string(), v.clone())))
            .collect();
        Ok(KafkaSink { brokers, topic, key, mode, properties })
    }

    /// Checks the sink against the view's columns; returns the key column's index.
    pub fn key_index(&self, schema: &datafusion::arrow::datatypes::Schema) -> Result<Option<usize>> {
        self.key
            .as_ref()
            .map(|key| {
                schema.index_of(key).map_err(|_| {
                    let columns: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
                    option_error(format!("key = '{key}' is not a column of the view (columns: {})", columns.join(", ")))
                })
            })
            .transpose()
    }

    pub fn producer(&self, sink: &str) -> Result<FutureProducer> {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.brokers)
            .set("client.id", format!("freshet-sink-{sink}"))
            .set("linger.ms", "5")
            .set("message.timeout.ms", "30000");
        for (key, value) in &self.properties {
            config.set(key, value);
        }
        config.create().map_err(|e| option_error(format!("sink {sink}: cannot create a Kafka producer: {e}")))
    }
}

/// One message to write.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub key: Option<Vec<u8>>,
    /// None is a tombstone.
    pub value: Option<Vec<u8>>,
}

/// The messages for one epoch's change, and how many retractions append mode left out.
pub fn encode(mode: Mode, key: Option<usize>, change: &ChangeBatch) -> Result<(Vec<Message>, u64)> {
    let (inserts, retracts) = change.consolidate()?.split()?;
    let after = json_rows(&inserts)?;
    let before = json_rows(&retracts)?;
    let keys = |batch: &RecordBatch| -> Result<Vec<Option<String>>> {
        let Some(k) = key else { return Ok(vec![None; batch.num_rows()]) };
        let column = batch.column(k);
        (0..batch.num_rows())
            .map(|i| if column.is_null(i) { Ok(None) } else { Ok(Some(array_value_to_string(column, i)?)) })
            .collect()
    };
    let after_keys = keys(&inserts)?;
    let before_keys = keys(&retracts)?;
    let bytes = |k: &Option<String>| k.as_ref().map(|k| k.as_bytes().to_vec());
    let mut messages = Vec::with_capacity(after.len() + before.len());
    let mut skipped = 0;
    match mode {
        Mode::Append => {
            skipped = before.len() as u64;
            for (k, row) in after_keys.iter().zip(after) {
                messages.push(Message { key: bytes(k), value: Some(row.into_bytes()) });
            }
        }
        Mode::Upsert => {
            let inserted: HashSet<&Option<String>> = after_keys.iter().collect();
            let mut tombstoned = HashSet::new();
            for k in &before_keys {
                if !inserted.contains(k) && tombstoned.insert(k) {
                    messages.push(Message { key: bytes(k), value: None });
                }
            }
            for (k, row) in after_keys.iter().zip(after) {
                messages.push(Message { key: bytes(k), value: Some(row.into_bytes()) });
            }
        }
        Mode::Debezium => {
            // With a key, a retraction and an insertion of one key are an update.
            let mut pending: HashMap<&String, Vec<String>> = HashMap::new();
            let mut deletes: Vec<(Option<String>, String)> = Vec::new();
            for (k, row) in before_keys.iter().zip(before) {
                match k {
                    Some(k) => pending.entry(k).or_default().push(row),
                    None => deletes.push((None, row)),
                }
            }
            for (k, row) in after_keys.iter().zip(after) {
                let old = k.as_ref().and_then(|k| pending.get_mut(k)).and_then(|rows| rows.pop());
                let (op, before) = match old {
                    Some(old) => ("u", old),
                    None => ("c", "null".to_string()),
                };
                let value = format!(r#"{{"before":{before},"after":{row},"op":"{op}"}}"#);
                messages.push(Message { key: bytes(k), value: Some(value.into_bytes()) });
            }
            for k in &before_keys {
                if let Some(k) = k
                    && let Some(rows) = pending.get_mut(k)
                    && let Some(row) = rows.pop()
                {
                    deletes.push((Some(k.clone()), row));
                }
            }
            for (k, row) in deletes {
                let value = format!(r#"{{"before":{row},"after":null,"op":"d"}}"#);
                messages.push(Message { key: bytes(&k), value: Some(value.into_bytes()) });
            }
        }
    }
    Ok((messages, skipped))
}

/// Each row as one JSON object, with nulls written out.
fn json_rows(batch: &RecordBatch) -> Result<Vec<String>> {
    if batch.num_rows() == 0 {
        return Ok(Vec::new());
    }
    let mut writer = WriterBuilder::new().with_explicit_nulls(true).build::<_, LineDelimited>(Vec::new());
    writer.write(batch)?;
    writer.finish()?;
    let text =
        String::from_utf8(writer.into_inner()).map_err(|e| Error::Internal(format!("JSON is not UTF-8: {e}")))?;
    Ok(text.lines().map(str::to_string).collect())
}

/// How long one epoch's messages may take to be acknowledged before the epoch is retried.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(60);

/// Writes `messages` to the topic; returns once the broker acknowledged all of them.
pub async fn deliver(producer: &FutureProducer, topic: &str, messages: &[Message]) -> Result<()> {
    let mut pending = Vec::with_capacity(messages.len());
    for message in messages {
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic);
        if let Some(key) = &message.key {
            record = record.key(key.as_slice());
        }
        if let Some(value) = &message.value {
            record = record.payload(value.as_slice());
        }
        // `send` waits while librdkafka's queue is full.
        pending.push(producer.send(record, DELIVERY_TIMEOUT));
    }
    for result in futures::future::join_all(pending).await {
        result.map_err(|(e, _)| Error::Storage(format!("writing to topic {topic}: {e}")))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use datafusion::arrow::array::{Int64Array, StringArray};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};

    use super::*;

    fn change(rows: &[(&str, i64, i64)]) -> ChangeBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("device", DataType::Utf8, true),
            Field::new("n", DataType::Int64, true),
        ]));
        let batch = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.0))),
                Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.1))),
            ],
        )
        .expect("batch");
        ChangeBatch::try_new(batch, Int64Array::from_iter_values(rows.iter().map(|r| r.2))).expect("change")
    }

    fn text(messages: &[Message]) -> Vec<(String, String)> {
        let s = |b: &Option<Vec<u8>>| b.as_ref().map_or("∅".to_string(), |b| String::from_utf8_lossy(b).into_owned());
        messages.iter().map(|m| (s(&m.key), s(&m.value))).collect()
    }

    #[test]
    fn upsert_writes_new_values_and_tombstones_for_vanished_keys() {
        let epoch = change(&[("a", 1, -1), ("a", 2, 1), ("b", 5, -1), ("c", 7, 1)]);
        let (messages, _) = encode(Mode::Upsert, Some(0), &epoch).expect("encoded");
        assert_eq!(
            text(&messages),
            [
                ("b".into(), "∅".into()),
                ("a".into(), r#"{"device":"a","n":2}"#.into()),
                ("c".into(), r#"{"device":"c","n":7}"#.into())
            ]
        );
    }

    #[test]
    fn debezium_pairs_a_keys_retraction_and_insertion_as_an_update() {
        let epoch = change(&[("a", 1, -1), ("a", 2, 1), ("b", 5, -1), ("c", 7, 1)]);
        let (messages, _) = encode(Mode::Debezium, Some(0), &epoch).expect("encoded");
        let values: Vec<String> = text(&messages).into_iter().map(|(_, v)| v).collect();
        assert_eq!(
            values,
            [
                r#"{"before":{"device":"a","n":1},"after":{"device":"a","n":2},"op":"u"}"#,
                r#"{"before":null,"after":{"device":"c","n":7},"op":"c"}"#,
                r#"{"before":{"device":"b","n":5},"after":null,"op":"d"}"#,
            ]
        );
    }

    #[test]
    fn append_writes_insertions_and_counts_what_it_leaves_out() {
        let epoch = change(&[("a", 1, -1), ("a", 2, 1), ("a", 2, 1)]);
        let (messages, skipped) = encode(Mode::Append, None, &epoch).expect("encoded");
        assert_eq!(skipped, 1);
        assert_eq!(messages.len(), 2);
        assert!(messages.iter().all(|m| m.key.is_none()));
    }
}
