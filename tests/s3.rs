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
