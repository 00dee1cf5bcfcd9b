//! The Postgres wire protocol as real clients use it: tokio-postgres (extended protocol,
//! binary parameters and results) and psql (simple protocol, text results).

mod common;

use std::process::Command;
use std::str::FromStr;

use chrono::{NaiveDate, NaiveDateTime, NaiveTime};
use common::{TestServer, db_error};
use rust_decimal::Decimal;
use tokio_postgres::SimpleQueryMessage;
use tokio_postgres::types::Type;

/// Decodes any column, remembering only whether it was NULL.
struct IsNull(bool);

impl<'a> tokio_postgres::types::FromSql<'a> for IsNull {
    fn from_sql(_: &Type, _: &'a [u8]) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(IsNull(false))
    }

    fn from_sql_null(_: &Type) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(IsNull(true))
    }

    fn accepts(_: &Type) -> bool {
        true
    }
}

const ALL_TYPES: &str = "CREATE TABLE all_types (
    id INT PRIMARY KEY, b BOOLEAN, i2 SMALLINT, i8 BIGINT, f4 REAL, f8 DOUBLE PRECISION,
    n NUMERIC(12, 3), s TEXT, v VARCHAR, by BYTEA, d DATE, tm TIME, ts TIMESTAMP, tz TIMESTAMPTZ)";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_insert_update_delete_select_with_tokio_postgres() {
    let server = TestServer::start().await;
    let client = server.connect().await;
    client.batch_execute("CREATE TABLE kv (k TEXT PRIMARY KEY, v BIGINT NOT NULL)").await.expect("create");
    let insert = client.prepare("INSERT INTO kv VALUES ($1, $2)").await.expect("prepare");
    assert_eq!(insert.params(), &[Type::TEXT, Type::INT8], "parameter types come from the table");
    for (k, v) in [("a", 1i64), ("b", 2), ("c", 3)] {
        assert_eq!(client.execute(&insert, &[&k, &v]).await.expect("insert"), 1);
    }
    let updated = client.execute("UPDATE kv SET v = v * $1 WHERE v >= $2", &[&10i64, &2i64]).await.expect("update");
    assert_eq!(updated, 2);
    let deleted = client.execute("DELETE FROM kv WHERE k = $1", &[&"a"]).await.expect("delete");
    assert_eq!(deleted, 1);
    let rows = client.query("SELECT k, v FROM kv ORDER BY k", &[]).await.expect("select");
    let got: Vec<(String, i64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(got, vec![("b".to_string(), 20), ("c".to_string(), 30)]);

    // The same statement prepared once and executed many times sees fresh data.
    let count = client.prepare("SELECT count(*) FROM kv WHERE v > $1").await.expect("prepare");
    assert_eq!(client.query_one(&count, &[&0i64]).await.expect("count").get::<_, i64>(0), 2);
    client.execute(&insert, &[&"d", &40i64]).await.expect("insert");
    assert_eq!(client.query_one(&count, &[&0i64]).await.expect("count").get::<_, i64>(0), 3);

    let err = client.execute(&insert, &[&"d", &1i64]).await.expect_err("duplicate key");
    assert_eq!(db_error(&err), "23505: duplicate key value violates unique constraint \"kv_pkey\"");
    let db = err.as_db_error().expect("server error");
    assert_eq!(db.detail(), Some("Key (k)=(d) already exists."));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_type_round_trips_in_binary_format() {
    let server = TestServer::start().await;
    let client = server.connect().await;
    client.batch_execute(ALL_TYPES).await.expect("create");
    let insert = client
        .prepare("INSERT INTO all_types VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)")
        .await
        .expect("prepare");
    let expected_types = [
        Type::INT4,
        Type::BOOL,
        Type::INT2,
        Type::INT8,
        Type::FLOAT4,
        Type::FLOAT8,
        Type::NUMERIC,
        Type::TEXT,
        Type::TEXT,
        Type::BYTEA,
        Type::DATE,
        Type::TIME,
        Type::TIMESTAMP,
        Type::TIMESTAMPTZ,
    ];
    assert_eq!(insert.params(), &expected_types);
    let n = Decimal::from_str("1234.567").expect("decimal");
    let d = NaiveDate::from_ymd_opt(2024, 2, 29).expect("date");
    let tm = NaiveTime::from_hms_micro_opt(13, 14, 15, 250_000).expect("time");
    let ts = NaiveDateTime::new(d, tm);
    let tz = chrono::DateTime::<chrono::Utc>::from_naive_utc_and_offset(ts, chrono::Utc);
    let bytes: Vec<u8> = vec![0, 1, 2, 255];
    client
        .execute(
            &insert,
            &[&1i32, &true, &-7i16, &(1i64 << 40), &1.5f32, &-2.25f64, &n, &"héllo", &"v", &bytes, &d, &tm, &ts, &tz],
        )
        .await
        .expect("insert every type");
    let nulls: [&(dyn tokio_postgres::types::ToSql + Sync); 14] = [
        &2i32,
        &None::<bool>,
        &None::<i16>,
        &None::<i64>,
        &None::<f32>,
        &None::<f64>,
        &None::<Decimal>,
        &None::<String>,
        &None::<String>,
        &None::<Vec<u8>>,
        &None::<NaiveDate>,
        &None::<NaiveTime>,
        &None::<NaiveDateTime>,
        &None::<chrono::DateTime<chrono::Utc>>,
    ];
    client.execute(&insert, &nulls).await.expect("insert NULLs");

    let select = client.prepare("SELECT * FROM all_types WHERE id = $1").await.expect("prepare");
    let result_types: Vec<Type> = select.columns().iter().map(|c| c.type_().clone()).collect();
    assert_eq!(result_types, expected_types, "result columns carry the Postgres type OIDs");
    let row = client.query_one(&select, &[&1i32]).await.expect("row 1");
    assert!(row.get::<_, bool>("b"));
    assert_eq!(row.get::<_, i16>("i2"), -7);
    assert_eq!(row.get::<_, i64>("i8"), 1 << 40);
    assert_eq!(row.get::<_, f32>("f4"), 1.5);
    assert_eq!(row.get::<_, f64>("f8"), -2.25);
    assert_eq!(row.get::<_, Decimal>("n"), n);
    assert_eq!(row.get::<_, String>("s"), "héllo");
    assert_eq!(row.get::<_, String>("v"), "v");
    assert_eq!(row.get::<_, Vec<u8>>("by"), bytes);
    assert_eq!(row.get::<_, NaiveDate>("d"), d);
    assert_eq!(row.get::<_, NaiveTime>("tm"), tm);
    assert_eq!(row.get::<_, NaiveDateTime>("ts"), ts);
    assert_eq!(row.get::<_, chrono::DateTime<chrono::Utc>>("tz"), tz);
    let row = client.query_one(&select, &[&2i32]).await.expect("row 2");
    for column in 1..14 {
        assert!(row.get::<_, IsNull>(column).0, "column {column} is NULL");
    }

    // The same values in text format over the simple protocol.
    let messages = client
        .simple_query("SELECT b, i2, i8, f8, n, s, by, d, tm, ts FROM all_types WHERE id = 1")
        .await
        .expect("text");
    let SimpleQueryMessage::Row(row) = &messages[1] else { panic!("expected a row, got {:?}", messages.len()) };
    let text: Vec<&str> = (0..row.len()).map(|i| row.get(i).expect("not null")).collect();
    assert_eq!(
        text,
        vec![
            "t",
            "-7",
            "1099511627776",
            "-2.25",
            "1234.567",
            "héllo",
            "\\x000102ff",
            "2024-02-29",
            "13:14:15.250000",
            "2024-02-29 13:14:15.250000"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interval_timestamptz_and_json_results_have_their_types() {
    let server = TestServer::start().await;
    let client = server.connect().await;
    let statement = client
        .prepare("SELECT INTERVAL '1 day 2 hours' AS i, CAST('2024-01-01 00:00:00+00' AS TIMESTAMPTZ) AS tz")
        .await
        .expect("prepare");
    assert_eq!(statement.columns()[0].type_(), &Type::INTERVAL);
    assert_eq!(statement.columns()[1].type_(), &Type::TIMESTAMPTZ);
    let row = client.query_one(&statement, &[]).await.expect("runs");
    let tz: chrono::DateTime<chrono::Utc> = row.get(1);
    assert_eq!(tz.to_rfc3339(), "2024-01-01T00:00:00+00:00");

    client.batch_execute("CREATE TABLE docs (id INT, body JSON)").await.expect("create");
    client.execute("INSERT INTO docs VALUES (1, $1)", &[&r#"{"a": [1, 2]}"#]).await.expect("insert json text");
    let select = client.prepare("SELECT body FROM docs").await.expect("prepare");
    assert_eq!(select.columns()[0].type_(), &Type::JSON);
    let body: serde_json::Value = client.query_one(&select, &[]).await.expect("select").get(0);
    assert_eq!(body, serde_json::json!({"a": [1, 2]}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_carry_sqlstate_and_position_and_the_session_goes_on() {
    let server = TestServer::start().await;
    let client = server.connect().await;
    let err = client.simple_query("SELECT * FROM missing_table").await.expect_err("unknown table");
    let db = err.as_db_error().expect("server error");
    assert_eq!(db.code().code(), "42P01");
    assert_eq!(db.position(), Some(&tokio_postgres::error::ErrorPosition::Original(15)));
    let err = client.prepare("SELECT 1 +* 2").await.expect_err("syntax error at Parse");
    assert_eq!(err.as_db_error().map(|d| d.code().code()), Some("42601"));
    // (A view over no table is now a constant; random() is still refused.)
    let err = client
        .batch_execute("CREATE MATERIALIZED VIEW v AS SELECT random() AS r")
        .await
        .expect_err("not deterministic");
    assert_eq!(err.as_db_error().map(|d| d.code().code()), Some("0A000"));
    // Still usable afterwards.
    let row = client.query_one("SELECT 41 + 1", &[]).await.expect("session still works");
    assert_eq!(row.get::<_, i64>(0), 42);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_request_stops_a_running_query() {
    let server = TestServer::start().await;
    let client = server.connect().await;
    let token = client.cancel_token();
    let canceller = tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        token.cancel_query(tokio_postgres::NoTls).await
    });
    let started = std::time::Instant::now();
    let err = client
        .simple_query("SELECT count(*) FROM range(1000000000000) a WHERE a.value % 7 = 3")
        .await
        .expect_err("cancelled");
    assert_eq!(err.as_db_error().map(|d| d.code().code()), Some("57014"), "{err}");
    canceller.await.expect("task").expect("cancel sent");
    assert!(started.elapsed() < std::time::Duration::from_secs(60));
    let row = client.query_one("SELECT 1::BIGINT", &[]).await.expect("session survives a cancel");
    assert_eq!(row.get::<_, i64>(0), 1);
}

/// Runs psql against `addr` with `args`, off the async runtime.
async fn psql(addr: std::net::SocketAddr, args: &[&str]) -> std::process::Output {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        Command::new("psql")
            .args([
                "-X",
                "-h",
                &addr.ip().to_string(),
                "-p",
                &addr.port().to_string(),
                "-U",
                "freshet",
                "-d",
                "freshet",
            ])
            .args(&args)
            .env("PGCONNECT_TIMEOUT", "10")
            .output()
            .expect("psql is installed (scripts/test installs postgresql-client)")
    })
    .await
    .expect("psql ran")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_runs_statements_and_shows_errors_with_their_position() {
    let server = TestServer::start().await;
    let addr = server.server.pg_addr();
    let out = psql(
        addr,
        &[
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            "CREATE TABLE t (id INT PRIMARY KEY, name TEXT)",
            "-c",
            "INSERT INTO t VALUES (1, 'one'), (2, 'two'), (3, 'three')",
            "-c",
            "UPDATE t SET name = 'TWO' WHERE id = 2",
            "-c",
            "DELETE FROM t WHERE id = 3",
            "-A",
            "-c",
            "SELECT id, name FROM t ORDER BY id",
        ],
    )
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "psql failed: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(stdout, "CREATE TABLE\nINSERT 0 3\nUPDATE 1\nDELETE 1\nid|name\n1|one\n2|TWO\n(2 rows)\n");

    let out = psql(addr, &["-c", "SELECT name FROM t WHERE nope = 1"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("ERROR:") && stderr.contains("nope"), "{stderr}");
    assert!(stderr.contains("LINE 1: SELECT name FROM t WHERE nope = 1"), "psql shows the position: {stderr}");
}
