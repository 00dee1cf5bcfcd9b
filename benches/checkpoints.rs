//! What checkpoints cost and what they buy.
//!
//! - Throughput: the telemetry generator (unthrottled, `--events`, `--devices` devices)
//!   into a GROUP BY device view, with checkpoints every second and with checkpoints off:
//!   events per second from the source's start until the view has counted every event.
//! - Bytes per checkpoint when about 1% of the view's groups change.
//! - Restart time: opening the database again, with the view restored from its checkpoint
//!   and with it recomputed from the source (checkpoints deleted).
//!
//! Run with `cargo bench --bench checkpoints` (`--quick` for a short smoke run,
//! `--events N --devices N` for other sizes).

use std::time::{Duration, Instant};

use freshet::catalog::{Database, Options, Outcome};
use futures::TryStreamExt;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The view reads the generator's stream and a table the bench writes into to change a
/// chosen share of the groups.
const VIEW: &str = "CREATE TABLE extra (device_id TEXT, temperature DOUBLE, vibration DOUBLE);
    CREATE MATERIALIZED VIEW per_device AS
    SELECT device_id, count(*) AS n, sum(temperature) AS heat, avg(vibration) AS shake
    FROM (SELECT device_id, temperature, vibration FROM telemetry
          UNION ALL SELECT device_id, temperature, vibration FROM extra) AS readings
    GROUP BY device_id";

async fn open(dir: &std::path::Path, checkpoint_interval: Option<Duration>) -> Database {
    let store = freshet::state::open_local_store(dir).expect("store");
    let options = Options { checkpoint_interval, ..Options::default() };
    Database::open_with(store, options).await.expect("opens")
}

async fn run(db: &Database, sql: &str) {
    for outcome in db.run(sql).await.unwrap_or_else(|e| panic!("{sql}: {e}")) {
        if let Outcome::Rows { stream, .. } = outcome {
            let _: Vec<_> = stream.try_collect().await.expect("rows");
        }
    }
}

async fn number(db: &Database, sql: &str) -> f64 {
    let mut outcomes = db.run(sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
    let Some(Outcome::Rows { stream, .. }) = outcomes.pop() else { panic!("{sql} returned no rows") };
    let batches: Vec<_> = stream.try_collect().await.expect("rows");
    let text = datafusion::arrow::util::display::array_value_to_string(batches[0].column(0), 0).expect("value");
    text.parse().unwrap_or(0.0)
}

/// Waits until the view has counted `events` events.
async fn caught_up(db: &Database, events: u64) {
    loop {
        if number(db, "SELECT coalesce(sum(n), 0) FROM per_device").await as u64 >= events {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Creates the source and the view; returns events per second from the source's creation
/// until the view has counted every event, with the checkpoints taken meanwhile, their
/// average size and their average duration in milliseconds.
async fn fill(db: &Database, events: u64, devices: u64) -> (f64, f64, f64, f64) {
    let started = Instant::now();
    run(
        db,
        &format!(
            "CREATE SOURCE telemetry WITH (connector = 'telemetry', devices = '{devices}', rate = '0', events = '{events}', seed = '1')"
        ),
    )
    .await;
    run(db, VIEW).await;
    caught_up(db, events).await;
    let seconds = started.elapsed().as_secs_f64();
    let checkpoints = number(db, "SELECT count(*) FROM freshet_catalog.checkpoints WHERE status = 'ok'").await;
    let bytes = number(db, "SELECT coalesce(avg(bytes), 0) FROM freshet_catalog.checkpoints WHERE status = 'ok'").await;
    let took =
        number(db, "SELECT coalesce(avg(duration_ms), 0) FROM freshet_catalog.checkpoints WHERE status = 'ok'").await;
    (events as f64 / seconds, checkpoints, bytes, took)
}

fn arg(name: &str) -> Option<u64> {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok())
}

fn mb(bytes: f64) -> String {
    format!("{:.1} MB", bytes / 1e6)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let events = arg("--events").unwrap_or(if quick { 200_000 } else { 5_000_000 });
    let devices = arg("--devices").unwrap_or(if quick { 10_000 } else { 100_000 });
    println!("checkpoints: {events} telemetry events into GROUP BY device_id over {devices} devices");

    let off = tempfile::tempdir().expect("temp dir");
    let db = open(off.path(), None).await;
    let (rate_off, _, _, _) = fill(&db, events, devices).await;
    drop(db);
    println!("  checkpoints off: {rate_off:>12.0} events/s");

    let on = tempfile::tempdir().expect("temp dir");
    let db = open(on.path(), Some(Duration::from_secs(1))).await;
    let (rate_on, taken, average, took) = fill(&db, events, devices).await;
    println!(
        "  checkpoints 1 s: {rate_on:>12.0} events/s ({:+.1}%), {taken} checkpoints of {} and {took:.0} ms on average",
        (rate_on / rate_off - 1.0) * 100.0,
        mb(average)
    );

    // About 1% of the groups change: one event for each of the first devices.
    let changed = (devices / 100).max(1);
    run(&db, "CHECKPOINT").await;
    let before = number(&db, "SELECT bytes FROM freshet_catalog.checkpoints ORDER BY epoch DESC LIMIT 1").await;
    run(
        &db,
        &format!(
            "INSERT INTO extra SELECT 'dev-' || lpad(value::text, 5, '0'), 20.0, 0.5 FROM range({changed}); FLUSH"
        ),
    )
    .await;
    let started = Instant::now();
    run(&db, "CHECKPOINT").await;
    let took = started.elapsed().as_secs_f64();
    let after = number(&db, "SELECT bytes FROM freshet_catalog.checkpoints ORDER BY epoch DESC LIMIT 1").await;
    let state = number(&db, "SELECT state_bytes FROM freshet_catalog.checkpoints ORDER BY epoch DESC LIMIT 1").await;
    println!(
        "  a checkpoint after {changed} of {devices} groups changed: {} written in {took:.2} s, of {} of state (the one before wrote {})",
        mb(after),
        mb(state),
        mb(before)
    );
    let failed = number(&db, "SELECT count(*) FROM freshet_catalog.checkpoints WHERE status <> 'ok'").await;
    if failed > 0.0 {
        let mut outcomes =
            db.run("SELECT epoch, error FROM freshet_catalog.checkpoints WHERE status <> 'ok'").await.expect("history");
        if let Some(Outcome::Rows { stream, .. }) = outcomes.pop() {
            let batches: Vec<_> = stream.try_collect().await.expect("rows");
            println!(
                "  failed checkpoints: {}",
                datafusion::arrow::util::pretty::pretty_format_batches(&batches).expect("table")
            );
        }
    }

    // Restart: restored from the checkpoint, then recomputed.
    run(&db, "CHECKPOINT").await;
    drop(db);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let path = on.path().to_path_buf();
    let restart = |interval| {
        let path = path.clone();
        async move {
            let started = Instant::now();
            let db = open(&path, interval).await;
            let seconds = started.elapsed().as_secs_f64();
            let restored = number(&db, "SELECT count(restored_from_epoch) FROM freshet_catalog.views").await;
            (seconds, restored, db)
        }
    };
    let (restored_seconds, restored, db) = restart(Some(Duration::from_secs(1))).await;
    drop(db);
    println!("  restart with the view restored ({restored} restored): {restored_seconds:.2} s");
    std::fs::remove_dir_all(on.path().join("checkpoint")).expect("delete checkpoints");
    let (rebuilt_seconds, restored, _db) = restart(None).await;
    println!("  restart with the view recomputed ({restored} restored): {rebuilt_seconds:.2} s");
}
