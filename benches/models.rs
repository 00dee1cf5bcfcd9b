//! Scoring throughput.
//!
//! - `score()` itself: a kmeans model with k = 8 over 4 features, called as the DataFusion
//!   function on 8,192-row batches of `double precision` arrays, on the bench's one thread
//!   (so the figure is per core). Includes the per-batch model lookup and the NULL check.
//! - An ad-hoc query `SELECT count(*) … WHERE score(…) > x` over a 4-million-row table.
//! - A materialized view applying the model to the telemetry stream: the source is filled
//!   first, then the view is created and its backfill (the same operators live events go
//!   through) is timed, on a single-threaded runtime (per core).
//!
//! Run with `cargo bench --bench models` (`--quick` for a short smoke run).

use std::sync::Arc;
use std::time::{Duration, Instant};

use datafusion::arrow::array::{ArrayRef, Float64Array};
use datafusion::arrow::datatypes::{DataType, Field};
use datafusion::common::ScalarValue;
use datafusion::common::config::ConfigOptions;
use datafusion::logical_expr::{ColumnarValue, ScalarFunctionArgs};
use freshet::catalog::{Database, Options, Outcome};
use futures::TryStreamExt;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const BATCH: usize = 8192;

async fn open(dir: &std::path::Path) -> Database {
    let store = freshet::state::open_local_store(dir).expect("store");
    let options = Options { barrier_interval: Duration::from_millis(100), workers: 1, ..Options::default() };
    Database::open_with(store, options).await.expect("opens")
}

async fn run(db: &Database, sql: &str) {
    for outcome in db.run(sql).await.unwrap_or_else(|e| panic!("{sql}: {e}")) {
        if let Outcome::Rows { stream, .. } = outcome {
            let _: Vec<_> = stream.try_collect().await.expect("rows");
        }
    }
}

async fn first_value(db: &Database, sql: &str) -> String {
    let mut outcomes = db.run(sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
    let Some(Outcome::Rows { stream, .. }) = outcomes.pop() else { panic!("{sql} returned no rows") };
    let batches: Vec<_> = stream.try_collect().await.expect("rows");
    datafusion::arrow::util::display::array_value_to_string(batches[0].column(0), 0).expect("value")
}

/// A kmeans model, k = 8, over 4 features: trained on 8 blobs of 10,000 rows.
async fn kmeans_model(db: &Database) {
    run(
        db,
        "CREATE TABLE history AS
             SELECT (value % 8) * 10.0 + (value * 7919 % 1000) / 1000.0 AS a,
                    (value % 8) * 3.0 + (value * 104729 % 1000) / 1000.0 AS b,
                    (value % 8) * 0.5 + (value * 15485863 % 1000) / 1000.0 AS c,
                    (value % 8) * 7.0 + (value * 32452843 % 1000) / 1000.0 AS d
             FROM range(80000);
         CREATE MODEL blobs USING kmeans (k = 8, n_runs = 2, seed = 1) AS SELECT a, b, c, d FROM history",
    )
    .await;
}

/// Rows per second through the `score()` function itself, on this thread.
async fn score_function(rows: usize) -> f64 {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = open(dir.path()).await;
    kmeans_model(&db).await;
    let state = db.session_state();
    let score = state.scalar_functions().get("score").expect("score is registered").clone();
    let feature = |seed: u64| -> ArrayRef {
        Arc::new(Float64Array::from_iter_values((0..BATCH as u64).map(|i| ((i * seed) % 8000) as f64 / 100.0)))
    };
    let features = [feature(7919), feature(104729), feature(15485863), feature(32452843)];
    let mut arg_fields = vec![Arc::new(Field::new("model", DataType::Utf8, false))];
    arg_fields.extend((0..4).map(|i| Arc::new(Field::new(format!("f{i}"), DataType::Float64, false))));
    let config = Arc::new(ConfigOptions::default());
    let call = || {
        let mut args = vec![ColumnarValue::Scalar(ScalarValue::Utf8(Some("blobs".into())))];
        args.extend(features.iter().map(|f| ColumnarValue::Array(f.clone())));
        ScalarFunctionArgs {
            args,
            arg_fields: arg_fields.clone(),
            number_rows: BATCH,
            return_field: Arc::new(Field::new("score", DataType::Float64, true)),
            config_options: config.clone(),
        }
    };
    // Warm up, then measure.
    for _ in 0..10 {
        score.invoke_with_args(call()).expect("scores");
    }
    let batches = rows.div_ceil(BATCH);
    let started = Instant::now();
    let mut checksum = 0.0;
    for _ in 0..batches {
        let ColumnarValue::Array(scores) = score.invoke_with_args(call()).expect("scores") else { panic!("array") };
        let scores = scores.as_any().downcast_ref::<Float64Array>().expect("double");
        checksum += scores.value(0);
    }
    let elapsed = started.elapsed().as_secs_f64();
    assert!(checksum.is_finite());
    (batches * BATCH) as f64 / elapsed
}

/// Rows per second of an ad-hoc query filtering a table by score.
async fn score_query(rows: usize) -> f64 {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = open(dir.path()).await;
    kmeans_model(&db).await;
    run(
        &db,
        &format!(
            "CREATE TABLE readings AS SELECT (value % 83) * 1.0 AS a, (value % 29) * 1.0 AS b,
                    (value % 5) * 1.0 AS c, (value % 53) * 1.0 AS d FROM range({rows})"
        ),
    )
    .await;
    let started = Instant::now();
    first_value(&db, "SELECT count(*) FROM readings WHERE score('blobs', a, b, c, d) > 3").await;
    rows as f64 / started.elapsed().as_secs_f64()
}

/// Events per second through a materialized view scoring the telemetry stream.
async fn telemetry_view(events: u64) -> f64 {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = open(dir.path()).await;
    run(
        &db,
        &format!(
            "CREATE SOURCE telemetry WITH (connector = 'telemetry', devices = '100', anomaly_rate = '0.01',
                 rate = '0', events = '{events}', base_time = '1767225600000')"
        ),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(600);
    while first_value(&db, "SELECT count(*) FROM telemetry").await != events.to_string() {
        assert!(Instant::now() < deadline, "the source did not fill");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    run(
        &db,
        "CREATE MODEL normal_ops USING kmeans (k = 8, n_runs = 2, seed = 1)
             AS SELECT temperature, vibration * 10 FROM telemetry WHERE NOT anomaly AND ts < '2026-01-01 00:05:00'",
    )
    .await;
    let started = Instant::now();
    run(
        &db,
        "CREATE MATERIALIZED VIEW anomalies AS
             SELECT device_id, ts, score('normal_ops', temperature, vibration * 10) AS distance
             FROM telemetry WHERE score('normal_ops', temperature, vibration * 10) > 4.0",
    )
    .await;
    let rate = events as f64 / started.elapsed().as_secs_f64();
    let flagged = first_value(&db, "SELECT count(*) FROM anomalies").await;
    println!("  (the view flagged {flagged} of {events} events)");
    rate
}

/// Events per second from a live telemetry source through the scoring view: the generator,
/// the durable log and the view, all on this thread.
async fn telemetry_live(events: u64) -> f64 {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = open(dir.path()).await;
    run(
        &db,
        "CREATE TABLE history AS SELECT 50.0 + (value % 20) AS temperature, 0.5 + (value % 10) / 10.0 AS vibration
             FROM range(20000);
         CREATE MODEL normal_ops USING kmeans (k = 8, n_runs = 2, seed = 1)
             AS SELECT temperature, vibration * 10 FROM history",
    )
    .await;
    let started = Instant::now();
    run(
        &db,
        &format!(
            "CREATE SOURCE telemetry WITH (connector = 'telemetry', devices = '100', anomaly_rate = '0.01',
                 rate = '0', events = '{events}', base_time = '1767225600000');
             CREATE MATERIALIZED VIEW anomalies AS
                 SELECT device_id, ts, score('normal_ops', temperature, vibration * 10) AS distance
                 FROM telemetry WHERE score('normal_ops', temperature, vibration * 10) > 4.0"
        ),
    )
    .await;
    let deadline = started + Duration::from_secs(600);
    loop {
        db.flush().await.expect("flush");
        let seen = first_value(&db, "SELECT count(*) FROM telemetry").await;
        if seen == events.to_string() {
            db.flush().await.expect("flush");
            break;
        }
        assert!(Instant::now() < deadline, "the source did not fill");
    }
    events as f64 / started.elapsed().as_secs_f64()
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        let rows = if quick { 2_000_000 } else { 50_000_000 };
        let rate = score_function(rows).await;
        println!("score() kmeans k=8, 4 features, {BATCH}-row batches: {:>6.1} M rows/s per core", rate / 1e6);
        let rows = if quick { 400_000 } else { 4_000_000 };
        let rate = score_query(rows).await;
        println!("ad-hoc SELECT count(*) WHERE score(…) > 3 over {rows} rows: {:>6.1} M rows/s", rate / 1e6);
        let events = if quick { 100_000 } else { 1_000_000 };
        let rate = telemetry_view(events).await;
        println!("view scoring the telemetry stream, backfill ({events} events): {rate:>9.0} events/s per core");
        let rate = telemetry_live(events).await;
        println!("live telemetry source → scoring view ({events} events, durable): {rate:>9.0} events/s per core");
    });
}
