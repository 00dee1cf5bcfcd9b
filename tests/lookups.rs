//! Lookups by key (`SELECT … FROM relation WHERE key = $1`), which freshet answers from a
//! key index rather than a scan: on materialized views by their GROUP BY columns and on
//! tables by their primary key, the answer must be exactly the rows a scan would give,
//! after inserts, updates and deletes, for present, absent and NULL keys.

mod common;

use std::collections::BTreeMap;

use common::TestServer;
use tokio_postgres::Client;

/// The tables' rows as the test believes them to be: id → (k, v).
type Model = BTreeMap<i64, (Option<String>, i64)>;

const KEYS: [&str; 5] = ["a", "b", "c", "d", "never"];

/// `per_k` as its query defines it: k → (count, sum).
fn per_k(model: &Model) -> BTreeMap<Option<String>, (i64, i64)> {
    let mut out: BTreeMap<Option<String>, (i64, i64)> = BTreeMap::new();
    for (k, v) in model.values() {
        let entry = out.entry(k.clone()).or_default();
        entry.0 += 1;
        entry.1 += v;
    }
    out
}

/// Checks every lookup the test knows against the model.
async fn assert_lookups(client: &Client, model: &Model, step: &str) {
    let by_k = client.prepare("SELECT n, s FROM per_k WHERE k = $1").await.expect("prepare");
    let expected = per_k(model);
    for key in KEYS {
        let rows = client.query(&by_k, &[&key]).await.expect("lookup");
        let got: Vec<(i64, i64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        let want: Vec<(i64, i64)> = expected.get(&Some(key.to_string())).copied().into_iter().collect();
        assert_eq!(got, want, "per_k WHERE k = '{key}' after {step}");
    }
    // `k = NULL` is never true, even though the NULL group is a row of the view.
    let none: Option<&str> = None;
    assert!(client.query(&by_k, &[&none]).await.expect("lookup").is_empty(), "k = NULL after {step}");

    let by_both = client.prepare("SELECT n FROM per_k_parity WHERE parity = $2 AND k = $1").await.expect("prepare");
    for key in KEYS {
        for parity in [0i64, 1] {
            let rows = client.query(&by_both, &[&key, &parity]).await.expect("lookup");
            let got: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
            let n = model.values().filter(|(k, v)| k.as_deref() == Some(key) && v.rem_euclid(2) == parity).count();
            let want: Vec<i64> = if n == 0 { vec![] } else { vec![n as i64] };
            assert_eq!(got, want, "per_k_parity WHERE k = '{key}' AND parity = {parity} after {step}");
        }
    }

    let by_id = client.prepare("SELECT k AS key, v FROM t WHERE id = $1").await.expect("prepare");
    for id in 0..12i64 {
        let rows = client.query(&by_id, &[&id]).await.expect("lookup");
        if let Some(row) = rows.first() {
            assert_eq!(row.columns()[0].name(), "key", "the alias names the column");
        }
        let got: Vec<(Option<String>, i64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        let want: Vec<(Option<String>, i64)> = model.get(&id).cloned().into_iter().collect();
        assert_eq!(got, want, "t WHERE id = {id} after {step}");
    }
}

/// A statement and what it does to the model.
type Step = (&'static str, fn(&mut Model));
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookups_by_key_answer_what_a_scan_would() {
    let server = TestServer::start().await;
    let client = server.connect().await;
    client
        .batch_execute(
            "CREATE TABLE t (id BIGINT PRIMARY KEY, k TEXT, v BIGINT NOT NULL);
             CREATE MATERIALIZED VIEW per_k AS SELECT k, count(*) AS n, sum(v) AS s FROM t GROUP BY k;
             CREATE MATERIALIZED VIEW per_k_parity AS
                 SELECT k, v % 2 AS parity, count(*) AS n FROM t GROUP BY k, v % 2;",
        )
        .await
        .expect("create");
    let mut model = Model::new();
    assert_lookups(&client, &model, "creating empty").await;

    let steps: [Step; 4] = [
        ("INSERT INTO t VALUES (0, 'a', 1), (1, 'a', 2), (2, 'b', 3), (3, NULL, 4), (4, 'c', 5), (5, 'a', 6)", |m| {
            for (id, k, v) in [
                (0, Some("a"), 1),
                (1, Some("a"), 2),
                (2, Some("b"), 3),
                (3, None, 4),
                (4, Some("c"), 5),
                (5, Some("a"), 6),
            ] {
                m.insert(id, (k.map(str::to_string), v));
            }
        }),
        ("UPDATE t SET k = 'b', v = v + 10 WHERE id IN (0, 4)", |m| {
            for id in [0, 4] {
                let row = m.get_mut(&id).expect("present");
                *row = (Some("b".into()), row.1 + 10);
            }
        }),
        ("DELETE FROM t WHERE k = 'a' OR k IS NULL", |m| {
            m.retain(|_, (k, _)| k.as_deref() != Some("a") && k.is_some())
        }),
        ("INSERT INTO t VALUES (6, 'a', 7), (7, 'd', 8), (8, NULL, 9), (9, 'a', 11)", |m| {
            for (id, k, v) in [(6, Some("a"), 7), (7, Some("d"), 8), (8, None, 9), (9, Some("a"), 11)] {
                m.insert(id, (k.map(str::to_string), v));
            }
        }),
    ];
    for (statement, apply) in steps {
        client.batch_execute(statement).await.expect("change");
        client.batch_execute("FLUSH").await.expect("flush");
        apply(&mut model);
        assert_lookups(&client, &model, statement).await;
    }

    // The same lookups in the simple protocol, with a constant key.
    let rows = client.simple_query("SELECT n, s FROM per_k WHERE k = 'a'").await.expect("query");
    let values: Vec<String> = rows
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(format!("{:?} {:?}", r.get(0), r.get(1))),
            _ => None,
        })
        .collect();
    assert_eq!(values, vec![r#"Some("2") Some("18")"#.to_string()]);
    // A key of another integer type finds the same row; a fraction finds none.
    let rows = client.query("SELECT v FROM t WHERE id = 7.0", &[]).await.expect("query");
    assert_eq!(rows.iter().map(|r| r.get::<_, i64>(0)).collect::<Vec<_>>(), vec![8]);
    assert!(client.query("SELECT v FROM t WHERE id = 7.5", &[]).await.expect("query").is_empty());
}
