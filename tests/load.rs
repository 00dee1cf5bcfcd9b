//! Many clients at once: 50 sessions inserting and reading for 10 seconds. Every insert
//! must succeed, every session must read its own writes, and no row may be lost.

mod common;

use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_clients_insert_and_select_for_ten_seconds() {
    const CLIENTS: i32 = 50;
    let server = common::TestServer::start().await;
    server
        .connect()
        .await
        .batch_execute("CREATE TABLE hits (client INT, n INT, PRIMARY KEY (client, n))")
        .await
        .expect("create");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut tasks = Vec::new();
    for client_id in 0..CLIENTS {
        let client = server.connect().await;
        tasks.push(tokio::spawn(async move {
            let insert = client.prepare("INSERT INTO hits VALUES ($1, $2)").await.expect("prepare insert");
            let count = client.prepare("SELECT count(*) FROM hits WHERE client = $1").await.expect("prepare count");
            let mut inserted = 0i32;
            while Instant::now() < deadline {
                client.execute(&insert, &[&client_id, &inserted]).await.expect("insert succeeds");
                inserted += 1;
                if inserted % 5 == 0 {
                    let seen: i64 = client.query_one(&count, &[&client_id]).await.expect("select succeeds").get(0);
                    assert_eq!(seen, inserted as i64, "client {client_id} reads its own writes");
                }
            }
            inserted as i64
        }));
    }
    let mut total = 0;
    for task in tasks {
        total += task.await.expect("client task finished without error");
    }
    let client = server.connect().await;
    let row = client.query_one("SELECT count(*), count(DISTINCT client) FROM hits", &[]).await.expect("final count");
    assert_eq!(row.get::<_, i64>(0), total, "no acknowledged row is missing and none is extra");
    assert_eq!(row.get::<_, i64>(1), CLIENTS as i64);
    println!("{CLIENTS} clients inserted {total} rows in 10 s");
}
