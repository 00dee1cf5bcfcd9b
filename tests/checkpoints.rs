//! Checkpoints of materialized views, with the real `freshet` binary and `kill -9`: a
//! restart restores views from their checkpoint (`freshet_catalog.views` says from which),
//! feeds them what was committed after it, and every view keeps equalling its query run as
//! a batch, then and as writes go on. A damaged checkpoint costs a recompute or an older
//! checkpoint, never a wrong answer.

mod common;

use common::process::Process;
use tokio_postgres::Client;

/// (view, query). `leaders` counts the same groups twice (in two orders), which runs as
/// one shared aggregate. The last one reads another materialized view, so it is always
/// recomputed (from that view's restored rows).
const VIEWS: [(&str, &str); 7] = [
    (
        "per_group",
        "SELECT g, count(*) AS n, sum(v) AS total, min(v) AS low, max(k) AS high, round(avg(v), 6) AS mean,
                bool_or(v > 900) AS big, count(DISTINCT v % 7) AS sevens, round(stddev(v), 6) AS spread
         FROM t GROUP BY g",
    ),
    ("named", "SELECT u.name, count(*) AS n, sum(t.v) AS total FROM t JOIN u ON t.g = u.g GROUP BY u.name"),
    ("unmatched", "SELECT u.name, t.k FROM u LEFT JOIN t ON t.g = u.g AND t.v < 5"),
    ("evens", "SELECT k, v * 2 AS doubled FROM t WHERE v % 2 = 0"),
    ("top", "SELECT k, v FROM t ORDER BY v DESC LIMIT 3"),
    (
        "leaders",
        "SELECT c.g, c.b, c.n
         FROM (SELECT g, v % 5 AS b, count(*) AS n FROM t GROUP BY g, v % 5) c
         JOIN (SELECT g, max(n) AS top FROM (SELECT v % 5 AS b, g, count(*) AS n FROM t GROUP BY v % 5, g) x GROUP BY g) m
           ON c.g = m.g AND c.n = m.top",
    ),
    ("evens_count", "SELECT count(*) AS n, sum(doubled) AS total FROM evens"),
];

/// Every row as `a|b|…` text, sorted.
async fn rows(client: &Client, sql: &str) -> Vec<String> {
    common::text_rows(client, sql).await
}

async fn run(client: &Client, sql: &str) {
    common::execute(client, sql).await
}

/// Every view equals its query over the tables as they are now.
async fn assert_views_are_right(client: &Client, when: &str) {
    run(client, "FLUSH").await;
    for (view, query) in VIEWS {
        let expected = rows(client, query).await;
        assert!(!expected.is_empty(), "{view} has rows to compare");
        assert_eq!(rows(client, &format!("SELECT * FROM {view}")).await, expected, "{view} {when}");
    }
}

/// `view|restored_from_epoch` for every view.
async fn restored(client: &Client) -> Vec<String> {
    rows(client, "SELECT view, coalesce(restored_from_epoch::text, 'rebuilt') FROM freshet_catalog.views").await
}

fn expect_restored(epoch: &str) -> Vec<String> {
    let mut expected: Vec<String> = VIEWS
        .iter()
        .map(|(view, _)| format!("{view}|{}", if *view == "evens_count" { "rebuilt" } else { epoch }))
        .collect();
    expected.sort();
    expected
}

/// Takes a checkpoint and returns its epoch.
async fn checkpoint(client: &Client) -> String {
    run(client, "CHECKPOINT").await;
    rows(client, "SELECT max(epoch)::text FROM freshet_catalog.checkpoints WHERE status = 'ok'").await.remove(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn views_restart_from_their_checkpoint_and_stay_equal_to_their_query() {
    let dir = tempfile::tempdir().expect("temp dir");
    // Checkpoints only when asked, so the test knows which one a restart finds.
    let args = ["--checkpoint-interval", "off"];
    let server = Process::start(dir.path(), &args);
    let c = common::connect(&server.connection_string).await;
    run(
        &c,
        "CREATE TABLE t (k TEXT PRIMARY KEY, g INT NOT NULL, v BIGINT NOT NULL);
         CREATE TABLE u (g INT PRIMARY KEY, name TEXT NOT NULL);
         INSERT INTO u VALUES (0, 'zero'), (1, 'one'), (2, 'two');
         INSERT INTO t SELECT 'k' || x, x % 3, x FROM generate_series(1, 1000) AS s(x)",
    )
    .await;
    let (_, leaders) = VIEWS[5];
    let plan = rows(&c, &format!("EXPLAIN CREATE MATERIALIZED VIEW x AS {leaders}")).await;
    assert!(plan.iter().any(|line| line.contains("shared #0")), "leaders shares its aggregate: {plan:?}");
    for (view, query) in VIEWS {
        run(&c, &format!("CREATE MATERIALIZED VIEW {view} AS {query}")).await;
    }
    let first = checkpoint(&c).await;
    assert_eq!(
        rows(&c, &format!("SELECT views, views_left_out FROM freshet_catalog.checkpoints WHERE epoch = {first}")).await,
        vec!["6|0"],
        "every view but the one reading a view is in the checkpoint"
    );
    // Committed after the checkpoint: the restart must replay these into restored state.
    run(
        &c,
        "DELETE FROM t WHERE v > 990;
         UPDATE t SET g = 3 WHERE v < 10;
         INSERT INTO u VALUES (3, 'three');
         INSERT INTO t VALUES ('extra', 1, 4), ('more', 2, 2000)",
    )
    .await;
    assert_views_are_right(&c, "before the kill").await;
    server.kill_9();

    let server = Process::start(dir.path(), &args);
    let c = common::connect(&server.connection_string).await;
    assert_eq!(restored(&c).await, expect_restored(&first), "views come back from the checkpoint");
    assert_views_are_right(&c, "after the restore and the changes after the checkpoint").await;
    // The restored state keeps working incrementally: groups shrink, move and vanish.
    run(
        &c,
        "DELETE FROM t WHERE g = 3;
         UPDATE t SET v = v + 1 WHERE v % 10 = 0;
         DELETE FROM u WHERE g = 0;
         INSERT INTO t SELECT 'n' || x, x % 4, x FROM generate_series(1, 50) AS s(x)",
    )
    .await;
    assert_views_are_right(&c, "after more writes on restored state").await;
    let second = checkpoint(&c).await;
    assert!(second.parse::<u64>().expect("epoch") > first.parse::<u64>().expect("epoch"), "epochs go on");
    run(&c, "UPDATE t SET v = v * 2 WHERE g = 1; INSERT INTO u VALUES (0, 'zero again')").await;
    let third = checkpoint(&c).await;
    run(&c, "INSERT INTO t VALUES ('late', 2, 3); DELETE FROM t WHERE k = 'k5'").await;
    server.kill_9();

    // The newest checkpoint's manifest is damaged: the one before it is used, with the
    // longer log after it.
    let dir_of = |epoch: &str| dir.path().join(format!("checkpoint/{:020}", epoch.parse::<u64>().expect("epoch")));
    std::fs::write(dir_of(&third).join("MANIFEST"), b"not a manifest").expect("damage the manifest");
    let server = Process::start(dir.path(), &args);
    let c = common::connect(&server.connection_string).await;
    assert_eq!(restored(&c).await, expect_restored(&second), "the checkpoint before it is restored");
    assert_views_are_right(&c, "restored from the older checkpoint").await;
    run(&c, "INSERT INTO t VALUES ('last', 0, 7)").await;
    let fourth = checkpoint(&c).await;
    server.kill_9();

    // The newest checkpoint's view states are truncated: the views are recomputed from
    // their inputs (the checkpoints before it are older than the snapshot taken at start).
    for entry in std::fs::read_dir(dir_of(&fourth)).expect("checkpoint directory") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "state") {
            let bytes = std::fs::read(&path).expect("state");
            std::fs::write(&path, &bytes[..bytes.len() / 2]).expect("truncate");
        }
    }
    let server = Process::start(dir.path(), &args);
    let c = common::connect(&server.connection_string).await;
    let all_rebuilt: Vec<String> = expect_restored("rebuilt");
    assert_eq!(restored(&c).await, all_rebuilt, "damaged states are not restored");
    assert_views_are_right(&c, "recomputed after damaged states").await;
    server.kill_9();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_are_taken_on_their_own_and_old_ones_deleted() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = Process::start(dir.path(), &["--checkpoint-interval", "100ms", "--checkpoints-kept", "2"]);
    let c = common::connect(&server.connection_string).await;
    run(&c, "CREATE TABLE t (k TEXT PRIMARY KEY, g INT NOT NULL, v BIGINT NOT NULL)").await;
    run(&c, "CREATE MATERIALIZED VIEW per_group AS SELECT g, count(*) AS n FROM t GROUP BY g").await;
    for n in 0..10 {
        run(&c, &format!("INSERT INTO t VALUES ('k{n}', {}, {n})", n % 2)).await;
        tokio::time::sleep(std::time::Duration::from_millis(150)).await;
    }
    let taken = common::count(&c, "SELECT count(*) FROM freshet_catalog.checkpoints WHERE status = 'ok'").await;
    assert!(taken >= 3, "checkpoints follow the writes ({taken} taken)");
    let held = common::count(&c, "SELECT count(*) FROM freshet_catalog.views WHERE last_checkpoint_epoch > 0").await;
    assert_eq!(held, 1, "the view is in the last checkpoint");
    let kept = std::fs::read_dir(dir.path().join("checkpoint")).expect("checkpoint directory").count();
    assert!(kept <= 3, "at most the two kept and one being written remain ({kept})");
    // Nothing written: no more checkpoints.
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    let before = common::count(&c, "SELECT count(*) FROM freshet_catalog.checkpoints").await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let after = common::count(&c, "SELECT count(*) FROM freshet_catalog.checkpoints").await;
    assert_eq!(before, after, "an idle server takes no checkpoints");
    server.kill_9();
}

/// The windows as (page, minute, clicks).
const MINUTES: &str = "SELECT page, date_part('minute', window_start)::int, clicks FROM per_minute";
const MINUTES_CLOSED: &str = "SELECT page, date_part('minute', window_start)::int, clicks FROM closed";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_time_state_comes_back_with_the_view() {
    let dir = tempfile::tempdir().expect("temp dir");
    let args = ["--checkpoint-interval", "off"];
    let server = Process::start(dir.path(), &args);
    let c = common::connect(&server.connection_string).await;
    run(
        &c,
        "CREATE TABLE clicks (page TEXT, ts TIMESTAMP, WATERMARK FOR ts AS ts - INTERVAL '5 seconds');
         CREATE MATERIALIZED VIEW per_minute AS
             SELECT page, window_start, count(*) AS clicks FROM TUMBLE(clicks, ts, INTERVAL '1 minute')
             GROUP BY page, window_start;
         CREATE MATERIALIZED VIEW closed AS
             SELECT page, window_start, count(*) AS clicks FROM TUMBLE(clicks, ts, INTERVAL '1 minute')
             GROUP BY page, window_start EMIT ON WINDOW CLOSE;
         INSERT INTO clicks VALUES ('a', '2026-01-01 10:00:10'), ('a', '2026-01-01 10:00:50'),
                                   ('b', '2026-01-01 10:01:20'), ('a', '2026-01-01 10:01:30')",
    )
    .await;
    let epoch = checkpoint(&c).await;
    assert_eq!(rows(&c, MINUTES_CLOSED).await, vec!["a|0|2"], "the first minute closed");
    server.kill_9();

    let server = Process::start(dir.path(), &args);
    let c = common::connect(&server.connection_string).await;
    let restored = rows(&c, "SELECT view, restored_from_epoch FROM freshet_catalog.views").await;
    assert_eq!(restored, vec![format!("closed|{epoch}"), format!("per_minute|{epoch}")]);
    // The watermark (10:01:25) came back: a click for 10:00 is late and dropped, and the
    // second minute closes once the watermark passes it.
    run(&c, "INSERT INTO clicks VALUES ('a', '2026-01-01 10:00:59'); INSERT INTO clicks VALUES ('b', '2026-01-01 10:02:30'); FLUSH").await;
    assert_eq!(rows(&c, MINUTES).await, vec!["a|0|2", "a|1|1", "b|1|1", "b|2|1"], "the late click is not counted");
    assert_eq!(
        rows(&c, MINUTES_CLOSED).await,
        vec!["a|0|2", "a|1|1", "b|1|1"],
        "held rows were kept and closed after the restart"
    );
    let late = common::count(&c, "SELECT sum(late_rows) FROM freshet_catalog.late_events").await;
    assert!(late >= 1, "the late click is counted as late ({late})");
    server.kill_9();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_interval_joins_and_joins_with_constants_continue_across_a_restart() {
    let dir = tempfile::tempdir().expect("temp dir");
    let args = ["--checkpoint-interval", "off"];
    let views = [
        (
            "converted",
            "SELECT c.user_id, date_part('second', c.ts)::int AS click_s, date_part('second', b.ts)::int AS buy_s
             FROM visits c JOIN buys b ON c.user_id = b.user_id AND b.ts BETWEEN c.ts AND c.ts + INTERVAL '10 seconds'",
        ),
        (
            "sessions",
            "SELECT user_id, date_part('second', window_start)::int AS started, count(*) AS hits
             FROM SESSION(visits, ts, INTERVAL '5 seconds') GROUP BY user_id, window_start",
        ),
        (
            // A constant is sent only to a view that starts afresh: a restored one has
            // its rows in the join's state, and keeps no visits.
            "labelled",
            "SELECT v.user_id, l.label, date_part('second', v.ts)::int AS s
             FROM visits v JOIN (VALUES ('u1', 'first'), ('u3', 'third')) l(user_id, label) ON v.user_id = l.user_id",
        ),
    ];
    let server = Process::start(dir.path(), &args);
    let c = common::connect(&server.connection_string).await;
    run(
        &c,
        "CREATE TABLE visits (user_id TEXT, ts TIMESTAMP, WATERMARK FOR ts AS ts - INTERVAL '2 seconds');
         CREATE TABLE buys (user_id TEXT, ts TIMESTAMP, WATERMARK FOR ts AS ts - INTERVAL '2 seconds');
         INSERT INTO visits VALUES ('u1', '2026-01-01 10:00:01'), ('u1', '2026-01-01 10:00:04'),
                                   ('u2', '2026-01-01 10:00:03');
         INSERT INTO buys VALUES ('u2', '2026-01-01 10:00:05')",
    )
    .await;
    for (view, query) in views {
        run(&c, &format!("CREATE MATERIALIZED VIEW {view} AS {query}")).await;
    }
    let epoch = checkpoint(&c).await;
    server.kill_9();

    let server = Process::start(dir.path(), &args);
    let c = common::connect(&server.connection_string).await;
    let restored = rows(&c, "SELECT view, restored_from_epoch FROM freshet_catalog.views").await;
    assert_eq!(restored, vec![format!("converted|{epoch}"), format!("labelled|{epoch}"), format!("sessions|{epoch}")]);
    // A buy matching a click from before the restart, and a visit extending a session
    // from before it, need the restored rows.
    run(
        &c,
        "INSERT INTO buys VALUES ('u1', '2026-01-01 10:00:09');
         INSERT INTO visits VALUES ('u1', '2026-01-01 10:00:08'), ('u2', '2026-01-01 10:00:20'),
                                   ('u3', '2026-01-01 10:00:21')",
    )
    .await;
    run(&c, "FLUSH").await;
    for (view, query) in views {
        let expected = rows(&c, query).await;
        assert_eq!(rows(&c, &format!("SELECT * FROM {view}")).await, expected, "{view} after the restart");
    }
    assert!(rows(&c, "SELECT * FROM converted").await.contains(&"u1|4|9".to_string()), "a pre-restart click matched");
    assert!(rows(&c, "SELECT * FROM sessions").await.contains(&"u1|1|3".to_string()), "the session grew across it");
    assert_eq!(
        rows(&c, "SELECT * FROM labelled").await,
        vec!["u1|first|1", "u1|first|4", "u1|first|8", "u3|third|21"],
        "visits after the restart met the restored constant rows"
    );
    server.kill_9();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_from_another_worker_count_is_recomputed_not_misread() {
    let dir = tempfile::tempdir().expect("temp dir");
    let query = "SELECT g, count(*) AS n, sum(v) AS total FROM t GROUP BY g";
    let server = Process::start(dir.path(), &["--checkpoint-interval", "off", "--workers", "2"]);
    let c = common::connect(&server.connection_string).await;
    run(
        &c,
        &format!(
            "CREATE TABLE t (g INT, v BIGINT); INSERT INTO t SELECT x % 10, x FROM generate_series(1, 500) AS s(x);
             CREATE MATERIALIZED VIEW per_g AS {query}"
        ),
    )
    .await;
    checkpoint(&c).await;
    server.kill_9();

    // Two aggregate instances' states cannot stand in for one: the view is recomputed.
    let server = Process::start(dir.path(), &["--checkpoint-interval", "off", "--workers", "1"]);
    let c = common::connect(&server.connection_string).await;
    assert_eq!(rows(&c, "SELECT view, restored_from_epoch FROM freshet_catalog.views").await, vec!["per_g|NULL"]);
    run(&c, "INSERT INTO t VALUES (3, 1000); FLUSH").await;
    assert_eq!(rows(&c, "SELECT * FROM per_g").await, rows(&c, query).await);
    server.kill_9();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_checkpoints_back_off_while_views_go_on_and_succeed_once_storage_recovers() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = Process::start(dir.path(), &["--checkpoint-interval", "100ms"]);
    let c = common::connect(&server.connection_string).await;
    run(&c, "CREATE TABLE t (id BIGINT, g INT); CREATE MATERIALIZED VIEW per_g AS SELECT g, count(*) AS n FROM t GROUP BY g")
        .await;
    // A file where the checkpoint directory should be: every checkpoint write fails.
    let _ = std::fs::remove_dir_all(dir.path().join("checkpoint"));
    std::fs::write(dir.path().join("checkpoint"), b"in the way").expect("blocker");
    let failed = "SELECT count(*) FROM freshet_catalog.checkpoints WHERE status = 'failed' AND error IS NOT NULL";
    let mut next = 0;
    let started = tokio::time::Instant::now();
    while started.elapsed() < std::time::Duration::from_secs(3) {
        run(&c, &format!("INSERT INTO t VALUES ({next}, {})", next % 3)).await;
        next += 1;
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    run(&c, "FLUSH").await;
    let attempts = common::count(&c, failed).await;
    assert!(attempts >= 1, "checkpoints failed while the store was unusable");
    // At 100 ms a checkpoint would be tried about 30 times; backing off (1 s, 2 s, …) tries
    // at most three.
    assert!(attempts <= 3, "failures back off instead of retrying every interval: {attempts}");
    assert_eq!(
        rows(&c, "SELECT sum(n) FROM per_g").await,
        vec![next.to_string()],
        "the view kept up while checkpoints failed"
    );

    // The store recovers: a later checkpoint succeeds, and a restart restores from it.
    std::fs::remove_file(dir.path().join("checkpoint")).expect("blocker removed");
    let ok = "SELECT count(*) FROM freshet_catalog.checkpoints WHERE status = 'ok'";
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    while common::count(&c, ok).await == 0 {
        assert!(tokio::time::Instant::now() < deadline, "no checkpoint succeeded after the store recovered");
        run(&c, &format!("INSERT INTO t VALUES ({next}, {})", next % 3)).await;
        next += 1;
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    server.kill_9();
    let server = Process::start(dir.path(), &["--checkpoint-interval", "100ms"]);
    let c = common::connect(&server.connection_string).await;
    let restored = common::count(&c, "SELECT count(restored_from_epoch) FROM freshet_catalog.views").await;
    assert_eq!(restored, 1, "restored from the checkpoint written after the store came back");
    run(&c, "FLUSH").await;
    assert_eq!(rows(&c, "SELECT sum(n) FROM per_g").await, vec![next.to_string()], "nothing committed is lost");
    server.kill_9();
}

/// The view differs from `query` in this many rows, counting duplicates (compared in the
/// server, so 100k rows do not cross the wire twice).
async fn rows_differing(client: &Client, view: &str, query: &str) -> i64 {
    common::integer(
        client,
        &format!(
            "SELECT count(*) FROM ((SELECT * FROM {view} EXCEPT ALL ({query}))
                                   UNION ALL (({query}) EXCEPT ALL SELECT * FROM {view})) AS d"
        ),
    )
    .await
}

/// Bytes checkpoint `epoch` wrote.
async fn checkpoint_bytes(client: &Client, epoch: &str) -> i64 {
    common::integer(client, &format!("SELECT bytes FROM freshet_catalog.checkpoints WHERE epoch = {epoch}")).await
}

/// Starts the server on `dir` again and checks that its one view came back from checkpoint
/// `epoch` and, once caught up, equals `query`.
async fn restarted_from(
    dir: &std::path::Path,
    args: &[&str],
    epoch: &str,
    view: &str,
    query: &str,
) -> (Process, Client) {
    let server = Process::start(dir, args);
    let c = common::connect(&server.connection_string).await;
    assert_eq!(
        rows(&c, "SELECT coalesce(restored_from_epoch::text, 'rebuilt') FROM freshet_catalog.views").await,
        vec![epoch.to_string()],
        "{view} comes back from checkpoint {epoch}"
    );
    run(&c, "FLUSH").await;
    assert_eq!(rows_differing(&c, view, query).await, 0, "{view} after the restore from {epoch}");
    (server, c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_view_with_duplicate_rows_checkpoints_what_changed_and_comes_back_whole() {
    let dir = tempfile::tempdir().expect("temp dir");
    let args = ["--checkpoint-interval", "off"];
    let server = Process::start(dir.path(), &args);
    let c = common::connect(&server.connection_string).await;
    // 120,000 rows, each of them twice: megabytes of rows, which go through the view's
    // local store at checkpoints, 60,000 distinct ones written at once the first time.
    const QUERY: &str = "SELECT k % 60000 AS g, 'padding to make the rows larger' AS pad FROM t";
    run(
        &c,
        &format!(
            "CREATE TABLE t (k BIGINT PRIMARY KEY);
             INSERT INTO t SELECT x FROM generate_series(0, 119999) AS s(x);
             CREATE MATERIALIZED VIEW twice AS {QUERY}"
        ),
    )
    .await;
    let first = checkpoint(&c).await;
    let whole = checkpoint_bytes(&c, &first).await;
    // One copy of some rows goes, both copies of others, and new rows come.
    run(
        &c,
        "DELETE FROM t WHERE k % 100 = 1 AND k < 60000;
         DELETE FROM t WHERE k % 1000 = 2;
         INSERT INTO t SELECT x FROM generate_series(200000, 200499) AS s(x)",
    )
    .await;
    let second = checkpoint(&c).await;
    let changed = checkpoint_bytes(&c, &second).await;
    assert!(
        changed * 5 < whole,
        "after 2% of the rows changed a checkpoint writes {changed} bytes; the first wrote {whole}"
    );
    run(&c, "DELETE FROM t WHERE k % 100 = 3 AND k < 60000; INSERT INTO t VALUES (300000), (300001)").await;
    run(&c, "FLUSH").await;
    assert_eq!(rows_differing(&c, "twice", QUERY).await, 0, "before the kill");
    server.kill_9();

    let (server, c) = restarted_from(dir.path(), &args, &second, "twice", QUERY).await;
    assert!(common::integer(&c, "SELECT count(*) FROM twice").await > 100_000, "the view has its rows");
    // Of two copies of a restored row, one goes, or both.
    run(&c, "DELETE FROM t WHERE k IN (5, 6, 60006); FLUSH").await;
    assert_eq!(common::integer(&c, "SELECT count(*) FROM twice WHERE g = 5").await, 1);
    assert_eq!(common::integer(&c, "SELECT count(*) FROM twice WHERE g = 6").await, 0);
    assert_eq!(rows_differing(&c, "twice", QUERY).await, 0, "after deletes on restored rows");
    let third = checkpoint(&c).await;
    server.kill_9();

    let (server, c) = restarted_from(dir.path(), &args, &third, "twice", QUERY).await;
    assert_eq!(common::integer(&c, "SELECT count(*) FROM twice WHERE g = 5").await, 1);
    server.kill_9();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_append_only_view_checkpoints_its_new_rows_and_comes_back_whole() {
    let dir = tempfile::tempdir().expect("temp dir");
    let args = ["--checkpoint-interval", "off"];
    let server = Process::start(dir.path(), &args);
    let c = common::connect(&server.connection_string).await;
    // A table with a watermark only gains rows, and so does the view over it: its row
    // store keys rows by arrival. Every row comes twice, so equal rows are kept apart. (The
    // watermark's delay is long, so no row is late and the view holds every row.)
    const QUERY: &str = "SELECT k % 60000 AS g, 'padding to make the rows larger' AS pad, ts FROM ev";
    let insert = |from: i64, to: i64| {
        format!("INSERT INTO ev SELECT x, to_timestamp(1767225600 + x) FROM generate_series({from}, {to}) AS s(x)")
    };
    run(
        &c,
        &format!(
            "CREATE TABLE ev (k BIGINT, ts TIMESTAMP, WATERMARK FOR ts AS ts - INTERVAL '1000 days');
             {}; {};
             CREATE MATERIALIZED VIEW arrivals AS {QUERY}",
            insert(0, 59_999),
            insert(0, 59_999)
        ),
    )
    .await;
    let first = checkpoint(&c).await;
    let whole = checkpoint_bytes(&c, &first).await;
    run(&c, &insert(60_000, 61_199)).await;
    let second = checkpoint(&c).await;
    let new_rows = checkpoint_bytes(&c, &second).await;
    assert!(new_rows * 5 < whole, "after 1% more rows a checkpoint writes {new_rows} bytes; the first wrote {whole}");
    run(&c, &insert(61_200, 61_299)).await;
    run(&c, "FLUSH").await;
    assert_eq!(rows_differing(&c, "arrivals", QUERY).await, 0, "before the kill");
    server.kill_9();

    let (server, c) = restarted_from(dir.path(), &args, &second, "arrivals", QUERY).await;
    assert_eq!(common::integer(&c, "SELECT count(*) FROM arrivals").await, 121_300, "every row, duplicates too");
    // The restored store goes on numbering arrivals where it stopped.
    run(&c, &format!("{}; {}", insert(70_000, 70_999), insert(70_000, 70_009))).await;
    let third = checkpoint(&c).await;
    server.kill_9();

    let (server, c) = restarted_from(dir.path(), &args, &third, "arrivals", QUERY).await;
    assert_eq!(common::integer(&c, "SELECT count(*) FROM arrivals").await, 122_310, "rows from both sessions");
    server.kill_9();
}
