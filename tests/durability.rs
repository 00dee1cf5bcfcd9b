//! Durability of the real `freshet` binary: every acknowledged write survives `kill -9`,
//! nothing unacknowledged-and-unsent appears, SIGTERM shuts down cleanly (with a last
//! checkpoint the next start restores views from), and `--init` runs before clients are
//! accepted.

mod common;

use common::process::Process;

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_inserts_survive_kill_9() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = Process::start(dir.path(), &[]);
    let setup = common::connect(&server.connection_string).await;
    setup.batch_execute("CREATE TABLE events (id BIGINT PRIMARY KEY, writer INT, payload TEXT)").await.expect("create");

    let acked = Arc::new(Mutex::new(BTreeSet::new()));
    let attempted = Arc::new(Mutex::new(BTreeSet::new()));
    let mut writers = Vec::new();
    for writer in 0..4i64 {
        let client = common::connect(&server.connection_string).await;
        let acked = acked.clone();
        let attempted = attempted.clone();
        writers.push(tokio::spawn(async move {
            let insert = client.prepare("INSERT INTO events VALUES ($1, $2, $3)").await.expect("prepare");
            for n in 0.. {
                let id = writer * 1_000_000 + n;
                attempted.lock().expect("lock").insert(id);
                match client.execute(&insert, &[&id, &(writer as i32), &format!("event {id}")]).await {
                    Ok(1) => {
                        acked.lock().expect("lock").insert(id);
                    }
                    Ok(other) => panic!("INSERT reported {other} rows"),
                    Err(_) => return, // the server is gone
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    server.kill_9();
    for writer in writers {
        writer.await.expect("writer task");
    }
    let acked = acked.lock().expect("lock").clone();
    let attempted = attempted.lock().expect("lock").clone();
    assert!(acked.len() > 50, "the writers made progress before the kill ({} rows)", acked.len());

    let server = Process::start(dir.path(), &[]);
    let client = common::connect(&server.connection_string).await;
    let rows = client.query("SELECT id, payload FROM events", &[]).await.expect("select after restart");
    let present: BTreeSet<i64> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(present.len(), rows.len(), "no row is duplicated");
    let lost: Vec<_> = acked.difference(&present).collect();
    assert!(lost.is_empty(), "{} acknowledged rows were lost, e.g. {:?}", lost.len(), &lost[..lost.len().min(5)]);
    let invented: Vec<_> = present.difference(&attempted).collect();
    assert!(invented.is_empty(), "rows that were never sent appeared: {invented:?}");
    // At most the one in-flight insert per writer may have landed without its acknowledgement.
    assert!(present.len() <= acked.len() + 4);
    for row in &rows {
        let id: i64 = row.get(0);
        assert_eq!(row.get::<_, String>(1), format!("event {id}"), "row contents intact");
    }
    // The restarted server takes new writes on top of the recovered ones.
    client.execute("INSERT INTO events VALUES (-1, -1, 'after restart')", &[]).await.expect("insert after restart");
    server.kill_9();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_shuts_down_cleanly_and_keeps_data() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = Process::start(dir.path(), &[]);
    let client = common::connect(&server.connection_string).await;
    client
        .batch_execute("CREATE TABLE t (id INT PRIMARY KEY, v TEXT); CREATE MATERIALIZED VIEW per_v AS SELECT v, count(*) AS n FROM t GROUP BY v; INSERT INTO t VALUES (1, 'a'), (2, 'b'); UPDATE t SET v = 'B' WHERE id = 2; DELETE FROM t WHERE id = 1")
        .await
        .expect("writes");
    let mut server = server;
    let pid = server.child.id().to_string();
    let status = Command::new("kill").args(["-TERM", &pid]).status().expect("kill runs");
    assert!(status.success());
    let exit = tokio::task::spawn_blocking(move || server.child.wait()).await.expect("join").expect("exits");
    assert!(exit.success(), "graceful shutdown exits 0, got {exit:?}");

    let server = Process::start(dir.path(), &[]);
    let client = common::connect(&server.connection_string).await;
    let rows = client.query("SELECT id, v FROM t", &[]).await.expect("select");
    let got: Vec<(i32, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(got, vec![(2, "B".to_string())]);
    // Shutdown took a last checkpoint: the view comes back from it, not recomputed.
    let restored = client.query_one("SELECT restored_from_epoch FROM freshet_catalog.views", &[]).await.expect("views");
    assert!(restored.get::<_, Option<i64>>(0).is_some(), "the view is restored from the shutdown checkpoint");
    let view = client.query("SELECT v, n FROM per_v", &[]).await.expect("view");
    let got: Vec<(String, i64)> = view.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(got, vec![("B".to_string(), 1)]);
    server.kill_9();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_file_runs_before_clients_connect() {
    let dir = tempfile::tempdir().expect("temp dir");
    let init = dir.path().join("init.sql");
    std::fs::write(
        &init,
        "CREATE TABLE IF NOT EXISTS devices (id TEXT PRIMARY KEY, site TEXT);\nINSERT INTO devices SELECT 'd-' || CAST(count(*) AS TEXT), 'hq' FROM devices;\n",
    )
    .expect("init file written");
    let data = dir.path().join("data");
    let init_arg = init.to_string_lossy().to_string();
    for expected in 1..=2i64 {
        let server = Process::start(&data, &["--init", &init_arg]);
        let client = common::connect(&server.connection_string).await;
        let row = client.query_one("SELECT count(*) FROM devices", &[]).await.expect("select");
        assert_eq!(row.get::<_, i64>(0), expected, "the init file ran once per start");
        server.kill_9();
    }

    // A failing init file stops startup with a message naming the file.
    std::fs::write(&init, "CREATE TABLE broken (;").expect("init file written");
    let out = Command::new(env!("CARGO_BIN_EXE_freshet"))
        .args([
            "serve",
            "--pg-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
            "--init",
            &init_arg,
            "--data-dir",
        ])
        .arg(&data)
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("init.sql") && stderr.contains("42601"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_are_listed_and_a_damaged_newest_one_falls_back_to_the_one_before() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = Process::start(dir.path(), &[]);
    let client = common::connect(&server.connection_string).await;
    client.batch_execute("CREATE TABLE t (id INT PRIMARY KEY)").await.expect("create");
    // One commit per statement: two snapshots' worth of log segments (one every 2048).
    let inserts: String = (0..4200).map(|i| format!("INSERT INTO t VALUES ({i});")).collect();
    client.batch_execute(&inserts).await.expect("inserts");
    let ok = "SELECT count(*) FROM freshet_catalog.snapshots WHERE status = 'ok' AND bytes > 0 AND rows > 2000";
    common::wait_for(&client, ok, 2).await;
    let failed = "SELECT count(*) FROM freshet_catalog.snapshots WHERE status <> 'ok' OR error IS NOT NULL";
    assert_eq!(common::count(&client, failed).await, 0);
    server.kill_9();

    let mut snapshots: Vec<_> = std::fs::read_dir(dir.path().join("snapshot"))
        .expect("snapshot directory")
        .map(|e| e.expect("entry").path())
        .collect();
    snapshots.sort();
    assert_eq!(snapshots.len(), 2, "the newest two are kept: {snapshots:?}");
    std::fs::write(snapshots.last().expect("newest"), b"damaged").expect("damaged");

    let server = Process::start(dir.path(), &[]);
    let client = common::connect(&server.connection_string).await;
    assert_eq!(common::count(&client, "SELECT count(*) FROM t").await, 4200, "nothing lost");
    assert_eq!(common::count(&client, "SELECT count(DISTINCT id) FROM t").await, 4200);
    server.kill_9();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_snapshots_back_off_while_writes_go_on_and_succeed_once_storage_recovers() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = Process::start(dir.path(), &[]);
    let client = common::connect(&server.connection_string).await;
    client.batch_execute("CREATE TABLE t (id INT PRIMARY KEY)").await.expect("create");
    // A file where the snapshot directory should be: every snapshot write fails.
    let blocker = dir.path().join("snapshot");
    std::fs::write(&blocker, b"in the way").expect("blocker");
    let inserts: String = (0..2200).map(|i| format!("INSERT INTO t VALUES ({i});")).collect();
    client.batch_execute(&inserts).await.expect("writes go on while snapshots fail");
    let failed = "SELECT count(*) FROM freshet_catalog.snapshots WHERE status = 'failed' AND error IS NOT NULL";
    // At least one attempt failed (a slow machine may have made a second by now).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while common::count(&client, failed).await == 0 {
        assert!(tokio::time::Instant::now() < deadline, "no snapshot attempt failed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let attempts = common::count(&client, failed).await;
    assert!(attempts <= 3, "failures back off instead of retrying on every commit: {attempts}");

    // Storage recovers: a later commit's snapshot succeeds.
    std::fs::remove_file(&blocker).expect("blocker removed");
    let ok = "SELECT count(*) FROM freshet_catalog.snapshots WHERE status = 'ok'";
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    let mut next = 2200;
    while common::count(&client, ok).await == 0 {
        assert!(tokio::time::Instant::now() < deadline, "no snapshot succeeded after the store recovered");
        client.execute(&format!("INSERT INTO t VALUES ({next})"), &[]).await.expect("insert");
        next += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.kill_9();
    let server = Process::start(dir.path(), &[]);
    let client = common::connect(&server.connection_string).await;
    assert_eq!(common::count(&client, "SELECT count(*) FROM t").await, next as i64, "nothing committed is lost");
    server.kill_9();
}
