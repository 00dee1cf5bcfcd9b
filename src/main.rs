//! The `freshet` command: `freshet serve` (also what a bare `freshet` runs).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use freshet::server::{Auth, Config, Security, Server, TlsFiles};
use tracing_subscriber::EnvFilter;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "freshet", version, about = "A SQL streaming database served over the Postgres wire protocol")]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (the default when no command is given).
    Serve(ServeArgs),
}

#[derive(Args, Clone)]
struct ServeArgs {
    /// Directory for the catalog, the write-ahead log and snapshots.
    #[arg(long, env = "FRESHET_DATA_DIR", default_value = "./freshet-data")]
    data_dir: PathBuf,
    /// Keep the durable state in an S3-compatible object store instead of --data-dir, e.g.
    /// `s3://bucket/freshet` (credentials, region and endpoint from the standard AWS_*
    /// environment variables). A new machine pointed at the same URL starts from that state.
    #[arg(long, env = "FRESHET_STORE")]
    store: Option<String>,
    /// Address for Postgres clients (psql -h HOST -p PORT -U freshet -d freshet).
    #[arg(long, env = "FRESHET_PG_LISTEN", default_value = "127.0.0.1:6543")]
    pg_listen: String,
    /// Address for HTTP: /health and /metrics (Prometheus text format).
    #[arg(long, env = "FRESHET_HTTP_LISTEN", default_value = "127.0.0.1:6544")]
    http_listen: String,
    /// SQL file whose statements run at start, before clients are accepted.
    #[arg(long)]
    init: Option<PathBuf>,
    /// How often barriers close an epoch; materialized views show new data once per epoch
    /// (e.g. `1s`, `200ms`).
    #[arg(long, env = "FRESHET_BARRIER_INTERVAL", default_value = "50ms", value_parser = parse_duration)]
    barrier_interval: Duration,
    /// How often materialized views checkpoint their operator states to the store, so a
    /// restart restores them instead of recomputing them from their inputs (e.g. `1s`;
    /// `off` turns checkpoints off).
    #[arg(long, env = "FRESHET_CHECKPOINT_INTERVAL", default_value = "1s", value_parser = parse_checkpoint_interval)]
    checkpoint_interval: CheckpointInterval,
    /// Complete checkpoints kept in the store (older ones are deleted).
    #[arg(long, env = "FRESHET_CHECKPOINTS_KEPT", default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=1000))]
    checkpoints_kept: u16,
    /// Parallel instances of each stateful view operator (GROUP BY, join), fed by a hash
    /// exchange on their keys; also the parallelism of batch queries. Default: the number
    /// of cores.
    #[arg(long, env = "FRESHET_WORKERS", value_parser = clap::value_parser!(u16).range(1..=256))]
    workers: Option<u16>,
    /// Operator state (GROUP BY groups, join keys, top-N partitions) kept in memory before
    /// the least recently used spills to local disk under --data-dir, e.g. `512MB`, `4GB` (units of 1024) or `off`.
    /// Default: half of the machine's memory.
    #[arg(long, env = "FRESHET_MEMORY_LIMIT", default_value = "auto", value_parser = parse_memory_limit)]
    memory_limit: MemoryLimit,
    /// Log segments (one per group commit) written between two snapshots of the state;
    /// fewer replays faster after a restart, more writes less.
    #[arg(long, env = "FRESHET_SNAPSHOT_EVERY", default_value_t = freshet::catalog::SNAPSHOT_EVERY_SEGMENTS, value_parser = clap::value_parser!(u64).range(1..))]
    snapshot_every: u64,
    /// The user name clients log in as.
    #[arg(long, env = "FRESHET_USER", default_value = freshet::server::auth::DEFAULT_USER)]
    user: String,
    /// Require this password (SCRAM-SHA-256). Without one, only loopback clients may connect.
    #[arg(long, env = "FRESHET_PASSWORD", hide_env_values = true)]
    password: Option<String>,
    /// PEM certificate chain for TLS (with --tls-key); clients may then use sslmode=require.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Log filter, e.g. `info` or `freshet=debug`; RUST_LOG wins when set.
    #[arg(long, default_value = "info")]
    log_level: String,
}

fn main() -> anyhow::Result<()> {
    freshet::keep_freed_memory();
    let cli = Cli::parse();
    let args = match cli.command {
        Some(Command::Serve(args)) => args,
        None => cli.serve,
    };
    let filter = EnvFilter::try_from_default_env().or_else(|_| EnvFilter::try_new(&args.log_level))?;
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(serve(args))
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = Config {
        data_dir: args.data_dir,
        store: args.store.filter(|s| !s.is_empty()),
        pg_listen: args.pg_listen,
        http_listen: args.http_listen,
        init: args.init,
        barrier_interval: args.barrier_interval,
        checkpoint_interval: args.checkpoint_interval.0,
        checkpoints_kept: usize::from(args.checkpoints_kept),
        workers: args.workers.map(usize::from).unwrap_or_else(freshet::catalog::default_workers),
        memory_limit: args.memory_limit.0,
        snapshot_every: args.snapshot_every,
    };
    match config.memory_limit {
        Some(bytes) => tracing::info!("operator state beyond {} MiB spills to disk", bytes >> 20),
        None => tracing::info!("no memory limit: operator state stays in memory"),
    }
    let tls = match (args.tls_cert, args.tls_key) {
        (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
        _ => None,
    };
    let password = args.password.filter(|p| !p.is_empty());
    let security = Security { auth: Auth { user: args.user, password }, tls };
    let server = Server::start_secured(config, security).await?;
    println!(
        "freshet ready: postgres on {pg} (psql -h {host} -p {port} -U freshet -d freshet), http on {http}",
        pg = server.pg_addr(),
        host = server.pg_addr().ip(),
        port = server.pg_addr().port(),
        http = server.http_addr(),
    );
    shutdown_signal().await;
    tracing::info!("shutting down");
    server.shutdown().await;
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::warn!("cannot listen for Ctrl-C: {e}");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                tracing::warn!("cannot listen for SIGTERM: {e}");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = terminate => {}
    }
}

/// Parses `250ms`, `2s` or a bare number of milliseconds.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => text.split_at(at),
        None => (text, "ms"),
    };
    let value: u64 = number.parse().map_err(|_| format!("`{text}` is not a duration like 500ms or 2s"))?;
    let duration = match unit {
        "ms" => Duration::from_millis(value),
        "s" => Duration::from_secs(value),
        _ => return Err(format!("`{text}`: use the unit ms or s")),
    };
    if duration.is_zero() {
        return Err("an interval must be positive".into());
    }
    Ok(duration)
}

/// A checkpoint interval; `None` is off.
#[derive(Debug, Clone, Copy)]
struct CheckpointInterval(Option<Duration>);

/// `--memory-limit`: bytes, or `None` for no limit.
#[derive(Clone, Copy, Debug)]
struct MemoryLimit(Option<usize>);

fn parse_memory_limit(text: &str) -> Result<MemoryLimit, String> {
    let text = text.trim();
    match text {
        "off" => return Ok(MemoryLimit(None)),
        "auto" => {
            // Half the machine's memory, from /proc/meminfo; no limit where that is unknown.
            let total = std::fs::read_to_string("/proc/meminfo").ok().and_then(|info| {
                let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
                line.split_whitespace().nth(1)?.parse::<usize>().ok()
            });
            return Ok(MemoryLimit(total.map(|kib| kib * 1024 / 2)));
        }
        _ => {}
    }
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: usize = number.parse().map_err(|_| format!("`{text}` is not a size such as 512MB, 4GB or off"))?;
    let scale: usize = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        "T" | "TB" | "TIB" => 1 << 40,
        other => return Err(format!("unknown unit `{other}` in `{text}` (use B, KB, MB, GB or TB)")),
    };
    let bytes = number.checked_mul(scale).ok_or_else(|| format!("`{text}` is too large"))?;
    if bytes < 1 << 20 {
        return Err(format!("`{text}` is below the smallest memory limit, 1MB"));
    }
    Ok(MemoryLimit(Some(bytes)))
}

fn parse_checkpoint_interval(text: &str) -> Result<CheckpointInterval, String> {
    match text.trim() {
        "off" | "0" => Ok(CheckpointInterval(None)),
        other => parse_duration(other).map(|d| CheckpointInterval(Some(d))),
    }
}
