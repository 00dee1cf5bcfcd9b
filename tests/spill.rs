//! State beyond memory, with the real `freshet` binary: a GROUP BY view, a view over a
//! join and a top-N per group, whose state is many times `--memory-limit`, spill their
//! least recently used groups, join keys or partitions to a local RocksDB, keep equalling their query run as a batch, checkpoint
//! only what changed (shared SST files), and come back after `kill -9` from those files
//! alone.

mod common;

use common::process::Process;
use tokio_postgres::Client;

const LIMIT_MB: i64 = 2;

const VIEW: &str = "SELECT g, count(*) AS n, count(DISTINCT v) AS kinds, min(v) AS low, max(v) AS high,
                           sum(v) AS total, string_agg(v::text, ',' ORDER BY v::text) AS listed
                    FROM t GROUP BY g";

/// The view equals its query over the table as it is now (compared in the server, so
/// 100k groups do not cross the wire twice; a sample does, to show it is not vacuous).
async fn assert_view_is_right(client: &Client, when: &str) {
    assert_equals_query(client, "groups", VIEW, "g IN (7, 4242, 99999)", 50_000, when).await;
}

/// View `view` equals `query` run as a batch now, its rows where `sample` hold are
/// printed alike, and it has more than `rows` rows.
async fn assert_equals_query(client: &Client, view: &str, query: &str, sample: &str, rows: i64, when: &str) {
    common::execute(client, "FLUSH").await;
    let differing = format!(
        "SELECT count(*) FROM (
            (SELECT * FROM {view} EXCEPT ALL ({query}))
            UNION ALL
            (({query}) EXCEPT ALL SELECT * FROM {view})) AS d"
    );
    assert_eq!(common::integer(client, &differing).await, 0, "{view} differs from its query {when}");
    let sampled = format!("SELECT * FROM {view} WHERE {sample}");
    let batch = format!("SELECT * FROM ({query}) AS q WHERE {sample}");
    assert_eq!(
        common::text_rows(client, &sampled).await,
        common::text_rows(client, &batch).await,
        "sampled rows of {view} {when}"
    );
    let count = format!("SELECT count(*) FROM {view}");
    assert!(common::integer(client, &count).await > rows, "{when}: {view} has its rows");
}

/// (bytes in memory, bytes spilled) of the state of view `groups`.
async fn usage(client: &Client) -> (i64, i64) {
    view_usage(client, "groups").await
}

/// (bytes in memory, bytes spilled) of the state of `view`.
async fn view_usage(client: &Client, view: &str) -> (i64, i64) {
    let query =
        format!("SELECT state_memory_bytes, state_spilled_bytes FROM freshet_catalog.views WHERE view = '{view}'");
    let line = common::text_rows(client, &query).await;
    let (memory, spilled) = line[0].split_once('|').expect("two columns");
    (memory.parse().expect("memory"), spilled.parse().expect("spilled"))
}

async fn checkpoint_bytes(client: &Client) -> i64 {
    common::execute(client, "CHECKPOINT").await;
    common::integer(
        client,
        "SELECT bytes FROM freshet_catalog.checkpoints WHERE status = 'ok' ORDER BY epoch DESC LIMIT 1",
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_view_with_state_many_times_the_memory_limit_spills_checkpoints_what_changed_and_recovers() {
    let dir = tempfile::tempdir().expect("temp dir");
    let limit = format!("{LIMIT_MB}MB");
    let args = ["--checkpoint-interval", "off", "--memory-limit", &limit, "--workers", "1"];
    let server = Process::start(dir.path(), &args);
    let c = common::connect(&server.connection_string).await;
    common::execute(&c, "CREATE TABLE t (k BIGINT PRIMARY KEY, g BIGINT NOT NULL, v BIGINT NOT NULL)").await;
    common::execute(&c, &format!("CREATE MATERIALIZED VIEW groups AS {VIEW}")).await;
    // 100k groups of five values each, inserted in ten statements (ten epochs at least).
    for part in 0..10 {
        common::execute(
            &c,
            &format!(
                "INSERT INTO t SELECT x, x % 100000, (x * 7919) % 1000003 FROM generate_series({}, {}) AS s(x)",
                part * 50_000 + 1,
                (part + 1) * 50_000
            ),
        )
        .await;
    }
    assert_view_is_right(&c, "after the inserts").await;
    let (memory, spilled) = usage(&c).await;
    let limit = LIMIT_MB << 20;
    assert!(memory <= limit, "the state in memory ({memory} bytes) stays within --memory-limit ({limit})");
    assert!(spilled >= 5 * limit, "the spilled state ({spilled} bytes, compressed) is at least 5x the limit");

    // Deletes and updates reach spilled groups: they are read back, changed and spilled again.
    common::execute(&c, "DELETE FROM t WHERE k % 97 = 0; UPDATE t SET v = v + 1 WHERE k % 89 = 0").await;
    assert_view_is_right(&c, "after deletes and updates of spilled groups").await;

    // The first checkpoint uploads the whole store; after 1% of the groups change, the next
    // one uploads about that much: files already uploaded are only referenced again.
    let whole = checkpoint_bytes(&c).await;
    common::execute(&c, "UPDATE t SET v = v + 2 WHERE g % 100 = 3").await;
    let incremental = checkpoint_bytes(&c).await;
    assert!(
        incremental * 10 < whole,
        "after 1% of the groups changed, a checkpoint uploads {incremental} bytes; the first uploaded {whole}"
    );
    eprintln!(
        "spill: {memory} bytes in memory, {spilled} spilled; checkpoints: {whole} bytes whole, {incremental} after 1% changed"
    );
    let shared = walk(&dir.path().join("checkpoint/shared"));
    assert!(shared.iter().any(|f| f.ends_with(".sst")), "the spilled files are in the store: {shared:?}");

    // Committed after the checkpoint, then the process dies.
    common::execute(&c, "DELETE FROM t WHERE g % 1000 = 17; INSERT INTO t VALUES (-1, 123456789, 5), (-2, 7, 5)").await;
    assert_view_is_right(&c, "before the kill").await;
    let (server, c) = killed_and_restarted_without_spill_dir(server, dir.path(), &args, &["groups"]).await;
    assert_view_is_right(&c, "after the restore and the changes after the checkpoint").await;
    common::execute(&c, "UPDATE t SET v = 0 WHERE k % 5 = 1; DELETE FROM t WHERE g < 1000").await;
    assert_view_is_right(&c, "after more changes to the restored state").await;
    let (memory, spilled) = usage(&c).await;
    assert!(memory <= limit && spilled > 0, "still spilled after the restart: {memory} in memory, {spilled} on disk");

    // Old checkpoints go, and with them the files no kept checkpoint refers to.
    for _ in 0..4 {
        common::execute(&c, "UPDATE t SET v = v + 1 WHERE g % 50 = 1").await;
        checkpoint_bytes(&c).await;
    }
    let manifests = walk(&dir.path().join("checkpoint")).into_iter().filter(|f| f.ends_with("MANIFEST")).count();
    assert_eq!(manifests, 3, "three checkpoints are kept");
    drop(server);
    let server = Process::start(dir.path(), &args);
    let c = common::connect(&server.connection_string).await;
    let restored = common::text_rows(
        &c,
        "SELECT restored_from_epoch IS NOT NULL FROM freshet_catalog.views WHERE view = 'groups'",
    );
    assert_eq!(restored.await, vec!["t"], "the newest checkpoint still has every file it needs");
    assert_view_is_right(&c, "after old checkpoints and their files were deleted").await;
}

/// A join of two tables whose rows are many times the memory limit, both sides changed
/// after they spilled (keys emptied, rows moved between keys, matches lost and found).
/// The left rows keep their text through the join: `chars` needs both sides.
const JOINED: &str = "SELECT a.g % 1000 AS bucket, count(*) AS n, count(b.v) AS matched, sum(b.v) AS total,
                             sum(length(a.note || b.v::text)) AS chars
                      FROM a LEFT JOIN b ON a.g = b.g GROUP BY a.g % 1000";

/// The row of each key of `a` with the greatest text.
const TOPS: &str =
    "SELECT * FROM (SELECT k, g, note, row_number() OVER (PARTITION BY g ORDER BY note DESC, k) AS rn FROM a) AS r
                    WHERE rn <= 1";

/// Both views equal their queries.
async fn assert_join_and_tops_are_right(client: &Client, when: &str) {
    assert_equals_query(client, "joined", JOINED, "bucket IN (0, 7, 999)", 999, when).await;
    assert_equals_query(client, "tops", TOPS, "g IN (7, 4242, 99999)", 50_000, when).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_and_a_top_n_per_group_many_times_the_memory_limit_spill_checkpoint_what_changed_and_recover() {
    let dir = tempfile::tempdir().expect("temp dir");
    let limit = format!("{LIMIT_MB}MB");
    let args = ["--checkpoint-interval", "off", "--memory-limit", &limit, "--workers", "1"];
    let server = Process::start(dir.path(), &args);
    let c = common::connect(&server.connection_string).await;
    common::execute(&c, "CREATE TABLE a (k BIGINT PRIMARY KEY, g BIGINT NOT NULL, note TEXT NOT NULL)").await;
    common::execute(&c, "CREATE TABLE b (k BIGINT PRIMARY KEY, g BIGINT NOT NULL, v BIGINT NOT NULL)").await;
    common::execute(&c, &format!("CREATE MATERIALIZED VIEW joined AS {JOINED}")).await;
    common::execute(&c, &format!("CREATE MATERIALIZED VIEW tops AS {TOPS}")).await;
    // 200k rows on the left over 100k keys, 100k on the right over 150k keys: some keys
    // match on both sides, some on one only.
    for part in 0..4 {
        let (from, to) = (part * 50_000 + 1, (part + 1) * 50_000);
        let a = format!(
            "INSERT INTO a SELECT x, x % 100000, md5(x::text) || md5((-x)::text) || md5((x * 3)::text) FROM generate_series({from}, {to}) AS s(x)"
        );
        common::execute(&c, &a).await;
        if part < 2 {
            let b = format!(
                "INSERT INTO b SELECT x, (x * 7) % 150000, x % 1000 FROM generate_series({from}, {to}) AS s(x)"
            );
            common::execute(&c, &b).await;
        }
    }
    assert_join_and_tops_are_right(&c, "after the inserts").await;
    let limit = LIMIT_MB << 20;
    let (memory, spilled) = view_usage(&c, "joined").await;
    let (top_memory, top_spilled) = view_usage(&c, "tops").await;
    assert!(
        memory + top_memory <= limit,
        "the state in memory ({memory} and {top_memory} bytes) stays within --memory-limit ({limit})"
    );
    assert!(spilled >= 5 * limit, "the spilled join ({spilled} bytes, compressed) is at least 5x the limit");
    assert!(top_spilled >= 5 * limit, "the spilled top-N ({top_spilled} bytes, compressed) is at least 5x the limit");

    // Changes on both sides reach spilled keys: deleted rows, rows moved to other keys,
    // and right rows gone so left rows lose their match.
    common::execute(
        &c,
        "DELETE FROM a WHERE k % 97 = 0; UPDATE a SET g = g + 1 WHERE k % 83 = 0;
         UPDATE b SET v = v + 1 WHERE k % 89 = 0; DELETE FROM b WHERE k % 79 = 0",
    )
    .await;
    assert_join_and_tops_are_right(&c, "after deletes and updates of spilled keys").await;

    let whole = checkpoint_bytes(&c).await;
    common::execute(&c, "UPDATE b SET v = v + 2 WHERE k % 100 = 3; UPDATE a SET note = 'zz' || note WHERE k % 100 = 5")
        .await;
    let incremental = checkpoint_bytes(&c).await;
    assert!(
        incremental * 10 < whole,
        "after 1% of the rows changed, a checkpoint uploads {incremental} bytes; the first uploaded {whole}"
    );
    eprintln!(
        "join and top-N spill: {memory} and {top_memory} bytes in memory, {spilled} and {top_spilled} spilled; checkpoints: {whole} bytes whole, {incremental} after 1% changed"
    );

    // Committed after the checkpoint, then the process dies.
    common::execute(&c, "DELETE FROM b WHERE g % 1000 = 17; INSERT INTO a VALUES (-1, 4242, 'late'), (-2, 7, 'late')")
        .await;
    assert_join_and_tops_are_right(&c, "before the kill").await;
    let (_server, c) = killed_and_restarted_without_spill_dir(server, dir.path(), &args, &["joined", "tops"]).await;
    assert_join_and_tops_are_right(&c, "after the restore and the changes after the checkpoint").await;
    common::execute(&c, "UPDATE a SET g = (g * 3) % 100000 WHERE k % 5 = 1; DELETE FROM b WHERE g < 10000").await;
    assert_join_and_tops_are_right(&c, "after more changes to the restored state").await;
    for view in ["joined", "tops"] {
        let (memory, spilled) = view_usage(&c, view).await;
        assert!(
            memory <= limit && spilled > 0,
            "{view} still spills after the restart: {memory} in memory, {spilled} on disk"
        );
    }
}

/// Kills `server` with SIGKILL, removes its local spill directory (scratch: a restart must
/// not need it), starts it again and checks that `views` were restored from their
/// checkpoint's files, not recomputed.
async fn killed_and_restarted_without_spill_dir(
    server: Process,
    dir: &std::path::Path,
    args: &[&str],
    views: &[&str],
) -> (Process, Client) {
    server.kill_9();
    std::fs::remove_dir_all(dir.join("spill")).expect("the spill directory existed");
    let server = Process::start(dir, args);
    let c = common::connect(&server.connection_string).await;
    for view in views {
        let query = format!("SELECT restored_from_epoch IS NOT NULL FROM freshet_catalog.views WHERE view = '{view}'");
        let restored = common::text_rows(&c, &query).await;
        assert_eq!(restored, vec!["t"], "{view} is restored from its checkpoint's files, not recomputed");
    }
    (server, c)
}

/// Every file under `dir`, as paths.
fn walk(dir: &std::path::Path) -> Vec<String> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                files.push(path.display().to_string());
            }
        }
    }
    files
}
