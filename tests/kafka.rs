//! Kafka sources and sinks against a real Kafka-protocol broker (tansu, on loopback), with
//! an independent client (kafka-python) producing what freshet reads and reading what
//! freshet writes.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::{TestServer, count, wait_for};

use common::kafka::Broker;

fn reading(i: usize) -> (Option<i32>, Option<String>, Option<String>) {
    let device = format!("d{}", i % 7);
    let value = serde_json::json!({ "device": device, "seq": i, "temperature": 20.0 + (i % 10) as f64 / 2.0 });
    (Some((i % 3) as i32), Some(device), Some(value.to_string()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kafka_source_reads_every_partition_and_resumes_exactly_after_a_restart() {
    let broker = Broker::start().await;
    broker.create_topic("readings", 3).await;
    let first: Vec<_> = (0..300).map(reading).collect();
    broker.produce("readings", &first).await;

    let dir = tempfile::tempdir().expect("temp dir");
    let start = || freshet::server::Server::start(common::config(dir.path()));
    let server = start().await.expect("starts");
    let url = |server: &freshet::server::Server| {
        let addr = server.pg_addr();
        format!("host={} port={} user=freshet dbname=freshet", addr.ip(), addr.port())
    };
    let client = common::connect(&url(&server)).await;
    client
        .batch_execute(&format!(
            "CREATE SOURCE readings (device TEXT NOT NULL, seq BIGINT NOT NULL, temperature DOUBLE PRECISION)
                 INCLUDE partition, offset, key AS device_key, timestamp
                 WITH (connector = 'kafka', brokers = '{}', topic = 'readings', start = 'earliest')
                 FORMAT JSON;
             CREATE MATERIALIZED VIEW per_device AS
                 SELECT device, count(*) AS n, max(temperature) AS hottest FROM readings GROUP BY device",
            broker.address
        ))
        .await
        .expect("source and view");
    wait_for(&client, "SELECT count(*) FROM readings", 300).await;
    // Every record once, from all three partitions, with its metadata.
    assert_eq!(count(&client, "SELECT count(DISTINCT seq) FROM readings").await, 300);
    assert_eq!(count(&client, "SELECT count(DISTINCT _partition) FROM readings").await, 3);
    assert_eq!(count(&client, "SELECT count(*) FROM readings WHERE _partition <> seq % 3").await, 0);
    assert_eq!(count(&client, "SELECT count(*) FROM readings WHERE device_key <> device").await, 0);
    assert_eq!(
        count(&client, "SELECT count(*) FROM readings WHERE _offset <> seq / 3").await,
        0,
        "offsets per partition"
    );
    assert_eq!(count(&client, "SELECT count(*) FROM readings WHERE _timestamp IS NULL").await, 0);
    client.batch_execute("FLUSH").await.expect("flush");
    assert_eq!(count(&client, "SELECT sum(n) FROM per_device").await, 300);
    // Progress: every partition read to its end.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let rows = client
            .query(
                "SELECT partition, next_offset, lag FROM freshet_catalog.source_progress WHERE source = 'readings'",
                &[],
            )
            .await
            .expect("progress");
        let done: Vec<(i32, i64, Option<i64>)> = rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect();
        if done == [(0, 100, Some(0)), (1, 100, Some(0)), (2, 100, Some(0))] {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "progress stayed at {done:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Records produced while freshet is down are read after the restart, none twice.
    drop(client);
    server.shutdown().await;
    let second: Vec<_> = (300..450).map(reading).collect();
    broker.produce("readings", &second).await;
    let server = start().await.expect("restarts");
    let client = common::connect(&url(&server)).await;
    wait_for(&client, "SELECT count(*) FROM readings", 450).await;
    assert_eq!(count(&client, "SELECT count(DISTINCT seq) FROM readings").await, 450);
    client.batch_execute("FLUSH").await.expect("flush");
    let view = client.query("SELECT device, n FROM per_device ORDER BY device", &[]).await.expect("view");
    let batch = client
        .query("SELECT device, count(*) FROM readings GROUP BY device ORDER BY device", &[])
        .await
        .expect("batch");
    let pairs =
        |rows: &[tokio_postgres::Row]| -> Vec<(String, i64)> { rows.iter().map(|r| (r.get(0), r.get(1))).collect() };
    assert_eq!(pairs(&view), pairs(&batch), "the view follows the source across the restart");

    // Opening after a replay writes a snapshot; the offsets come back from it too.
    drop(client);
    server.shutdown().await;
    let third: Vec<_> = (450..500).map(reading).collect();
    broker.produce("readings", &third).await;
    let server = start().await.expect("restarts again");
    let client = common::connect(&url(&server)).await;
    wait_for(&client, "SELECT count(*) FROM readings", 500).await;
    assert_eq!(count(&client, "SELECT count(DISTINCT seq) FROM readings").await, 500);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_that_do_not_decode_become_dead_letters_and_the_rest_are_read() {
    let broker = Broker::start().await;
    broker.create_topic("dirty", 2).await;
    let server = TestServer::start().await;
    let client = server.connect().await;
    client
        .batch_execute(&format!(
            "CREATE SOURCE dirty (id BIGINT NOT NULL, name TEXT)
                 WITH (connector = 'kafka', brokers = '{}', topic = 'dirty') FORMAT JSON",
            broker.address
        ))
        .await
        .expect("source");
    let record = |partition: i32, value: &str| (Some(partition), None, Some(value.to_string()));
    broker
        .produce(
            "dirty",
            &[
                record(0, r#"{"id": 1, "name": "one"}"#),
                record(0, r#"{"id": "two"}"#),
                record(1, r#"{"name": "no id"}"#),
                record(1, r#"{"id": 3}"#),
                record(0, "not json at all"),
                record(1, r#"{"id": 4, "name": "four"}"#),
            ],
        )
        .await;
    wait_for(&client, "SELECT count(*) FROM dirty", 3).await;
    let ids: Vec<i64> =
        client.query("SELECT id FROM dirty ORDER BY id", &[]).await.expect("rows").iter().map(|r| r.get(0)).collect();
    assert_eq!(ids, [1, 3, 4]);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while count(&client, "SELECT count(*) FROM freshet_catalog.dead_letters WHERE source = 'dirty'").await < 3 {
        assert!(tokio::time::Instant::now() < deadline, "dead letters did not appear");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let letters = client
        .query(
            "SELECT partition, \"offset\", error, raw FROM freshet_catalog.dead_letters WHERE source = 'dirty'
             ORDER BY partition, \"offset\"",
            &[],
        )
        .await
        .expect("dead letters");
    let at: Vec<(i32, i64)> = letters.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(at, [(0, 1), (0, 2), (1, 0)], "each bad record with its partition and offset");
    let raw: Vec<String> = letters.iter().map(|r| r.get(3)).collect();
    assert_eq!(raw, [r#"{"id": "two"}"#, "not json at all", r#"{"name": "no id"}"#]);
    for row in &letters {
        let error: String = row.get(2);
        assert!(!error.is_empty(), "the error says what is wrong");
    }
    let dead =
        count(&client, "SELECT sum(dead_letters) FROM freshet_catalog.source_progress WHERE source = 'dirty'").await;
    assert_eq!(dead, 3 * 2, "each partition's row carries the source's dead-letter count");
    server.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_error_fail_stops_the_source_at_the_bad_record() {
    let broker = Broker::start().await;
    broker.create_topic("strict", 1).await;
    broker
        .produce("strict", &[(Some(0), None, Some(r#"{"id": 1}"#.into())), (Some(0), None, Some("{broken".into()))])
        .await;
    let server = TestServer::start().await;
    let client = server.connect().await;
    client
        .batch_execute(&format!(
            "CREATE SOURCE strict (id BIGINT NOT NULL)
                 WITH (connector = 'kafka', brokers = '{}', topic = 'strict', on_error = 'fail') FORMAT JSON",
            broker.address
        ))
        .await
        .expect("source");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let (status, error) = loop {
        let row = client
            .query_one("SELECT status, last_error FROM freshet_catalog.source_progress WHERE source = 'strict'", &[])
            .await
            .expect("progress");
        let status: String = row.get(0);
        if status == "stopped" {
            break (status, row.get::<_, Option<String>>(1).unwrap_or_default());
        }
        assert!(tokio::time::Instant::now() < deadline, "the source did not stop (status {status})");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(status, "stopped");
    assert!(error.contains("offset 1") && error.contains("on_error"), "the error names the record: {error}");
    assert_eq!(count(&client, "SELECT count(*) FROM strict").await, 0, "nothing from the failing batch is appended");
    server.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sinks_write_view_changes_that_an_independent_client_reads_back() {
    let broker = Broker::start().await;
    for topic in ["totals_upsert", "totals_cdc", "orders_append"] {
        broker.create_topic(topic, 1).await;
    }
    let server = TestServer::start().await;
    let client = server.connect().await;
    client
        .batch_execute(&format!(
            "CREATE TABLE orders (id BIGINT PRIMARY KEY, customer TEXT NOT NULL, amount BIGINT NOT NULL);
             CREATE MATERIALIZED VIEW totals AS SELECT customer, sum(amount) AS total FROM orders GROUP BY customer;
             CREATE MATERIALIZED VIEW all_orders AS SELECT id, customer, amount FROM orders;
             CREATE SINK totals_upsert FROM totals
                 WITH (connector = 'kafka', brokers = '{b}', topic = 'totals_upsert', key = 'customer', mode = 'upsert')
                 FORMAT JSON;
             CREATE SINK totals_cdc FROM totals
                 WITH (connector = 'kafka', brokers = '{b}', topic = 'totals_cdc', key = 'customer', mode = 'debezium');
             CREATE SINK orders_append FROM all_orders
                 WITH (connector = 'kafka', brokers = '{b}', topic = 'orders_append');",
            b = broker.address
        ))
        .await
        .expect("setup");
    let sinks: Vec<String> =
        client.query("SHOW SINKS", &[]).await.expect("show sinks").iter().map(|r| r.get(0)).collect();
    assert_eq!(sinks, ["orders_append", "totals_cdc", "totals_upsert"]);
    client.batch_execute("INSERT INTO orders VALUES (1, 'ada', 10), (2, 'bob', 5)").await.expect("insert");
    client.batch_execute("FLUSH").await.expect("flush");
    client.batch_execute("INSERT INTO orders VALUES (3, 'ada', 7)").await.expect("insert");
    client.batch_execute("FLUSH").await.expect("flush");
    client.batch_execute("DELETE FROM orders WHERE customer = 'bob'").await.expect("delete");
    client.batch_execute("FLUSH").await.expect("flush");

    // Upsert: ada's latest total, and a tombstone for bob.
    let upserts = broker.consume("totals_upsert", 4).await;
    let mut latest: BTreeMap<String, Option<serde_json::Value>> = BTreeMap::new();
    for record in &upserts {
        let key = record["key"].as_str().expect("keyed").to_string();
        let value = record["value"].as_str().map(|v| serde_json::from_str(v).expect("JSON value"));
        latest.insert(key, value);
    }
    assert_eq!(latest["ada"], Some(serde_json::json!({ "customer": "ada", "total": 17 })), "{upserts:?}");
    assert_eq!(latest["bob"], None, "bob's rows were deleted: a tombstone ({upserts:?})");

    // Debezium: create, update, delete.
    let changes = broker.consume("totals_cdc", 4).await;
    let ops: BTreeSet<(String, String)> = changes
        .iter()
        .map(|r| {
            let value: serde_json::Value = serde_json::from_str(r["value"].as_str().expect("value")).expect("JSON");
            (r["key"].as_str().expect("key").to_string(), value["op"].as_str().expect("op").to_string())
        })
        .collect();
    let expected: BTreeSet<(String, String)> = [("ada", "c"), ("bob", "c"), ("ada", "u"), ("bob", "d")]
        .iter()
        .map(|(k, o)| (k.to_string(), o.to_string()))
        .collect();
    assert_eq!(ops, expected, "{changes:?}");
    let update = changes
        .iter()
        .map(|r| serde_json::from_str::<serde_json::Value>(r["value"].as_str().expect("value")).expect("JSON"))
        .find(|v| v["op"] == "u")
        .expect("an update");
    assert_eq!(update["before"]["total"], 10);
    assert_eq!(update["after"]["total"], 17);

    // Append: every inserted order once; the delete is counted, not written.
    let appended = broker.consume("orders_append", 3).await;
    let ids: BTreeSet<i64> = appended
        .iter()
        .map(|r| {
            serde_json::from_str::<serde_json::Value>(r["value"].as_str().expect("value")).expect("JSON")["id"]
                .as_i64()
                .expect("id")
        })
        .collect();
    assert_eq!(ids, BTreeSet::from([1, 2, 3]));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while count(&client, "SELECT retractions_skipped FROM freshet_catalog.sinks WHERE sink = 'orders_append'").await
        != 1
    {
        assert!(tokio::time::Instant::now() < deadline, "the skipped retraction is not counted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    server.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_statements_that_do_not_fit_are_refused_clearly() {
    let server = TestServer::start().await;
    let client = server.connect().await;
    client
        .batch_execute(
            "CREATE TABLE t (k TEXT, v BIGINT);
             CREATE MATERIALIZED VIEW mv AS SELECT k, sum(v) AS s FROM t GROUP BY k",
        )
        .await
        .expect("setup");
    let refused = |sql: &'static str| {
        let client = &client;
        async move {
            let e = client.batch_execute(sql).await.expect_err(sql);
            common::db_error(&e)
        }
    };
    let e = refused("CREATE SOURCE s (a INT) WITH (connector = 'kafka', topic = 'x') FORMAT JSON").await;
    assert!(e.starts_with("22023") && e.contains("brokers"), "{e}");
    let e = refused("CREATE SOURCE s (a INT) WITH (connector = 'kafka', brokers = 'b:1', topic = 'x', start = 'soon')")
        .await;
    assert!(e.starts_with("22023") && e.contains("earliest"), "{e}");
    let e = refused("CREATE SOURCE s (a INT) INCLUDE headers WITH (connector = 'kafka', brokers = 'b:1', topic = 'x')")
        .await;
    assert!(e.starts_with("22023") && e.contains("partition, offset, timestamp and key"), "{e}");
    let e = refused("CREATE SOURCE s (n BIGINT) WITH (connector = 'kafka', brokers = 'b:1', topic = 'x') FORMAT TEXT")
        .await;
    assert!(e.starts_with("22023") && e.contains("TEXT"), "{e}");
    let e = refused("CREATE SINK k FROM t WITH (connector = 'kafka', brokers = 'b:1', topic = 'x')").await;
    assert!(e.starts_with("42809") && e.contains("materialized view"), "{e}");
    let e = refused("CREATE SINK k FROM mv WITH (connector = 'kafka', brokers = 'b:1', topic = 'x', mode = 'upsert')")
        .await;
    assert!(e.starts_with("22023") && e.contains("key"), "{e}");
    let e = refused(
        "CREATE SINK k FROM mv WITH (connector = 'kafka', brokers = 'b:1', topic = 'x', key = 'nope', mode = 'upsert')",
    )
    .await;
    assert!(e.starts_with("22023") && e.contains("nope"), "{e}");
    // A sink holds its view: dropping the view needs CASCADE, which drops the sink too.
    client
        .batch_execute("CREATE SINK k FROM mv WITH (connector = 'kafka', brokers = '127.0.0.1:1', topic = 'x')")
        .await
        .expect("a sink to an unreachable broker is created; it retries");
    let e = refused("DROP MATERIALIZED VIEW mv").await;
    assert!(e.starts_with("2BP01") && e.contains("sink \"k\""), "{e}");
    let e = refused("CREATE TABLE k (a INT)").await;
    assert!(e.starts_with("42P07"), "a sink's name is taken: {e}");
    client.batch_execute("DROP MATERIALIZED VIEW mv CASCADE").await.expect("cascade");
    assert!(client.query("SHOW SINKS", &[]).await.expect("show").is_empty());
    client.batch_execute("DROP SINK IF EXISTS k").await.expect("if exists");
    server.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_waits_for_an_unreachable_broker_and_reads_once_it_is_there() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port").local_addr().expect("addr").port();
    let server = TestServer::start().await;
    let client = server.connect().await;
    client
        .batch_execute(&format!(
            "CREATE SOURCE late (v TEXT) INCLUDE offset
                 WITH (connector = 'kafka', brokers = '127.0.0.1:{port}', topic = 'late') FORMAT TEXT"
        ))
        .await
        .expect("created while the broker is down");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let row = client
            .query_one("SELECT status, last_error FROM freshet_catalog.source_progress WHERE source = 'late'", &[])
            .await
            .expect("progress");
        let (status, error): (String, Option<String>) = (row.get(0), row.get(1));
        if status == "retrying" && error.is_some() {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the missing broker is not reported ({status}, {error:?})");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let broker = Broker::start_on(port).await;
    broker.create_topic("late", 1).await;
    let records: Vec<_> = (0..20).map(|i| (Some(0), None, Some(format!("event {i}")))).collect();
    broker.produce("late", &records).await;
    wait_for(&client, "SELECT count(*) FROM late", 20).await;
    assert_eq!(count(&client, "SELECT count(DISTINCT _offset) FROM late").await, 20);
    let status: String = client
        .query_one("SELECT status FROM freshet_catalog.source_progress WHERE source = 'late'", &[])
        .await
        .expect("progress")
        .get(0);
    assert_eq!(status, "running");
    server.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn avro_values_written_by_fastavro_are_read_and_bad_ones_dead_lettered() {
    let broker = Broker::start().await;
    broker.create_topic("avro_readings", 1).await;
    let schema = r#"{"type": "record", "name": "Reading", "namespace": "plant", "fields": [
        {"name": "device", "type": "string"},
        {"name": "seq", "type": "long"},
        {"name": "temperature", "type": ["null", "double"], "default": null},
        {"name": "at", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "ok", "type": "boolean"}]}"#;
    let mut values: Vec<serde_json::Value> = (0..40)
        .map(|i| {
            let temperature =
                if i % 10 == 0 { serde_json::Value::Null } else { serde_json::json!(20.0 + i as f64 / 4.0) };
            serde_json::json!({ "device": format!("d{}", i % 4), "seq": i, "temperature": temperature,
                                "at": 1_790_000_000_000i64 + i * 1000, "ok": i % 2 == 0 })
        })
        .collect();
    // Not Avro of this schema: a string length running past the end.
    values.insert(17, serde_json::json!({ "raw_hex": "7f6162" }));
    broker.produce_avro("avro_readings", schema, &values).await;

    let server = TestServer::start().await;
    let client = server.connect().await;
    client
        .batch_execute(&format!(
            "CREATE SOURCE readings (seq BIGINT NOT NULL, device TEXT, temperature DOUBLE PRECISION,
                                     at TIMESTAMP WITH TIME ZONE, ok BOOLEAN)
                 INCLUDE offset
                 WITH (connector = 'kafka', brokers = '{}', topic = 'avro_readings', avro.schema = '{schema}')
                 FORMAT AVRO;
             CREATE MATERIALIZED VIEW per_device AS
                 SELECT device, count(*) AS n, count(temperature) AS measured FROM readings GROUP BY device",
            broker.address
        ))
        .await
        .expect("avro source");
    wait_for(&client, "SELECT count(*) FROM readings", 40).await;
    wait_for(&client, "SELECT count(*) FROM freshet_catalog.dead_letters WHERE source = 'readings'", 1).await;
    let letter = client
        .query_one("SELECT \"offset\", error FROM freshet_catalog.dead_letters WHERE source = 'readings'", &[])
        .await
        .expect("dead letter");
    assert_eq!(letter.get::<_, Option<i64>>(0), Some(17), "the bad record's offset");
    assert!(letter.get::<_, String>(1).contains("Avro"), "{}", letter.get::<_, String>(1));

    let row = client
        .query_one("SELECT device, temperature, at, ok, _offset FROM readings WHERE seq = 21", &[])
        .await
        .expect("a row");
    assert_eq!(row.get::<_, String>(0), "d1");
    assert_eq!(row.get::<_, Option<f64>>(1), Some(25.25));
    let at = chrono::DateTime::from_timestamp_millis(1_790_000_021_000).expect("a time");
    assert_eq!(row.get::<_, chrono::DateTime<chrono::Utc>>(2), at, "timestamp-millis arrives as that instant");
    assert!(!row.get::<_, bool>(3));
    assert_eq!(row.get::<_, i64>(4), 22, "offsets count the bad record too");
    assert_eq!(count(&client, "SELECT count(*) FROM readings WHERE temperature IS NULL").await, 4);
    client.batch_execute("FLUSH").await.expect("flush");
    assert_eq!(count(&client, "SELECT sum(n) FROM per_device").await, 40);
    assert_eq!(count(&client, "SELECT sum(measured) FROM per_device").await, 36);

    // Columns the schema cannot give are refused when the source is created.
    let refused = |sql: String| {
        let client = &client;
        async move { common::db_error(&client.batch_execute(&sql).await.expect_err(&sql)) }
    };
    let with = |columns: &str, options: &str| {
        format!(
            "CREATE SOURCE bad ({columns}) WITH (connector = 'kafka', brokers = '{}', topic = 'avro_readings'{options}) FORMAT AVRO",
            broker.address
        )
    };
    let e = refused(with("pressure DOUBLE PRECISION", &format!(", avro.schema = '{schema}'"))).await;
    assert!(e.starts_with("22023") && e.contains("pressure is not a field"), "{e}");
    let e = refused(with("seq BIGINT", "")).await;
    assert!(e.contains("needs the writer schema"), "{e}");
    let e = refused(with("seq BIGINT", ", schema.registry = 'http://127.0.0.1:8081'")).await;
    assert!(e.starts_with("0A000"), "{e}");
}
