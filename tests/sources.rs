//! Sources: generator connectors append durable rows that views follow; a restart
//! continues each generator exactly after its last durable event.

mod common;

use std::time::Duration;

use common::{TestServer, count, wait_for};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nexmark_source_feeds_views() {
    let server = TestServer::start().await;
    let client = server.connect().await;
    client
        .batch_execute(
            "CREATE SOURCE bid WITH (connector = 'nexmark', kind = 'bid', rate = '0', events = '20000',
                                     base_time = '1700000000000');
             CREATE MATERIALIZED VIEW per_auction AS
                 SELECT auction, count(*) AS bids, max(price) AS top FROM bid GROUP BY auction",
        )
        .await
        .expect("setup");
    wait_for(&client, "SELECT count(*) FROM bid", 20_000).await;
    client.batch_execute("FLUSH").await.expect("flush");
    let view = client.query("SELECT * FROM per_auction ORDER BY auction", &[]).await.expect("view");
    let batch = client
        .query("SELECT auction, count(*), max(price) FROM bid GROUP BY auction ORDER BY auction", &[])
        .await
        .expect("batch");
    assert!(view.len() > 10, "bids spread over auctions ({} groups)", view.len());
    let rows = |rows: &[tokio_postgres::Row]| -> Vec<(i64, i64, i64)> {
        rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect()
    };
    assert_eq!(rows(&view), rows(&batch), "the view equals its query over the source");
    let first: chrono::NaiveDateTime =
        client.query_one("SELECT min(date_time) FROM bid", &[]).await.expect("time").get(0);
    assert_eq!(first.and_utc().timestamp_millis() / 1000, 1_700_000_000, "event time starts at base_time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_source_continues_without_gaps_or_repeats() {
    let dir = tempfile::tempdir().expect("temp dir");
    let start = || freshet::server::Server::start(common::config(dir.path()));
    let server = start().await.expect("starts");
    let addr = server.pg_addr();
    let url = format!("host={} port={} user=freshet dbname=freshet", addr.ip(), addr.port());
    let client = common::connect(&url).await;
    client
        .batch_execute(
            "CREATE SOURCE tel WITH (connector = 'telemetry', devices = '10', rate = '2000', events = '3000',
                                     base_time = '1700000000000', anomaly_rate = '0.05')",
        )
        .await
        .expect("source");
    // Stop part way.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while count(&client, "SELECT count(*) FROM tel").await < 300 {
        assert!(tokio::time::Instant::now() < deadline, "the source did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(client);
    server.shutdown().await;
    let server = start().await.expect("restarts");
    let addr = server.pg_addr();
    let client = common::connect(&format!("host={} port={} user=freshet dbname=freshet", addr.ip(), addr.port())).await;
    let before = count(&client, "SELECT count(*) FROM tel").await;
    assert!((300..3000).contains(&before), "stopped part way: {before}");
    wait_for(&client, "SELECT count(*) FROM tel", 3000).await;
    // Event n is device n % 10 at second n / 10: every (device, second) exactly once.
    assert_eq!(count(&client, "SELECT count(DISTINCT device_id || CAST(ts AS TEXT)) FROM tel").await, 3000);
    assert_eq!(count(&client, "SELECT count(DISTINCT device_id) FROM tel").await, 10);
    let last: chrono::NaiveDateTime = client.query_one("SELECT max(ts) FROM tel", &[]).await.expect("max").get(0);
    assert_eq!(last.and_utc().timestamp_millis(), 1_700_000_000_000 + 299 * 1000);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(count(&client, "SELECT count(*) FROM tel").await, 3000, "the source stops at its event limit");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sources_refuse_what_does_not_fit() {
    let server = TestServer::start().await;
    let client = server.connect().await;
    for (sql, code) in [
        ("CREATE SOURCE s WITH (connector = 'kinesis', stream = 't')", "0A000"),
        ("CREATE SOURCE s WITH (connector = 'nexmark', kind = 'bids')", "22023"),
        ("CREATE SOURCE s WITH (connector = 'telemetry', devices = 'many')", "22023"),
        ("CREATE SOURCE s WITH (connector = 'telemetry', speed = '3')", "22023"),
        ("CREATE SOURCE s (a INT) WITH (connector = 'telemetry')", "22023"),
        ("CREATE SOURCE s", "22023"),
    ] {
        let err = client.batch_execute(sql).await.expect_err(sql);
        assert_eq!(err.as_db_error().map(|d| d.code().code()), Some(code), "{sql}: {err}");
    }
    client
        .batch_execute(
            "CREATE SOURCE tel WITH (connector = 'telemetry', rate = '100');
             CREATE MATERIALIZED VIEW hot AS SELECT device_id, max(temperature) AS t FROM tel GROUP BY device_id",
        )
        .await
        .expect("source and view");
    let names: Vec<String> = client
        .simple_query("SHOW SOURCES")
        .await
        .expect("show")
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .collect();
    assert_eq!(names, vec!["tel"]);
    for (sql, code) in [
        ("INSERT INTO tel SELECT * FROM tel LIMIT 1", "42809"),
        ("DROP TABLE tel", "42809"),
        ("DROP SOURCE tel", "2BP01"),
        ("CREATE SOURCE tel WITH (connector = 'telemetry')", "42P07"),
    ] {
        let err = client.batch_execute(sql).await.expect_err(sql);
        assert_eq!(err.as_db_error().map(|d| d.code().code()), Some(code), "{sql}: {err}");
    }
    client.batch_execute("DROP SOURCE tel CASCADE").await.expect("drop with its view");
    let err = client.batch_execute("SELECT * FROM hot").await.expect_err("dropped");
    assert_eq!(err.as_db_error().map(|d| d.code().code()), Some("42P01"));
    client.batch_execute("DROP SOURCE IF EXISTS tel").await.expect("if exists");
}

/// One HTTP/1.1 request over a fresh connection: (status, body).
async fn post(addr: std::net::SocketAddr, path: &str, body: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("http connects");
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: freshet\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.expect("request sent");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("response read");
    let status = response.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("status line");
    let body = response.split("\r\n\r\n").nth(1).unwrap_or_default().to_string();
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_sources_take_json_and_csv_records() {
    let server = TestServer::start().await;
    let client = server.connect().await;
    client
        .batch_execute(
            "CREATE SOURCE events (device TEXT NOT NULL, reading DOUBLE PRECISION, at TIMESTAMP)
                 WITH (connector = 'http') FORMAT JSON;
             CREATE SOURCE rows_csv (id BIGINT, name TEXT) WITH (connector = 'http', header = 'true') FORMAT CSV;
             CREATE MATERIALIZED VIEW per_device AS SELECT device, count(*) AS n, sum(reading) AS total
                 FROM events GROUP BY device",
        )
        .await
        .expect("sources");
    let http = server.server.http_addr();
    let (status, body) = post(
        http,
        "/ingest/events",
        "{\"device\": \"a\", \"reading\": 1.5, \"at\": \"2026-11-26T10:00:00\"}\n{\"device\": \"b\", \"reading\": 2}\n\n{\"device\": \"a\", \"reading\": 3.5}\n",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"rows\":3"), "{body}");
    client.batch_execute("FLUSH").await.expect("flush");
    let rows: Vec<(String, i64, f64)> = client
        .query("SELECT device, n, total FROM per_device ORDER BY device", &[])
        .await
        .expect("view")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(rows, vec![("a".to_string(), 2, 5.0), ("b".to_string(), 1, 2.0)]);

    // A bad record names its line, and nothing of the body is appended.
    for bad in [
        "{\"device\": \"c\", \"reading\": 1}\n{\"device\": \"d\", \"reading\": \"hot\"}\n",
        "{\"device\": \"c\", \"reading\": 1}\n{\"reading\": 4}\n",
        "{\"device\": \"c\", \"reading\": 1}\n{\"device\": \"e\", \"colour\": \"red\"}\n",
        "{\"device\": \"c\", \"reading\": 1}\nnot json\n",
    ] {
        let (status, body) = post(http, "/ingest/events", bad).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(body.contains("line 2"), "{bad}: {body}");
    }
    assert_eq!(count(&client, "SELECT count(*) FROM events").await, 3, "rejected bodies append nothing");
    // Every bad record is listed, with its line.
    let (status, body) = post(
        http,
        "/ingest/events",
        "{\"device\": \"x\"}\n{\"reading\": 1}\nnope\n{\"device\": \"y\", \"reading\": 2}\n",
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let response: serde_json::Value = serde_json::from_str(&body).expect("JSON error");
    let lines: Vec<i64> =
        response["errors"].as_array().expect("errors").iter().map(|e| e["line"].as_i64().expect("line")).collect();
    assert_eq!(lines, [2, 3], "{body}");
    // A JSON array works as well as JSON lines.
    let (status, body) =
        post(http, "/ingest/events", "[{\"device\": \"c\", \"reading\": 1}, {\"device\": \"c\", \"reading\": 2}]")
            .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(count(&client, "SELECT count(*) FROM events").await, 5);
    // A body over 64 MiB is refused with 413 (the sender may see the connection close early).
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let stream = tokio::net::TcpStream::connect(http).await.expect("http connects");
        let (mut reader, mut writer) = stream.into_split();
        let size = 65usize << 20;
        let sending = tokio::spawn(async move {
            let head = format!("POST /ingest/events HTTP/1.1\r\nHost: freshet\r\nContent-Length: {size}\r\n\r\n");
            writer.write_all(head.as_bytes()).await?;
            let chunk = vec![b' '; 1 << 20];
            for _ in 0..65 {
                writer.write_all(&chunk).await?;
            }
            Ok::<_, std::io::Error>(writer)
        });
        let mut response = vec![0u8; 12];
        tokio::time::timeout(Duration::from_secs(60), reader.read_exact(&mut response))
            .await
            .expect("answered")
            .expect("status line");
        assert_eq!(String::from_utf8_lossy(&response), "HTTP/1.1 413", "bodies over 64 MiB are refused");
        drop(sending);
    }

    let (status, body) = post(http, "/ingest/rows_csv", "id,name\n1,one\n2,two\n").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(count(&client, "SELECT sum(id) FROM rows_csv").await, 3);
    let (status, _) = post(http, "/ingest/rows_csv", "id,name\n3,three\nfour,4\n").await;
    assert_eq!(status, 400);
    let (status, _) = post(http, "/ingest/missing", "{}").await;
    assert_eq!(status, 404);
    client.batch_execute("CREATE SOURCE gen WITH (connector = 'telemetry', rate = '1')").await.expect("generator");
    let (status, _) = post(http, "/ingest/gen", "{}").await;
    assert_eq!(status, 409, "generators take no posted rows");
    let err = client
        .batch_execute("CREATE SOURCE nocols WITH (connector = 'http')")
        .await
        .expect_err("an http source needs columns");
    assert_eq!(err.as_db_error().map(|d| d.code().code()), Some("22023"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_sources_read_each_file_once_across_restarts() {
    let data = tempfile::tempdir().expect("data dir");
    let files = tempfile::tempdir().expect("files dir");
    let csv = |name: &str, body: &str| std::fs::write(files.path().join(name), body).expect("file written");
    csv("a.csv", "id,name\n1,one\n2,two\n");
    csv("b.csv", "id,name\n3,three\n");
    csv("notes.txt", "not matched by the glob\n");
    let start = || freshet::server::Server::start(common::config(data.path()));
    let server = start().await.expect("starts");
    let addr = server.pg_addr();
    let client = common::connect(&format!("host={} port={} user=freshet dbname=freshet", addr.ip(), addr.port())).await;
    client
        .batch_execute(&format!(
            "CREATE SOURCE f (id BIGINT NOT NULL, name TEXT) WITH (connector = 'file', path = '{}/*.csv',
                 header = 'true', watch = 'true') FORMAT CSV;
             CREATE MATERIALIZED VIEW total AS SELECT count(*) AS n, sum(id) AS s FROM f",
            files.path().display()
        ))
        .await
        .expect("source");
    wait_for(&client, "SELECT count(*) FROM f", 3).await;
    let per_file: Vec<(String, i64)> = client
        .query("SELECT _file, count(*) FROM f GROUP BY _file ORDER BY _file", &[])
        .await
        .expect("per file")
        .iter()
        .map(|r| (r.get::<_, String>(0).rsplit('/').next().unwrap_or_default().to_string(), r.get(1)))
        .collect();
    assert_eq!(per_file, vec![("a.csv".to_string(), 2), ("b.csv".to_string(), 1)], "each row names its file");

    // New files are picked up; a file that does not decode is skipped whole.
    csv("c.csv", "id,name\n4,four\n");
    csv("d_bad.csv", "id,name\n5,five\nsix,6\n");
    wait_for(&client, "SELECT count(*) FROM f", 4).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(count(&client, "SELECT count(*) FROM f").await, 4, "the bad file added nothing");
    client.batch_execute("FLUSH").await.expect("flush");
    assert_eq!(count(&client, "SELECT s FROM total").await, 10);
    drop(client);
    server.shutdown().await;

    csv("e.csv", "id,name\n7,seven\n");
    let server = start().await.expect("restarts");
    let addr = server.pg_addr();
    let client = common::connect(&format!("host={} port={} user=freshet dbname=freshet", addr.ip(), addr.port())).await;
    wait_for(&client, "SELECT count(*) FROM f", 5).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(count(&client, "SELECT count(*) FROM f").await, 5, "files read before the restart are not read again");
    assert_eq!(count(&client, "SELECT count(DISTINCT id) FROM f").await, 5);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_sources_read_json_lines_and_parquet() {
    use datafusion::arrow::array::{Float64Array, StringArray};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use datafusion::arrow::record_batch::RecordBatch;
    let files = tempfile::tempdir().expect("files dir");
    std::fs::write(files.path().join("r1.jsonl"), "{\"dev\": \"a\", \"t\": 1.5}\n{\"dev\": \"b\", \"t\": 2.5}\n")
        .expect("json");
    let schema = std::sync::Arc::new(Schema::new(vec![
        Field::new("t", DataType::Float64, false),
        Field::new("dev", DataType::Utf8, false),
        Field::new("extra", DataType::Utf8, true),
    ]));
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            std::sync::Arc::new(Float64Array::from(vec![10.0, 20.0, 30.0])),
            std::sync::Arc::new(StringArray::from(vec!["x", "y", "z"])),
            std::sync::Arc::new(StringArray::from(vec![None::<&str>, None, None])),
        ],
    )
    .expect("batch");
    let file = std::fs::File::create(files.path().join("p1.parquet")).expect("parquet file");
    let mut writer = datafusion::parquet::arrow::ArrowWriter::try_new(file, schema, None).expect("writer");
    writer.write(&batch).expect("write");
    writer.close().expect("close");

    let server = TestServer::start().await;
    let client = server.connect().await;
    let dir = files.path().display();
    client
        .batch_execute(&format!(
            "CREATE SOURCE j (dev TEXT, t DOUBLE PRECISION) WITH (connector = 'file', path = '{dir}/*.jsonl') FORMAT JSON;
             CREATE SOURCE p (dev TEXT, t DOUBLE PRECISION) WITH (connector = 'file', path = '{dir}/*.parquet') FORMAT PARQUET"
        ))
        .await
        .expect("sources");
    wait_for(&client, "SELECT count(*) FROM j", 2).await;
    wait_for(&client, "SELECT count(*) FROM p", 3).await;
    assert_eq!(count(&client, "SELECT CAST(sum(t) AS BIGINT) FROM p").await, 60, "Parquet columns matched by name");
    let err = client
        .batch_execute("CREATE SOURCE bad (a INT) WITH (connector = 'file', path = 'gs://bucket/x.csv') FORMAT CSV")
        .await
        .expect_err("only s3:// object stores are known");
    assert_eq!(err.as_db_error().map(|d| d.code().code()), Some("0A000"));
    let err = client
        .batch_execute("CREATE SOURCE bad (_file TEXT) WITH (connector = 'file', path = '/tmp/*.csv') FORMAT CSV")
        .await
        .expect_err("the file column is freshet's");
    assert_eq!(err.as_db_error().map(|d| d.code().code()), Some("22023"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_sink_writes_each_epoch_as_a_complete_parquet_file() {
    use datafusion::arrow::array::{Int64Array, StringArray};
    use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

    let server = TestServer::start().await;
    let client = server.connect().await;
    let out = tempfile::tempdir().expect("output dir");
    client
        .batch_execute(&format!(
            "CREATE TABLE orders (id BIGINT PRIMARY KEY, customer TEXT NOT NULL, amount BIGINT NOT NULL);
             CREATE MATERIALIZED VIEW totals AS SELECT customer, sum(amount) AS total FROM orders GROUP BY customer;
             CREATE SINK totals_files FROM totals WITH (connector = 'file', path = '{}', mode = 'changes') FORMAT PARQUET",
            out.path().display()
        ))
        .await
        .expect("setup");
    client.batch_execute("INSERT INTO orders VALUES (1, 'ada', 10), (2, 'bob', 5); FLUSH").await.expect("epoch 1");
    client.batch_execute("INSERT INTO orders VALUES (3, 'ada', 7); FLUSH").await.expect("epoch 2");
    client.batch_execute("DELETE FROM orders WHERE customer = 'bob'; FLUSH").await.expect("epoch 3");
    // Replaying every file's changes in name order rebuilds the view.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        // Files being written have a hidden temporary name; every final name is complete.
        let mut names: Vec<String> = std::fs::read_dir(out.path())
            .expect("listing")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .filter(|name| !name.starts_with('.'))
            .collect();
        names.sort();
        let mut totals: std::collections::BTreeMap<(String, i64), i64> = Default::default();
        for name in &names {
            assert!(name.ends_with(".parquet"), "only Parquet files under final names: {name}");
            let file = std::fs::File::open(out.path().join(name)).expect("open");
            for batch in ParquetRecordBatchReaderBuilder::try_new(file).expect("parquet").build().expect("reader") {
                let batch = batch.expect("batch");
                let customer = batch.column(0).as_any().downcast_ref::<StringArray>().expect("customer");
                let total = batch.column(1).as_any().downcast_ref::<Int64Array>().expect("total");
                let diff =
                    batch.column_by_name("_diff").expect("_diff").as_any().downcast_ref::<Int64Array>().expect("diff");
                for i in 0..batch.num_rows() {
                    *totals.entry((customer.value(i).to_string(), total.value(i))).or_default() += diff.value(i);
                }
            }
        }
        totals.retain(|_, n| *n != 0);
        if totals == std::collections::BTreeMap::from([(("ada".to_string(), 17), 1)]) {
            assert!(names.len() >= 3, "one file per epoch with changes: {names:?}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the files add up to {totals:?} ({names:?})");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let written =
        count(&client, "SELECT messages_written FROM freshet_catalog.sinks WHERE sink = 'totals_files'").await;
    assert_eq!(written, 5, "rows written: ada +1, bob +1, ada -1 +1, bob -1");
    let e = client
        .batch_execute("CREATE SINK bad FROM totals WITH (connector = 'file', path = 'gs://bucket/x')")
        .await
        .expect_err("only s3:// object stores are known");
    assert!(common::db_error(&e).starts_with("0A000"), "{}", common::db_error(&e));
}
