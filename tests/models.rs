//! Models over the wire: training each algorithm on labelled data from testdata/models,
//! scoring in queries and views, versions and hot swaps under load, export and import
//! between servers, recovery, and every kind of bad input.

mod common;

use std::time::Duration;

use common::TestServer;
use tokio_postgres::{Client, SimpleQueryMessage};

/// The first column of each row, as text (NULL as "NULL").
async fn column(client: &Client, sql: &str) -> Vec<String> {
    let messages = client.simple_query(sql).await.unwrap_or_else(|e| panic!("{sql}: {}", common::db_error(&e)));
    messages
        .into_iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(row) => Some(row.get(0).unwrap_or("NULL").to_string()),
            _ => None,
        })
        .collect()
}

async fn number(client: &Client, sql: &str) -> f64 {
    let values = column(client, sql).await;
    values.first().and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("{sql} returned {values:?}"))
}

/// SQLSTATE and message of a statement that must fail.
async fn error(client: &Client, sql: &str) -> (String, String) {
    match client.batch_execute(sql).await {
        Ok(()) => panic!("{sql} succeeded but should fail"),
        Err(e) => {
            let db = e.as_db_error().unwrap_or_else(|| panic!("{sql}: not a database error: {e}"));
            (db.code().code().to_string(), db.message().to_string())
        }
    }
}

async fn run(client: &Client, sql: &str) {
    client.batch_execute(sql).await.unwrap_or_else(|e| panic!("{sql}: {}", common::db_error(&e)));
}

/// Creates table `name` with `columns` and the rows of `testdata/models/<file>`.
async fn load(client: &Client, name: &str, columns: &str, file: &str) {
    let path = format!("{}/testdata/models/{file}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let rows: Vec<String> = text
        .lines()
        .skip(1)
        .map(|line| {
            let values: Vec<String> = line
                .split(',')
                .map(|v| if v.parse::<f64>().is_ok() { v.to_string() } else { format!("'{v}'") })
                .collect();
            format!("({})", values.join(", "))
        })
        .collect();
    run(client, &format!("CREATE TABLE {name} ({columns}); INSERT INTO {name} VALUES {}", rows.join(", "))).await;
}

fn close(actual: f64, expected: f64, tolerance: f64, what: &str) {
    assert!((actual - expected).abs() <= tolerance, "{what}: got {actual}, expected {expected} ± {tolerance}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_algorithm_scores_its_known_good_values() {
    let server = TestServer::start().await;
    let c = server.connect().await;

    load(&c, "clusters", "x DOUBLE, y DOUBLE, cluster BIGINT", "clusters.csv").await;
    run(&c, "CREATE MODEL blobs USING kmeans (k = 3, seed = 1) AS SELECT x, y FROM clusters").await;
    close(number(&c, "SELECT score('blobs', 3.0, 4.0)").await, 5.0, 1e-9, "kmeans distance to (0, 0)");
    close(number(&c, "SELECT score('blobs', 10, 1)").await, 1.0, 1e-9, "kmeans distance to (10, 0)");
    // Each labelled cluster gets one id, and the three ids differ.
    let per_cluster = column(
        &c,
        "SELECT count(DISTINCT predict('blobs', x, y)) FROM clusters GROUP BY cluster ORDER BY 1 DESC LIMIT 1",
    )
    .await;
    assert_eq!(per_cluster, vec!["1"], "one id per labelled cluster");
    assert_eq!(column(&c, "SELECT count(DISTINCT predict('blobs', x, y)) FROM clusters").await, vec!["3"]);
    close(number(&c, "SELECT sum(score('blobs', x, y) * score('blobs', x, y)) FROM clusters").await, 12.0, 1e-9, "inertia");

    load(&c, "ring", "x DOUBLE, y DOUBLE", "ring.csv").await;
    run(&c, "CREATE MODEL ring_gmm USING gaussian_mixture (components = 1) AS SELECT x, y FROM ring").await;
    let expected = (2.0 * std::f64::consts::PI).ln() + 0.5 * 0.25f64.ln() + 2.0;
    close(number(&c, "SELECT score('ring_gmm', 1, 1)").await, expected, 1e-4, "gaussian NLL at (1, 1)");
    assert_eq!(column(&c, "SELECT predict('ring_gmm', 5, 5)").await, vec!["0"]);

    load(&c, "spread", "x BIGINT, y REAL", "zscore.csv").await;
    run(&c, "CREATE MODEL spread_z USING zscore AS SELECT x, y FROM spread").await;
    close(number(&c, "SELECT score('spread_z', 6, 30)").await, 3.0 / 2.5f64.sqrt(), 1e-9, "max |z|");
    close(number(&c, "SELECT score('spread_z', 3, 80)").await, 50.0 / (10.0 * 2.5f64.sqrt()), 1e-6, "max |z| on y");

    load(&c, "plane", "x1 INT, x2 INT, y DOUBLE", "linear.csv").await;
    run(&c, "CREATE MODEL plane_fit USING linear_regression AS SELECT x1, x2, y FROM plane").await;
    close(number(&c, "SELECT score('plane_fit', 10, 1)").await, 18.0, 1e-6, "2·10 − 3·1 + 1");
    close(number(&c, "SELECT predict('plane_fit', 0, 0)").await, 1.0, 1e-6, "intercept");

    load(&c, "failures", "x DOUBLE, failed BIGINT", "logistic.csv").await;
    run(&c, "CREATE MODEL failure_risk USING logistic_regression AS SELECT x, failed FROM failures").await;
    close(number(&c, "SELECT score('failure_risk', 0)").await, 0.5, 1e-3, "P(failed) at the symmetry point");
    assert!(number(&c, "SELECT score('failure_risk', 4)").await > 0.9, "P(failed) far on the failing side");
    assert_eq!(column(&c, "SELECT predict('failure_risk', 3), predict('failure_risk', -3)").await, vec!["1"]);
    assert_eq!(column(&c, "SELECT predict('failure_risk', -3)").await, vec!["0"]);
    assert_eq!(column(&c, "SELECT count(*) FROM failures WHERE predict('failure_risk', x) = failed").await, vec!["10"]);

    load(&c, "levels", "x DOUBLE, level TEXT", "tree.csv").await;
    run(&c, "CREATE MODEL level_tree USING decision_tree (max_depth = 2, positive = 'high') AS SELECT x, level FROM levels").await;
    assert_eq!(column(&c, "SELECT predict('level_tree', 3)").await, vec!["low"]);
    assert_eq!(column(&c, "SELECT predict('level_tree', 7)").await, vec!["high"]);
    close(number(&c, "SELECT score('level_tree', 8)").await, 1.0, 1e-12, "P(high) in the high leaf");
    close(number(&c, "SELECT score('level_tree', 1)").await, 0.0, 1e-12, "P(high) in the low leaf");

    let models = column(&c, "SHOW MODELS").await;
    assert_eq!(models, vec!["blobs", "failure_risk", "level_tree", "plane_fit", "ring_gmm", "spread_z"]);
    let described = c.query("DESCRIBE MODEL failure_risk", &[]).await.expect("describe");
    let metrics: String = described[0].get("metrics");
    assert_eq!(metrics, r#"{"accuracy":1.0}"#);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_and_creates_nothing() {
    let server = TestServer::start().await;
    let c = server.connect().await;
    run(&c, "CREATE TABLE r (id BIGINT, device TEXT, t DOUBLE, v DOUBLE); INSERT INTO r VALUES (1, 'a', 1, 2), (2, 'b', 3, 4), (3, 'c', NULL, 5)").await;

    let (code, message) = error(&c, "SELECT score('nope', t, v) FROM r").await;
    assert_eq!(code, "42704");
    assert!(message.contains("model \"nope\" does not exist"), "{message}");

    let (code, message) = error(&c, "CREATE MODEL m USING kmeans (k = 2) AS SELECT t, v FROM r").await;
    assert_eq!(code, "22004", "NULL features without impute: {message}");
    assert!(message.contains("impute = 'mean'"), "{message}");
    run(&c, "CREATE MODEL m USING kmeans (k = 2, impute = 'mean') AS SELECT t, v FROM r").await;

    let (code, message) = error(&c, "SELECT score('m', t) FROM r").await;
    assert_eq!(code, "42883");
    assert!(message.contains("model \"m\" expects 2 features (t double precision, v double precision), got 1"), "{message}");
    let (code, message) = error(&c, "SELECT score('m', t, device) FROM r").await;
    assert_eq!(code, "42804");
    assert!(message.contains("model \"m\"") && message.contains("got text"), "{message}");
    let (code, _) = error(&c, "SELECT score(device, t, v) FROM r").await;
    assert_eq!(code, "42P13", "the model name must be a literal");

    let (code, message) = error(&c, "CREATE MODEL bad USING kmeans (k = 2) AS SELECT device, t FROM r").await;
    assert_eq!(code, "42804");
    assert!(message.contains("feature \"device\" is text"), "{message}");
    let (code, message) = error(&c, "CREATE MODEL bad USING kmeans (k = 2) AS SELECT t, v FROM r WHERE id > 10").await;
    assert_eq!(code, "22023");
    assert!(message.contains("returned no rows"), "{message}");
    let (code, message) = error(&c, "CREATE MODEL bad USING kmeans (k = 5) AS SELECT v FROM r").await;
    assert_eq!(code, "22023");
    assert!(message.contains("k = 5") && message.contains("(3)"), "{message}");
    let (code, _) = error(&c, "CREATE MODEL bad USING kmeans AS SELECT v FROM r").await;
    assert_eq!(code, "22023", "kmeans without k");
    let (code, message) = error(&c, "CREATE MODEL bad USING forest (trees = 3) AS SELECT v FROM r").await;
    assert_eq!(code, "22023");
    assert!(message.contains("unknown algorithm \"forest\""), "{message}");
    let (code, _) = error(&c, "CREATE MODEL bad USING kmeans (k = 1) AS SELECT v FROM missing").await;
    assert_eq!(code, "42P01");
    assert_eq!(column(&c, "SHOW MODELS").await, vec!["m"], "no half-created model");
    assert!(std::fs::read_dir(server.dir.path().join("models/bad")).is_err(), "no file for a failed model");

    let (code, _) = error(&c, "CREATE MODEL m USING kmeans (k = 1) AS SELECT t, v FROM r WHERE t IS NOT NULL").await;
    assert_eq!(code, "42710");
    run(&c, "CREATE MODEL IF NOT EXISTS m USING kmeans (k = 1) AS SELECT t, v FROM r WHERE t IS NOT NULL").await;

    // NULL and NaN features score NULL and are counted.
    let scores = column(&c, "SELECT score('m', t, v) FROM r ORDER BY id").await;
    assert_eq!(scores[2], "NULL");
    assert_eq!(column(&c, "SELECT score('m', 'NaN'::double, 1.0)").await, vec!["NULL"]);
    let described = c.query("DESCRIBE MODEL m", &[]).await.expect("describe");
    let nulls: i64 = described[0].get("null_scores");
    assert_eq!(nulls, 2);

    // A view using the model keeps it from being dropped, unless CASCADE.
    run(&c, "CREATE MATERIALIZED VIEW scored AS SELECT id, score('m', t, v) AS s FROM r").await;
    let (code, message) = error(&c, "DROP MODEL m").await;
    assert_eq!(code, "2BP01");
    assert!(message.contains("view \"scored\""), "{message}");
    let (code, _) = error(&c, "CREATE OR REPLACE MODEL m USING kmeans (k = 1) AS SELECT t FROM r WHERE t IS NOT NULL").await;
    assert_eq!(code, "2BP01", "a running view cannot lose a feature");
    run(&c, "DROP MODEL m CASCADE").await;
    assert!(column(&c, "SHOW MATERIALIZED VIEWS").await.is_empty());
    assert!(column(&c, "SHOW MODELS").await.is_empty());
    let (code, _) = error(&c, "DROP MODEL m").await;
    assert_eq!(code, "42704");
    run(&c, "DROP MODEL IF EXISTS m").await;
    let (code, _) = error(&c, "ALTER MODEL m RETRAIN").await;
    assert_eq!(code, "42704");
}
