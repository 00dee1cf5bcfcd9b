//! An S3-compatible server (moto's server mode) on loopback for tests, with an independent
//! client (boto3, which moto brings) to create buckets and put, list and fetch objects.

use std::process::{Command, Stdio};
use std::time::Duration;

/// moto on a free loopback port, storing in memory; killed when dropped.
pub struct S3 {
    child: std::process::Child,
    pub endpoint: String,
}

impl S3 {
    pub async fn start() -> S3 {
        let port = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port").local_addr().expect("addr").port();
        let child = Command::new("python3")
            .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 runs moto (scripts/test installs moto[server])");
        let s3 = S3 { child, endpoint: format!("http://127.0.0.1:{port}") };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            assert!(tokio::time::Instant::now() < deadline, "moto did not listen on port {port}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        s3
    }

    /// The standard AWS variables that point a client (freshet, boto3) at this server.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ACCESS_KEY_ID", "testing"),
            ("AWS_SECRET_ACCESS_KEY", "testing"),
            ("AWS_REGION", "us-east-1"),
            ("AWS_ENDPOINT_URL", &self.endpoint),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    /// Runs a boto3 script with `s3` bound to a client of this server and `args` as
    /// `sys.argv[1:]`; returns what it printed.
    async fn boto3(&self, script: &str, args: &[&str]) -> String {
        let program = format!("import sys, boto3\ns3 = boto3.client('s3')\n{script}");
        let mut command = Command::new("python3");
        command.arg("-c").arg(program).args(args).envs(self.env());
        super::stdout_of(&super::run_program(command, "python3 (boto3)").await, "boto3")
    }

    pub async fn create_bucket(&self, bucket: &str) {
        self.boto3("s3.create_bucket(Bucket=sys.argv[1])", &[bucket]).await;
    }

    pub async fn put(&self, bucket: &str, key: &str, body: &str) {
        self.boto3(
            "s3.put_object(Bucket=sys.argv[1], Key=sys.argv[2], Body=sys.argv[3].encode())",
            &[bucket, key, body],
        )
        .await;
    }

    /// The keys under `prefix`, sorted.
    pub async fn list(&self, bucket: &str, prefix: &str) -> Vec<String> {
        let script = "r = s3.list_objects_v2(Bucket=sys.argv[1], Prefix=sys.argv[2])\nfor o in r.get('Contents', []): print(o['Key'])";
        let mut keys: Vec<String> = self.boto3(script, &[bucket, prefix]).await.lines().map(str::to_string).collect();
        keys.sort();
        keys
    }

    /// Fetches every object under `prefix` into `dir`, each named by its key's last part.
    pub async fn download(&self, bucket: &str, prefix: &str, dir: &std::path::Path) {
        let script = "import os\nr = s3.list_objects_v2(Bucket=sys.argv[1], Prefix=sys.argv[2])\nfor o in r.get('Contents', []): s3.download_file(sys.argv[1], o['Key'], os.path.join(sys.argv[3], o['Key'].split('/')[-1]))";
        self.boto3(script, &[bucket, prefix, &dir.display().to_string()]).await;
    }

    /// The first bytes of an object, as hex.
    pub async fn head_bytes(&self, bucket: &str, key: &str, n: usize) -> String {
        let script =
            "b = s3.get_object(Bucket=sys.argv[1], Key=sys.argv[2])['Body'].read()\nprint(b[:int(sys.argv[3])].hex())";
        self.boto3(script, &[bucket, key, &n.to_string()]).await.trim().to_string()
    }
}

impl Drop for S3 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
