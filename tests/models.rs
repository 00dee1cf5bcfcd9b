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
    close(
        number(&c, "SELECT sum(score('blobs', x, y) * score('blobs', x, y)) FROM clusters").await,
        12.0,
        1e-9,
        "inertia",
    );

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
    run(
        &c,
        "CREATE MODEL level_tree USING decision_tree (max_depth = 2, positive = 'high') AS SELECT x, level FROM levels",
    )
    .await;
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
    assert!(
        message.contains("model \"m\" expects 2 features (t double precision, v double precision), got 1"),
        "{message}"
    );
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
    let (code, _) =
        error(&c, "CREATE OR REPLACE MODEL m USING kmeans (k = 1) AS SELECT t FROM r WHERE t IS NOT NULL").await;
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

/// Two versions of one model that score the same row differently: v1 centroid at 0, v2
/// at 100 (trained on other rows), so a row's score tells which version scored it.
async fn two_centroid_versions(c: &Client) {
    run(
        c,
        "CREATE TABLE centers (x DOUBLE, era BIGINT);
         INSERT INTO centers VALUES (0, 1), (100, 2);
         CREATE MODEL centroid USING kmeans (k = 1) AS SELECT x FROM centers WHERE era = 1",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_view_swaps_versions_under_load_without_losing_rows() {
    let server = TestServer::start().await;
    let c = server.connect().await;
    two_centroid_versions(&c).await;
    run(
        &c,
        "CREATE TABLE readings (id BIGINT, x DOUBLE);
         CREATE MATERIALIZED VIEW scored AS
             SELECT id, x, score('centroid', x) AS s, score_version('centroid') AS v
             FROM readings WHERE score('centroid', x) >= 0",
    )
    .await;
    // A writer inserts batches of rows while the model is replaced and rolled back.
    let writer_client = server.connect().await;
    let writer = tokio::spawn(async move {
        for batch in 0..60i64 {
            let values: Vec<String> = (0..50).map(|i| format!("({}, {})", batch * 50 + i, i % 7)).collect();
            writer_client
                .batch_execute(&format!("INSERT INTO readings VALUES {}", values.join(", ")))
                .await
                .expect("insert during swaps");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    run(&c, "CREATE OR REPLACE MODEL centroid USING kmeans (k = 1) AS SELECT x FROM centers WHERE era = 2").await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    run(&c, "ALTER MODEL centroid SET VERSION 1").await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    run(&c, "ALTER MODEL centroid SET VERSION 2").await;
    // Rows committed after this FLUSH (a barrier after the swap) are scored by version 2.
    run(&c, "FLUSH").await;
    let swapped_at = number(&c, "SELECT coalesce(max(id), -1) FROM readings").await as i64;
    writer.await.expect("writer finished");
    run(&c, "FLUSH").await;

    assert_eq!(number(&c, "SELECT count(*) FROM readings").await, 3000.0);
    assert_eq!(number(&c, "SELECT count(*) FROM scored").await, 3000.0, "no row lost across swaps");
    // Every row's score is the one its version gives: |x − 0| for v1, |x − 100| for v2.
    let wrong =
        number(&c, "SELECT count(*) FROM scored WHERE NOT ((v = 1 AND s = abs(x)) OR (v = 2 AND s = abs(x - 100)))")
            .await;
    assert_eq!(wrong, 0.0, "each row carries the version that scored it");
    let versions = column(&c, "SELECT DISTINCT v FROM scored ORDER BY v").await;
    assert_eq!(versions, vec!["1", "2"], "rows from before and after the swap");
    let late = number(&c, &format!("SELECT count(*) FROM scored WHERE id > {swapped_at} AND v <> 2")).await;
    assert_eq!(late, 0.0, "rows after the swap's barrier carry the new version");
    assert!(swapped_at < 2999, "the swap happened while rows were still arriving");
    let described = column(&c, "DESCRIBE MODEL centroid").await;
    assert_eq!(described, vec!["1", "2"], "both versions are kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exported_model_scores_identically_on_another_server() {
    let file = tempfile::NamedTempFile::new().expect("temp file");
    let path = file.path().display().to_string();
    let query = "SELECT x, y, round(score('shape', x, y), 12)::text, predict('shape', x, y) FROM grid ORDER BY x, y";
    let setup = "CREATE TABLE grid (x DOUBLE, y DOUBLE);
                 INSERT INTO grid SELECT a / 3.0, (a * 7 % 11) / 2.0 FROM generate_series(0, 200) AS g(a)";
    let exported = {
        let server = TestServer::start().await;
        let c = server.connect().await;
        run(&c, setup).await;
        run(&c, "CREATE MODEL shape USING gaussian_mixture (components = 3, seed = 4) AS SELECT x, y FROM grid").await;
        run(&c, &format!("COPY MODEL shape TO '{path}'")).await;
        rows_text(&c, query).await
    };
    let text = std::fs::read_to_string(&path).expect("model file");
    assert!(text.contains("\"format\": \"freshet-model\"") && text.contains("\"algorithm\": \"gaussian_mixture\""));
    let server = TestServer::start().await;
    let c = server.connect().await;
    run(&c, setup).await;
    run(&c, &format!("CREATE MODEL shape FROM '{path}'")).await;
    assert_eq!(rows_text(&c, query).await, exported, "identical scores on the importing server");
    let (code, _) = error(&c, "CREATE MODEL other FROM '/nonexistent/model.json'").await;
    assert_eq!(code, "58P01");
    std::fs::write(&path, "{\"not\": \"a model\"}").expect("overwrite");
    let (code, message) = error(&c, &format!("CREATE MODEL other FROM '{path}'")).await;
    assert_eq!(code, "22P02");
    assert!(message.contains("is not a freshet model file"), "{message}");
}

async fn connect_to(server: &freshet::server::Server) -> Client {
    let addr = server.pg_addr();
    common::connect(&format!("host={} port={} user=freshet dbname=freshet", addr.ip(), addr.port())).await
}

/// Every row as `a|b|…` text.
async fn rows_text(client: &Client, sql: &str) -> Vec<String> {
    let messages = client.simple_query(sql).await.unwrap_or_else(|e| panic!("{sql}: {}", common::db_error(&e)));
    messages
        .into_iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(row) => {
                Some((0..row.len()).map(|i| row.get(i).unwrap_or("NULL")).collect::<Vec<_>>().join("|"))
            }
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_and_their_versions_survive_a_restart() {
    let dir = tempfile::tempdir().expect("temp dir");
    let start = || freshet::server::Server::start(common::config(dir.path()));
    let server = start().await.expect("starts");
    let c = connect_to(&server).await;
    two_centroid_versions(&c).await;
    run(
        &c,
        "CREATE OR REPLACE MODEL centroid USING kmeans (k = 1) AS SELECT x FROM centers WHERE era = 2;
         ALTER MODEL centroid RETRAIN;
         ALTER MODEL centroid SET VERSION 2;
         CREATE TABLE readings (id BIGINT, x DOUBLE);
         INSERT INTO readings VALUES (1, 10);
         CREATE MATERIALIZED VIEW scored AS SELECT id, score('centroid', x) AS s, score_version('centroid') AS v FROM readings",
    )
    .await;
    assert_eq!(rows_text(&c, "SELECT * FROM scored").await, vec!["1|90.0|2"]);
    server.shutdown().await;

    let server = start().await.expect("restarts");
    let c = connect_to(&server).await;
    assert_eq!(
        rows_text(&c, "DESCRIBE MODEL centroid")
            .await
            .iter()
            .map(|r| r.split('|').take(2).collect::<Vec<_>>().join("|"))
            .collect::<Vec<_>>(),
        vec!["1|f", "2|t", "3|f"]
    );
    assert_eq!(
        rows_text(&c, "SELECT * FROM scored").await,
        vec!["1|90.0|2"],
        "the view restarts on the version it used"
    );
    run(&c, "INSERT INTO readings VALUES (2, 0); ALTER MODEL centroid SET VERSION 1; FLUSH; INSERT INTO readings VALUES (3, 5); FLUSH").await;
    assert_eq!(rows_text(&c, "SELECT * FROM scored ORDER BY id").await, vec!["1|90.0|2", "2|100.0|2", "3|5.0|1"]);
    run(&c, "CHECKPOINT").await;
    server.shutdown().await;

    // A snapshot of the log keeps the models too, and the view restored from its
    // checkpoint keeps each row's score and the version that gave it.
    let server = start().await.expect("restarts again");
    let c = connect_to(&server).await;
    assert_eq!(rows_text(&c, "SELECT score('centroid', 1), score_version('centroid')").await, vec!["1.0|1"]);
    assert_eq!(
        rows_text(&c, "SELECT * FROM scored ORDER BY id").await,
        vec!["1|90.0|2", "2|100.0|2", "3|5.0|1"],
        "rows keep the scores they were given"
    );
    run(&c, "INSERT INTO readings VALUES (4, 1); DELETE FROM readings WHERE id = 2; FLUSH").await;
    assert_eq!(
        rows_text(&c, "SELECT * FROM scored ORDER BY id").await,
        vec!["1|90.0|2", "3|5.0|1", "4|1.0|1"],
        "a restored row is taken back with the score it had"
    );
    run(&c, "DROP MODEL centroid CASCADE").await;
    server.shutdown().await;
    let server = start().await.expect("restarts after the drop");
    let c = connect_to(&server).await;
    assert!(rows_text(&c, "SHOW MODELS").await.is_empty());
    assert!(!dir.path().join("models/centroid/v1.json").exists(), "a dropped model's files are deleted");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_anomaly_detection_example_finds_the_labelled_anomalies() {
    let server = TestServer::start().await;
    let c = server.connect().await;
    let broker = common::kafka::Broker::start().await;
    broker.create_topic("anomalies", 1).await;
    let path = format!("{}/sql/anomaly_detection.sql", env!("CARGO_MANIFEST_DIR"));
    // The example's broker is the test's.
    let script = std::fs::read_to_string(&path).expect("example").replace("localhost:9092", &broker.address);
    // Statements end with `;` at the end of a line; `-- wait until: QUERY = N` waits.
    let mut statement = String::new();
    for line in script.lines() {
        if let Some(wait) = line.strip_prefix("-- wait until: ") {
            let (query, expected) = wait.rsplit_once(" = ").expect("QUERY = N");
            let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
            while column(&c, query).await != vec![expected.to_string()] {
                assert!(tokio::time::Instant::now() < deadline, "{query} never reached {expected}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            continue;
        }
        if line.trim_start().starts_with("--") {
            continue;
        }
        statement.push_str(line);
        statement.push('\n');
        if line.trim_end().ends_with(';') {
            run(&c, &statement).await;
            statement.clear();
        }
    }
    let counts = rows_text(
        &c,
        "SELECT (SELECT count(*) FROM anomalies WHERE labelled) AS tp, (SELECT count(*) FROM anomalies) AS flagged,
                (SELECT count(*) FROM telemetry WHERE anomaly) AS actual",
    )
    .await;
    let counts: Vec<f64> = counts[0].split('|').map(|v| v.parse().expect("count")).collect();
    let (true_positives, flagged, actual) = (counts[0], counts[1], counts[2]);
    assert!(actual >= 100.0, "enough labelled anomalies to measure ({actual})");
    let precision = true_positives / flagged;
    let recall = true_positives / actual;
    eprintln!(
        "anomaly view: precision {precision:.3}, recall {recall:.3} ({true_positives} of {flagged} flagged, {actual} labelled)"
    );
    assert!(precision >= 0.9, "precision {precision}");
    assert!(recall >= 0.9, "recall {recall}");
    // One query reads both views at one epoch (the source keeps streaming meanwhile).
    let same = rows_text(
        &c,
        "SELECT (SELECT sum(anomalies) FROM anomalies_per_minute) = (SELECT count(*) FROM anomalies) AS same",
    )
    .await;
    assert_eq!(same, vec!["t"], "the dashboard view counts every anomaly");
    // The anomaly handler sees at least every anomaly flagged so far on the topic.
    let alerts = broker.consume("anomalies", flagged as usize).await;
    assert!(alerts.len() >= flagged as usize, "{} alerts on the topic, {flagged} anomalies", alerts.len());
    let first: serde_json::Value = serde_json::from_str(alerts[0]["value"].as_str().expect("value")).expect("JSON");
    assert!(first["device_id"].is_string() && first["distance"].is_number(), "{first}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_is_retrained_on_its_schedule_from_new_rows() {
    let server = TestServer::start().await;
    let c = server.connect().await;
    run(
        &c,
        "CREATE TABLE level (x DOUBLE); INSERT INTO level VALUES (1), (3);
         CREATE MODEL mean_level USING kmeans (k = 1) WITH (retrain_every = '300ms') AS SELECT x FROM level;
         INSERT INTO level VALUES (20)",
    )
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    // The new rows move the centroid from 2 to 8 once a scheduled retraining ran.
    while (number(&c, "SELECT score('mean_level', 0)").await - 8.0).abs() > 1e-3 {
        assert!(tokio::time::Instant::now() < deadline, "no scheduled retraining");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let described = rows_text(&c, "DESCRIBE MODEL mean_level").await;
    assert!(described.len() >= 2, "retraining adds versions: {described:?}");
    assert!(described[1].contains("|300ms|"), "the schedule is kept: {}", described[1]);
    // Replacing the model without a schedule stops it.
    run(&c, "CREATE OR REPLACE MODEL mean_level USING kmeans (k = 1) AS SELECT x FROM level WHERE x < 10").await;
    let versions = rows_text(&c, "DESCRIBE MODEL mean_level").await.len();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        rows_text(&c, "DESCRIBE MODEL mean_level").await.len(),
        versions,
        "no retraining after the schedule ended"
    );
    close(number(&c, "SELECT score('mean_level', 0)").await, 2.0, 1e-3, "the replacement's centroid");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_deleted_after_a_swap_are_taken_back_with_the_scores_they_were_given() {
    let server = TestServer::start().await;
    let c = server.connect().await;
    two_centroid_versions(&c).await;
    run(
        &c,
        "CREATE TABLE readings (id BIGINT, x DOUBLE);
         CREATE MATERIALIZED VIEW near AS
             SELECT id, x, score('centroid', x) AS s, score_version('centroid') AS v
             FROM readings WHERE score('centroid', x) < 50;
         CREATE MATERIALIZED VIEW near_total AS SELECT count(*) AS n, sum(s) AS s FROM near;
         INSERT INTO readings VALUES (0, 0), (1, 1), (2, 2), (3, 3), (4, 4), (5, 5), (6, 6), (7, 7), (8, 8), (9, 9);
         FLUSH",
    )
    .await;
    assert_eq!(number(&c, "SELECT count(*) FROM near WHERE v = 1").await, 10.0, "version 1 keeps all ten");
    // Version 2 scores these rows |x − 100| ≥ 90: it would filter every one of them out.
    run(&c, "CREATE OR REPLACE MODEL centroid USING kmeans (k = 1) AS SELECT x FROM centers WHERE era = 2; FLUSH")
        .await;
    run(&c, "DELETE FROM readings WHERE id < 5; UPDATE readings SET x = 7.5 WHERE id = 7; FLUSH").await;

    // The deleted rows leave the view although version 2 would not have kept them; the
    // updated row's new value is scored by version 2 and filtered out; the rest keep
    // the version-1 scores they were given.
    let ids = column(&c, "SELECT CAST(id AS TEXT) || ':' || CAST(CAST(s AS BIGINT) AS TEXT) || ':v' || CAST(v AS TEXT) FROM near ORDER BY id").await;
    assert_eq!(ids, vec!["5:5:v1", "6:6:v1", "8:8:v1", "9:9:v1"]);
    assert_eq!(number(&c, "SELECT n FROM near_total").await, 4.0);
    assert_eq!(number(&c, "SELECT s FROM near_total").await, 28.0, "the aggregate over the view agrees");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_condition_that_scores_takes_back_pairs_as_they_were_matched() {
    let server = TestServer::start().await;
    let c = server.connect().await;
    two_centroid_versions(&c).await;
    run(
        &c,
        "CREATE TABLE readings (id BIGINT, site TEXT, x DOUBLE);
         CREATE TABLE sites (site TEXT, lim DOUBLE);
         CREATE TABLE clusters (cluster INT, name TEXT);
         CREATE MATERIALIZED VIEW near AS
             SELECT r.id, s.site FROM readings r JOIN sites s ON r.site = s.site AND score('centroid', r.x) < s.lim;
         CREATE MATERIALIZED VIEW named AS
             SELECT r.id, c.name FROM readings r JOIN clusters c ON predict('centroid', r.x) = c.cluster;
         INSERT INTO sites VALUES ('a', 50);
         INSERT INTO clusters VALUES (0, 'only');
         INSERT INTO readings VALUES (0, 'a', 0), (1, 'a', 1), (2, 'a', 2), (3, 'a', 3), (4, 'a', 4),
             (5, 'a', 5), (6, 'a', 6), (7, 'a', 7), (8, 'a', 8), (9, 'a', 9);
         FLUSH",
    )
    .await;
    assert_eq!(number(&c, "SELECT count(*) FROM near").await, 10.0, "version 1 matches all ten");
    assert_eq!(number(&c, "SELECT count(*) FROM named WHERE name = 'only'").await, 10.0, "a model call as a join key");
    // Version 2 scores these rows |x − 100| ≥ 90: no pair would match under it.
    run(&c, "CREATE OR REPLACE MODEL centroid USING kmeans (k = 1) AS SELECT x FROM centers WHERE era = 2; FLUSH")
        .await;
    run(&c, "DELETE FROM readings WHERE id < 5; FLUSH").await;
    // The deleted readings' pairs leave the view, though version 2 would not have matched
    // them; the others stay as version 1 matched them.
    let ids = column(&c, "SELECT CAST(id AS TEXT) AS i FROM near ORDER BY i").await;
    assert_eq!(ids, vec!["5", "6", "7", "8", "9"]);
    assert_eq!(number(&c, "SELECT count(*) FROM named").await, 5.0);
    let (code, message) = error(
        &c,
        "CREATE MATERIALIZED VIEW outer_near AS
             SELECT r.id, s.site FROM readings r LEFT JOIN sites s ON r.site = s.site AND score('centroid', r.x) < s.lim",
    )
    .await;
    assert_eq!(code, "0A000", "{message}");
    assert!(message.contains("model function in the condition of a LEFT join"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aggregate_over_scores_takes_back_the_scores_rows_were_given() {
    let server = TestServer::start().await;
    let c = server.connect().await;
    two_centroid_versions(&c).await;
    run(
        &c,
        "CREATE TABLE readings (id BIGINT, site TEXT, x DOUBLE);
         CREATE MATERIALIZED VIEW per_site AS
             SELECT site, count(*) AS n, sum(score('centroid', x)) AS total, max(score_version('centroid')) AS v
             FROM readings GROUP BY site;
         INSERT INTO readings VALUES (1, 'a', 1), (2, 'a', 2), (3, 'b', 3), (4, 'b', 4);
         FLUSH",
    )
    .await;
    assert_eq!(number(&c, "SELECT total FROM per_site WHERE site = 'a'").await, 3.0);
    run(&c, "CREATE OR REPLACE MODEL centroid USING kmeans (k = 1) AS SELECT x FROM centers WHERE era = 2; FLUSH")
        .await;
    // Row 1 leaves with the score it was added with (1, by version 1); row 5 joins with
    // version 2's score |5 − 100| = 95.
    run(&c, "DELETE FROM readings WHERE id = 1; INSERT INTO readings VALUES (5, 'b', 5); FLUSH").await;
    let rows = column(
        &c,
        "SELECT site || ':' || CAST(n AS TEXT) || ':' || CAST(CAST(total AS BIGINT) AS TEXT) || ':v' || CAST(v AS TEXT) FROM per_site ORDER BY site",
    )
    .await;
    assert_eq!(rows, vec!["a:1:2:v1", "b:3:102:v2"]);
}
