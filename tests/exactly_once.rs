//! Exactly-once sinks with the real `freshet` binary and `kill -9` at random moments: a
//! Parquet file sink of a GROUP BY view's changes, and a Kafka sink (real broker) of an
//! append-only view. After every restart and once all input is in, what the sink wrote,
//! folded together, equals the view and the batch query over all inserted rows: nothing is
//! lost and nothing is written twice.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::kafka::Broker;
use common::process::Process;
use common::s3::S3;
use datafusion::arrow::array::{Array, Int64Array, StringArray};
use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use rand::{Rng, SeedableRng};
use tokio_postgres::Client;

/// Rounds of inserts, each ended by a `kill -9` at a random moment.
const ROUNDS: usize = 6;
/// Rows per insert statement.
const ROWS_PER_INSERT: i64 = 50;

/// Inserts rows for round `round`, one committed statement after another, `statements` of
/// them or until one fails (the server was killed). With `deletes`, some rows are deleted
/// every few statements, so the view retracts rows too.
async fn insert(client: &Client, round: usize, statements: Option<i64>, deletes: bool) {
    for i in 0..statements.unwrap_or(i64::MAX) {
        let first = round as i64 * 100_000_000 + i * ROWS_PER_INSERT;
        let values: Vec<String> =
            (first..first + ROWS_PER_INSERT).map(|id| format!("({id}, 'k{}', {})", id % 7, id % 100)).collect();
        let sql = format!("INSERT INTO t VALUES {}", values.join(", "));
        if client.batch_execute(&sql).await.is_err() {
            return;
        }
        if deletes
            && i % 4 == 3
            && client.batch_execute(&format!("DELETE FROM t WHERE id % 97 = {}", i % 97)).await.is_err()
        {
            return;
        }
    }
}

/// Runs rounds of inserts, killing the server at a random moment in each and starting it
/// again; returns the last server, running.
async fn crash_rounds(data: &std::path::Path, args: &[&str], deletes: bool, seed: u64) -> (Process, Client) {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let mut server = Process::start(data, args);
    let mut client = common::connect(&server.connection_string).await;
    for round in 0..ROUNDS {
        // Killed mid-statement, mid-checkpoint or mid-delivery: whatever it was doing.
        let kill_after = Duration::from_millis(rng.gen_range(100..1500));
        let _ = tokio::time::timeout(kill_after, insert(&client, round, None, deletes)).await;
        server.kill_9();
        server = Process::start(data, args);
        client = common::connect(&server.connection_string).await;
    }
    (server, client)
}

/// Takes a checkpoint, then waits until the sink delivered everything it holds.
async fn wait_until_delivered(client: &Client, sink: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    common::execute(client, "FLUSH").await;
    common::execute(client, "CHECKPOINT").await;
    let epoch = common::count(client, "SELECT max(epoch) FROM freshet_catalog.checkpoints WHERE status = 'ok'").await;
    loop {
        let sql = format!(
            "SELECT coalesce(delivered_epoch, 0), waiting_rows, status FROM freshet_catalog.sinks WHERE sink = '{sink}'"
        );
        let row = common::text_rows(client, &sql).await;
        let fields: Vec<&str> = row[0].split('|').collect();
        if fields[0].parse::<i64>().expect("an epoch") >= epoch && fields[1] == "0" {
            return;
        }
        assert!(Instant::now() < deadline, "sink {sink} did not deliver checkpoint {epoch}: {}", row[0]);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// (key, n, total) → weight, summed over every Parquet file in `dir`.
fn fold_files(dir: &std::path::Path) -> BTreeMap<(String, i64, i64), i64> {
    let mut folded = BTreeMap::new();
    for entry in std::fs::read_dir(dir).expect("sink directory") {
        let path = entry.expect("entry").path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
        if name.starts_with('.') {
            continue; // a file still being written, never a delivered one
        }
        assert!(name.ends_with(".parquet"), "unexpected file {name}");
        let file = std::fs::File::open(&path).expect("file opens");
        let reader = ParquetRecordBatchReaderBuilder::try_new(file).expect("a Parquet file").build().expect("reader");
        for batch in reader {
            let batch = batch.expect("rows read");
            let column = |name: &str| batch.column(batch.schema().index_of(name).expect("column")).clone();
            let keys = column("k");
            let keys = keys.as_any().downcast_ref::<StringArray>().expect("text keys");
            let ints = |name: &str| column(name).as_any().downcast_ref::<Int64Array>().expect("bigint").clone();
            let (n, total, diff) = (ints("n"), ints("total"), ints("_diff"));
            for i in 0..batch.num_rows() {
                *folded.entry((keys.value(i).to_string(), n.value(i), total.value(i))).or_insert(0) += diff.value(i);
            }
        }
    }
    folded.retain(|_, weight| *weight != 0);
    folded
}

fn as_rows(folded: &BTreeMap<(String, i64, i64), i64>) -> Vec<String> {
    let mut rows = Vec::new();
    for ((k, n, total), weight) in folded {
        assert!(*weight > 0, "row ({k}, {n}, {total}) was retracted more often than written: {weight}");
        rows.extend(std::iter::repeat_n(format!("{k}|{n}|{total}"), *weight as usize));
    }
    rows.sort(); // as common::text_rows sorts
    rows
}

/// Creates table `t`, the GROUP BY view `totals` over it, and an exactly-once file sink
/// `out` of its changes into `path`.
async fn totals_into_files(client: &Client, path: &str) {
    common::execute(client, "CREATE TABLE t (id BIGINT, k TEXT, v BIGINT)").await;
    common::execute(
        client,
        "CREATE MATERIALIZED VIEW totals AS SELECT k, count(*) AS n, sum(v) AS total FROM t GROUP BY k",
    )
    .await;
    let sink = format!(
        "CREATE SINK out FROM totals WITH (connector = 'file', path = '{path}', mode = 'changes', exactly_once = 'true')"
    );
    common::execute(client, &sink).await;
}

/// The rows of `totals`, once checked against the batch query over every committed row.
async fn totals_checked(client: &Client) -> Vec<String> {
    let view = common::text_rows(client, "SELECT k, n, total FROM totals ORDER BY k, n, total").await;
    let batch = common::text_rows(
        client,
        "SELECT k, count(*) AS n, sum(v) AS total FROM (SELECT * FROM t) AS rows GROUP BY k ORDER BY k, n, total",
    )
    .await;
    assert!(!view.is_empty(), "the view has rows");
    assert_eq!(view, batch, "the view equals the batch query over every committed row");
    view
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_sink_writes_each_change_once_across_kill_9() {
    let data = tempfile::tempdir().expect("temp dir");
    let out = tempfile::tempdir().expect("temp dir");
    let args = ["--checkpoint-interval", "100ms"];
    {
        let server = Process::start(data.path(), &args);
        let client = common::connect(&server.connection_string).await;
        totals_into_files(&client, &out.path().display().to_string()).await;
        server.kill_9();
    }
    let (_server, client) = crash_rounds(data.path(), &args, true, 7).await;
    wait_until_delivered(&client, "out").await;

    let view = totals_checked(&client).await;
    let written = as_rows(&fold_files(out.path()));
    let files = std::fs::read_dir(out.path()).expect("sink directory").count();
    let rows = common::integer(&client, "SELECT count(*) FROM t").await;
    eprintln!("{rows} rows in the table after {ROUNDS} kills; {files} files; the view has {} rows", view.len());
    assert_eq!(written, view, "the sink's files, folded, equal the view: no change lost or written twice");

    // Still exactly once after one more clean round.
    insert(&client, ROUNDS, Some(10), false).await;
    wait_until_delivered(&client, "out").await;
    let view = common::text_rows(&client, "SELECT k, n, total FROM totals ORDER BY k, n, total").await;
    assert_eq!(as_rows(&fold_files(out.path())), view, "later changes are written once too");
}

/// Creates table `t`, the append-only view `evens` over it, and an exactly-once Kafka sink
/// `out` of it into `topic`.
async fn evens_into_kafka(client: &Client, broker: &Broker, topic: &str) {
    common::execute(client, "CREATE TABLE t (id BIGINT, k TEXT, v BIGINT)").await;
    common::execute(client, "CREATE MATERIALIZED VIEW evens AS SELECT id, v FROM t WHERE v % 2 = 0").await;
    let sink = format!(
        "CREATE SINK out FROM evens WITH (connector = 'kafka', brokers = '{}', topic = '{topic}', key = 'id', exactly_once = 'true')",
        broker.address
    );
    common::execute(client, &sink).await;
}

/// The committed messages of `topic` as `id|v` rows of `evens`, sorted.
async fn committed_evens(broker: &Broker, topic: &str) -> Vec<String> {
    let mut written: Vec<String> = broker
        .consume_committed(topic)
        .await
        .iter()
        .map(|record| {
            let value: serde_json::Value =
                serde_json::from_str(record["value"].as_str().expect("a value")).expect("a JSON row");
            format!("{}|{}", value["id"].as_i64().expect("id"), value["v"].as_i64().expect("v"))
        })
        .collect();
    written.sort(); // as common::text_rows sorts
    written
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_sink_commits_each_row_once_across_kill_9() {
    let broker = Broker::start().await;
    broker.create_topic("evens", 3).await;
    let data = tempfile::tempdir().expect("temp dir");
    let args = ["--checkpoint-interval", "100ms"];
    {
        let server = Process::start(data.path(), &args);
        let client = common::connect(&server.connection_string).await;
        evens_into_kafka(&client, &broker, "evens").await;
        server.kill_9();
    }
    let (_server, client) = crash_rounds(data.path(), &args, false, 11).await;
    wait_until_delivered(&client, "out").await;

    let view = common::text_rows(&client, "SELECT id, v FROM evens ORDER BY id").await;
    let batch =
        common::text_rows(&client, "SELECT id, v FROM (SELECT * FROM t) AS rows WHERE v % 2 = 0 ORDER BY id").await;
    assert!(!view.is_empty(), "the view has rows");
    assert_eq!(view, batch, "the view equals the batch query over every committed row");
    let written = committed_evens(&broker, "evens").await;
    assert_eq!(written.len(), view.len(), "as many committed messages as view rows");
    assert_eq!(written, view, "every row of the view was committed to the topic exactly once");
}

/// Checkpoints (in effect) only when asked, so the fallback tests know which one a restart
/// falls back to.
const FALLBACK_ARGS: [&str; 2] = ["--checkpoint-interval", "3600s"];

/// Delivers two checkpoints (rounds 0 and 1 of `statements` inserts each), kills the
/// server, damages the newer checkpoint and starts the server again, so `view` comes back
/// from the older one and replays what the sink delivered from the newer one. Returns the
/// new server, a client of it, and the epoch of the checkpoint restored.
async fn deliver_twice_and_lose_the_newer_checkpoint(
    data: &std::path::Path,
    (server, client): (Process, Client),
    env: &[(String, String)],
    view: &str,
    (statements, deletes): (i64, bool),
) -> (Process, Client, i64) {
    let latest = "SELECT max(epoch) FROM freshet_catalog.checkpoints WHERE status = 'ok'";
    insert(&client, 0, Some(statements), deletes).await;
    wait_until_delivered(&client, "out").await;
    let older = common::count(&client, latest).await;
    insert(&client, 1, Some(statements), deletes).await;
    wait_until_delivered(&client, "out").await;
    let newer = common::count(&client, latest).await;
    assert!(newer > older, "a newer checkpoint was delivered");
    server.kill_9();

    let manifest = data.join(format!("checkpoint/{newer:020}/MANIFEST"));
    std::fs::write(&manifest, b"not a manifest").expect("damage the manifest");
    let server = Process::start_with_env(data, &FALLBACK_ARGS, env);
    let client = common::connect(&server.connection_string).await;
    let restored = format!(
        "SELECT coalesce(restored_from_epoch::text, 'rebuilt') FROM freshet_catalog.views WHERE view = '{view}'"
    );
    assert_eq!(
        common::text_rows(&client, &restored).await,
        vec![older.to_string()],
        "{view} came back from the older checkpoint"
    );
    (server, client, older)
}

/// Where a file sink of the fallback test writes, and how its files are read back.
enum Target {
    Local(tempfile::TempDir),
    S3 { s3: S3, prefix: &'static str },
}

impl Target {
    fn path(&self) -> String {
        match self {
            Target::Local(dir) => dir.path().display().to_string(),
            Target::S3 { prefix, .. } => format!("s3://lake/{prefix}"),
        }
    }

    fn env(&self) -> Vec<(String, String)> {
        match self {
            Target::Local(_) => Vec::new(),
            Target::S3 { s3, .. } => s3.env(),
        }
    }

    /// The rows of every file the sink wrote, folded.
    async fn folded(&self) -> BTreeMap<(String, i64, i64), i64> {
        match self {
            Target::Local(dir) => fold_files(dir.path()),
            Target::S3 { s3, prefix } => {
                let copy = tempfile::tempdir().expect("temp dir");
                s3.download("lake", prefix, copy.path()).await;
                fold_files(copy.path())
            }
        }
    }
}

/// A file sink delivers from a checkpoint that is then damaged: the view comes back from
/// the one before and replays changes the sink already wrote. What it writes next leaves
/// them out, so its files, folded, still equal the view.
async fn restored_from_an_older_checkpoint(target: Target) {
    let data = tempfile::tempdir().expect("temp dir");
    let server = Process::start_with_env(data.path(), &FALLBACK_ARGS, &target.env());
    let client = common::connect(&server.connection_string).await;
    totals_into_files(&client, &target.path()).await;
    // Groups grow, and rows are deleted.
    let started = (server, client);
    let (_server, client, _) =
        deliver_twice_and_lose_the_newer_checkpoint(data.path(), started, &target.env(), "totals", (20, true)).await;
    insert(&client, 2, Some(10), true).await;
    wait_until_delivered(&client, "out").await;

    let view = totals_checked(&client).await;
    assert_eq!(
        as_rows(&target.folded().await),
        view,
        "the sink's files, folded, equal the view: the replayed changes were not written twice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_sink_restored_from_an_older_checkpoint_still_writes_each_change_once() {
    restored_from_an_older_checkpoint(Target::Local(tempfile::tempdir().expect("temp dir"))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_s3_file_sink_restored_from_an_older_checkpoint_still_writes_each_change_once() {
    let s3 = S3::start().await;
    s3.create_bucket("lake").await;
    restored_from_an_older_checkpoint(Target::S3 { s3, prefix: "sink/totals" }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kafka_sink_restored_from_an_older_checkpoint_loses_nothing_and_says_what_it_writes_again() {
    let broker = Broker::start().await;
    broker.create_topic("evens_again", 1).await;
    let data = tempfile::tempdir().expect("temp dir");
    let server = Process::start(data.path(), &FALLBACK_ARGS);
    let client = common::connect(&server.connection_string).await;
    evens_into_kafka(&client, &broker, "evens_again").await;
    let (_server, client, older) =
        deliver_twice_and_lose_the_newer_checkpoint(data.path(), (server, client), &[], "evens", (4, false)).await;
    insert(&client, 2, Some(2), false).await;
    wait_until_delivered(&client, "out").await;

    let error =
        common::text_rows(&client, "SELECT coalesce(last_error, '') FROM freshet_catalog.sinks WHERE sink = 'out'")
            .await;
    assert!(
        error[0].contains(&format!("came back from checkpoint {older}")) && error[0].contains("delivered again"),
        "the sink says it delivers the replayed changes again: {error:?}"
    );
    let view = common::text_rows(&client, "SELECT id, v FROM evens ORDER BY id").await;
    let mut written = committed_evens(&broker, "evens_again").await;
    written.dedup();
    assert_eq!(written, view, "every row of the view reached the topic");
}
