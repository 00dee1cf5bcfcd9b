//! Materialized views against the oracle: after every random change to the tables, each
//! view's contents must equal its query run as an ordinary batch query over the same data.

mod common;

use common::TestServer;
use tokio_postgres::{Client, SimpleQueryMessage};

/// View shapes the engine maintains today; every one is checked after every step.
const SHAPES: &[(&str, &str)] = &[
    ("v_all", "SELECT * FROM t"),
    ("v_project", "SELECT id, k, v * 2 + 1 AS x, upper(s) AS us, f / 2 AS half FROM t"),
    ("v_filter", "SELECT id, v, s FROM t WHERE v > 10 AND s IS NOT NULL"),
    ("v_count", "SELECT k, count(*) AS n FROM t GROUP BY k"),
    ("v_aggregates", "SELECT k, count(v) AS c, sum(v) AS s, avg(v) AS a, min(v) AS lo, max(v) AS hi FROM t GROUP BY k"),
    ("v_null_keys", "SELECT s, count(*) AS n, max(f) AS mf, min(f) AS lf FROM t GROUP BY s"),
    ("v_global", "SELECT count(*) AS n, sum(v) AS s, avg(f) AS a, min(s) AS ms, max(v) AS mv FROM t"),
    ("v_filtered_aggregate", "SELECT k, sum(f) AS sf, count(*) AS n FROM t WHERE v % 3 = 0 GROUP BY k"),
    ("v_having", "SELECT k, count(*) AS n, sum(v) AS s FROM t GROUP BY k HAVING count(*) > 2"),
    (
        "v_expression_group",
        "SELECT v % 4 AS bucket, min(s) AS first_s, max(s) AS last_s, count(s) AS n FROM t GROUP BY v % 4",
    ),
    ("v_two_keys", "SELECT k, s, sum(v) AS total, max(id) AS newest FROM t GROUP BY k, s"),
    (
        "v_aggregate_of_expression",
        "SELECT k % 2 AS parity, sum(v * k) AS weighted, min(v + k) AS lo FROM t WHERE s <> 'c' GROUP BY k % 2",
    ),
    ("v_distinct", "SELECT DISTINCT k, s FROM t"),
    ("v_count_distinct", "SELECT k, count(DISTINCT s) AS kinds FROM t GROUP BY k"),
    (
        "v_mixed_distinct",
        "SELECT k, count(DISTINCT s) AS kinds, count(DISTINCT v % 3) AS residues, sum(v) AS total FROM t GROUP BY k",
    ),
    ("v_join", "SELECT t.id, t.v, u.uid, u.label FROM t JOIN u ON t.k = u.k"),
    ("v_join_condition", "SELECT t.id, u.uid FROM t JOIN u ON t.k = u.k AND t.v > u.w"),
    // A constant input: the other input's rows are kept only until the view starts.
    (
        "v_join_constant",
        "SELECT t.id, t.v, c.name FROM t JOIN (VALUES (0, 'zero'), (1, 'one'), (3, 'three'), (3, 'again')) c(k, name) ON t.k = c.k",
    ),
    ("v_constant_join_condition", "SELECT r.value, t.id FROM range(-2, 4) r JOIN t ON t.k = r.value AND t.v > r.value"),
    ("v_left_join", "SELECT t.id, u.label FROM t LEFT JOIN u ON t.k = u.k"),
    ("v_right_join", "SELECT t.id, u.uid FROM t RIGHT JOIN u ON t.k = u.k"),
    ("v_full_join", "SELECT t.id, t.s, u.uid FROM t FULL JOIN u ON t.k = u.k"),
    ("v_left_join_condition", "SELECT t.id, u.uid FROM t LEFT JOIN u ON t.k = u.k AND t.v > u.w"),
    ("v_full_join_condition", "SELECT t.id, u.uid, u.label FROM t FULL JOIN u ON t.k = u.k AND u.w < t.v"),
    ("v_right_join_condition", "SELECT t.id, u.uid FROM t RIGHT JOIN u ON t.k = u.k AND t.f + u.w > 0"),
    ("v_exists_condition", "SELECT id FROM t WHERE EXISTS (SELECT 1 FROM u WHERE u.k = t.k AND u.w > t.v)"),
    ("v_not_exists_condition", "SELECT id, v FROM t WHERE NOT EXISTS (SELECT 1 FROM u WHERE u.k = t.k AND u.w >= t.v)"),
    ("v_in", "SELECT id, k FROM t WHERE k IN (SELECT k FROM u WHERE w > 0)"),
    ("v_exists", "SELECT id FROM t WHERE EXISTS (SELECT 1 FROM u WHERE u.k = t.k AND u.label = 'x')"),
    ("v_not_exists", "SELECT id, v FROM t WHERE NOT EXISTS (SELECT 1 FROM u WHERE u.k = t.k)"),
    (
        "v_join_aggregate",
        "SELECT u.label, count(*) AS n, sum(t.v) AS s, max(t.f) AS mf FROM t JOIN u ON t.k = u.k GROUP BY u.label",
    ),
    ("v_self_join", "SELECT a.id, b.id AS other FROM t a JOIN t b ON a.v = b.v AND a.id < b.id"),
    ("v_bool_aggregates", "SELECT k, bool_and(v > 0) AS all_pos, bool_or(s = 'a') AS any_a FROM t GROUP BY k"),
    ("v_top_n", "SELECT id, v FROM t ORDER BY v DESC NULLS LAST, id LIMIT 3"),
    ("v_top_n_offset", "SELECT id, k FROM t ORDER BY id LIMIT 4 OFFSET 2"),
    ("v_top_n_of_groups", "SELECT k, sum(v) AS s FROM t GROUP BY k ORDER BY s DESC NULLS LAST, k LIMIT 2"),
    (
        "v_top_per_group",
        "SELECT * FROM (SELECT id, k, v, row_number() OVER (PARTITION BY k ORDER BY v DESC NULLS LAST, id) AS rn FROM t) WHERE rn <= 2",
    ),
    (
        "v_top_per_group_band",
        "SELECT k, id FROM (SELECT k, id, row_number() OVER (PARTITION BY s ORDER BY f, id DESC) AS rn FROM t) x WHERE rn BETWEEN 2 AND 3 AND k > 0",
    ),
    (
        "v_spread",
        "SELECT k, round(stddev(v), 6) AS sd, round(variance(v), 6) AS var, round(var_pop(f), 6) AS vp, round(stddev_pop(f), 6) AS sdp FROM t GROUP BY k",
    ),
    (
        "v_collect",
        "SELECT k, string_agg(s, ',' ORDER BY s) AS names, array_agg(v ORDER BY v) AS vs, array_agg(f ORDER BY f DESC) AS fs, string_agg(s, '' ORDER BY s DESC) AS rev FROM t GROUP BY k",
    ),
    ("v_union_all", "SELECT k, v AS x FROM t WHERE v > 0 UNION ALL SELECT k, w FROM u"),
    ("v_union", "SELECT k FROM t UNION SELECT k FROM u WHERE label = 'x'"),
    ("v_union_aggregate", "SELECT k, count(*) AS n FROM (SELECT k FROM t UNION ALL SELECT k FROM u) GROUP BY k"),
];

/// Views over the views above (and tables): created after them, checked the same way.
const VIEW_SHAPES: &[(&str, &str)] = &[
    ("v_over_count", "SELECT n, count(*) AS groups FROM v_count GROUP BY n"),
    ("v_over_join", "SELECT c.k, c.n, u.label FROM v_count c JOIN u ON c.k = u.k"),
    ("v_over_over", "SELECT sum(groups) AS total, max(n) AS biggest FROM v_over_count"),
];

/// A small deterministic generator (xorshift), so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> i64 {
        (self.next() % n) as i64
    }
}

async fn rows(client: &Client, sql: &str) -> Vec<String> {
    let messages = client.simple_query(sql).await.unwrap_or_else(|e| panic!("{sql}: {}", common::db_error(&e)));
    let mut rows: Vec<String> = messages
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(row) => {
                Some((0..row.len()).map(|i| row.get(i).unwrap_or("NULL").to_string()).collect::<Vec<_>>().join("|"))
            }
            _ => None,
        })
        .collect();
    rows.sort();
    rows
}

fn random_row(rng: &mut Rng, id: i64) -> String {
    let k = rng.below(5);
    let v = if rng.below(10) == 0 { "NULL".to_string() } else { (rng.below(60) - 20).to_string() };
    let s = ["'a'", "'b'", "'c'", "NULL"][rng.below(4) as usize];
    // Halves are exact in binary floating point, so sums do not depend on order.
    let f = (rng.below(41) - 20) as f64 / 2.0;
    format!("({id}, {k}, {v}, {s}, {f})")
}

/// One random change: inserts, updates of values and keys, deletes of extremes and groups.
fn random_change(rng: &mut Rng, next_id: &mut i64) -> String {
    match rng.below(13) {
        9 | 10 => {
            *next_id += 1;
            let k = if rng.below(7) == 0 { "NULL".to_string() } else { rng.below(6).to_string() };
            let label = ["'x'", "'y'", "NULL"][rng.below(3) as usize];
            format!("INSERT INTO u VALUES ({}, {k}, {}, {label})", *next_id, rng.below(30) - 10)
        }
        11 => format!("DELETE FROM u WHERE uid % 3 = {}", rng.below(3)),
        12 => format!("UPDATE u SET k = {}, w = w + 5 WHERE uid % 4 = {}", rng.below(6), rng.below(4)),
        0..=2 => {
            let n = 1 + rng.below(6);
            let values: Vec<String> = (0..n)
                .map(|_| {
                    *next_id += 1;
                    random_row(rng, *next_id)
                })
                .collect();
            format!("INSERT INTO t VALUES {}", values.join(", "))
        }
        3 => format!("UPDATE t SET v = v + {} WHERE id % 4 = {}", rng.below(7) - 3, rng.below(4)),
        4 => format!("UPDATE t SET k = {} WHERE id % 5 = {}", rng.below(5), rng.below(5)),
        5 => "DELETE FROM t WHERE v = (SELECT min(v) FROM t)".to_string(),
        6 => "DELETE FROM t WHERE v = (SELECT max(v) FROM t)".to_string(),
        7 => format!("DELETE FROM t WHERE k = {}", rng.below(5)),
        _ => format!("UPDATE t SET s = NULL, f = f + 1 WHERE id % 3 = {}", rng.below(3)),
    }
}

async fn assert_views_match(client: &Client, step: &str) {
    client.batch_execute("FLUSH").await.expect("flush");
    for (name, query) in SHAPES.iter().chain(VIEW_SHAPES) {
        let view = rows(client, &format!("SELECT * FROM {name}")).await;
        let oracle = rows(client, query).await;
        assert_eq!(view, oracle, "view {name} ({query}) differs from its query after {step}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn views_equal_their_queries_under_random_changes_on_one_worker() {
    views_equal_their_queries_under_random_changes(1).await;
}

/// The same oracle with every GROUP BY and join split over three instances by key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn views_equal_their_queries_under_random_changes_on_three_workers() {
    views_equal_their_queries_under_random_changes(3).await;
}

async fn views_equal_their_queries_under_random_changes(workers: usize) {
    let server = TestServer::start_with(|config| config.workers = workers).await;
    let client = server.connect().await;
    client
        .batch_execute(
            "CREATE TABLE t (id BIGINT PRIMARY KEY, k INT, v BIGINT, s TEXT, f DOUBLE PRECISION);
             CREATE TABLE u (uid BIGINT PRIMARY KEY, k INT, w BIGINT, label TEXT);
             INSERT INTO u VALUES (-1, 1, 3, 'x'), (-2, 2, -4, 'y'), (-3, NULL, 0, 'x')",
        )
        .await
        .expect("create");
    // Stateful operators really run as `workers` instances.
    let plan = rows(
        &client,
        "EXPLAIN CREATE MATERIALIZED VIEW x AS SELECT u.label, count(*) FROM t JOIN u ON t.k = u.k GROUP BY u.label",
    )
    .await;
    let parallel = plan.iter().filter(|line| line.contains(&format!("x{workers} (hash exchange"))).count();
    assert_eq!(parallel, if workers > 1 { 2 } else { 0 }, "{plan:?}");
    let mut rng = Rng(0x9E3779B97F4A7C15);
    let mut next_id = 0;
    // Some views start over existing data (backfill), the rest over an empty table.
    let insert = random_change(&mut Rng(7), &mut next_id);
    client.batch_execute(&insert).await.expect("seed rows");
    for (i, (name, query)) in SHAPES.iter().enumerate() {
        if i % 2 == 0 {
            client.batch_execute(&format!("CREATE MATERIALIZED VIEW {name} AS {query}")).await.expect("create view");
        }
    }
    client.batch_execute("INSERT INTO t VALUES (1000, 1, 5, 'a', 1.5), (1001, 1, 5, 'b', 2.5)").await.expect("rows");
    for (i, (name, query)) in SHAPES.iter().enumerate() {
        if i % 2 == 1 {
            client.batch_execute(&format!("CREATE MATERIALIZED VIEW {name} AS {query}")).await.expect("create view");
        }
    }
    for (name, query) in VIEW_SHAPES {
        client.batch_execute(&format!("CREATE MATERIALIZED VIEW {name} AS {query}")).await.expect("create view");
    }
    assert_views_match(&client, "creation").await;
    for step in 0..80 {
        // Several changes per epoch, so the views must consolidate within an epoch too.
        let mut statements = Vec::new();
        for _ in 0..1 + rng.below(3) {
            let change = random_change(&mut rng, &mut next_id);
            client.batch_execute(&change).await.unwrap_or_else(|e| panic!("{change}: {}", common::db_error(&e)));
            statements.push(change);
        }
        assert_views_match(&client, &format!("step {step}: {}", statements.join("; "))).await;
    }
    client.batch_execute("DELETE FROM t").await.expect("empty the table");
    assert_views_match(&client, "deleting every row").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn views_survive_restart_and_keep_updating() {
    let dir = tempfile::tempdir().expect("temp dir");
    let start = || freshet::server::Server::start(common::config(dir.path()));
    let server = start().await.expect("starts");
    let addr = server.pg_addr();
    let client = common::connect(&format!("host={} port={} user=freshet dbname=freshet", addr.ip(), addr.port())).await;
    client
        .batch_execute(
            "CREATE TABLE r (dev TEXT, temp BIGINT);
             INSERT INTO r VALUES ('a', 1), ('a', 3), ('b', 10);
             CREATE MATERIALIZED VIEW per_dev AS SELECT dev, count(*) AS n, max(temp) AS hi FROM r GROUP BY dev;
             CREATE VIEW warm AS SELECT dev, temp FROM r WHERE temp > 1;
             CREATE MATERIALIZED VIEW warm_count AS SELECT count(*) AS n FROM warm;
             CREATE MATERIALIZED VIEW busiest AS SELECT max(n) AS most FROM per_dev",
        )
        .await
        .expect("setup");
    server.shutdown().await;

    let server = start().await.expect("restarts");
    let addr = server.pg_addr();
    let client = common::connect(&format!("host={} port={} user=freshet dbname=freshet", addr.ip(), addr.port())).await;
    assert_eq!(rows(&client, "SHOW MATERIALIZED VIEWS").await, vec!["busiest", "per_dev", "warm_count"]);
    assert_eq!(rows(&client, "SELECT * FROM busiest").await, vec!["2"]);
    assert_eq!(rows(&client, "SELECT * FROM warm_count").await, vec!["2"]);
    assert_eq!(rows(&client, "SELECT dev FROM warm").await, vec!["a", "b"]);
    assert_eq!(rows(&client, "SELECT * FROM per_dev").await, vec!["a|2|3", "b|1|10"]);
    client.batch_execute("DELETE FROM r WHERE temp = 3; INSERT INTO r VALUES ('c', 0); FLUSH").await.expect("changes");
    assert_eq!(rows(&client, "SELECT * FROM per_dev").await, vec!["a|1|1", "b|1|10", "c|1|0"]);
    assert_eq!(rows(&client, "SELECT * FROM busiest").await, vec!["1"]);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn views_refuse_what_they_cannot_maintain() {
    let server = TestServer::start().await;
    let client = server.connect().await;
    client.batch_execute("CREATE TABLE a (id INT, x INT); CREATE TABLE b (id INT, y INT)").await.expect("tables");
    for (sql, code) in [
        ("CREATE MATERIALIZED VIEW v AS SELECT x FROM a WHERE x NOT IN (SELECT y FROM b)", "0A000"),
        ("CREATE MATERIALIZED VIEW v AS SELECT x FROM a LIMIT 3", "0A000"),
        ("CREATE MATERIALIZED VIEW v AS SELECT x, random() AS r FROM a", "0A000"),
        ("CREATE MATERIALIZED VIEW v AS SELECT x FROM a WHERE x > extract(epoch FROM now())", "0A000"),
        ("CREATE MATERIALIZED VIEW v AS SELECT x FROM missing", "42P01"),
        (
            "CREATE MATERIALIZED VIEW v AS SELECT * FROM (SELECT x, rank() OVER (ORDER BY x) AS r FROM a) WHERE r <= 2",
            "0A000",
        ),
        (
            "CREATE MATERIALIZED VIEW v AS SELECT * FROM (SELECT x, row_number() OVER (ORDER BY x) AS r FROM a) WHERE r > 2",
            "0A000",
        ),
        ("CREATE MATERIALIZED VIEW v AS SELECT x, row_number() OVER (ORDER BY x) AS r FROM a", "0A000"),
    ] {
        let err = client.batch_execute(sql).await.expect_err(sql);
        assert_eq!(err.as_db_error().map(|d| d.code().code()), Some(code), "{sql}: {err}");
    }
    client.batch_execute("CREATE MATERIALIZED VIEW v AS SELECT x FROM a").await.expect("a simple view");
    let err = client.batch_execute("INSERT INTO v VALUES (1)").await.expect_err("views are read-only");
    assert_eq!(err.as_db_error().map(|d| d.code().code()), Some("42809"));
    let err = client.batch_execute("DROP TABLE a").await.expect_err("a view depends on it");
    assert_eq!(err.as_db_error().map(|d| d.code().code()), Some("2BP01"));
    client.batch_execute("DROP MATERIALIZED VIEW v; DROP TABLE a").await.expect("drop in order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_cascade_takes_the_dependent_views_along() {
    let server = TestServer::start().await;
    let client = server.connect().await;
    client
        .batch_execute(
            "CREATE TABLE a (id INT, x INT);
             CREATE TABLE keep (id INT);
             INSERT INTO a VALUES (1, 10), (2, 20);
             CREATE MATERIALIZED VIEW m1 AS SELECT id, x * 2 AS y FROM a;
             CREATE VIEW p1 AS SELECT id FROM m1 WHERE y > 25;
             CREATE MATERIALIZED VIEW m2 AS SELECT count(*) AS n FROM p1;
             CREATE MATERIALIZED VIEW other AS SELECT count(*) AS n FROM keep",
        )
        .await
        .expect("setup");
    assert_eq!(rows(&client, "SELECT * FROM m2").await, vec!["1"]);
    for sql in ["DROP MATERIALIZED VIEW m1", "DROP VIEW p1", "DROP TABLE a"] {
        let err = client.batch_execute(sql).await.expect_err(sql);
        assert_eq!(err.as_db_error().map(|d| d.code().code()), Some("2BP01"), "{sql}: {err}");
        assert!(err.as_db_error().is_some_and(|d| d.message().contains("CASCADE")), "{sql}: {err}");
    }
    let err = client.batch_execute("DROP VIEW m1").await.expect_err("m1 is materialized");
    assert_eq!(err.as_db_error().map(|d| d.code().code()), Some("42809"), "{err}");
    client.batch_execute("DROP TABLE a CASCADE").await.expect("cascade");
    assert_eq!(rows(&client, "SHOW MATERIALIZED VIEWS").await, vec!["other"]);
    for name in ["a", "m1", "p1", "m2"] {
        let err = client.batch_execute(&format!("SELECT * FROM {name}")).await.expect_err(name);
        assert_eq!(err.as_db_error().map(|d| d.code().code()), Some("42P01"), "{name}: {err}");
    }
    client.batch_execute("INSERT INTO keep VALUES (1); FLUSH").await.expect("the rest keeps working");
    assert_eq!(rows(&client, "SELECT * FROM other").await, vec!["1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_query_sees_every_view_and_table_at_the_same_epoch() {
    let server = TestServer::start().await;
    let client = server.connect().await;
    client
        .batch_execute(
            "CREATE TABLE t (id BIGINT, v BIGINT);
             CREATE MATERIALIZED VIEW counted AS SELECT count(*) AS n FROM t;
             CREATE MATERIALIZED VIEW summed AS SELECT sum(v) AS s, count(v) AS n FROM t",
        )
        .await
        .expect("setup");
    let writer = server.connect().await;
    let writes = tokio::spawn(async move {
        for i in 0..300i64 {
            writer.batch_execute(&format!("INSERT INTO t VALUES ({i}, 1), ({i}, 1)")).await.expect("insert");
            if i % 7 == 0 {
                writer.batch_execute(&format!("DELETE FROM t WHERE id = {}", i / 2)).await.expect("delete");
            }
        }
    });
    let mut checks = 0;
    while !writes.is_finished() {
        let row = client
            .query_one("SELECT c.n, s.n, s.s, (SELECT count(*) FROM t) FROM counted c CROSS JOIN summed s", &[])
            .await
            .expect("read");
        let (views_a, views_b, table): (i64, i64, i64) = (row.get(0), row.get(1), row.get(3));
        assert_eq!(views_a, views_b, "two views in one query are at the same epoch");
        assert_eq!(views_a, table, "tables in a query over views are read at the views' epoch");
        checks += 1;
    }
    writes.await.expect("writer");
    assert!(checks > 10, "the reader overlapped the writer ({checks} reads)");
}

/// Reads SUBSCRIBE rows until `n` data rows arrived: `(diff, columns…)` as text.
async fn next_rows(stream: &mut std::pin::Pin<Box<tokio_postgres::SimpleQueryStream>>, n: usize) -> Vec<String> {
    use futures::StreamExt;
    let mut rows = Vec::new();
    while rows.len() < n {
        let message = tokio::time::timeout(std::time::Duration::from_secs(30), stream.next())
            .await
            .expect("rows arrive while the subscription is open")
            .expect("stream open")
            .expect("no error");
        if let SimpleQueryMessage::Row(row) = message {
            rows.push((1..row.len()).map(|i| row.get(i).unwrap_or("NULL").to_string()).collect::<Vec<_>>().join("|"));
            let epoch: i64 = row.get(0).expect("epoch").parse().expect("an integer epoch");
            assert!(epoch >= 0);
        }
    }
    rows.sort();
    rows
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_streams_the_snapshot_then_every_change() {
    let server = TestServer::start().await;
    let client = server.connect().await;
    client
        .batch_execute(
            "CREATE TABLE r (dev TEXT, temp BIGINT);
             INSERT INTO r VALUES ('a', 1), ('b', 2);
             CREATE MATERIALIZED VIEW hot AS SELECT dev, temp FROM r WHERE temp > 0",
        )
        .await
        .expect("setup");
    let subscriber = server.connect().await;
    let mut stream = Box::pin(subscriber.simple_query_raw("SUBSCRIBE TO hot").await.expect("subscribes"));
    assert_eq!(next_rows(&mut stream, 2).await, vec!["1|a|1", "1|b|2"], "the snapshot comes first");

    client
        .batch_execute("INSERT INTO r VALUES ('c', 3), ('z', -1); DELETE FROM r WHERE dev = 'a'; FLUSH")
        .await
        .expect("changes");
    assert_eq!(next_rows(&mut stream, 2).await, vec!["-1|a|1", "1|c|3"], "then each change, with its diff");
    client.batch_execute("UPDATE r SET temp = 20 WHERE dev = 'b'; FLUSH").await.expect("update");
    assert_eq!(next_rows(&mut stream, 2).await, vec!["-1|b|2", "1|b|20"], "an update is a retraction and an insertion");

    // Cancelling ends the subscription; the session goes on.
    subscriber.cancel_token().cancel_query(tokio_postgres::NoTls).await.expect("cancel sent");
    let ended = loop {
        use futures::StreamExt;
        match tokio::time::timeout(std::time::Duration::from_secs(30), stream.next()).await.expect("ends") {
            Some(Ok(_)) => continue,
            Some(Err(e)) => break e,
            None => panic!("the subscription ended without the cancel error"),
        }
    };
    assert_eq!(ended.as_db_error().map(|d| d.code().code()), Some("57014"));
    drop(stream);
    let row = subscriber.query_one("SELECT count(*) FROM hot", &[]).await.expect("session still works");
    assert_eq!(row.get::<_, i64>(0), 2);

    let err = subscriber.simple_query("SUBSCRIBE TO r").await.expect_err("only views");
    assert_eq!(err.as_db_error().map(|d| d.code().code()), Some("42809"));
    let mut quiet =
        Box::pin(subscriber.simple_query_raw("SUBSCRIBE hot WITH (snapshot = false)").await.expect("subscribes"));
    // The subscription starts once the server has handled SUBSCRIBE, which this client
    // cannot see, so insert until a change arrives: the first row must be one of those.
    let mut inserted = Vec::new();
    let first = loop {
        use futures::StreamExt;
        let dev = format!("d{}", inserted.len());
        client.batch_execute(&format!("INSERT INTO r VALUES ('{dev}', 4); FLUSH")).await.expect("insert");
        inserted.push(format!("1|{dev}|4"));
        assert!(inserted.len() < 60, "no change arrived on the subscription");
        let next = async {
            loop {
                match quiet.next().await {
                    Some(Ok(SimpleQueryMessage::Row(row))) => {
                        return (1..row.len()).map(|i| row.get(i).unwrap_or("NULL")).collect::<Vec<_>>().join("|");
                    }
                    Some(Ok(_)) => continue,
                    other => panic!("the subscription ended: {:?}", other.map(|r| r.err())),
                }
            }
        };
        if let Ok(row) = tokio::time::timeout(std::time::Duration::from_millis(500), next).await {
            break row;
        }
    };
    assert!(inserted.contains(&first), "without the snapshot only changes arrive: got {first}, inserted {inserted:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_over_subscribe_fetches_what_arrived() {
    let server = TestServer::start().await;
    let client = server.connect().await;
    client
        .batch_execute(
            "CREATE TABLE r (dev TEXT, temp BIGINT);
             INSERT INTO r VALUES ('a', 1), ('b', 2), ('c', 3);
             CREATE MATERIALIZED VIEW hot AS SELECT dev, temp FROM r WHERE temp > 0",
        )
        .await
        .expect("setup");
    let reader = server.connect().await;
    // Rows as `diff|dev|temp`, dropping the epoch.
    let fetch = |sql: &'static str| {
        let reader = &reader;
        async move {
            let rows = rows(reader, sql).await;
            rows.into_iter()
                .map(|r| r.split_once('|').map(|(_, rest)| rest.to_string()).unwrap_or(r))
                .collect::<Vec<_>>()
        }
    };
    reader.batch_execute("DECLARE c CURSOR FOR SUBSCRIBE TO hot").await.expect("declare");
    assert_eq!(fetch("FETCH 2 c").await.len(), 2, "FETCH n returns at most n rows");
    assert_eq!(fetch("FETCH ALL FROM c").await.len(), 1, "the rest of the snapshot");
    assert!(fetch("FETCH ALL c WITH (timeout = '200ms')").await.is_empty(), "nothing new: empty after the timeout");
    client.batch_execute("DELETE FROM r WHERE dev = 'a'; INSERT INTO r VALUES ('d', 4); FLUSH").await.expect("changes");
    assert_eq!(fetch("FETCH ALL c").await, vec!["-1|a|1", "1|d|4"], "FETCH waits for the next change");

    // Over the extended protocol (prepared statements), with typed columns.
    client.batch_execute("UPDATE r SET temp = 30 WHERE dev = 'c'; FLUSH").await.expect("update");
    let typed = reader.query("FETCH ALL IN c", &[]).await.expect("extended fetch");
    let mut changes: Vec<(i64, String, i64)> = typed.iter().map(|r| (r.get(1), r.get(2), r.get(3))).collect();
    changes.sort();
    assert_eq!(changes, vec![(-1, "c".to_string(), 3), (1, "c".to_string(), 30)]);
    assert!(typed.iter().all(|r| r.get::<_, i64>(0) > 0), "each row carries its epoch");

    for (sql, code) in [
        ("DECLARE c CURSOR FOR SUBSCRIBE hot", "42P03"),
        ("FETCH ALL missing", "34000"),
        ("DECLARE d CURSOR FOR SUBSCRIBE r", "42809"),
    ] {
        let err = reader.batch_execute(sql).await.expect_err(sql);
        assert_eq!(err.as_db_error().map(|d| d.code().code()), Some(code), "{sql}: {err}");
    }
    reader.batch_execute("CLOSE c").await.expect("close");
    let err = reader.batch_execute("FETCH ALL c").await.expect_err("closed");
    assert_eq!(err.as_db_error().map(|d| d.code().code()), Some("34000"));
}
