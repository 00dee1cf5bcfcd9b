//! Nexmark: the queries of `sql/nexmark/` measured the way other streaming engines report
//! them.
//!
//! `cargo bench --bench nexmark -- [--query q0,q5,…] [--events N] [--workers W] [--json FILE]
//! [--barrier-interval MS] [--checkpoint-interval MS|off] [--retention all|none] [--no-warm-up]
//! [--rounds R]` (the end-to-end server's barrier and checkpoint intervals, default the
//! server's, and the sources' retention, default `all`; `--no-warm-up` skips touching half
//! the machine's memory before the first measurement; `--rounds`, default 2, how many times
//! the engine alone and batch each run)
//!
//! For each query, in a fresh process of its own (so peak memory is the query's):
//! - **end to end, generator included**: an in-process server (durable, on a temporary data
//!   directory) with the three nexmark sources, unthrottled, producing N events in all
//!   (1 person, 3 auctions and 46 bids per 50 events), and the query as a materialized view;
//!   timed from the first `CREATE SOURCE` until the view has caught up with every event
//!   (`FLUSH`). Events per second and per CPU-second of the whole process, and its peak RSS.
//! - **engine alone**: the same N events generated first as Arrow batches in memory, then
//!   pushed through the view's operators inline on one thread (one worker), with a barrier
//!   every 100,000 events and the view's arrangement kept up to date: events per CPU-second.
//! - **batch**: DataFusion running the same query once over the same in-memory events, on
//!   one core (one partition): events per CPU-second. The ratio engine ÷ batch says how
//!   close incremental maintenance comes to recomputing once.
//!
//! The engine alone and batch run alternately, `--rounds` times each, and each side's
//! fastest round is its figure (the JSON also gives each side's first round).
//!
//! It also measures the generator alone (N events as Arrow batches, per CPU-second), the
//! ceiling for q0. Output: a table on stdout and, with `--json FILE`, one JSON object per
//! line per query. Queries whose file says freshet cannot run them are listed, not run.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use datafusion::arrow::datatypes::{Field, Schema, SchemaRef};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::datasource::MemTable;
use datafusion::prelude::{SessionConfig, SessionContext};
use freshet::catalog::table::{TableDef, TableState};
use freshet::catalog::{Database, Options};
use freshet::connectors::generator::{Generator, GeneratorSpec};
use freshet::dataflow::operators::{EpochSink, EventTimeOperator, LateCounter, MaterializeOperator};
use freshet::dataflow::{Barrier, ChangeBatch, Message, Operator, Output};
use freshet::server::{Config, Server};
use freshet::sql::Planned;
use freshet::sql::view::{Node, lower_view};
use serde_json::json;
use tokio_postgres::{NoTls, SimpleQueryMessage};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Event time starts here in every run, so runs are reproducible.
const BASE_TIME: u64 = 1_700_000_000_000;
/// Events per round of the in-memory stream: 200 people, 600 auctions, 9,200 bids.
const ROUND: u64 = 10_000;
/// Rounds between barriers when the engine runs alone (the server's barriers come every
/// 100 ms of wall time instead).
const ROUNDS_PER_BARRIER: u64 = 10;
const KINDS: [(&str, u64); 3] = [("person", 1), ("auction", 3), ("bid", 46)];

/// CPU seconds this process has used (user + system, all threads, exited ones included).
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage only writes the struct it is given.
    let usage = unsafe {
        let mut usage = std::mem::zeroed::<libc::rusage>();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

/// Peak resident memory of this process so far, in bytes (VmHWM).
fn peak_rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0);
    kib * 1024
}

/// Wall and CPU time of `work`.
struct Timed {
    seconds: f64,
    cpu_seconds: f64,
}

fn value_of(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned()
}

fn number(name: &str, default: u64) -> u64 {
    value_of(name).map_or(default, |v| v.replace('_', "").parse().unwrap_or_else(|_| panic!("{name} takes a number")))
}

/// The queries under sql/nexmark, in numeric order: (name, SQL, why it is not run).
fn queries() -> Vec<(String, String, Option<String>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("sql/nexmark");
    let mut found: Vec<(u32, String, String)> = std::fs::read_dir(&dir)
        .expect("sql/nexmark")
        .filter_map(|e| {
            let path = e.ok()?.path();
            let name = path.file_stem()?.to_str()?.to_string();
            let number = name.strip_prefix('q')?.parse().ok()?;
            (path.extension()? == "sql").then(|| (number, name, std::fs::read_to_string(&path).expect("query")))
        })
        .collect();
    found.sort();
    found
        .into_iter()
        .map(|(_, name, sql)| {
            let refused = sql.contains("freshet cannot run this query yet").then(|| {
                let reason = sql.lines().find(|l| l.contains("freshet cannot run")).unwrap_or_default();
                reason.trim_start_matches("--").trim().to_string()
            });
            (name, sql, refused)
        })
        .collect()
}

/// Events of the kind with `share` of every 50 among the first `events` events of the
/// stream: each 50 starts with its person, then its auctions, then its bids.
fn events_of(share: u64, events: u64) -> u64 {
    let before: u64 = KINDS.iter().take_while(|(_, s)| *s != share).map(|(_, s)| s).sum();
    events / 50 * share + (events % 50).saturating_sub(before).min(share)
}

fn generator(kind: &str, events: u64) -> GeneratorSpec {
    let options: freshet::connectors::Options = [
        ("connector", "nexmark".to_string()),
        ("kind", kind.to_string()),
        ("rate", "0".to_string()),
        ("events", events.to_string()),
        ("base_time", BASE_TIME.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    GeneratorSpec::from_options(&options).expect("generator options").expect("a generator")
}

/// The stream as Arrow batches, round by round: (kind, batch) in arrival order.
fn generate(events: u64) -> Vec<(&'static str, RecordBatch)> {
    let mut generators: Vec<(&str, u64, Generator)> =
        KINDS.iter().map(|&(kind, share)| (kind, share, generator(kind, events_of(share, events)).open(0))).collect();
    let mut out = Vec::new();
    let mut done = 0;
    while done < events {
        let round = ROUND.min(events - done);
        for (kind, share, generator) in &mut generators {
            let n = events_of(*share, done + round) - events_of(*share, done);
            if n > 0 {
                out.push((*kind, generator.next_batch(n as usize).expect("events")));
            }
        }
        done += round;
    }
    out
}

/// A view's operators with the leaves they read, run inline.
enum Driven {
    Table(String),
    EventTime {
        table: String,
        operator: EventTimeOperator,
    },
    Constant(Vec<RecordBatch>),
    Operator {
        operator: Box<dyn Operator>,
        inputs: Vec<Driven>,
    },
    /// A subtree several parents read (see `Node::Shared`): fed once per feed, its output
    /// handed to each of them.
    Shared(Rc<RefCell<SharedDriven>>),
}

/// A shared subtree, how many parents read it, and its output for the current feed until
/// every one of them has had it.
struct SharedDriven {
    node: Driven,
    readers: usize,
    served: usize,
    output: Vec<Message>,
}

/// What a leaf emits: rows of a table, or a constant relation's rows at the start.
enum Feed<'a> {
    Rows(&'a str, &'a RecordBatch),
    Constants,
    Barrier(&'a Barrier),
}

impl Driven {
    fn new(node: Node, shared: &mut HashMap<usize, Rc<RefCell<SharedDriven>>>) -> Driven {
        match node {
            Node::Table(table) => Driven::Table(table),
            Node::EventTime { table, column, delay_ms, units_per_ms } => {
                let late = Arc::new(LateCounter::new(table.clone(), "bench".into(), units_per_ms));
                let operator = EventTimeOperator::new(column, delay_ms.saturating_mul(units_per_ms), late);
                Driven::EventTime { table, operator }
            }
            Node::Constant { rows, .. } => Driven::Constant(rows),
            Node::Operator(operator, inputs) => {
                Driven::Operator { operator, inputs: inputs.into_iter().map(|n| Driven::new(n, shared)).collect() }
            }
            Node::Shared(subtree) => {
                if let Some(node) = subtree.take() {
                    let node = Driven::new(node, shared);
                    let driven = SharedDriven { node, readers: 0, served: 0, output: Vec::new() };
                    shared.insert(subtree.id, Rc::new(RefCell::new(driven)));
                }
                let driven = shared[&subtree.id].clone();
                driven.borrow_mut().readers += 1;
                Driven::Shared(driven)
            }
            Node::Parallel { .. } => panic!("one worker: stateful operators run as one instance"),
        }
    }

    /// Delivers `feed` to every leaf it concerns and returns what this node emits. A
    /// barrier reaches each input first, and its output reaches this node before the
    /// barrier does, as the runtime aligns barriers.
    async fn feed(&mut self, feed: &Feed<'_>) -> Vec<Message> {
        match (self, feed) {
            (Driven::Table(table), Feed::Rows(name, batch)) if table == name => {
                vec![Message::Data(ChangeBatch::inserts((*batch).clone()))]
            }
            (Driven::Constant(rows), Feed::Constants) => {
                std::mem::take(rows).into_iter().map(|b| Message::Data(ChangeBatch::inserts(b))).collect()
            }
            (Driven::EventTime { table, operator }, feed) => {
                let mut out = Output::default();
                match feed {
                    Feed::Rows(name, batch) if table == name => {
                        operator.process(0, ChangeBatch::inserts((*batch).clone()), &mut out).await.expect("rows");
                    }
                    Feed::Barrier(barrier) => operator.on_barrier(barrier, &mut out).await.expect("barrier"),
                    _ => {}
                }
                out.take_messages()
            }
            (Driven::Shared(shared), feed) => {
                if shared.borrow().served == 0 {
                    // Out of the cell while it runs, so no borrow is held across the feed.
                    let mut node = std::mem::replace(&mut shared.borrow_mut().node, Driven::Constant(Vec::new()));
                    let output = Box::pin(node.feed(feed)).await;
                    let mut driven = shared.borrow_mut();
                    driven.node = node;
                    driven.output = output;
                }
                let mut driven = shared.borrow_mut();
                driven.served += 1;
                let output = driven.output.clone();
                if driven.served == driven.readers {
                    driven.served = 0;
                    driven.output.clear();
                }
                output
            }
            (Driven::Operator { operator, inputs }, feed) => {
                let mut out = Output::default();
                for (port, input) in inputs.iter_mut().enumerate() {
                    for message in Box::pin(input.feed(feed)).await {
                        match message {
                            Message::Data(change) => operator.process(port, change, &mut out).await.expect("process"),
                            Message::Watermark(w) => {
                                operator.on_watermark(port, w, &mut out).await.expect("on_watermark")
                            }
                            Message::Barrier(_) => unreachable!("barriers are the driver's"),
                        }
                    }
                }
                if let Feed::Barrier(barrier) = feed {
                    operator.on_barrier(barrier, &mut out).await.expect("on_barrier");
                }
                out.take_messages()
            }
            _ => Vec::new(),
        }
    }
}

/// The view's arrangement, kept as the server keeps it.
struct Arrangement(Arc<std::sync::Mutex<TableState>>);

impl EpochSink for Arrangement {
    fn commit(&mut self, _barrier: &Barrier, parts: Vec<ChangeBatch>) -> freshet::error::Result<()> {
        self.0.lock().expect("arrangement").apply_all(&parts)
    }
}

/// Rows of the first column of a simple query's answer.
async fn first_column(client: &tokio_postgres::Client, sql: &str) -> Vec<String> {
    let messages = client.simple_query(sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
    messages
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(row) => Some(row.get(0).unwrap_or_default().to_string()),
            _ => None,
        })
        .collect()
}

/// The query as a view in a server fed by the three generators; returns the timings and
/// the view's row count.
async fn end_to_end(sql: &str, events: u64, workers: usize) -> (Timed, u64) {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = Config {
        data_dir: dir.path().to_path_buf(),
        pg_listen: "127.0.0.1:0".into(),
        http_listen: "127.0.0.1:0".into(),
        workers,
        barrier_interval: value_of("--barrier-interval").map_or(freshet::catalog::DEFAULT_BARRIER_INTERVAL, |ms| {
            Duration::from_millis(ms.parse().expect("--barrier-interval takes milliseconds"))
        }),
        checkpoint_interval: match value_of("--checkpoint-interval").as_deref() {
            None => Some(freshet::catalog::checkpoint::DEFAULT_CHECKPOINT_INTERVAL),
            Some("off") => None,
            Some(ms) => {
                Some(Duration::from_millis(ms.parse().expect("--checkpoint-interval takes milliseconds or off")))
            }
        },
        ..Config::default()
    };
    let server = Server::start(config).await.expect("server starts");
    let addr = server.pg_addr();
    let conn = format!("host={} port={} user=freshet dbname=freshet", addr.ip(), addr.port());
    let (client, connection) = tokio_postgres::connect(&conn, NoTls).await.expect("connects");
    tokio::spawn(connection);
    let (started, cpu) = (Instant::now(), cpu_seconds());
    let retention = value_of("--retention").unwrap_or_else(|| "all".into());
    for (kind, share) in KINDS {
        let n = events_of(share, events);
        client
            .batch_execute(&format!(
                "CREATE SOURCE {kind} WITH (connector = 'nexmark', kind = '{kind}', rate = '0', events = '{n}', base_time = '{BASE_TIME}', retention = '{retention}')"
            ))
            .await
            .expect("source");
    }
    client.batch_execute(&format!("CREATE MATERIALIZED VIEW q AS {sql}")).await.expect("the view");
    loop {
        let finished =
            first_column(&client, "SELECT source FROM freshet_catalog.source_progress WHERE status = 'finished'").await;
        if finished.len() == KINDS.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    client.batch_execute("FLUSH").await.expect("flush");
    let timed = Timed { seconds: started.elapsed().as_secs_f64(), cpu_seconds: cpu_seconds() - cpu };
    let rows = first_column(&client, "SELECT count(*) FROM q").await[0].parse().expect("count");
    drop(client);
    server.shutdown().await;
    (timed, rows)
}

/// The query's operators, run inline over `stream`; returns the CPU time and view rows.
async fn engine_alone(name: &str, sql: &str, events: u64, stream: &[(&'static str, RecordBatch)]) -> (Timed, u64) {
    let options = Options { workers: 1, ..Options::default() };
    let db = Database::open_with(Arc::new(object_store::memory::InMemory::new()), options).await.expect("database");
    for (kind, _) in KINDS {
        db.run(&format!(
            "CREATE SOURCE {kind} WITH (connector = 'nexmark', kind = '{kind}', rate = '0', events = '0', base_time = '{BASE_TIME}')"
        ))
        .await
        .expect("source");
    }
    let state = db.session_state();
    let Planned::CreateView(view) =
        freshet::sql::plan_view(&state, name.into(), false, sql).await.expect("the view plans")
    else {
        panic!("{name} plans as a view")
    };
    let root = lower_view(&state, &view.plan, view.emit_on_window_close).expect("the view lowers");
    // The view's arrangement as the server defines it: nullable columns, no watermark,
    // and no index when the view only gains rows.
    let fields: Vec<Field> =
        view.plan.schema().fields().iter().map(|f| Field::new(f.name(), f.data_type().clone(), true)).collect();
    let schema: SchemaRef = Arc::new(Schema::new(fields));
    let def = match freshet::sql::view::append_only(&view.plan) {
        true => TableDef::append_only(1, name.into(), schema.clone()),
        false => TableDef::new(1, name.into(), schema.clone(), vec![], vec![], HashMap::new()),
    };
    let def = Arc::new(def);
    let arrangement = Arc::new(std::sync::Mutex::new(TableState::new(def).expect("arrangement")));
    let materialize = MaterializeOperator::new(schema, Box::new(Arrangement(arrangement.clone())));
    let mut driven =
        Driven::Operator { operator: Box::new(materialize), inputs: vec![Driven::new(root, &mut HashMap::new())] };
    let (started, cpu) = (Instant::now(), cpu_seconds());
    driven.feed(&Feed::Constants).await;
    let mut epoch = 0;
    let mut done = 0;
    let mut next_barrier = ROUND * ROUNDS_PER_BARRIER;
    for (kind, batch) in stream {
        driven.feed(&Feed::Rows(kind, batch)).await;
        done += batch.num_rows() as u64;
        if done >= next_barrier || done == events {
            epoch += 1;
            let barrier = Barrier { epoch, checkpoint: false, mutation: None };
            driven.feed(&Feed::Barrier(&barrier)).await;
            next_barrier += ROUND * ROUNDS_PER_BARRIER;
        }
    }
    let timed = Timed { seconds: started.elapsed().as_secs_f64(), cpu_seconds: cpu_seconds() - cpu };
    let rows = arrangement
        .lock()
        .expect("arrangement")
        .version()
        .batches()
        .expect("rows")
        .iter()
        .map(|b| b.num_rows() as u64)
        .sum();
    (timed, rows)
}

/// The query run once by DataFusion over the in-memory stream on one partition; `None`
/// when DataFusion cannot plan it (SESSION windows are freshet's own).
async fn batch(sql: &str, stream: &[(&'static str, RecordBatch)]) -> Option<(Timed, u64)> {
    let mut config = SessionConfig::new().with_target_partitions(1);
    let options = config.options_mut();
    options.set("datafusion.sql_parser.dialect", "PostgreSQL").expect("dialect");
    options.set("datafusion.execution.time_zone", "+00:00").expect("time zone");
    let ctx = SessionContext::new_with_config(config);
    for (kind, share) in KINDS {
        let batches: Vec<RecordBatch> = stream.iter().filter(|(k, _)| *k == kind).map(|(_, b)| b.clone()).collect();
        let schema = generator(kind, share).schema();
        ctx.register_table(kind, Arc::new(MemTable::try_new(schema, vec![batches]).expect("table"))).expect("register");
    }
    let state = ctx.state();
    let (started, cpu) = (Instant::now(), cpu_seconds());
    let (plan, _) = freshet::sql::plan_query(&state, sql).await.ok()?;
    let plan = state.optimize(&plan).ok()?;
    let physical = state.create_physical_plan(&plan).await.ok()?;
    let batches = datafusion::physical_plan::collect(physical, state.task_ctx()).await.expect("batch query runs");
    let timed = Timed { seconds: started.elapsed().as_secs_f64(), cpu_seconds: cpu_seconds() - cpu };
    Some((timed, batches.iter().map(|b| b.num_rows() as u64).sum()))
}

/// The SQL of query `name` (as `queries` reads it).
fn query_sql(name: &str) -> String {
    let (_, sql, _) = queries().into_iter().find(|(n, _, _)| n == name).unwrap_or_else(|| panic!("no query {name}"));
    sql
}

/// One query, measured in this process: prints one JSON line.
async fn run_query(name: &str, events: u64, workers: usize) {
    let sql = query_sql(name);
    let (e2e, view_rows) = end_to_end(&sql, events, workers).await;
    let peak = peak_rss_bytes();
    let stream = generate(events);
    // The engine alone and batch, alternately, `--rounds` times each; each side's best
    // round counts (a first round also pays for faulting in fresh memory), and the first
    // rounds are reported as well.
    let mut engines = Vec::new();
    let mut batches = Vec::new();
    for _ in 0..number("--rounds", 2).max(1) {
        engines.push(engine_alone(name, &sql, events, &stream).await);
        batches.push(batch(&sql, &stream).await);
    }
    let best =
        |rounds: Vec<(Timed, u64)>| rounds.into_iter().min_by(|a, b| a.0.cpu_seconds.total_cmp(&b.0.cpu_seconds));
    let per_cpu = |t: &Timed| events as f64 / t.cpu_seconds.max(1e-6);
    let engine_first = per_cpu(&engines[0].0);
    let batch_first = batches[0].as_ref().map(|(t, _)| per_cpu(t));
    let (engine, engine_rows) = best(engines).expect("at least one round");
    let batch = best(batches.into_iter().collect::<Option<Vec<_>>>().unwrap_or_default());
    let engine_rate = per_cpu(&engine);
    let batch_rate = batch.as_ref().map(|(t, _)| per_cpu(t));
    let result = json!({
        "query": name,
        "events": events,
        "workers": workers,
        "seconds": e2e.seconds,
        "cpu_seconds": e2e.cpu_seconds,
        "events_per_second": events as f64 / e2e.seconds,
        "events_per_cpu_second": per_cpu(&e2e),
        "engine_events_per_cpu_second": engine_rate,
        "engine_seconds": engine.seconds,
        "engine_first_events_per_cpu_second": engine_first,
        "batch_first_events_per_cpu_second": batch_first,
        "batch_events_per_cpu_second": batch_rate,
        "engine_batch_ratio": batch_rate.map(|b| engine_rate / b),
        "peak_rss_bytes": peak,
        "view_rows": view_rows,
        "engine_view_rows": engine_rows,
        "batch_rows": batch.as_ref().map(|(_, rows)| rows),
    });
    println!("RESULT {result}");
}

/// The engine alone, `rounds` times over the same events, and nothing else: a process to
/// point a profiler at (`--child qN --engine-only R`). Prints the CPU time of each round.
async fn profile_engine(name: &str, events: u64, rounds: u64) {
    let sql = query_sql(name);
    let stream = generate(events);
    for round in 1..=rounds {
        let (engine, rows) = engine_alone(name, &sql, events, &stream).await;
        let rate = events as f64 / engine.cpu_seconds.max(1e-6);
        println!("round {round}: {:.3} CPU-s, {rate:.0} events per CPU-second, {rows} view rows", engine.cpu_seconds);
    }
}

/// The generator alone: N events as Arrow batches.
fn run_generator(events: u64) {
    let (started, cpu) = (Instant::now(), cpu_seconds());
    let stream = generate(events);
    let timed = Timed { seconds: started.elapsed().as_secs_f64(), cpu_seconds: cpu_seconds() - cpu };
    let generated: u64 = stream.iter().map(|(_, b)| b.num_rows() as u64).sum();
    assert_eq!(generated, events, "the generator produced every event");
    let result = json!({
        "query": "generator",
        "events": events,
        "seconds": timed.seconds,
        "events_per_second": events as f64 / timed.seconds,
        "events_per_cpu_second": events as f64 / timed.cpu_seconds.max(1e-6),
        "peak_rss_bytes": peak_rss_bytes(),
    });
    println!("RESULT {result}");
}

/// Touches half of the machine's memory once, then frees it (see `main`).
fn warm_up() {
    let total_kib: u64 = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines().find_map(|l| l.strip_prefix("MemTotal:").map(|v| v.trim().trim_end_matches(" kB").to_string()))
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(8 << 20);
    let chunks = (total_kib / 2) >> 20;
    let held: Vec<Vec<u8>> = (0..chunks).map(|_| std::hint::black_box(vec![1u8; 1 << 30])).collect();
    println!("RESULT {}", json!({ "query": "warm-up", "bytes": held.len() << 30 }));
}

/// Runs `--child what` in a process of its own and returns its result.
fn child(what: &str, events: u64, workers: usize) -> Option<serde_json::Value> {
    let exe = std::env::current_exe().expect("this bench's path");
    let mut command = std::process::Command::new(exe);
    command.args(["--child", what, "--events", &events.to_string(), "--workers", &workers.to_string()]);
    for option in ["--barrier-interval", "--checkpoint-interval", "--retention", "--rounds"] {
        if let Some(value) = value_of(option) {
            command.args([option, &value]);
        }
    }
    let output = command.stderr(std::process::Stdio::inherit()).output().expect("the bench runs itself");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout.lines().find_map(|l| l.strip_prefix("RESULT "));
    match line {
        Some(line) if output.status.success() => Some(serde_json::from_str(line).expect("a JSON result")),
        _ => {
            eprintln!("{what} failed ({}):\n{stdout}", output.status);
            None
        }
    }
}

fn main() {
    freshet::keep_freed_memory();
    let events = number("--events", 10_000_000);
    let workers = number("--workers", freshet::catalog::default_workers() as u64) as usize;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    if let Some(what) = value_of("--child") {
        match what.as_str() {
            "generator" => run_generator(events),
            "warm-up" => warm_up(),
            name if value_of("--engine-only").is_some() => {
                runtime.block_on(profile_engine(name, events, number("--engine-only", 1)))
            }
            name => runtime.block_on(run_query(name, events, workers)),
        }
        return;
    }
    let wanted: Option<Vec<String>> = value_of("--query").map(|q| q.split(',').map(|s| s.trim().to_string()).collect());
    let mut json_file = value_of("--json").map(|path| std::fs::File::create(path).expect("the --json file"));
    let mut emit = |value: &serde_json::Value| {
        if let Some(file) = &mut json_file {
            writeln!(file, "{value}").expect("write --json");
        }
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("nexmark: {events} events, {workers} worker(s), {cores} core(s); each query in a fresh process");
    // On a VM, memory the guest has not touched for a while (or ever) costs the
    // hypervisor's backing on first touch: on this project's machine a query whose process
    // touched such memory used 2-2.5x the CPU of the same run right after. A child that
    // touches half the machine's memory first keeps that cost off every query's figure.
    if !std::env::args().any(|a| a == "--no-warm-up") {
        let _ = child("warm-up", events, workers);
    }
    if let Some(generator) = child("generator", events, workers) {
        println!(
            "generator alone (Arrow batches): {:.0} events per CPU-second",
            generator["events_per_cpu_second"].as_f64().unwrap_or(0.0)
        );
        emit(&generator);
    }
    println!(
        "{:<5} {:>9} {:>13} {:>13} {:>13} {:>13} {:>7} {:>9}",
        "query", "seconds", "events/s", "ev/CPU-s", "engine/CPU-s", "batch/CPU-s", "ratio", "peak MiB"
    );
    for (name, _, refused) in queries() {
        if wanted.as_ref().is_some_and(|w| !w.contains(&name)) {
            continue;
        }
        if let Some(reason) = refused {
            println!("{name:<5} not run: {reason}");
            continue;
        }
        let Some(result) = child(&name, events, workers) else {
            println!("{name:<5} failed (see above)");
            continue;
        };
        let f = |key: &str| result[key].as_f64();
        let or_na = |v: Option<f64>, digits: usize| v.map_or("n/a".to_string(), |v| format!("{v:.digits$}"));
        println!(
            "{name:<5} {:>9.2} {:>13.0} {:>13.0} {:>13.0} {:>13} {:>7} {:>9.0}",
            f("seconds").unwrap_or(0.0),
            f("events_per_second").unwrap_or(0.0),
            f("events_per_cpu_second").unwrap_or(0.0),
            f("engine_events_per_cpu_second").unwrap_or(0.0),
            or_na(f("batch_events_per_cpu_second"), 0),
            or_na(f("engine_batch_ratio"), 3),
            f("peak_rss_bytes").unwrap_or(0.0) / (1024.0 * 1024.0),
        );
        let (view, engine, batch) = (&result["view_rows"], &result["engine_view_rows"], &result["batch_rows"]);
        if view != engine || (!batch.is_null() && view != batch) {
            println!("      rows differ: view {view}, engine alone {engine}, batch {batch}");
        }
        emit(&result);
    }
}
