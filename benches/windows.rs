//! Event-time windows at the operator level: a one-minute tumbling GROUP BY over a
//! telemetry stream, planned and lowered the way freshet builds a view (DataFusion plan,
//! `freshet::sql::view::lower`, an `EventTimeOperator` at the leaf and, for EMIT ON WINDOW
//! CLOSE, an `EmitOnCloseOperator` at the root), driven inline on one task: figures are
//! per core, with no server, log or channels.
//!
//!     cargo bench --bench windows -- [--events N] [--rate R] [--devices D] [--batch B]
//!                                    [--barrier-batches K] [--check-events N]
//!
//! The stream is `readings (ts TIMESTAMP(3), device_id BIGINT, temperature DOUBLE)` with a
//! watermark 5 s behind the greatest event time seen. Events come in event-time order at
//! `--rate` (10,000) per simulated second from `--devices` (1,000) devices, in batches of
//! `--batch` (8192) rows; most are 0–50 ms out of order, 1 in 100 up to 3 s (still inside
//! the delay), and 1 in 10,000 is 10 s behind (late: dropped and counted). A barrier follows
//! every `--barrier-batches` (10) batches.
//!
//! First a correctness check on `--check-events` (2M) events: each variant's output against
//! DataFusion running the query as a batch over the rows the event-time operator kept. Then
//! each variant in a fresh process of its own (so resident memory is its own):
//! - EMIT ON WINDOW CLOSE: events/s, windows emitted, late rows, and resident memory every
//!   1M events; after five simulated minutes its peak over the second half must stay
//!   within 10% of its peak over the first half (PASS/FAIL is printed, not asserted).
//! - Updates as events arrive (no EMIT clause; closed groups are still freed): events/s and
//!   final resident memory.
//!
//! Rates leave out generating the input, which is timed on its own: "wall" is wall time
//! spent in the operators, "per CPU-second" is the process's CPU time less the generation
//! time (everything runs on one thread).

use std::sync::Arc;
use std::time::{Duration, Instant};

use datafusion::arrow::array::{Array, Float64Array, Int64Array, TimestampMillisecondArray};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::datasource::MemTable;
use datafusion::prelude::{SessionConfig, SessionContext};
use freshet::dataflow::operators::{EmitOnCloseOperator, EventTimeOperator, LateCounter};
use freshet::dataflow::{Barrier, ChangeBatch, Message, Operator, Output};
use freshet::sql::view::{Node, lower_view, watermarked};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The view's query (without its EMIT clause).
const QUERY: &str = "SELECT device_id, window_start, window_end, count(*) AS n, avg(temperature) AS mean, \
     max(temperature) AS hottest FROM TUMBLE(readings, ts, INTERVAL '1 minute') GROUP BY device_id, window_start, window_end";
/// The same answer as a batch query, written without the window function.
const REFERENCE: &str = "SELECT device_id, date_bin(INTERVAL '1 minute', ts) AS window_start, count(*), \
     avg(temperature), max(temperature) FROM readings GROUP BY 1, 2";
const WINDOW_MS: i64 = 60_000;
const DELAY_MS: i64 = 5_000;
/// 2024-01-01 00:00:17 UTC: the first window is a partial one.
const START_MS: i64 = 1_704_067_217_000;
/// One event in this many is late.
const LATE_EVERY: u64 = 10_000;
const LATE_BY_MS: i64 = 10_000;
const SAMPLE_EVERY: u64 = 1_000_000;
/// Resident memory is judged from this much simulated time on.
const WARM_UP_MS: u64 = 5 * 60_000;

/// CPU seconds this process has used (user + system).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which is in parentheses): utime is the 12th, stime the 13th.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// Resident memory of this process in MiB (VmRSS).
fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .unwrap_or(0.0);
    kib / 1024.0
}

fn argument(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse().unwrap_or_else(|_| panic!("{name} takes a number")))
        .unwrap_or(default)
}

#[derive(Clone, Copy)]
struct Settings {
    events: u64,
    rate: u64,
    devices: u64,
    batch: u64,
    barrier_batches: u64,
}

/// `readings`, with the watermark on `ts` as `WATERMARK FOR ts AS ts - INTERVAL '5 seconds'`
/// records it.
fn readings_schema() -> SchemaRef {
    let watermark = [(freshet::sql::WATERMARK_KEY.to_string(), DELAY_MS.to_string())].into_iter().collect();
    Arc::new(Schema::new(vec![
        Field::new("ts", DataType::Timestamp(TimeUnit::Millisecond, None), true).with_metadata(watermark),
        Field::new("device_id", DataType::Int64, true),
        Field::new("temperature", DataType::Float64, true),
    ]))
}

/// A session configured like freshet's, with one worker so stateful operators are not
/// split behind an exchange.
fn session(readings: Vec<RecordBatch>) -> SessionContext {
    let mut config = SessionConfig::new().with_target_partitions(1);
    config.options_mut().set("datafusion.execution.time_zone", "+00:00").expect("time zone option");
    let ctx = SessionContext::new_with_config(config);
    let table = MemTable::try_new(readings_schema(), vec![readings]).expect("readings table");
    ctx.register_table("readings", Arc::new(table)).expect("readings registered");
    ctx
}

/// A view's operators, from the event-time leaf up to the root, run inline.
struct Pipeline {
    operators: Vec<Box<dyn Operator>>,
    epoch: u64,
    /// What the event-time operator let through, kept for the check only.
    kept: Option<Vec<RecordBatch>>,
}

impl Pipeline {
    /// Delivers `messages` to operator `level`, what it emits to the next, and so on;
    /// returns what the root emitted.
    async fn deliver(&mut self, level: usize, mut messages: Vec<Message>) -> Vec<Message> {
        for (i, operator) in self.operators.iter_mut().enumerate().skip(level) {
            let mut out = Output::default();
            for message in messages {
                match message {
                    Message::Data(change) => operator.process(0, change, &mut out).await.expect("process"),
                    Message::Watermark(w) => operator.on_watermark(0, w, &mut out).await.expect("on_watermark"),
                    Message::Barrier(_) => panic!("operators emit no barriers; the driver sends them"),
                }
            }
            messages = out.take_messages();
            if i == 0
                && let Some(kept) = &mut self.kept
            {
                kept.extend(messages.iter().filter_map(|m| match m {
                    Message::Data(change) => Some(change.batch().clone()),
                    _ => None,
                }));
            }
        }
        messages
    }

    async fn push(&mut self, batch: RecordBatch) -> Vec<Message> {
        self.deliver(0, vec![Message::Data(ChangeBatch::inserts(batch))]).await
    }

    /// A barrier through every operator in order, as the runtime aligns it: each operator's
    /// barrier output reaches the operators above before their own barrier.
    async fn barrier(&mut self) -> Vec<Message> {
        self.epoch += 1;
        let barrier = Barrier { epoch: self.epoch, checkpoint: false, mutation: None };
        let mut root = Vec::new();
        for level in 0..self.operators.len() {
            let mut out = Output::default();
            self.operators[level].on_barrier(&barrier, &mut out).await.expect("on_barrier");
            let messages = out.take_messages();
            root.extend(self.deliver(level + 1, messages).await);
        }
        root
    }
}

/// A planned view: its operators and where to read its output.
struct View {
    pipeline: Pipeline,
    late: Arc<LateCounter>,
    description: String,
    /// Output columns: window_start (the column watermarks close), and count(*).
    window_start: usize,
    count: usize,
    /// Units of window_start per millisecond.
    units_per_ms: i64,
}

/// Plans, optimises and lowers the query as `CREATE MATERIALIZED VIEW` does.
async fn build(emit_on_close: bool) -> View {
    let ctx = session(Vec::new());
    let state = ctx.state();
    let (plan, _) = freshet::sql::plan_query(&state, QUERY).await.expect("the query plans");
    let plan = state.optimize(&plan).expect("the plan optimises");
    let mut root = lower_view(&state, &plan, false).expect("the plan lowers to operators");
    let window_start = watermarked(&plan).iter().position(|w| *w).expect("window_start carries a watermark");
    let output: SchemaRef = Arc::new(plan.schema().as_arrow().clone());
    if emit_on_close {
        let operator = EmitOnCloseOperator::new(window_start, output.clone()).expect("emit on close");
        root = Node::Operator(Box::new(operator), vec![root]);
    }
    let description = root.describe();
    let mut operators = Vec::new();
    let late = flatten(root, &mut operators);
    let units_per_ms = match output.field(window_start).data_type() {
        DataType::Timestamp(TimeUnit::Microsecond, _) => 1_000,
        DataType::Timestamp(TimeUnit::Nanosecond, _) => 1_000_000,
        _ => 1,
    };
    View {
        pipeline: Pipeline { operators, epoch: 0, kept: None },
        late,
        description,
        window_start,
        count: output.index_of("n").expect("count column"),
        units_per_ms,
    }
}

/// Appends the operators of a one-input tree from the leaf up (the leaf becomes the
/// `EventTimeOperator` the view's runtime would start) and returns its late-row counter.
fn flatten(node: Node, operators: &mut Vec<Box<dyn Operator>>) -> Arc<LateCounter> {
    match node {
        Node::EventTime { table, column, delay_ms, units_per_ms } => {
            let late = Arc::new(LateCounter::new(table, "bench".into(), units_per_ms));
            let operator = EventTimeOperator::new(column, delay_ms.saturating_mul(units_per_ms), late.clone());
            operators.push(Box::new(operator));
            late
        }
        Node::Operator(operator, inputs) => {
            let Ok([input]) = <[Node; 1]>::try_from(inputs) else {
                panic!("{} has several inputs; the bench drives a chain", operator.name())
            };
            let late = flatten(input, operators);
            operators.push(operator);
            late
        }
        Node::Table(name) => panic!("{name} lowered without its event-time operator"),
        Node::Constant { what, .. } => panic!("{what}: the bench drives a chain over one source"),
        Node::Parallel { .. } => panic!("a parallel operator: the session must have target_partitions = 1"),
        Node::Shared(_) => panic!("a shared subtree: the bench drives a chain"),
    }
}

/// A window the aggregate still holds (by the bench's own bookkeeping).
struct OpenWindow {
    start: i64,
    rows: u64,
    /// One bit per device with a row in the window.
    devices: Vec<u64>,
}

/// The telemetry stream, with a record of which windows hold which rows.
struct Generator {
    schema: SchemaRef,
    rate: u64,
    devices: u64,
    /// Events generated so far.
    next: u64,
    state: u64,
    /// Rows generated late (the event-time operator must drop exactly these).
    late: u64,
    /// Windows not yet closed, with the rows and devices they hold.
    open: Vec<OpenWindow>,
}

impl Generator {
    fn new(settings: Settings) -> Self {
        Generator {
            schema: readings_schema(),
            rate: settings.rate,
            devices: settings.devices,
            next: 0,
            state: 0x5eed,
            late: 0,
            open: Vec::new(),
        }
    }

    /// splitmix64.
    fn random(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn batch(&mut self, rows: usize) -> RecordBatch {
        let mut times = Vec::with_capacity(rows);
        let mut devices = Vec::with_capacity(rows);
        let mut temperatures = Vec::with_capacity(rows);
        for _ in 0..rows {
            let i = self.next;
            self.next += 1;
            let on_time = START_MS + (i * 1000 / self.rate) as i64;
            let r = self.random();
            let device = (r % self.devices) as i64;
            let jitter = (if (r >> 20).is_multiple_of(100) { (r >> 32) % 3_001 } else { (r >> 32) % 51 }) as i64;
            let late = i % LATE_EVERY == LATE_EVERY / 2;
            let time = on_time - jitter - if late { LATE_BY_MS } else { 0 };
            if late {
                self.late += 1;
            } else {
                self.record(time, device);
            }
            times.push(time);
            devices.push(device);
            temperatures.push(15.0 + (device % 20) as f64 + ((r >> 44) % 1000) as f64 / 100.0);
        }
        let columns: Vec<Arc<dyn Array>> = vec![
            Arc::new(TimestampMillisecondArray::from(times)),
            Arc::new(Int64Array::from(devices)),
            Arc::new(Float64Array::from(temperatures)),
        ];
        RecordBatch::try_new(self.schema.clone(), columns).expect("a readings batch")
    }

    fn record(&mut self, time: i64, device: i64) {
        let start = time - time.rem_euclid(WINDOW_MS);
        let index = match self.open.iter().rposition(|w| w.start == start) {
            Some(index) => index,
            None => {
                let words = self.devices.div_ceil(64) as usize;
                self.open.push(OpenWindow { start, rows: 0, devices: vec![0; words] });
                self.open.len() - 1
            }
        };
        let window = &mut self.open[index];
        window.rows += 1;
        window.devices[device as usize / 64] |= 1 << (device % 64);
    }

    /// The aggregate frees the groups of windows starting before `watermark_ms`.
    fn close(&mut self, watermark_ms: i64) {
        self.open.retain(|w| w.start >= watermark_ms);
    }

    /// Groups (device, window) the aggregate holds.
    fn open_groups(&self) -> u64 {
        self.open.iter().flat_map(|w| &w.devices).map(|bits| u64::from(bits.count_ones())).sum()
    }

    fn open_rows(&self) -> u64 {
        self.open.iter().map(|w| w.rows).sum()
    }
}

/// What the view's root emitted.
#[derive(Default)]
struct Totals {
    /// Rows inserted (for EMIT ON WINDOW CLOSE: windows emitted).
    inserted: u64,
    retracted: u64,
    /// Σ weight × count(*): the rows counted by the output as it stands.
    counted: i64,
    /// The latest watermark on window_start, in milliseconds.
    watermark_ms: Option<i64>,
}

impl Totals {
    fn absorb(&mut self, messages: Vec<Message>, view: &View, generator: &mut Generator) {
        for message in messages {
            match message {
                Message::Data(change) => {
                    let counts = change.batch().column(view.count).as_any().downcast_ref::<Int64Array>();
                    let counts = counts.expect("count(*) is BIGINT");
                    for (weight, count) in change.weights().values().iter().zip(counts.values().iter()) {
                        if *weight > 0 {
                            self.inserted += *weight as u64;
                        } else {
                            self.retracted += weight.unsigned_abs();
                        }
                        self.counted += weight * count;
                    }
                }
                Message::Watermark(w) if w.column == view.window_start => {
                    let ms = w.value.div_euclid(view.units_per_ms);
                    self.watermark_ms = Some(ms);
                    generator.close(ms);
                }
                _ => {}
            }
        }
    }
}

/// (device_id, window_start in ms) → (count, avg, max).
type Answer = std::collections::HashMap<(i64, i64), (i64, f64, f64)>;

/// The answer that result rows with weights add up to; their columns are at `columns`
/// (device, window_start, count, avg, max). A row whose net weight is not 0 or 1, or two
/// rows for one window, are reported in `problems`.
fn answer(batches: &[(RecordBatch, Vec<i64>)], columns: [usize; 5], problems: &mut Vec<String>) -> Answer {
    let mut net: std::collections::HashMap<(i64, i64, i64, u64, u64), i64> = Default::default();
    for (batch, weights) in batches {
        let ints = |i: usize, via: &DataType| {
            let column = cast(batch.column(i), via).and_then(|c| cast(&c, &DataType::Int64)).expect("integers");
            column.as_any().downcast_ref::<Int64Array>().expect("Int64").clone()
        };
        let floats = |i: usize| {
            let column = cast(batch.column(i), &DataType::Float64).expect("floats");
            column.as_any().downcast_ref::<Float64Array>().expect("Float64").clone()
        };
        let device = ints(columns[0], &DataType::Int64);
        let start = ints(columns[1], &DataType::Timestamp(TimeUnit::Millisecond, None));
        let count = ints(columns[2], &DataType::Int64);
        let (mean, hottest) = (floats(columns[3]), floats(columns[4]));
        for (row, weight) in weights.iter().enumerate() {
            let key = (
                device.value(row),
                start.value(row),
                count.value(row),
                mean.value(row).to_bits(),
                hottest.value(row).to_bits(),
            );
            *net.entry(key).or_default() += weight;
        }
    }
    let mut answer = Answer::new();
    for ((device, start, count, mean, hottest), weight) in net {
        match weight {
            0 => {}
            1 => {
                if answer.insert((device, start), (count, f64::from_bits(mean), f64::from_bits(hottest))).is_some() {
                    problems.push(format!("device {device} window {start}: two rows"));
                }
            }
            w => problems.push(format!("device {device} window {start}: a row with net weight {w}")),
        }
    }
    answer
}

/// Compares `actual` with `expected` on the windows `expected` holds.
fn compare(actual: &Answer, expected: &Answer, problems: &mut Vec<String>) {
    for (key, (count, mean, hottest)) in expected {
        match actual.get(key) {
            None => problems.push(format!("device {} window {}: missing", key.0, key.1)),
            Some((c, m, h)) => {
                if c != count || (m - mean).abs() > 1e-9 * mean.abs().max(1.0) || h != hottest {
                    problems.push(format!(
                        "device {} window {}: ({c}, {m}, {h}), DataFusion says ({count}, {mean}, {hottest})",
                        key.0, key.1
                    ));
                }
            }
        }
    }
    for key in actual.keys().filter(|k| !expected.contains_key(k)) {
        problems.push(format!("device {} window {}: not in DataFusion's answer", key.0, key.1));
    }
}

/// Runs `events` events through both variants and compares their output with DataFusion's
/// batch answer over the rows kept; returns whether everything matched.
async fn check(settings: Settings) -> bool {
    let mut ok = true;
    for emit_on_close in [true, false] {
        let mut view = build(emit_on_close).await;
        view.pipeline.kept = Some(Vec::new());
        let mut generator = Generator::new(settings);
        let mut totals = Totals::default();
        let mut output = Vec::new();
        let mut batches = 0;
        while generator.next < settings.events {
            let rows = settings.batch.min(settings.events - generator.next) as usize;
            let batch = generator.batch(rows);
            let mut messages = view.pipeline.push(batch).await;
            batches += 1;
            if batches % settings.barrier_batches == 0 {
                messages.extend(view.pipeline.barrier().await);
            }
            output.extend(messages.iter().filter_map(|m| match m {
                Message::Data(change) => Some((change.batch().clone(), change.weights().values().to_vec())),
                _ => None,
            }));
            totals.absorb(messages, &view, &mut generator);
        }
        let messages = view.pipeline.barrier().await;
        output.extend(messages.iter().filter_map(|m| match m {
            Message::Data(change) => Some((change.batch().clone(), change.weights().values().to_vec())),
            _ => None,
        }));
        totals.absorb(messages, &view, &mut generator);

        let mut problems = Vec::new();
        let late = view.late.rows();
        if late != generator.late {
            problems.push(format!("{late} rows dropped as late, {} generated late", generator.late));
        }
        let kept_batches = view.pipeline.kept.take().unwrap_or_default();
        let kept: u64 = kept_batches.iter().map(|b| b.num_rows() as u64).sum();
        if kept != settings.events - late {
            problems.push(format!("{kept} rows kept of {} events with {late} late", settings.events));
        }
        let ctx = session(kept_batches);
        let reference = ctx.sql(REFERENCE).await.expect("the reference query plans");
        let reference = reference.collect().await.expect("the reference query runs");
        let reference: Vec<_> = reference
            .into_iter()
            .map(|b| {
                let rows = b.num_rows();
                (b, vec![1; rows])
            })
            .collect();
        let expected = answer(&reference, [0, 1, 2, 3, 4], &mut problems);
        let actual = answer(&output, [0, view.window_start, view.count, view.count + 1, view.count + 2], &mut problems);
        let closed_before = totals.watermark_ms.unwrap_or(i64::MIN);
        let variant = if emit_on_close {
            // Only closed windows are out, each once; the rest are still open.
            if totals.retracted > 0 {
                problems.push(format!("{} retractions out of EMIT ON WINDOW CLOSE", totals.retracted));
            }
            let closed: Answer = expected.iter().filter(|(k, _)| k.1 < closed_before).map(|(k, v)| (*k, *v)).collect();
            compare(&actual, &closed, &mut problems);
            let open_rows: i64 = expected.iter().filter(|(k, _)| k.1 >= closed_before).map(|(_, v)| v.0).sum();
            if open_rows as u64 != generator.open_rows() {
                problems.push(format!("{open_rows} rows in open windows, the bench counted {}", generator.open_rows()));
            }
            if totals.counted + open_rows != kept as i64 {
                problems.push(format!("emitted counts {} + open rows {open_rows} != {kept} kept", totals.counted));
            }
            format!(
                "EMIT ON WINDOW CLOSE: {} windows emitted (all closed windows; {} still open hold {open_rows} rows)",
                actual.len(),
                expected.len() - closed.len()
            )
        } else {
            compare(&actual, &expected, &mut problems);
            if totals.counted != kept as i64 {
                problems.push(format!("Σ weight × count = {} != {kept} kept", totals.counted));
            }
            format!(
                "updates: {} windows as of the last barrier, {} rows in and {} retracted",
                actual.len(),
                totals.inserted,
                totals.retracted
            )
        };
        if problems.is_empty() {
            println!(
                "check OK ({} events, {late} late, {kept} kept) {variant}; every window equals DataFusion's batch answer",
                settings.events
            );
        } else {
            ok = false;
            println!("check FAILED ({} events) {variant}: {} problems", settings.events, problems.len());
            for problem in problems.iter().take(20) {
                println!("  {problem}");
            }
        }
    }
    ok
}

struct Sample {
    events: u64,
    rss: f64,
}

/// One variant, timed, with resident memory sampled every 1M events.
async fn timed(emit_on_close: bool, settings: Settings) {
    let name = if emit_on_close { "EMIT ON WINDOW CLOSE" } else { "updates as events arrive" };
    let mut view = build(emit_on_close).await;
    println!("\n== {name}: {} events ==\n{}", settings.events, view.description.trim_end());
    let mut generator = Generator::new(settings);
    let mut totals = Totals::default();
    let mut samples = Vec::new();
    let mut next_sample = SAMPLE_EVERY;
    let mut generating = Duration::ZERO;
    let mut batches = 0;
    if emit_on_close {
        println!("{:>12} {:>9} {:>12} {:>10} {:>12}", "events", "RSS MiB", "open groups", "elapsed s", "simulated");
    }
    let started = Instant::now();
    let cpu_before = cpu_seconds();
    while generator.next < settings.events {
        let clock = Instant::now();
        let rows = settings.batch.min(settings.events - generator.next) as usize;
        let batch = generator.batch(rows);
        generating += clock.elapsed();
        let messages = view.pipeline.push(batch).await;
        totals.absorb(messages, &view, &mut generator);
        batches += 1;
        if batches % settings.barrier_batches == 0 {
            let messages = view.pipeline.barrier().await;
            totals.absorb(messages, &view, &mut generator);
        }
        if generator.next >= next_sample {
            next_sample += SAMPLE_EVERY;
            let sample = Sample { events: generator.next, rss: rss_mib() };
            if emit_on_close {
                let simulated = generator.next * 1000 / settings.rate / 1000;
                println!(
                    "{:>12} {:>9.1} {:>12} {:>10.1} {:>9}m{:02}s",
                    sample.events,
                    sample.rss,
                    generator.open_groups(),
                    started.elapsed().as_secs_f64(),
                    simulated / 60,
                    simulated % 60
                );
            }
            samples.push(sample);
        }
    }
    let messages = view.pipeline.barrier().await;
    totals.absorb(messages, &view, &mut generator);
    let elapsed = started.elapsed();
    let cpu = cpu_seconds() - cpu_before;
    let operating = (elapsed - generating).as_secs_f64();
    let events = settings.events as f64;
    let late = view.late.rows();
    let kept = settings.events - late;
    println!(
        "{name}: {:.0} events/s wall, {:.0} events per CPU-second (operators {operating:.1}s wall, {:.1} CPU-s; generating the input {:.1}s more)",
        events / operating,
        events / (cpu - generating.as_secs_f64()).max(1e-9),
        cpu - generating.as_secs_f64(),
        generating.as_secs_f64()
    );
    let open_rows = generator.open_rows() as i64;
    if emit_on_close {
        let consistent = totals.counted + open_rows == kept as i64 && late == generator.late;
        println!(
            "{name}: {} windows emitted, {late} late rows dropped ({} generated late); emitted counts {} + {open_rows} rows in open windows = {} vs {kept} kept: {}",
            totals.inserted,
            generator.late,
            totals.counted,
            totals.counted + open_rows,
            if consistent { "consistent" } else { "INCONSISTENT" }
        );
        judge_memory(&samples, settings);
    } else {
        let consistent = totals.counted == kept as i64 && late == generator.late;
        println!(
            "{name}: {} rows inserted and {} retracted at the root, {late} late rows; Σ weight × count = {} vs {kept} kept: {}",
            totals.inserted,
            totals.retracted,
            totals.counted,
            if consistent { "consistent" } else { "INCONSISTENT" }
        );
        let peak = samples.iter().map(|s| s.rss).fold(0.0, f64::max);
        println!("{name}: final RSS {:.1} MiB (peak sample {peak:.1} MiB)", rss_mib());
    }
}

/// Resident memory over the second half of the run against the first half after warm-up.
/// RSS rises and falls within each window (groups fill, then close), so single samples
/// swing; growth shows as a higher peak, which must stay within 10% of the first half's.
fn judge_memory(samples: &[Sample], settings: Settings) {
    let warm = WARM_UP_MS * settings.rate / 1000;
    let half = settings.events / 2;
    let first: Vec<f64> = samples.iter().filter(|s| s.events >= warm && s.events <= half).map(|s| s.rss).collect();
    let second: Vec<f64> = samples.iter().filter(|s| s.events > half && s.events >= warm).map(|s| s.rss).collect();
    if first.is_empty() || second.is_empty() {
        println!(
            "memory: n/a (the run is too short for samples after {} simulated minutes in both halves)",
            WARM_UP_MS / 60_000
        );
        return;
    }
    let stats = |rss: &[f64]| {
        let (low, high) = rss.iter().fold((f64::MAX, 0.0f64), |(l, h), r| (l.min(*r), h.max(*r)));
        (low, high, rss.iter().sum::<f64>() / rss.len() as f64)
    };
    let (low1, high1, mean1) = stats(&first);
    let (low2, high2, mean2) = stats(&second);
    let within = high2 <= high1 * 1.10;
    println!(
        "memory: after warm-up, first half ({} samples) min {low1:.1} / mean {mean1:.1} / max {high1:.1} MiB; second half ({} samples) min {low2:.1} / mean {mean2:.1} / max {high2:.1} MiB; peak {:+.1}%, mean {:+.1}%: {}",
        first.len(),
        second.len(),
        (high2 / high1 - 1.0) * 100.0,
        (mean2 / mean1 - 1.0) * 100.0,
        if within { "PASS (peak within 10%)" } else { "FAIL (peak grew beyond 10%)" }
    );
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let settings = Settings {
        events: argument("--events", 100_000_000),
        rate: argument("--rate", 10_000),
        devices: argument("--devices", 1_000),
        batch: argument("--batch", 8192),
        barrier_batches: argument("--barrier-batches", 10).max(1),
    };
    let args: Vec<String> = std::env::args().collect();
    match args.iter().position(|a| a == "--variant").and_then(|i| args.get(i + 1)).map(String::as_str) {
        Some("close") => return timed(true, settings).await,
        Some("updates") => return timed(false, settings).await,
        Some(other) => panic!("--variant takes close or updates, not {other}"),
        None => {}
    }
    println!(
        "{} devices, {} events per simulated second, batches of {} rows, a barrier every {} batches ({:.1} simulated s)",
        settings.devices,
        settings.rate,
        settings.batch,
        settings.barrier_batches,
        (settings.batch * settings.barrier_batches) as f64 / settings.rate as f64
    );
    let check_events = argument("--check-events", 2_000_000);
    if !check(Settings { events: check_events, ..settings }).await {
        println!("the operators gave a wrong answer: not timing them");
        std::process::exit(1);
    }
    // Each variant in a process of its own, so resident memory is its own.
    let program = std::env::current_exe().expect("the bench's own path");
    for variant in ["close", "updates"] {
        let status = std::process::Command::new(&program)
            .args(args.iter().skip(1))
            .args(["--variant", variant])
            .status()
            .expect("the bench runs a variant");
        if !status.success() {
            println!("variant {variant} failed: {status}");
        }
    }
}
