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
async fn nexmark_queries_as_views_equal_their_batch_results() {
    let server = TestServer::start().await;
    let client = server.connect().await;
    // One event stream, split by kind: 1 person, 3 auctions and 46 bids per 50 events,
    // spanning 100 seconds of event time (500 events per second) and generated over a few
    // seconds of wall time, so the views below see them arrive batch by batch, with the
    // generators' default watermarks (date_time minus 4 seconds) closing windows.
    let sources = [("person", 1_000), ("auction", 3_000), ("bid", 46_000)];
    for (kind, events) in sources {
        client
            .batch_execute(&format!(
                "CREATE SOURCE {kind} WITH (connector = 'nexmark', kind = '{kind}', rate = '15000', event_rate = '500', events = '{events}',
                                            base_time = '1700000000000')"
            ))
            .await
            .expect("source");
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("sql/nexmark");
    let mut files: Vec<_> = std::fs::read_dir(&dir).expect("sql/nexmark").map(|e| e.expect("entry").path()).collect();
    files.retain(|f| f.extension().is_some_and(|e| e == "sql"));
    files.sort();
    assert_eq!(files.len(), 23, "q0 to q22 are there: {files:?}");
    let mut queries = Vec::new();
    let mut refused = Vec::new();
    for file in files {
        let name = file.file_stem().expect("name").to_string_lossy().into_owned();
        let query = std::fs::read_to_string(&file).expect("query");
        // A query freshet cannot run says so in its header, and is refused with 0A000.
        if query.contains("freshet cannot run this query yet") {
            let error = client
                .batch_execute(&format!("CREATE MATERIALIZED VIEW nexmark_{name} AS {query}"))
                .await
                .expect_err("the header says freshet cannot run it");
            let code = error.as_db_error().map(|e| e.code().code().to_string());
            assert_eq!(code.as_deref(), Some("0A000"), "{name}: {}", common::db_error(&error));
            refused.push(name);
            continue;
        }
        client
            .batch_execute(&format!("CREATE MATERIALIZED VIEW nexmark_{name} AS {query}"))
            .await
            .unwrap_or_else(|e| panic!("{name} as a view: {}", common::db_error(&e)));
        // Windowed queries whose output has a window column also run with EMIT ON WINDOW
        // CLOSE. (Pass-through queries such as q0 accept it too, holding each bid back
        // until the watermark passes its date_time; the windowed ones are checked here.)
        let windowed = query.contains("window_start") || query.contains("window_end");
        let closed = windowed
            && client
                .batch_execute(&format!(
                    "CREATE MATERIALIZED VIEW nexmark_{name}_closed AS {query} EMIT ON WINDOW CLOSE"
                ))
                .await
                .is_ok();
        queries.push((name, query, closed));
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
    client.batch_execute("FLUSH").await.expect("flush");
    for (name, query, closed) in &queries {
        let view = rows(&client, &format!("SELECT * FROM nexmark_{name}")).await;
        let batch = rows(&client, query).await;
        assert!(!batch.is_empty(), "{name} has an answer over these events");
        assert_eq!(view, batch, "{name}: the view equals the batch query");
        if !closed {
            continue;
        }
        // With EMIT ON WINDOW CLOSE: exactly the rows of the windows the watermark passed,
        // which are all windows but the last few seconds' (the generators stopped).
        let emitted = rows(&client, &format!("SELECT * FROM nexmark_{name}_closed")).await;
        let time = window_column(&client, &format!("nexmark_{name}")).await;
        let last_closed = emitted.iter().map(|r| r[time].clone()).max().flatten();
        assert!(last_closed.is_some(), "{name}: windows closed as the watermark passed them");
        let expected: Vec<_> = view.iter().filter(|r| r[time] <= last_closed).cloned().collect();
        assert_eq!(emitted, expected, "{name}: the closed windows, each complete");
        // Every window well behind the watermark (30 s before the last event) has closed.
        let column = column_name(&client, &format!("nexmark_{name}"), time).await;
        let old = |view: String| {
            format!(
                "SELECT count(*) FROM {view} WHERE {column} < (SELECT max(date_time) FROM bid) - INTERVAL '30 seconds'"
            )
        };
        let all_old = common::count(&client, &old(format!("nexmark_{name}"))).await;
        assert!(all_old > 0, "{name}: the stream spans more than 30 seconds of windows");
        assert_eq!(
            common::count(&client, &old(format!("nexmark_{name}_closed"))).await,
            all_old,
            "{name}: windows the watermark passed long ago are all emitted"
        );
    }
    assert!(queries.iter().filter(|q| q.2).count() >= 4, "q5, q8, q11 and q12 run with EMIT ON WINDOW CLOSE");
    assert_eq!(refused, ["q6"], "every query but q6 runs as a view");
    // The generator emits events in time order: nothing is late.
    let late = rows(&client, "SELECT view FROM freshet_catalog.late_events WHERE late_rows > 0").await;
    assert!(late.is_empty(), "no late events: {late:?}");
    let watermarks =
        rows(&client, "SELECT DISTINCT source FROM freshet_catalog.late_events WHERE watermark IS NOT NULL").await;
    assert_eq!(watermarks.len(), 3, "every source has a watermark: {watermarks:?}");
}

/// The name of column `position` (0-based) of `view`.
async fn column_name(client: &tokio_postgres::Client, view: &str, position: usize) -> String {
    let sql = format!(
        "SELECT column_name FROM information_schema.columns WHERE table_name = '{view}' AND ordinal_position = {}",
        position + 1
    );
    rows(client, &sql).await.first().and_then(|r| r[0].clone()).unwrap_or_else(|| panic!("{view} column {position}"))
}

/// The position of the column windows close by: the first window end (`…end…`), else the
/// first window start (`…start…`), of `view`. (Windows of one size close in start order
/// too; sessions only in end order.)
async fn window_column(client: &tokio_postgres::Client, view: &str) -> usize {
    let columns = rows(
        client,
        &format!("SELECT ordinal_position, column_name FROM information_schema.columns WHERE table_name = '{view}'"),
    )
    .await;
    let mut columns: Vec<(i64, String)> = columns
        .into_iter()
        .map(|c| (c[0].as_deref().unwrap_or("0").parse().expect("position"), c[1].clone().unwrap_or_default()))
        .collect();
    columns.sort();
    let position = columns
        .iter()
        .find(|(_, name)| name.contains("end"))
        .or_else(|| columns.iter().find(|(_, name)| name.contains("start")))
        .unwrap_or_else(|| panic!("{view} has a window column: {columns:?}"))
        .0;
    usize::try_from(position - 1).expect("1-based")
}
