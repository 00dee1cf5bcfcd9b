//! Startup and shutdown of a freshet server: opens the database, runs the `--init` file,
//! binds the Postgres and HTTP listeners, and drains running statements on shutdown.
//!
//! [`Server::start`] is what `freshet serve` and the integration tests call; tests bind
//! `127.0.0.1:0` and read the chosen ports back from [`Server::pg_addr`].

pub mod auth;
pub mod cursor;
mod deferred;
pub mod http;
pub mod metrics;
pub mod pg;
pub mod session;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::catalog::Database;
use crate::error::{Error, Result};
pub use auth::{Auth, Security, TlsFiles};
use metrics::Metrics;
use pg::PgHandlers;

/// How long shutdown waits for running statements before it stops anyway.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a server keeps its data and where it listens.
#[derive(Debug, Clone)]
pub struct Config {
    /// Root of the durable state (catalog, log, snapshots) unless `store` is given.
    pub data_dir: PathBuf,
    /// An object-store URL (`s3://bucket/prefix`) that holds the durable state instead of
    /// `data_dir`, so a machine with an empty disk starts from it.
    pub store: Option<String>,
    /// Address of the Postgres wire protocol listener.
    pub pg_listen: String,
    /// Address of the HTTP listener (`/health`, `/metrics`).
    pub http_listen: String,
    /// SQL statements run once at start, before clients are accepted.
    pub init: Option<PathBuf>,
    /// How often barriers close an epoch (materialized views publish once per epoch).
    pub barrier_interval: Duration,
    /// How often views checkpoint their operator states; `None` is off.
    pub checkpoint_interval: Option<Duration>,
    /// Complete checkpoints kept in the store.
    pub checkpoints_kept: usize,
    /// Parallel instances of each stateful view operator (and batch query parallelism).
    pub workers: usize,
    /// Bytes of operator state kept in memory before it spills to `data_dir/spill`
    /// (`None`: no limit).
    pub memory_limit: Option<usize>,
    /// Log segments written between two state snapshots.
    pub snapshot_every: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("./freshet-data"),
            store: None,
            pg_listen: "127.0.0.1:6543".into(),
            http_listen: "127.0.0.1:6544".into(),
            init: None,
            barrier_interval: crate::catalog::DEFAULT_BARRIER_INTERVAL,
            checkpoint_interval: Some(crate::catalog::checkpoint::DEFAULT_CHECKPOINT_INTERVAL),
            checkpoints_kept: crate::catalog::checkpoint::DEFAULT_CHECKPOINTS_KEPT,
            workers: crate::catalog::default_workers(),
            memory_limit: None,
            snapshot_every: crate::catalog::SNAPSHOT_EVERY_SEGMENTS,
        }
    }
}

/// A running server. Dropping it without [`Server::shutdown`] leaves its tasks running
/// until the runtime ends.
pub struct Server {
    db: Database,
    metrics: Arc<Metrics>,
    pg_addr: SocketAddr,
    http_addr: SocketAddr,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Server {
    /// Opens the database, runs the init file, and starts accepting loopback clients
    /// without a password and without TLS.
    pub async fn start(config: Config) -> Result<Server> {
        Server::start_secured(config, Security::default()).await
    }

    /// Like [`Server::start`], with authentication and TLS as `security` says.
    pub async fn start_secured(config: Config, security: Security) -> Result<Server> {
        let tls = security.tls.as_ref().map(auth::tls_acceptor).transpose()?;
        let store = match &config.store {
            Some(url) => crate::state::open_prefix(url)?,
            None => crate::state::open_local_store(&config.data_dir)?,
        };
        let options = crate::catalog::Options {
            barrier_interval: config.barrier_interval,
            checkpoint_interval: config.checkpoint_interval,
            checkpoints_kept: config.checkpoints_kept,
            workers: config.workers,
            memory_limit: config.memory_limit,
            spill_dir: Some(config.data_dir.join("spill")),
            snapshot_every: config.snapshot_every,
            local_store_dir: config.store.is_none().then(|| config.data_dir.clone()),
        };
        let db = Database::open_with(store, options).await?;
        if let Some(path) = &config.init {
            let sql = std::fs::read_to_string(path)
                .map_err(|e| Error::Config(format!("cannot read --init file {}: {e}", path.display())))?;
            db.run(&sql).await.map_err(|e| {
                let at = e.position().map(|p| format!(" at character {p}")).unwrap_or_default();
                Error::Config(format!("--init file {} failed{at}: {e} (SQLSTATE {})", path.display(), e.sqlstate()))
            })?;
            tracing::info!(file = %path.display(), "init statements ran");
        }
        let pg_listener = bind(&config.pg_listen, "--pg-listen").await?;
        let http_listener = bind(&config.http_listen, "--http-listen").await?;
        let pg_addr = local_addr(&pg_listener)?;
        let http_addr = local_addr(&http_listener)?;
        let metrics = Arc::new(Metrics::default());
        let (stop, stopped) = watch::channel(false);
        db.set_login_user(&security.auth.user)?;
        let handlers = Arc::new(PgHandlers::new(db.clone(), metrics.clone(), security.auth));
        let pg_task = tokio::spawn(accept_loop(pg_listener, handlers, tls, metrics.clone(), stopped.clone()));
        let router = http::router(db.clone(), metrics.clone());
        let mut http_stopped = stopped;
        let http_task = tokio::spawn(async move {
            let serve = axum::serve(http_listener, router).with_graceful_shutdown(async move {
                let _ = http_stopped.wait_for(|s| *s).await;
            });
            if let Err(e) = serve.await {
                tracing::error!("http listener failed: {e}");
            }
        });
        let storage = config.store.clone().unwrap_or_else(|| config.data_dir.display().to_string());
        tracing::info!(%pg_addr, %http_addr, %storage, "freshet is ready");
        Ok(Server { db, metrics, pg_addr, http_addr, stop, tasks: vec![pg_task, http_task] })
    }

    /// The bound Postgres address (useful when listening on port 0).
    pub fn pg_addr(&self) -> SocketAddr {
        self.pg_addr
    }

    /// The bound HTTP address.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The database this server serves.
    pub fn database(&self) -> &Database {
        &self.db
    }

    /// Stops accepting clients, waits (bounded) for running statements, then returns.
    /// Acknowledged writes are already durable, so nothing is lost if the wait times out.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        self.db.stop_sources();
        let deadline = tokio::time::Instant::now() + DRAIN_TIMEOUT;
        while self.metrics.statements_running.load(Ordering::Acquire) > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for task in self.tasks {
            let _ = task.await;
        }
        // A last checkpoint, so the next start restores every view without replaying
        // anything into it.
        if let Err(e) = self.db.final_checkpoint().await {
            tracing::warn!("the checkpoint at shutdown failed; the next start recomputes more: {e}");
        }
        tracing::info!("freshet stopped");
    }
}

async fn bind(addr: &str, flag: &str) -> Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| Error::Config(format!("cannot listen on {addr} ({flag}): {e}")))
}

fn local_addr(listener: &TcpListener) -> Result<SocketAddr> {
    listener.local_addr().map_err(|e| Error::Config(format!("listener has no address: {e}")))
}

async fn accept_loop(
    listener: TcpListener,
    handlers: Arc<PgHandlers>,
    tls: Option<pgwire::tokio::TlsAcceptor>,
    metrics: Arc<Metrics>,
    mut stopped: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            _ = stopped.wait_for(|s| *s) => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((socket, peer)) => {
                let _ = socket.set_nodelay(true);
                metrics.connections_accepted.fetch_add(1, Ordering::Relaxed);
                metrics.connections_open.fetch_add(1, Ordering::Relaxed);
                let handlers = handlers.clone();
                let metrics = metrics.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    serve_connection(socket, peer, handlers, tls, &metrics).await;
                    metrics.connections_open.fetch_sub(1, Ordering::Relaxed);
                });
            }
            Err(e) => {
                // Usually out of file descriptors: back off instead of spinning.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Runs one connection: rejects a first packet that cannot be a Postgres startup packet,
/// and closes connections that do not finish startup within [`STARTUP_TIMEOUT`].
async fn serve_connection(
    socket: tokio::net::TcpStream,
    peer: SocketAddr,
    handlers: Arc<PgHandlers>,
    tls: Option<pgwire::tokio::TlsAcceptor>,
    metrics: &Metrics,
) {
    if let Err(reason) = check_startup_packet(&socket).await {
        metrics.connection_errors.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(%peer, "closing connection: {reason}");
        return;
    }
    let started = handlers.startup_watch.expect(peer);
    let watch = handlers.startup_watch.clone();
    let session = pgwire::tokio::process_socket(socket, tls, handlers.connection());
    tokio::pin!(session);
    let result = tokio::select! {
        result = &mut session => Some(result),
        finished = tokio::time::timeout(STARTUP_TIMEOUT, started) => match finished {
            Ok(Ok(())) => Some(session.await),
            _ => None,
        },
    };
    watch.forget(peer);
    match result {
        Some(Ok(())) => {}
        Some(Err(e)) => {
            metrics.connection_errors.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%peer, "connection closed with error: {e}");
        }
        None => {
            metrics.connection_errors.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%peer, "closing connection: startup not finished within {STARTUP_TIMEOUT:?}");
        }
    }
}

/// Postgres' own limit on the length of a startup packet.
const MAX_STARTUP_PACKET: i32 = 10_000;
/// How long a client may take to send its startup packet and finish startup.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);

/// Peeks at the first 8 bytes: a length Postgres would accept and a known request code
/// (protocol 3.x, SSL, GSSAPI encryption, or cancel).
async fn check_startup_packet(socket: &tokio::net::TcpStream) -> std::result::Result<(), String> {
    let mut head = [0u8; 8];
    let peeked = tokio::time::timeout(STARTUP_TIMEOUT, async {
        loop {
            match socket.peek(&mut head).await {
                Ok(0) => return Err("closed before the startup packet".to_string()),
                Ok(n) if n >= head.len() => return Ok(()),
                Ok(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                Err(e) => return Err(e.to_string()),
            }
        }
    })
    .await
    .map_err(|_| "no startup packet".to_string())?;
    peeked?;
    let length = i32::from_be_bytes([head[0], head[1], head[2], head[3]]);
    let code = i32::from_be_bytes([head[4], head[5], head[6], head[7]]);
    if !(8..=MAX_STARTUP_PACKET).contains(&length) {
        return Err(format!("invalid length of startup packet ({length})"));
    }
    let major = code >> 16;
    let known = major == 3 || matches!(code, 80877102..=80877104);
    if !known {
        return Err(format!("unsupported frontend protocol or request code {code}"));
    }
    Ok(())
}
