//! Generators: sources that make their own events, deterministically. Event `n` of a
//! generator is always the same row, so a generator resumes at any position and two runs
//! with the same options produce the same data.
//!
//! - `nexmark` (`kind = 'bid' | 'auction' | 'person'`): the Nexmark benchmark's events, the
//!   same values as the `nexmark` crate's generator but written straight into Arrow columns
//!   (`super::nexmark_columns`), with the columns of the Flink/RisingWave Nexmark setups.
//! - `telemetry`: devices reporting timestamp, device id, temperature, vibration and
//!   pressure once per second of event time, with a fraction of labelled anomalies.
//!
//! Options common to both: `rate` (events per second of wall time, `0` = as fast as
//! possible; default 1000), `events` (stop after this many; default unbounded) and
//! `base_time` (event time of the first event, in milliseconds since the Unix epoch;
//! default: the time the source was created, recorded so a restart continues the same
//! sequence).
//!
//! Nexmark also takes `event_rate`: events per second of event time over the whole
//! stream (all kinds), so a short run can span minutes of windows. By default event time
//! advances at `rate` when throttled and at 10,000 events per second otherwise.

use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, BooleanBuilder, Float64Builder, StringBuilder, TimestampMillisecondBuilder};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::arrow::record_batch::RecordBatch;
use nexmark::event::EventType;

use super::nexmark_columns::NexmarkColumns;
use super::{Options, number, option_error};
use crate::error::Result;

/// What a generator source was declared with, defaults resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct GeneratorSpec {
    pub kind: GeneratorKind,
    /// Events per second of wall time; 0 = unthrottled.
    pub rate: u64,
    /// Stop after this many events.
    pub events: Option<u64>,
    /// Event time of the first event, ms since the Unix epoch.
    pub base_time: i64,
    /// Nexmark: events per second of event time (`None`: follow `rate`).
    pub event_rate: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum GeneratorKind {
    Nexmark(EventType),
    Telemetry { devices: u64, seed: u64, anomaly_rate: f64 },
}

impl GeneratorSpec {
    /// Parses a source's options; `None` when the connector is not a generator.
    pub fn from_options(options: &Options) -> Result<Option<GeneratorSpec>> {
        let connector = options.get("connector").map(|c| c.to_ascii_lowercase()).unwrap_or_default();
        let (kind, allowed): (GeneratorKind, &[&str]) = match connector.as_str() {
            "nexmark" => {
                let kind = match options.get("kind").map(|k| k.to_ascii_lowercase()).as_deref() {
                    Some("bid") | None => EventType::Bid,
                    Some("auction") => EventType::Auction,
                    Some("person") => EventType::Person,
                    Some(other) => {
                        return Err(option_error(format!(
                            "nexmark kind '{other}' is unknown (expected 'bid', 'auction' or 'person')"
                        )));
                    }
                };
                (GeneratorKind::Nexmark(kind), &["kind", "event_rate"])
            }
            "telemetry" => {
                let devices = number::<u64>(options, "devices")?.unwrap_or(100);
                let anomaly_rate = number::<f64>(options, "anomaly_rate")?.unwrap_or(0.01);
                if devices == 0 {
                    return Err(option_error("telemetry needs at least one device (devices = '1' or more)"));
                }
                if !(0.0..=1.0).contains(&anomaly_rate) {
                    return Err(option_error(format!("anomaly_rate = '{anomaly_rate}' must be between 0 and 1")));
                }
                let seed = number::<u64>(options, "seed")?.unwrap_or(0);
                (GeneratorKind::Telemetry { devices, seed, anomaly_rate }, &["devices", "anomaly_rate", "seed"])
            }
            _ => return Ok(None),
        };
        let common = ["connector", "rate", "events", "base_time", super::RETENTION];
        if let Some(unknown) = options.keys().find(|k| !common.contains(&k.as_str()) && !allowed.contains(&k.as_str()))
        {
            let mut known: Vec<&str> = common.iter().chain(allowed).copied().collect();
            known.sort();
            return Err(option_error(format!(
                "option {unknown} is unknown for the {connector} connector (known: {})",
                known.join(", ")
            )));
        }
        let base_time = match number::<i64>(options, "base_time")? {
            Some(t) => t,
            None => chrono::Utc::now().timestamp_millis(),
        };
        let event_rate = number::<u64>(options, "event_rate")?;
        if event_rate == Some(0) {
            return Err(option_error("event_rate must be at least 1 event per second of event time"));
        }
        Ok(Some(GeneratorSpec {
            kind,
            rate: number::<u64>(options, "rate")?.unwrap_or(1000),
            events: number::<u64>(options, "events")?,
            base_time,
            event_rate,
        }))
    }

    /// The options with every default written out, so the source restarts identically.
    pub fn resolved(&self, options: &Options) -> Options {
        let mut resolved = options.clone();
        resolved.insert("rate".into(), self.rate.to_string());
        resolved.insert("base_time".into(), self.base_time.to_string());
        if let GeneratorKind::Telemetry { devices, seed, anomaly_rate } = self.kind {
            resolved.insert("devices".into(), devices.to_string());
            resolved.insert("seed".into(), seed.to_string());
            resolved.insert("anomaly_rate".into(), anomaly_rate.to_string());
        }
        resolved
    }

    /// The columns the generator produces.
    pub fn schema(&self) -> SchemaRef {
        let int = |name: &str| Field::new(name, DataType::Int64, false);
        let text = |name: &str| Field::new(name, DataType::Utf8, false);
        let time = |name: &str| Field::new(name, DataType::Timestamp(TimeUnit::Millisecond, None), false);
        let fields = match self.kind {
            GeneratorKind::Nexmark(EventType::Bid) => vec![
                int("auction"),
                int("bidder"),
                int("price"),
                text("channel"),
                text("url"),
                time("date_time"),
                text("extra"),
            ],
            GeneratorKind::Nexmark(EventType::Auction) => vec![
                int("id"),
                text("item_name"),
                text("description"),
                int("initial_bid"),
                int("reserve"),
                time("date_time"),
                time("expires"),
                int("seller"),
                int("category"),
                text("extra"),
            ],
            GeneratorKind::Nexmark(EventType::Person) => vec![
                int("id"),
                text("name"),
                text("email_address"),
                text("credit_card"),
                text("city"),
                text("state"),
                time("date_time"),
                text("extra"),
            ],
            GeneratorKind::Telemetry { .. } => vec![
                time("ts"),
                text("device_id"),
                Field::new("temperature", DataType::Float64, false),
                Field::new("vibration", DataType::Float64, false),
                Field::new("pressure", DataType::Float64, false),
                Field::new("anomaly", DataType::Boolean, false),
            ],
        };
        // Default watermarks: nexmark's date_time minus 4 seconds (as in Flink's Nexmark
        // setup), telemetry's ts minus 5 seconds; a WATERMARK clause replaces them.
        let (time_column, delay_ms) = match self.kind {
            GeneratorKind::Nexmark(_) => ("date_time", 4_000),
            GeneratorKind::Telemetry { .. } => ("ts", 5_000),
        };
        let fields = fields
            .into_iter()
            .map(|f| match f.name() == time_column {
                true => f.with_metadata([(crate::sql::WATERMARK_KEY.to_string(), delay_ms.to_string())].into()),
                false => f,
            })
            .collect::<Vec<_>>();
        Arc::new(Schema::new(fields))
    }

    /// Events per second of event time: `event_rate`, else the wall-clock rate when
    /// throttled, else 10,000.
    fn nexmark_event_rate(&self) -> usize {
        let rate = self.event_rate.unwrap_or(if self.rate > 0 { self.rate } else { 10_000 });
        usize::try_from(rate).unwrap_or(usize::MAX)
    }

    /// A generator positioned after `position` events.
    pub fn open(&self, position: u64) -> Generator {
        let events = match self.kind {
            GeneratorKind::Nexmark(kind) => {
                let config = nexmark::config::NexmarkConfig {
                    base_time: u64::try_from(self.base_time).unwrap_or(0),
                    first_rate: self.nexmark_event_rate(),
                    next_rate: self.nexmark_event_rate(),
                    ..Default::default()
                };
                Events::Nexmark(Box::new(NexmarkColumns::new(&config, kind)))
            }
            GeneratorKind::Telemetry { devices, seed, anomaly_rate } => {
                Events::Telemetry { devices, seed, anomaly_rate, base_time: self.base_time }
            }
        };
        Generator { schema: self.schema(), position, events }
    }
}

/// A running generator.
pub struct Generator {
    schema: SchemaRef,
    position: u64,
    events: Events,
}

/// Where a generator's events come from.
enum Events {
    /// Nexmark events are a pure function of the kind's offset, too.
    Nexmark(Box<NexmarkColumns>),
    /// Telemetry is a pure function of the event number.
    Telemetry { devices: u64, seed: u64, anomaly_rate: f64, base_time: i64 },
}

impl Generator {
    /// Events produced so far (the position to resume at).
    pub fn position(&self) -> u64 {
        self.position
    }

    pub fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    /// The next `n` events.
    pub fn next_batch(&mut self, n: usize) -> Result<RecordBatch> {
        let columns = match &mut self.events {
            Events::Nexmark(events) => events.columns(self.position, n)?,
            Events::Telemetry { devices, seed, anomaly_rate, base_time } => {
                telemetry_columns(self.position, n, *devices, *seed, *anomaly_rate, *base_time)
            }
        };
        self.position += n as u64;
        Ok(RecordBatch::try_new(self.schema.clone(), columns)?)
    }
}

/// A well-mixed 64-bit value from `x` (splitmix64's finalizer).
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// A uniform value in [0, 1) for draw `k` of event `n`.
fn uniform(seed: u64, n: u64, k: u64) -> f64 {
    (mix(seed ^ mix(n.wrapping_mul(8).wrapping_add(k))) >> 11) as f64 / (1u64 << 53) as f64
}

/// Event `n` is device `n % devices` at second `n / devices` after the base time.
fn telemetry_columns(
    start: u64,
    n: usize,
    devices: u64,
    seed: u64,
    anomaly_rate: f64,
    base_time: i64,
) -> Vec<ArrayRef> {
    let mut ts = TimestampMillisecondBuilder::with_capacity(n);
    let mut device = StringBuilder::new();
    let mut temperature = Float64Builder::with_capacity(n);
    let mut vibration = Float64Builder::with_capacity(n);
    let mut pressure = Float64Builder::with_capacity(n);
    let mut anomaly = BooleanBuilder::with_capacity(n);
    for event in start..start + n as u64 {
        let id = event % devices;
        let second = (event / devices) as i64;
        ts.append_value(base_time.saturating_add(second.saturating_mul(1000)));
        device.append_value(format!("dev-{id:05}"));
        // Each device has its own normal operating point; readings vary around it.
        let base_temp = 40.0 + 20.0 * uniform(seed, id, 100);
        let base_vibration = 0.5 + uniform(seed, id, 101);
        let abnormal = uniform(seed, event, 0) < anomaly_rate;
        let noise = |k| uniform(seed, event, k) - 0.5;
        let (t, v) = if abnormal {
            (base_temp + 25.0 + 10.0 * noise(1), base_vibration * 4.0 + noise(2))
        } else {
            (base_temp + 2.0 * noise(1), base_vibration + 0.1 * noise(2))
        };
        temperature.append_value((t * 100.0).round() / 100.0);
        vibration.append_value((v * 1000.0).round() / 1000.0);
        pressure.append_value(((101.3 + 0.5 * noise(3)) * 100.0).round() / 100.0);
        anomaly.append_value(abnormal);
    }
    vec![
        Arc::new(ts.finish()),
        Arc::new(device.finish()),
        Arc::new(temperature.finish()),
        Arc::new(vibration.finish()),
        Arc::new(pressure.finish()),
        Arc::new(anomaly.finish()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(options: &[(&str, &str)]) -> GeneratorSpec {
        let options: Options = options.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        GeneratorSpec::from_options(&options).expect("valid").expect("a generator")
    }

    #[test]
    fn a_generator_resumes_exactly_where_it_stopped() {
        for options in [
            vec![("connector", "nexmark"), ("kind", "bid"), ("base_time", "1700000000000")],
            vec![("connector", "nexmark"), ("kind", "person"), ("base_time", "1700000000000")],
            vec![("connector", "nexmark"), ("kind", "auction"), ("base_time", "1700000000000")],
            vec![("connector", "telemetry"), ("devices", "7"), ("base_time", "1700000000000")],
        ] {
            let spec = spec(&options);
            let whole = spec.open(0).next_batch(100).expect("rows");
            let mut first = spec.open(0);
            let head = first.next_batch(40).expect("rows");
            assert_eq!(first.position(), 40);
            let tail = spec.open(40).next_batch(60).expect("rows");
            assert_eq!(head, whole.slice(0, 40), "{options:?}");
            assert_eq!(tail, whole.slice(40, 60), "{options:?}: resuming at 40 gives the same events");
        }
    }

    #[test]
    fn telemetry_labels_about_the_requested_share_of_anomalies() {
        let spec = spec(&[("connector", "telemetry"), ("anomaly_rate", "0.1"), ("seed", "3")]);
        let batch = spec.open(0).next_batch(20_000).expect("rows");
        let labels = batch.column(5).as_any().downcast_ref::<datafusion::arrow::array::BooleanArray>().expect("bools");
        let share = labels.true_count() as f64 / 20_000.0;
        assert!((0.08..0.12).contains(&share), "{share}");
    }

    #[test]
    fn bad_options_are_named() {
        let options: Options =
            [("connector", "nexmark"), ("kind", "bids")].iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let err = GeneratorSpec::from_options(&options).expect_err("unknown kind");
        assert!(err.to_string().contains("bids"), "{err}");
        let options: Options =
            [("connector", "telemetry"), ("speed", "3")].iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let err = GeneratorSpec::from_options(&options).expect_err("unknown option");
        assert!(err.to_string().contains("speed"), "{err}");
    }
}

#[cfg(test)]
mod throughput {
    use super::*;

    /// CPU time this thread has used, in seconds (Linux: /proc/thread-self/schedstat).
    fn thread_cpu_seconds() -> f64 {
        let stat = std::fs::read_to_string("/proc/thread-self/schedstat").expect("linux schedstat");
        let ns: u64 = stat.split_whitespace().next().and_then(|v| v.parse().ok()).expect("run time in ns");
        ns as f64 / 1e9
    }

    /// Events per CPU-second over 2 CPU-seconds of `produce` making batches of 8192.
    fn events_per_cpu_second(mut produce: impl FnMut() -> usize) -> f64 {
        produce();
        let (start, mut events) = (thread_cpu_seconds(), 0);
        while thread_cpu_seconds() - start < 2.0 {
            events += produce();
        }
        events as f64 / (thread_cpu_seconds() - start)
    }

    /// Events per CPU-second of `next_batch(8192)` per kind, and of the nexmark crate's
    /// events turned into the same columns. Run with
    /// `cargo test --release --lib generator_throughput -- --ignored --nocapture`.
    #[test]
    #[ignore = "a measurement, not a check"]
    fn generator_throughput() {
        for kind in [EventType::Bid, EventType::Auction, EventType::Person] {
            let spec = GeneratorSpec {
                kind: GeneratorKind::Nexmark(kind),
                rate: 0,
                events: None,
                base_time: 1_700_000_000_000,
                event_rate: None,
            };
            let mut generator = spec.open(0);
            let ours = events_per_cpu_second(|| generator.next_batch(8192).expect("rows").num_rows());
            let config = nexmark::config::NexmarkConfig {
                base_time: 1_700_000_000_000,
                first_rate: 10_000,
                next_rate: 10_000,
                ..Default::default()
            };
            let mut offset = 0;
            let crates = events_per_cpu_second(|| {
                let columns = super::super::nexmark_columns::tests::crate_columns(config.clone(), kind, offset, 8192);
                offset += 8192;
                columns[0].len()
            });
            println!("{kind:?}: {:.2}M events per CPU-second (the crate's events: {:.2}M)", ours / 1e6, crates / 1e6);
        }
    }
}
