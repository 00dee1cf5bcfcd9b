//! MQTT sources: the IoT path. A source subscribes to a topic filter (wildcards allowed)
//! with QoS 1 in a persistent session (`clean_session = false`, client id
//! `freshet-<source>` unless `client_id` says otherwise), so the broker keeps what devices
//! publish while freshet is away. Each message is acknowledged only once its rows are
//! durable: nothing acknowledged is ever lost, and a crash between durability and the
//! acknowledgement makes the broker send that message again (at least once; MQTT has no
//! offsets to deduplicate by).
//!
//! Throughput follows the broker's limit on unacknowledged messages per client (Mosquitto's
//! `max_inflight_messages`, 20 by default): raise it on the broker for heavy streams.

use std::sync::Arc;
use std::time::Duration;

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, Publish, QoS};

use super::kafka::{RecordDecoder, Records};
use super::{DeadLetter, Format, Options, Progress, option_error};
use crate::error::{Error, Result};

/// An MQTT source's options.
#[derive(Debug, Clone, PartialEq)]
pub struct MqttSource {
    pub host: String,
    pub port: u16,
    pub topic: String,
    pub qos: QoS,
    pub client_id: Option<String>,
    pub format: Format,
}

const OPTIONS: &[&str] = &["connector", "url", "topic", "qos", "client_id", "format", "header"];

impl MqttSource {
    pub fn from_options(options: &Options, format: Format) -> Result<MqttSource> {
        if let Some(unknown) = options.keys().find(|k| !OPTIONS.contains(&k.as_str())) {
            return Err(option_error(format!(
                "option {unknown} is unknown for the mqtt connector (known: url, topic, qos, client_id)"
            )));
        }
        let url = options.get("url").ok_or_else(|| option_error("an mqtt source needs url = 'mqtt://host[:port]'"))?;
        let address = url
            .strip_prefix("mqtt://")
            .or_else(|| url.strip_prefix("tcp://"))
            .ok_or_else(|| option_error(format!("url = '{url}' must start with mqtt:// (TLS is not supported yet)")))?
            .trim_end_matches('/');
        let (host, port) = match address.rsplit_once(':') {
            Some((host, port)) => {
                (host.to_string(), port.parse().map_err(|_| option_error(format!("url = '{url}' has a bad port")))?)
            }
            None => (address.to_string(), 1883),
        };
        if host.is_empty() {
            return Err(option_error(format!("url = '{url}' names no host")));
        }
        let topic =
            options.get("topic").cloned().ok_or_else(|| option_error("an mqtt source needs topic = 'filter'"))?;
        if !rumqttc::valid_filter(&topic) {
            return Err(option_error(format!("topic = '{topic}' is not a valid MQTT topic filter")));
        }
        let qos = match options.get("qos").map(|q| q.trim()) {
            None | Some("1") => QoS::AtLeastOnce,
            Some("0") => QoS::AtMostOnce,
            Some(other) => {
                return Err(option_error(format!(
                    "qos = '{other}' must be 1 (at least once, the default) or 0 (at most once)"
                )));
            }
        };
        if matches!(format, Format::Parquet) {
            return Err(Error::not_supported("FORMAT PARQUET for MQTT messages"));
        }
        Ok(MqttSource { host, port, topic, qos, client_id: options.get("client_id").cloned(), format })
    }
}

/// Most messages decoded and appended together, and the longest a batch waits to fill.
const MAX_MESSAGES: usize = 4096;
const LINGER: Duration = Duration::from_millis(20);
const BACKOFF_START: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// A batch for the ingest task: rows and dead letters, and the messages to acknowledge
/// once they are durable.
pub struct Received {
    pub rows: RecordBatch,
    pub dead_letters: Vec<DeadLetter>,
    pub to_ack: Vec<Publish>,
    pub client: AsyncClient,
}

/// Runs the MQTT connection, handing decoded batches to the ingest task, until the ingest
/// task goes away.
pub async fn receive(
    spec: MqttSource,
    source: String,
    schema: SchemaRef,
    out: tokio::sync::mpsc::Sender<Received>,
    progress: Arc<Progress>,
) {
    let client_id = spec.client_id.clone().unwrap_or_else(|| format!("freshet-{source}"));
    let mut options = MqttOptions::new(client_id, spec.host.clone(), spec.port);
    options.set_keep_alive(Duration::from_secs(10)).set_clean_session(false).set_manual_acks(true);
    // Acknowledgements go through the client's request channel: room for a full batch.
    let (client, mut events) = AsyncClient::new(options, 2 * MAX_MESSAGES);
    let decoder = RecordDecoder::new(spec.format, &schema, Vec::new());
    let mut batch: Vec<Publish> = Vec::new();
    let mut backoff = BACKOFF_START;
    // Publishes are collected here; a separate task must poll the event loop while acks are
    // sent, so batches leave through a channel to the ingest task.
    loop {
        if out.is_closed() {
            return;
        }
        let polled =
            if batch.is_empty() { Ok(events.poll().await) } else { tokio::time::timeout(LINGER, events.poll()).await };
        match polled {
            Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => {
                backoff = BACKOFF_START;
                // Subscribe on every connection: the session may be new.
                if let Err(e) = client.try_subscribe(spec.topic.clone(), spec.qos) {
                    progress.failed_attempt(&format!("subscribing to {}: {e}", spec.topic));
                }
            }
            Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => {
                progress.set_status("running");
                tracing::info!(source = %source, topic = %spec.topic, "mqtt source subscribed");
            }
            Ok(Ok(Event::Incoming(Packet::Publish(publish)))) => {
                batch.push(publish);
                if batch.len() < MAX_MESSAGES {
                    continue;
                }
            }
            Ok(Ok(_)) => continue,
            Ok(Err(e)) => {
                progress.failed_attempt(&format!("mqtt broker {}:{}: {e}", spec.host, spec.port));
                tracing::warn!(source = %source, "mqtt connection failed, retrying in {backoff:?}: {e}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
            Err(_) => {} // lingered long enough: hand the batch over
        }
        if batch.is_empty() {
            continue;
        }
        let mut records = Records::default();
        for (i, publish) in batch.iter().enumerate() {
            records.push(0, i as i64, None, None, Some(&publish.payload));
        }
        let received = match decoder.decode(&records) {
            Ok((rows, dead)) => {
                let dead_letters = dead
                    .into_iter()
                    .map(|mut d| {
                        let topic = d.offset.and_then(|i| batch.get(i as usize)).map(|p| p.topic.clone());
                        d.error = format!("topic {}: {}", topic.unwrap_or_default(), d.error);
                        d.partition = None;
                        d.offset = None;
                        d
                    })
                    .collect();
                progress.read(records.len() as u64, records.bytes() as u64);
                Received { rows, dead_letters, to_ack: std::mem::take(&mut batch), client: client.clone() }
            }
            Err(e) => {
                progress.stopped(&format!("decoding failed: {e}"));
                return;
            }
        };
        // The event loop keeps running while the batch is appended: acks need it.
        let sent = out.send(received);
        tokio::pin!(sent);
        loop {
            tokio::select! {
                result = &mut sent => {
                    if result.is_err() {
                        return;
                    }
                    break;
                }
                event = events.poll() => match event {
                    Ok(Event::Incoming(Packet::Publish(publish))) => batch.push(publish),
                    Ok(_) => {}
                    Err(e) => {
                        progress.failed_attempt(&format!("mqtt broker {}:{}: {e}", spec.host, spec.port));
                        tokio::time::sleep(backoff).await;
                    }
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(pairs: &[(&str, &str)]) -> Options {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn urls_topics_and_qos_are_checked() {
        let spec = MqttSource::from_options(
            &options(&[("connector", "mqtt"), ("url", "mqtt://broker:1884"), ("topic", "plant/+/telemetry")]),
            Format::Json,
        )
        .expect("valid");
        assert_eq!((spec.host.as_str(), spec.port, spec.qos), ("broker", 1884, QoS::AtLeastOnce));
        let bad = |pairs: &[(&str, &str)]| {
            MqttSource::from_options(&options(pairs), Format::Json).expect_err("refused").to_string()
        };
        assert!(bad(&[("url", "http://x"), ("topic", "t")]).contains("mqtt://"));
        assert!(bad(&[("url", "mqtt://x"), ("topic", "a/#/b")]).contains("topic filter"));
        assert!(bad(&[("url", "mqtt://x"), ("topic", "t"), ("qos", "2")]).contains("qos"));
        assert!(bad(&[("topic", "t")]).contains("url"));
    }
}
