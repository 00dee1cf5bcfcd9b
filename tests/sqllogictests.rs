//! Runs every `sqllogictest/**/*.slt` file over a real Postgres wire connection, each file
//! against its own freshly started server (its own data directory), so files are isolated.
//!
//! `cargo test --test sqllogictests` runs them all; extra arguments filter by path substring.
//! Failed statements are reported to the .slt file as `SQLSTATE: message`, so a file can
//! assert the code (`statement error 42P01`) as well as the text.

mod common;

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use sqllogictest::{AsyncDB, DBOutput, DefaultColumnType};
use tokio_postgres::SimpleQueryMessage;

struct Freshet {
    client: tokio_postgres::Client,
}

#[derive(Debug)]
struct SqlError(String);

impl std::fmt::Display for SqlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SqlError {}

#[async_trait]
impl AsyncDB for Freshet {
    type Error = SqlError;
    type ColumnType = DefaultColumnType;

    async fn run(&mut self, sql: &str) -> Result<DBOutput<DefaultColumnType>, SqlError> {
        let messages = self.client.simple_query(sql).await.map_err(|e| SqlError(common::db_error(&e)))?;
        let mut rows = Vec::new();
        let mut columns = None;
        let mut affected = 0;
        for message in messages {
            match message {
                SimpleQueryMessage::RowDescription(description) => columns = Some(description.len()),
                SimpleQueryMessage::Row(row) => {
                    columns = Some(row.len());
                    rows.push(
                        (0..row.len())
                            .map(|i| match row.get(i) {
                                None => "NULL".to_string(),
                                Some("") => "(empty)".to_string(),
                                Some(text) => text.to_string(),
                            })
                            .collect(),
                    );
                }
                SimpleQueryMessage::CommandComplete(n) => affected = n,
                _ => {}
            }
        }
        Ok(match columns {
            Some(n) => DBOutput::Rows { types: vec![DefaultColumnType::Any; n], rows },
            None => DBOutput::StatementComplete(affected),
        })
    }

    async fn shutdown(&mut self) {}

    fn engine_name(&self) -> &str {
        "freshet"
    }

    async fn sleep(duration: std::time::Duration) {
        tokio::time::sleep(duration).await;
    }
}

fn slt_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            slt_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "slt") {
            out.push(path);
        }
    }
}

async fn run_file(path: &Path) -> Result<(), String> {
    // Two workers on every machine, so EXPLAIN output does not depend on the core count.
    let server = common::TestServer::start_with(|config| config.workers = 2).await;
    let connection_string = server.connection_string();
    let mut runner = sqllogictest::Runner::new(move || {
        let connection_string = connection_string.clone();
        async move { Ok::<_, SqlError>(Freshet { client: common::connect(&connection_string).await }) }
    });
    let result = runner.run_file_async(path).await.map_err(|e| e.display(true).to_string());
    server.server.shutdown().await;
    result
}

#[tokio::main]
async fn main() {
    let filters: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("sqllogictest");
    let mut files = Vec::new();
    slt_files(&root, &mut files);
    files.sort();
    files.retain(|f| filters.is_empty() || filters.iter().any(|p| f.to_string_lossy().contains(p.as_str())));
    assert!(!files.is_empty() || !filters.is_empty(), "no .slt files under {}", root.display());
    let (mut passed, mut failed) = (0, 0);
    for file in &files {
        let name = file.strip_prefix(&root).unwrap_or(file).display().to_string();
        match run_file(file).await {
            Ok(()) => {
                passed += 1;
                println!("test {name} ... ok");
            }
            Err(e) => {
                failed += 1;
                println!("test {name} ... FAILED\n{e}");
            }
        }
    }
    println!("\nsqllogictest: {passed} passed, {failed} failed");
    if failed > 0 {
        std::process::exit(1);
    }
}
