//! The real `freshet` binary as a child process, for tests that kill it or give it an
//! environment of its own (AWS settings for an S3-compatible store).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// `freshet serve` on free loopback ports.
pub struct Process {
    pub child: Child,
    pub connection_string: String,
}

impl Process {
    pub fn start(data_dir: &Path, extra: &[&str]) -> Process {
        Process::start_with_env(data_dir, extra, &[])
    }

    /// Starts it with `env` added to its environment; returns once it accepts clients.
    pub fn start_with_env(data_dir: &Path, extra: &[&str], env: &[(String, String)]) -> Process {
        let mut child = Command::new(env!("CARGO_BIN_EXE_freshet"))
            .args(["serve", "--pg-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .args(extra)
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("freshet starts");
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut lines = BufReader::new(stdout).lines();
        let ready = lines.next().expect("freshet prints a ready line").expect("stdout is readable");
        // "freshet ready: postgres on 127.0.0.1:PORT (psql …), http on …"
        let addr = ready
            .strip_prefix("freshet ready: postgres on ")
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("unexpected ready line: {ready}"));
        let (host, port) = addr.rsplit_once(':').expect("host:port");
        Process { child, connection_string: format!("host={host} port={port} user=freshet dbname=freshet") }
    }

    pub fn kill_9(mut self) {
        self.child.kill().expect("SIGKILL sent");
        self.child.wait().expect("reaped");
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
