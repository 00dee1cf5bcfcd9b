//! The Nexmark queries under sql/nexmark/, each run as a materialized view over a
//! reproducible nexmark event stream, must equal the same query run as a batch query over
//! the same events.

mod common;

use std::time::Duration;

use common::TestServer;
use tokio_postgres::SimpleQueryMessage;

/// Every row of `sql` as text, sorted.
async fn rows(client: &tokio_postgres::Client, sql: &str) -> Vec<Vec<Option<String>>> {
    let messages = client.simple_query(sql).await.unwrap_or_else(|e| panic!("{sql}: {}", common::db_error(&e)));
    let mut rows: Vec<Vec<Option<String>>> = messages
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(row) => Some((0..row.len()).map(|i| row.get(i).map(str::to_string)).collect()),
            _ => None,
        })
        .collect();
    rows.sort();
    rows
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn windowed_nexmark_queries_as_views_equal_their_batch_results() {
    let server = TestServer::start().await;
    let client = server.connect().await;
    // One event stream, split by kind: 1 person, 3 auctions and 46 bids per 50 events.
    let sources = [("person", 1_000), ("auction", 3_000), ("bid", 46_000)];
    for (kind, events) in sources {
        client
            .batch_execute(&format!(
                "CREATE SOURCE {kind} WITH (connector = 'nexmark', kind = '{kind}', rate = '0', events = '{events}',
                                            base_time = '1700000000000')"
            ))
            .await
            .expect("source");
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let finished =
            rows(&client, "SELECT source FROM freshet_catalog.source_progress WHERE status = 'finished'").await;
        if finished.len() == sources.len() {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the generators did not finish: {finished:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("sql/nexmark");
    let mut files: Vec<_> = std::fs::read_dir(&dir).expect("sql/nexmark").map(|e| e.expect("entry").path()).collect();
    files.retain(|f| f.extension().is_some_and(|e| e == "sql"));
    files.sort();
    assert!(files.len() >= 3, "the windowed queries are there: {files:?}");
    for file in files {
        let name = file.file_stem().expect("name").to_string_lossy().into_owned();
        let query = std::fs::read_to_string(&file).expect("query");
        client
            .batch_execute(&format!("CREATE MATERIALIZED VIEW nexmark_{name} AS {query}"))
            .await
            .unwrap_or_else(|e| panic!("{name} as a view: {}", common::db_error(&e)));
        client.batch_execute("FLUSH").await.expect("flush");
        let view = rows(&client, &format!("SELECT * FROM nexmark_{name}")).await;
        let batch = rows(&client, &query).await;
        assert!(!batch.is_empty(), "{name} has an answer over these events");
        assert_eq!(view, batch, "{name}: the view equals the batch query");
    }
}
