//! Sources with `retention = 'none'`, with the real `freshet` binary and `kill -9`: once a
//! checkpoint holds a source's rows for every view reading it, the source forgets them, and
//! its views still equal the same views over an identical source that keeps every row,
//! across restarts and log snapshots. A view that cannot be checkpointed keeps the rows.

mod common;

use std::time::{Duration, Instant};

use common::process::Process;
use tokio_postgres::Client;

const EVENTS: i64 = 30_000;

/// (view over the source that forgets, the same over the one that keeps everything).
const VIEWS: [(&str, &str); 3] = [
    ("per_auction", "SELECT auction, count(*) AS n, sum(price) AS total, max(price) AS high FROM {} GROUP BY auction"),
    ("top", "SELECT auction, bidder, price FROM {} ORDER BY price DESC, auction, bidder LIMIT 5"),
    ("named", "SELECT a.name, count(*) AS n FROM {} AS b JOIN auctions AS a ON b.auction % 10 = a.id GROUP BY a.name"),
];

fn source(name: &str, retention: &str) -> String {
    format!(
        "CREATE SOURCE {name} WITH (connector = 'nexmark', kind = 'bid', rate = '4000', events = '{EVENTS}',
                                  base_time = '1700000000000', retention = '{retention}')"
    )
}

/// Waits until both sources have every event and the views have caught up.
async fn wait_for_everything(client: &Client) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        common::execute(client, "FLUSH").await;
        let counted = common::integer(client, "SELECT coalesce(sum(n), 0) FROM per_auction_forget").await;
        let kept = common::integer(client, "SELECT count(*) FROM bid_keep").await;
        if counted == EVENTS && kept == EVENTS {
            return;
        }
        assert!(Instant::now() < deadline, "ingestion stalled: {counted} and {kept} of {EVENTS}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn assert_views_agree(client: &Client, when: &str) {
    common::execute(client, "FLUSH").await;
    for (view, _) in VIEWS {
        let forget = common::text_rows(client, &format!("SELECT * FROM {view}_forget")).await;
        let keep = common::text_rows(client, &format!("SELECT * FROM {view}_keep")).await;
        assert!(!forget.is_empty(), "{view} has rows {when}");
        let only_forget: Vec<_> = forget.iter().filter(|r| !keep.contains(r)).take(5).collect();
        let only_keep: Vec<_> = keep.iter().filter(|r| !forget.contains(r)).take(5).collect();
        assert_eq!(forget.len(), keep.len(), "{view} {when}: {only_forget:?} against {only_keep:?}");
        assert!(only_forget.is_empty() && only_keep.is_empty(), "{view} {when}: {only_forget:?} against {only_keep:?}");
    }
}

async fn kept_rows(client: &Client) -> i64 {
    common::integer(client, "SELECT count(*) FROM bid_forget").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_forgets_checkpointed_rows_and_its_views_stay_exact_across_kills_and_snapshots() {
    let dir = tempfile::tempdir().expect("temp dir");
    // Explicit checkpoints, and a log snapshot every 50 commits (cut at a checkpoint).
    let args = ["--checkpoint-interval", "off", "--snapshot-every", "50"];
    let server = Process::start(dir.path(), &args);
    let c = common::connect(&server.connection_string).await;
    common::execute(&c, "CREATE TABLE auctions (id BIGINT PRIMARY KEY, name TEXT); INSERT INTO auctions SELECT x, 'a' || x FROM generate_series(0, 9) AS s(x)").await;
    common::execute(&c, &source("bid_forget", "none")).await;
    common::execute(&c, &source("bid_keep", "all")).await;
    for (view, query) in VIEWS {
        common::execute(
            &c,
            &format!("CREATE MATERIALIZED VIEW {view}_forget AS {}", query.replace("{}", "bid_forget")),
        )
        .await;
        common::execute(&c, &format!("CREATE MATERIALIZED VIEW {view}_keep AS {}", query.replace("{}", "bid_keep")))
            .await;
    }
    // Mid-ingestion: checkpoints make the source forget what they hold.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    common::execute(&c, "CHECKPOINT").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while kept_rows(&c).await >= common::integer(&c, "SELECT count(*) FROM bid_keep").await {
        assert!(Instant::now() < deadline, "the source never forgot the rows the checkpoint holds");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // (The two sources are at different offsets while they ingest: the views are compared
    // once both have every event.)
    common::execute(&c, "CHECKPOINT").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    common::execute(&c, "CHECKPOINT").await;
    server.kill_9();

    // The restart restores every view from its checkpoint; the generators go on.
    let server = Process::start(dir.path(), &args);
    let c = common::connect(&server.connection_string).await;
    let failures = common::text_rows(&c, "SELECT view FROM freshet_catalog.views WHERE failure IS NOT NULL").await;
    assert!(failures.is_empty(), "no view failed: {failures:?}");
    let restored = common::text_rows(
        &c,
        "SELECT view FROM freshet_catalog.views WHERE view LIKE '%forget' AND restored_from_epoch IS NOT NULL",
    );
    assert_eq!(restored.await.len(), VIEWS.len(), "the views over the forgetting source come from a checkpoint");
    assert!(kept_rows(&c).await < EVENTS, "forgotten rows stay forgotten after the restart");
    wait_for_everything(&c).await;
    assert_views_agree(&c, "after the restart and the rest of the events").await;
    let snapshots = common::integer(&c, "SELECT count(*) FROM freshet_catalog.snapshots WHERE status = 'ok'").await;

    // Everything is in; a last checkpoint lets the source forget every row.
    common::execute(&c, "CHECKPOINT").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while kept_rows(&c).await > 0 {
        assert!(Instant::now() < deadline, "the source kept rows every view has checkpointed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // More commits: a snapshot cut at that checkpoint replaces the log.
    for i in 0..60 {
        common::execute(&c, &format!("UPDATE auctions SET name = 'a{i}' WHERE id = 9")).await;
    }
    common::execute(&c, "UPDATE auctions SET name = 'a9' WHERE id = 9").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while common::integer(&c, "SELECT count(*) FROM freshet_catalog.snapshots WHERE status = 'ok'").await <= snapshots {
        assert!(Instant::now() < deadline, "no snapshot was written");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.kill_9();

    let server = Process::start(dir.path(), &args);
    let c = common::connect(&server.connection_string).await;
    let failures =
        common::text_rows(&c, "SELECT view, failure FROM freshet_catalog.views WHERE failure IS NOT NULL").await;
    assert!(failures.is_empty(), "no view failed after a restart from a snapshot: {failures:?}");
    assert_eq!(kept_rows(&c).await, 0, "the snapshot holds none of the forgotten rows");
    assert_eq!(common::integer(&c, "SELECT count(*) FROM bid_keep").await, EVENTS);
    assert_views_agree(&c, "after a restart from a snapshot cut at a checkpoint").await;
    assert_eq!(common::integer(&c, "SELECT sum(n) FROM per_auction_forget").await, EVENTS);

    // A new view over the forgetting source sees only the rows it still has.
    common::execute(&c, "CREATE MATERIALIZED VIEW late_count AS SELECT count(*) AS n FROM bid_forget").await;
    assert_eq!(common::integer(&c, "SELECT n FROM late_count").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_view_that_cannot_be_checkpointed_keeps_its_sources_rows() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = Process::start(dir.path(), &["--checkpoint-interval", "off"]);
    let c = common::connect(&server.connection_string).await;
    common::execute(
        &c,
        "CREATE SOURCE bids WITH (connector = 'nexmark', kind = 'bid', rate = '0', events = '2000', retention = 'none');
         CREATE MATERIALIZED VIEW spread AS SELECT approx_percentile_cont(price, 0.5) AS median FROM bids",
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while common::integer(&c, "SELECT count(*) FROM bids").await < 2000 {
        assert!(Instant::now() < deadline, "ingestion stalled");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    common::execute(&c, "CHECKPOINT").await;
    common::execute(&c, "CHECKPOINT").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        common::integer(&c, "SELECT count(*) FROM bids").await,
        2000,
        "its rows are kept: the view is rebuilt from them"
    );
    let error = c
        .batch_execute("CREATE SOURCE odd WITH (connector = 'nexmark', kind = 'bid', retention = 'sometimes')")
        .await
        .expect_err("an unknown retention is refused");
    assert!(common::db_error(&error).contains("retention = 'sometimes' is not known"), "{}", common::db_error(&error));
}
