//! Incremental view maintenance.
//!
//! - Operator level: change batches straight into the GROUP BY operator and the view's
//!   arrangement, at 100k and 1M groups, to show that the cost of a change does not grow
//!   with the state.
//! - End to end over the wire: `INSERT … SELECT` / `DELETE` batches plus `FLUSH` into a
//!   GROUP BY view and a join view. These include the durable write and the DELETE's scan of
//!   the whole table (tables have no secondary indexes), so they do grow with the table.
//!
//! Run with `cargo bench --bench views` (`--quick` for a short smoke run, `--operators` for
//! the operator level only, `--groups 1000000,10000000` for other state sizes). The
//! operator level runs inline on the bench's main task, so its figures are per core.

use std::time::{Duration, Instant};

use std::collections::HashMap;
use std::sync::Arc;

use datafusion::arrow::array::Int64Array;
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::physical_expr::expressions::Column;
use freshet::catalog::table::{TableDef, TableState};
use freshet::dataflow::operators::{AggregateFunction, AggregateOperator, AggregateSpec, JoinKind, JoinOperator};
use freshet::dataflow::{Barrier, ChangeBatch, Operator, Output};
use freshet::server::{Config, Server};
use tokio_postgres::NoTls;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const BATCH: i64 = 10_000;

async fn start() -> (Server, tempfile::TempDir, tokio_postgres::Client) {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = Config {
        data_dir: dir.path().to_path_buf(),
        pg_listen: "127.0.0.1:0".into(),
        http_listen: "127.0.0.1:0".into(),
        barrier_interval: Duration::from_millis(100),
        ..Config::default()
    };
    let server = Server::start(config).await.expect("server starts");
    let addr = server.pg_addr();
    let conn = format!("host={} port={} user=freshet dbname=freshet", addr.ip(), addr.port());
    let (client, connection) = tokio_postgres::connect(&conn, NoTls).await.expect("connects");
    tokio::spawn(connection);
    (server, dir, client)
}

/// Applies `batches` change batches (inserts into existing groups, then deletes of half of
/// them) and returns changed rows per second.
async fn changes_per_second(client: &tokio_postgres::Client, table: &str, groups: i64, batches: i64) -> f64 {
    let started = Instant::now();
    let mut rows = 0;
    for b in 0..batches {
        let offset = b * BATCH;
        client
            .batch_execute(&format!(
                "INSERT INTO {table} SELECT {offset} + value, (value * 7919 + {offset}) % {groups}, value % 100 FROM range({BATCH}); FLUSH"
            ))
            .await
            .expect("insert batch");
        rows += BATCH;
        client
            .batch_execute(&format!("DELETE FROM {table} WHERE id >= {offset} AND id < {offset} + {BATCH} / 2; FLUSH"))
            .await
            .expect("delete batch");
        rows += BATCH / 2;
    }
    rows as f64 / started.elapsed().as_secs_f64()
}

async fn group_by(groups: i64, batches: i64) -> f64 {
    let (server, _dir, client) = start().await;
    client.batch_execute("CREATE TABLE t (id BIGINT, k BIGINT, v BIGINT)").await.expect("table");
    client
        .batch_execute(&format!("INSERT INTO t SELECT -1 - value, value, 1 FROM range({groups})"))
        .await
        .expect("one row per group");
    client
        .batch_execute(
            "CREATE MATERIALIZED VIEW g AS SELECT k, count(*) AS n, sum(v) AS s, max(v) AS m FROM t GROUP BY k",
        )
        .await
        .expect("view");
    let rate = changes_per_second(&client, "t", groups, batches).await;
    server.shutdown().await;
    rate
}

async fn join(rows: i64, batches: i64) -> f64 {
    let (server, _dir, client) = start().await;
    client
        .batch_execute(&format!(
            "CREATE TABLE t (id BIGINT, k BIGINT, v BIGINT);
             CREATE TABLE d (k BIGINT PRIMARY KEY, name TEXT);
             INSERT INTO d SELECT value, 'n' || CAST(value AS TEXT) FROM range({rows});
             CREATE MATERIALIZED VIEW j AS SELECT t.id, t.v, d.name FROM t JOIN d ON t.k = d.k"
        ))
        .await
        .expect("setup");
    let rate = changes_per_second(&client, "t", rows, batches).await;
    server.shutdown().await;
    rate
}

/// `(k, v)` rows: `n` rows spread over `groups` keys starting at `offset`.
fn rows(n: i64, groups: i64, offset: i64) -> RecordBatch {
    let schema =
        Arc::new(Schema::new(vec![Field::new("k", DataType::Int64, false), Field::new("v", DataType::Int64, false)]));
    let keys: Vec<i64> = (0..n).map(|i| ((offset + i) * 7919) % groups).collect();
    let values: Vec<i64> = (0..n).map(|i| (offset + i) % 100).collect();
    RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from(keys)), Arc::new(Int64Array::from(values))])
        .expect("rows")
}

/// One epoch: the changes (into input port 0), then the barrier; the operator's output
/// goes into the view.
async fn run_epoch(operator: &mut dyn Operator, view: &mut TableState, epoch: &mut u64, changes: Vec<ChangeBatch>) {
    run_epoch_on(operator, view, epoch, changes.into_iter().map(|c| (0, c)).collect()).await
}

/// One epoch with each change on its input port.
async fn run_epoch_on(
    operator: &mut dyn Operator,
    view: &mut TableState,
    epoch: &mut u64,
    changes: Vec<(usize, ChangeBatch)>,
) {
    *epoch += 1;
    let mut out = Output::default();
    for (port, change) in changes {
        operator.process(port, change, &mut out).await.expect("process");
    }
    let barrier = Barrier { epoch: *epoch, checkpoint: false, mutation: None };
    operator.on_barrier(&barrier, &mut out).await.expect("barrier");
    for message in out.take_messages() {
        if let freshet::dataflow::Message::Data(change) = message {
            view.apply(&change).expect("view applies");
        }
    }
}

/// Changed input rows per second through GROUP BY k (count, sum, max) and the view's
/// arrangement, over a state of `groups` groups. Returns (rows/s, µs per 10k-row epoch).
async fn operator_group_by(groups: i64, epochs: i64) -> (f64, f64) {
    let output = Arc::new(Schema::new(vec![
        Field::new("k", DataType::Int64, true),
        Field::new("n", DataType::Int64, true),
        Field::new("s", DataType::Int64, true),
        Field::new("m", DataType::Int64, true),
    ]));
    let column = |name: &str, i| Arc::new(Column::new(name, i)) as Arc<dyn datafusion::physical_plan::PhysicalExpr>;
    let specs = vec![
        AggregateSpec::new(AggregateFunction::CountRows, None, DataType::Int64),
        AggregateSpec::new(AggregateFunction::Sum, Some(column("v", 1)), DataType::Int64),
        AggregateSpec::new(AggregateFunction::Max, Some(column("v", 1)), DataType::Int64),
    ];
    let mut operator =
        AggregateOperator::new(vec![column("k", 0)], vec![DataType::Int64], specs, output.clone()).expect("operator");
    let def = Arc::new(TableDef::new(1, "view".into(), output, vec![], vec![], HashMap::new()));
    let mut view = TableState::new(def).expect("view state");
    let mut epoch = 0;
    // Fill the state: one row per group.
    for start in (0..groups).step_by(100_000) {
        let n = 100_000.min(groups - start);
        run_epoch(&mut operator, &mut view, &mut epoch, vec![ChangeBatch::inserts(rows(n, groups, start))]).await;
    }
    let started = std::time::Instant::now();
    let mut changed = 0;
    for e in 0..epochs {
        let offset = groups + e * BATCH;
        let inserted = rows(BATCH, groups, offset);
        run_epoch(&mut operator, &mut view, &mut epoch, vec![ChangeBatch::inserts(inserted.clone())]).await;
        run_epoch(&mut operator, &mut view, &mut epoch, vec![ChangeBatch::retracts(inserted)]).await;
        changed += 2 * BATCH;
    }
    let elapsed = started.elapsed();
    (changed as f64 / elapsed.as_secs_f64(), elapsed.as_micros() as f64 / (2 * epochs) as f64)
}

/// Changed fact rows per second through an inner join against `dimension` rows (each fact
/// matches one), with the view's arrangement, on one core.
async fn operator_join(dimension: i64, epochs: i64) -> f64 {
    let int = |name: &str| Field::new(name, DataType::Int64, true);
    let output = Arc::new(Schema::new(vec![int("k"), int("v"), int("dk"), int("dv")]));
    let column = |name: &str, i| Arc::new(Column::new(name, i)) as Arc<dyn datafusion::physical_plan::PhysicalExpr>;
    let mut operator = JoinOperator::new(
        JoinKind::Inner,
        vec![column("k", 0)],
        vec![column("k", 0)],
        vec![DataType::Int64],
        vec![DataType::Int64, DataType::Int64],
        vec![DataType::Int64, DataType::Int64],
        None,
        output.clone(),
    )
    .expect("operator");
    let def = Arc::new(TableDef::new(1, "view".into(), output, vec![], vec![], HashMap::new()));
    let mut view = TableState::new(def).expect("view state");
    let mut epoch = 0;
    for start in (0..dimension).step_by(100_000) {
        let n = 100_000.min(dimension - start);
        let dims = vec![(1, ChangeBatch::inserts(rows(n, dimension, start)))];
        run_epoch_on(&mut operator, &mut view, &mut epoch, dims).await;
    }
    let started = Instant::now();
    let mut changed = 0;
    for e in 0..epochs {
        let facts = rows(BATCH, dimension, e * BATCH);
        run_epoch_on(&mut operator, &mut view, &mut epoch, vec![(0, ChangeBatch::inserts(facts.clone()))]).await;
        run_epoch_on(&mut operator, &mut view, &mut epoch, vec![(0, ChangeBatch::retracts(facts))]).await;
        changed += 2 * BATCH;
    }
    changed as f64 / started.elapsed().as_secs_f64()
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let batches = if quick { 2 } else { 10 };
    let epochs = if quick { 5 } else { 50 };
    // `--groups 1000000,10000000` measures other state sizes.
    let sizes: Vec<i64> = args
        .iter()
        .position(|a| a == "--groups")
        .and_then(|i| args.get(i + 1))
        .map(|list| list.split(',').map(|n| n.parse().expect("--groups takes numbers")).collect())
        .unwrap_or_else(|| vec![100_000, 1_000_000]);
    let operators_only = args.iter().any(|a| a == "--operators");
    for &groups in &sizes {
        let (rate, per_epoch) = operator_group_by(groups, epochs).await;
        println!(
            "operator GROUP BY + arrangement, {groups:>8} groups: {rate:>9.0} changed rows/s/core, {per_epoch:>8.0} µs per {BATCH}-row epoch"
        );
    }
    for &dimension in &sizes {
        let rate = operator_join(dimension, epochs).await;
        println!("operator JOIN + arrangement, {dimension:>8} dimension rows: {rate:>9.0} changed rows/s/core");
    }
    if operators_only {
        return;
    }
    let (small, large) = if quick { (1_000, 10_000) } else { (100_000, 1_000_000) };
    for groups in [small, large] {
        let rate = group_by(groups, batches).await;
        println!("view GROUP BY over {groups:>7} groups: {rate:>9.0} changed rows/s (batches of {BATCH} + FLUSH)");
    }
    let rate = join(small, batches).await;
    println!("view JOIN against {small:>7} dimension rows: {rate:>9.0} changed rows/s");
}
