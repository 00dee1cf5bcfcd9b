//! MQTT sources against a real broker (Mosquitto on loopback), with Mosquitto's own
//! `mosquitto_pub` as the device publishing readings.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{count, wait_for};
use tokio_postgres::Client;

/// Mosquitto on a free loopback port; killed when dropped.
struct Mosquitto {
    child: std::process::Child,
    port: u16,
}

impl Mosquitto {
    async fn start() -> Mosquitto {
        let port = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port").local_addr().expect("addr").port();
        Mosquitto::start_on(port).await
    }

    async fn start_on(port: u16) -> Mosquitto {
        // Debian installs the broker in /usr/sbin, which is not on every PATH.
        let program =
            if std::path::Path::new("/usr/sbin/mosquitto").exists() { "/usr/sbin/mosquitto" } else { "mosquitto" };
        let child = Command::new(program)
            .args(["-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto runs (scripts/test installs it)");
        let broker = Mosquitto { child, port };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            assert!(tokio::time::Instant::now() < deadline, "mosquitto did not listen on {port}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        broker
    }

    /// Publishes each line of `messages` to `topic` with QoS 1, as a device would.
    async fn publish(&self, topic: &str, messages: &[String]) {
        let mut command = Command::new("mosquitto_pub");
        command.args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-t", topic, "-q", "1", "-l"]);
        let body = messages.join("\n") + "\n";
        let output = tokio::task::spawn_blocking(move || {
            use std::io::Write;
            let mut child = command
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("mosquitto_pub runs (scripts/test installs mosquitto-clients)");
            child.stdin.take().expect("stdin").write_all(body.as_bytes()).expect("written");
            child.wait_with_output().expect("mosquitto_pub finished")
        })
        .await
        .expect("published");
        common::stdout_of(&output, "mosquitto_pub");
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn wait_subscribed(client: &Client, source: &str) {
    let sql = format!(
        "SELECT count(*) FROM freshet_catalog.source_progress WHERE source = '{source}' AND status = 'running'"
    );
    wait_for(client, &sql, 1).await;
}

fn readings(device: &str, seqs: std::ops::Range<i64>) -> Vec<String> {
    seqs.map(|seq| format!(r#"{{"device": "{device}", "seq": {seq}, "temperature": {}}}"#, 20 + seq % 7)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mqtt_source_reads_a_topic_filter_and_keeps_what_arrives_while_it_is_down() {
    let broker = Mosquitto::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let start = || freshet::server::Server::start(common::config(dir.path()));
    let server = start().await.expect("starts");
    let url = |server: &freshet::server::Server| {
        let addr = server.pg_addr();
        format!("host={} port={} user=freshet dbname=freshet", addr.ip(), addr.port())
    };
    let client = common::connect(&url(&server)).await;
    client
        .batch_execute(&format!(
            "CREATE SOURCE plant (device TEXT NOT NULL, seq BIGINT NOT NULL, temperature DOUBLE PRECISION)
                 WITH (connector = 'mqtt', url = 'mqtt://127.0.0.1:{}', topic = 'plant/+/telemetry') FORMAT JSON;
             CREATE MATERIALIZED VIEW per_device AS SELECT device, count(DISTINCT seq) AS readings FROM plant GROUP BY device",
            broker.port
        ))
        .await
        .expect("source and view");
    wait_subscribed(&client, "plant").await;
    broker.publish("plant/a/telemetry", &readings("a", 0..100)).await;
    let mut b = readings("b", 0..50);
    b.push("{not json".into());
    broker.publish("plant/b/telemetry", &b).await;
    broker.publish("elsewhere/c/telemetry", &readings("c", 0..10)).await;
    wait_for(&client, "SELECT count(DISTINCT device || seq) FROM plant", 150).await;
    assert_eq!(count(&client, "SELECT count(*) FROM plant WHERE device = 'c'").await, 0, "the filter holds");
    wait_for(&client, "SELECT count(*) FROM freshet_catalog.dead_letters WHERE source = 'plant'", 1).await;
    let error: String = client
        .query_one("SELECT error FROM freshet_catalog.dead_letters WHERE source = 'plant'", &[])
        .await
        .expect("dead letter")
        .get(0);
    assert!(error.contains("plant/b/telemetry"), "the dead letter names its topic: {error}");

    // The persistent session keeps what devices publish while freshet is down.
    drop(client);
    server.shutdown().await;
    broker.publish("plant/a/telemetry", &readings("a", 100..160)).await;
    let server = start().await.expect("restarts");
    let client = common::connect(&url(&server)).await;
    wait_for(&client, "SELECT count(DISTINCT device || seq) FROM plant", 210).await;
    client.batch_execute("FLUSH").await.expect("flush");
    let per_device: Vec<(String, i64)> = client
        .query("SELECT device, readings FROM per_device ORDER BY device", &[])
        .await
        .expect("view")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(per_device, [("a".to_string(), 160), ("b".to_string(), 50)]);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_mqtt_broker_is_retried_and_reported() {
    let server = common::TestServer::start().await;
    let client = server.connect().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("port").local_addr().expect("addr").port();
    client
        .batch_execute(&format!(
            "CREATE SOURCE lonely (v TEXT) WITH (connector = 'mqtt', url = 'mqtt://127.0.0.1:{port}', topic = 't') FORMAT TEXT"
        ))
        .await
        .expect("created; the broker may come later");
    let sql = "SELECT count(*) FROM freshet_catalog.source_progress WHERE source = 'lonely' AND status = 'retrying' AND last_error IS NOT NULL";
    wait_for(&client, sql, 1).await;
    // When the broker appears, the source connects and reads.
    let broker = Mosquitto::start_on(port).await;
    wait_subscribed(&client, "lonely").await;
    broker.publish("t", &["hello".to_string(), "world".to_string()]).await;
    wait_for(&client, "SELECT count(*) FROM lonely", 2).await;
    let e = client
        .batch_execute(
            "CREATE SOURCE bad (v TEXT) WITH (connector = 'mqtt', url = 'mqtt://x', topic = 'a/#/b') FORMAT TEXT",
        )
        .await
        .expect_err("bad filter");
    assert!(common::db_error(&e).starts_with("22023"), "{}", common::db_error(&e));
}
