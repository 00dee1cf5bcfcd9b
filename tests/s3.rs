//! File sources and sinks on an S3-compatible object store (moto's server on loopback),
//! with boto3 as the independent client that puts the input and lists the output.

mod common;

use common::process::Process;
use common::s3::S3;
use common::{count, wait_for};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_files_feed_a_source_and_a_file_sink_writes_parquet_back() {
    let s3 = S3::start().await;
    s3.create_bucket("lake").await;
    s3.put("lake", "in/2026-11-01.csv", "1,2.5\n2,4.0\n3,1.5\n").await;
    s3.put("lake", "in/2026-11-02.csv", "4,10.0\n").await;
    // Neither matches in/*.csv: another directory, another extension.
    s3.put("lake", "in/archive/old.csv", "99,99.0\n").await;
    s3.put("lake", "in/readme.txt", "not data").await;

    let dir = tempfile::tempdir().expect("temp dir");
    let server = Process::start_with_env(dir.path(), &[], &s3.env());
    let client = common::connect(&server.connection_string).await;
    client
        .batch_execute(
            "CREATE SOURCE readings (id INT NOT NULL, v DOUBLE PRECISION)
                 WITH (connector = 'file', path = 's3://lake/in/*.csv', watch = 'true') FORMAT CSV;
             CREATE MATERIALIZED VIEW big AS SELECT id, v FROM readings WHERE v >= 2;
             CREATE SINK big_files FROM big WITH (connector = 'file', path = 's3://lake/out/big') FORMAT PARQUET",
        )
        .await
        .expect("source, view and sink on s3");
    wait_for(&client, "SELECT count(*) FROM readings", 4).await;
    assert_eq!(count(&client, "SELECT count(*) FROM readings WHERE id = 99").await, 0, "only in/*.csv is read");
    let files = "SELECT count(DISTINCT _file) FROM readings WHERE _file LIKE 's3://lake/in/%.csv'";
    assert_eq!(count(&client, files).await, 2, "rows name the object they came from");

    // A file that appears later is picked up (watch).
    s3.put("lake", "in/2026-11-03.csv", "5,7.0\n6,0.5\n").await;
    wait_for(&client, "SELECT count(*) FROM readings", 6).await;
    wait_for(&client, "SELECT count(*) FROM big", 4).await;

    // The sink's files, as another client sees them: whole Parquet files under the prefix.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut keys = Vec::new();
    while tokio::time::Instant::now() < deadline {
        keys = s3.list("lake", "out/big/").await;
        if keys.len() >= 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert!(keys.len() >= 2, "an initial file and one per later epoch, got {keys:?}");
    for key in &keys {
        assert!(key.starts_with("out/big/big_files-") && key.ends_with(".parquet"), "{key}");
        assert_eq!(s3.head_bytes("lake", key, 4).await, "50415231", "{key} starts with PAR1");
    }

    // Read back through a Parquet source on the same prefix: exactly the view's rows.
    client
        .batch_execute(
            "CREATE SOURCE big_again (id INT, v DOUBLE PRECISION)
                 WITH (connector = 'file', path = 's3://lake/out/big/*.parquet') FORMAT PARQUET",
        )
        .await
        .expect("parquet source on s3");
    wait_for(&client, "SELECT count(*) FROM big_again", 4).await;
    let rows = client.query("SELECT id, v FROM big_again ORDER BY id", &[]).await.expect("read back");
    let got: Vec<(i32, f64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(got, vec![(1, 2.5), (2, 4.0), (4, 10.0), (5, 7.0)]);

    // After a restart the source reads no object twice.
    server.kill_9();
    let server = Process::start_with_env(dir.path(), &[], &s3.env());
    let client = common::connect(&server.connection_string).await;
    s3.put("lake", "in/2026-11-04.csv", "7,3.0\n").await;
    wait_for(&client, "SELECT count(*) FROM readings", 7).await;
    assert_eq!(count(&client, "SELECT count(*) FROM (SELECT DISTINCT id FROM readings) d").await, 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_bucket_is_retried_and_reported_until_it_exists() {
    let s3 = S3::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let server = Process::start_with_env(dir.path(), &[], &s3.env());
    let client = common::connect(&server.connection_string).await;
    client
        .batch_execute(
            "CREATE SOURCE late (id INT) WITH (connector = 'file', path = 's3://late/*.csv', watch = 'true') FORMAT CSV",
        )
        .await
        .expect("the bucket is looked at when the source runs, not when it is created");
    let retrying = "SELECT count(*) FROM freshet_catalog.source_progress
                    WHERE source = 'late' AND status = 'retrying' AND last_error LIKE '%s3://late/%'";
    wait_for(&client, retrying, 1).await;

    s3.create_bucket("late").await;
    s3.put("late", "a.csv", "1\n2\n").await;
    wait_for(&client, "SELECT count(*) FROM late", 2).await;

    // Schemes freshet does not know, and URLs without a bucket, are refused up front.
    let refused = |sql: &'static str| {
        let client = &client;
        async move { common::db_error(&client.batch_execute(sql).await.expect_err(sql)) }
    };
    let e = refused("CREATE SOURCE g (a INT) WITH (connector = 'file', path = 'gs://b/*.csv') FORMAT CSV").await;
    assert!(e.starts_with("0A000") && e.contains("gs://"), "{e}");
    let e = refused("CREATE SOURCE g (a INT) WITH (connector = 'file', path = 's3:///x.csv') FORMAT CSV").await;
    assert!(e.contains("names no bucket"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_kept_in_s3_restores_onto_an_empty_data_dir_and_damage_is_refused() {
    let s3 = S3::start().await;
    s3.create_bucket("state").await;
    let store = ["--store", "s3://state/prod"];
    let first_disk = tempfile::tempdir().expect("temp dir");
    let server = Process::start_with_env(first_disk.path(), &store, &s3.env());
    let client = common::connect(&server.connection_string).await;
    client
        .batch_execute(
            "CREATE TABLE orders (id INT PRIMARY KEY, customer TEXT NOT NULL, amount BIGINT NOT NULL);
             INSERT INTO orders SELECT i, 'c' || CAST(i % 7 AS TEXT), i * 10 FROM generate_series(1, 500) AS g(i);
             UPDATE orders SET amount = 0 WHERE id % 50 = 0;
             DELETE FROM orders WHERE id > 490;
             CREATE MATERIALIZED VIEW per_customer AS
                 SELECT customer, count(*) AS n, sum(amount) AS total FROM orders GROUP BY customer",
        )
        .await
        .expect("writes");
    let query = "SELECT customer, n, total FROM per_customer ORDER BY customer";
    client.batch_execute("FLUSH").await.expect("flush");
    let rows = |rows: Vec<tokio_postgres::Row>| -> Vec<(String, i64, i64)> {
        rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect()
    };
    let before = rows(client.query(query, &[]).await.expect("view"));
    assert_eq!(before.iter().map(|r| r.1).sum::<i64>(), 490);
    server.kill_9();
    assert!(!s3.list("state", "prod/log/").await.is_empty(), "the log is in the bucket");
    let local: Vec<_> = std::fs::read_dir(first_disk.path()).expect("data dir").collect();
    assert!(local.is_empty(), "nothing durable is kept on the local disk: {local:?}");

    // Another machine: an empty data directory, the same store.
    let second_disk = tempfile::tempdir().expect("temp dir");
    let server = Process::start_with_env(second_disk.path(), &store, &s3.env());
    let client = common::connect(&server.connection_string).await;
    client.batch_execute("FLUSH").await.expect("flush");
    assert_eq!(rows(client.query(query, &[]).await.expect("view")), before, "the view is the same");
    assert_eq!(count(&client, "SELECT count(*) FROM orders WHERE amount = 0").await, 9);
    client.batch_execute("INSERT INTO orders VALUES (1000, 'c1', 5)").await.expect("writes go on");
    server.kill_9();

    // A damaged log object is refused at start, naming it; nothing starts from a guess.
    let segments = s3.list("state", "prod/log/").await;
    let newest = segments.last().expect("segments");
    s3.put("state", newest, "not a segment").await;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_freshet"))
        .args(["serve", "--pg-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0", "--data-dir"])
        .arg(second_disk.path())
        .args(store)
        .envs(s3.env())
        .output()
        .expect("freshet runs");
    assert!(!out.status.success(), "a damaged store stops startup");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let name = newest.rsplit('/').next().expect("file name");
    assert!(stderr.contains(name), "the message names the damaged object: {stderr}");
}
