//! Crash recovery of the real binary: a Kafka source (tansu on loopback) feeds a GROUP BY
//! view and a join view while `kill -9` lands at random moments (mid-ingest, mid-commit,
//! mid-snapshot). After the last restart, with all input consumed, the source holds every
//! produced record exactly once and both views equal what the produced records say. About
//! half the restarts find a checkpoint taken since the one before and restore the views
//! from it; the rest recompute them: both must give the same answer.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::kafka::Broker;
use common::process::Process;
use common::s3::S3;
use common::{count, wait_for};

const KILLS: usize = 20;
const PER_ROUND: usize = 250;
const DEVICES: usize = 13;

/// A small deterministic generator for the kill moments (the seed is printed).
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

fn record(seq: usize) -> (Option<i32>, Option<String>, Option<String>) {
    let value = serde_json::json!({ "device": format!("d{}", seq % DEVICES), "seq": seq, "reading": (seq * 7) % 100 });
    (None, Some(format!("d{}", seq % DEVICES)), Some(value.to_string()))
}

async fn crash_and_recover(broker: &Broker, topic: &str, env: &[(String, String)], store: &[&str]) {
    broker.create_topic(topic, 3).await;
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("time").as_nanos() as u64;
    println!("kill moments from seed {seed}");
    let mut random = Lcg(seed);
    let mut disk = tempfile::tempdir().expect("temp dir");
    let mut produced = 0;
    // Views restored from a checkpoint rather than recomputed, over all restarts.
    let mut restored_views = 0;
    for round in 0..KILLS {
        if !store.is_empty() && round == KILLS / 2 {
            // Half way, the machine is replaced: only the object store survives.
            disk = tempfile::tempdir().expect("temp dir");
        }
        let server = Process::start_with_env(disk.path(), store, env);
        if round > 0 {
            let client = common::connect(&server.connection_string).await;
            let sql = "SELECT count(*) FROM freshet_catalog.views WHERE restored_from_epoch IS NOT NULL";
            restored_views += count(&client, sql).await;
        }
        if round == 0 {
            let client = common::connect(&server.connection_string).await;
            let sites: Vec<String> = (0..DEVICES).map(|d| format!("('d{d}', 's{}')", d % 3)).collect();
            client
                .batch_execute(&format!(
                    "CREATE SOURCE events (device TEXT NOT NULL, seq BIGINT NOT NULL, reading BIGINT NOT NULL)
                         WITH (connector = 'kafka', brokers = '{}', topic = '{topic}') FORMAT JSON;
                     CREATE TABLE devices (device TEXT PRIMARY KEY, site TEXT NOT NULL);
                     INSERT INTO devices VALUES {};
                     CREATE MATERIALIZED VIEW per_device AS
                         SELECT device, count(*) AS n, sum(reading) AS total FROM events GROUP BY device;
                     CREATE MATERIALIZED VIEW per_site AS
                         SELECT d.site, count(*) AS n, sum(e.seq) AS seqs
                         FROM events e JOIN devices d ON e.device = d.device GROUP BY d.site",
                    broker.address,
                    sites.join(", ")
                ))
                .await
                .expect("source, table and views");
        }
        // The kill lands while records are arriving and being appended.
        let records: Vec<_> = (produced..produced + PER_ROUND).map(record).collect();
        let pause = Duration::from_millis(200 + random.below(1500));
        tokio::join!(broker.produce(topic, &records), async move {
            tokio::time::sleep(pause).await;
            server.kill_9();
        });
        produced += PER_ROUND;
    }

    let server = Process::start_with_env(disk.path(), store, env);
    let client = common::connect(&server.connection_string).await;
    wait_for(&client, "SELECT count(*) FROM events", produced as i64).await;
    assert_eq!(count(&client, "SELECT count(DISTINCT seq) FROM events").await, produced as i64, "no record twice");
    client.batch_execute("FLUSH").await.expect("flush");

    let mut per_device: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    let mut per_site: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    for seq in 0..produced {
        let device = seq % DEVICES;
        let d = per_device.entry(format!("d{device}")).or_default();
        d.0 += 1;
        d.1 += ((seq * 7) % 100) as i64;
        let s = per_site.entry(format!("s{}", device % 3)).or_default();
        s.0 += 1;
        s.1 += seq as i64;
    }
    let view = |rows: Vec<tokio_postgres::Row>| -> BTreeMap<String, (i64, i64)> {
        rows.iter().map(|r| (r.get(0), (r.get(1), r.get(2)))).collect()
    };
    let got = view(client.query("SELECT device, n, total FROM per_device", &[]).await.expect("per_device"));
    assert_eq!(got, per_device, "the GROUP BY view counts every record once");
    let got = view(client.query("SELECT site, n, seqs FROM per_site", &[]).await.expect("per_site"));
    assert_eq!(got, per_site, "the join view counts every record once");
    println!("{restored_views} views were restored from checkpoints over {KILLS} restarts");
    assert!(restored_views > 0, "some restarts restore views from their checkpoints");
    server.kill_9();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_moments_loses_and_duplicates_nothing() {
    let broker = Broker::start().await;
    crash_and_recover(&broker, "events_local", &[], &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_with_the_state_in_s3_and_a_replaced_machine_loses_nothing() {
    let broker = Broker::start().await;
    let s3 = S3::start().await;
    s3.create_bucket("freshet").await;
    crash_and_recover(&broker, "events_s3", &s3.env(), &["--store", "s3://freshet/crash"]).await;
}
