//! A Kafka-protocol broker (tansu) on loopback for tests, with an independent client
//! (kafka-python) to produce and consume.

use std::process::{Command, Stdio};
use std::time::Duration;

/// A tansu broker on a free loopback port, with in-memory storage; killed when dropped.
pub struct Broker {
    child: std::process::Child,
    pub url: String,
    /// `host:port`, as freshet's `brokers` option wants it.
    pub address: String,
}

impl Broker {
    pub async fn start() -> Broker {
        let port = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port").local_addr().expect("addr").port();
        Broker::start_on(port).await
    }

    pub async fn start_on(port: u16) -> Broker {
        let address = format!("127.0.0.1:{port}");
        let url = format!("tcp://{address}");
        let child = Command::new("tansu")
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tansu runs (scripts/test installs it with cargo install tansu)");
        let broker = Broker { child, url, address };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(&broker.address).await.is_err() {
            assert!(tokio::time::Instant::now() < deadline, "tansu did not listen on {}", broker.address);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        broker
    }

    pub async fn create_topic(&self, name: &str, partitions: u32) {
        let mut command = Command::new("tansu");
        command.args(["topic", "create", name, "--broker", &self.url, "--partitions", &partitions.to_string()]);
        super::stdout_of(&super::run_program(command, "tansu topic create").await, "tansu topic create");
    }

    /// Produces `records` with the independent client; each is `(partition, key, value)`.
    pub async fn produce(&self, topic: &str, records: &[(Option<i32>, Option<String>, Option<String>)]) {
        let records: Vec<serde_json::Value> = records
            .iter()
            .map(|(partition, key, value)| serde_json::json!({ "partition": partition, "key": key, "value": value }))
            .collect();
        self.run_producer(&["produce", &self.address, topic], &records).await;
    }

    /// Produces each of `values` (a JSON object) as one Avro datum of `schema`, written by
    /// fastavro; `{"raw_hex": "…"}` produces those bytes instead.
    pub async fn produce_avro(&self, topic: &str, schema: &str, values: &[serde_json::Value]) {
        let records: Vec<serde_json::Value> = values.iter().map(|v| serde_json::json!({ "value": v })).collect();
        self.run_producer(&["produce-avro", &self.address, topic, schema], &records).await;
    }

    /// Every committed record of `topic` (read with isolation level read_committed), once
    /// none has arrived for 3 seconds.
    pub async fn consume_committed(&self, topic: &str) -> Vec<serde_json::Value> {
        let mut command = Command::new("python3");
        command.arg(client_script()).args(["consume-committed", &self.address, topic]);
        let output = super::run_program(command, "python3").await;
        super::stdout_of(&output, "kafka-python consumer")
            .lines()
            .map(|line| serde_json::from_str(line).expect("a JSON record"))
            .collect()
    }

    async fn run_producer(&self, args: &[&str], records: &[serde_json::Value]) {
        let lines: String = records.iter().map(|r| r.to_string() + "\n").collect();
        let mut command = Command::new("python3");
        command.arg(client_script()).args(args);
        let output = tokio::task::spawn_blocking(move || {
            use std::io::Write;
            let mut child = command
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("python3 runs (scripts/test installs kafka-python)");
            child.stdin.take().expect("stdin").write_all(lines.as_bytes()).expect("records written");
            child.wait_with_output().expect("producer finished")
        })
        .await
        .expect("producer ran");
        let sent = super::stdout_of(&output, "kafka-python producer");
        assert_eq!(sent.trim(), records.len().to_string(), "every record was produced");
    }

    /// The first `n` records of `topic`, read back by the independent client.
    pub async fn consume(&self, topic: &str, n: usize) -> Vec<serde_json::Value> {
        let mut command = Command::new("python3");
        command.arg(client_script()).args(["consume", &self.address, topic, &n.to_string()]);
        let output = super::run_program(command, "python3").await;
        super::stdout_of(&output, "kafka-python consumer")
            .lines()
            .map(|line| serde_json::from_str(line).expect("a JSON record"))
            .collect()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn client_script() -> String {
    format!("{}/tests/kafka/client.py", env!("CARGO_MANIFEST_DIR"))
}
