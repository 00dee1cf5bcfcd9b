//! The Postgres wire protocol, on the pgwire crate: startup, simple and extended query,
//! cancel requests. Each connection runs on its own task (spawned by [`super::Server`]);
//! a failing statement answers with an `ErrorResponse` and the session goes on, a broken
//! connection ends only itself.
//!
//! Rows are encoded from Arrow by the `arrow-pg` crate (text and binary formats, Postgres
//! type OIDs); statements are planned and run by the [`Database`]. Session statements
//! (SET, SHOW, BEGIN, …) are answered here from the connection's [`Session`], kept in
//! pgwire's per-connection extensions; startup (authentication) is [`super::auth`]'s.

use std::fmt::Debug;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use async_trait::async_trait;
use datafusion::arrow::datatypes::{DataType, Schema, SchemaRef};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::execution::SendableRecordBatchStream;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion_postgres::arrow_pg::datatypes::df::deserialize_parameters;
use datafusion_postgres::arrow_pg::datatypes::{arrow_schema_to_pg_fields, encode_recordbatch, into_pg_type};
use futures::{Sink, SinkExt, StreamExt, stream};
use pgwire::api::DEFAULT_NAME;
use pgwire::api::auth::StartupHandler;
use pgwire::api::cancel::{CancelHandler, DefaultCancelHandler};
use pgwire::api::portal::{Format, Portal};
use pgwire::api::query::{ExtendedQueryHandler, SimpleQueryHandler};
use pgwire::api::results::{FieldInfo, QueryResponse, Response, Tag};
use pgwire::api::stmt::QueryParser;
use pgwire::api::store::{Entry, PortalStore};
use pgwire::api::{ClientInfo, ClientPortalStore, ConnectionManager, ErrorHandler, PgWireServerHandlers, Type};
use pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use pgwire::messages::PgWireBackendMessage;
use pgwire::messages::data::DataRow;
use pgwire::messages::extendedquery::{Bind, BindComplete, Execute};
use pgwire::types::format::FormatOptions;

use super::auth::{Auth, Authenticator, ConnectionStartup};
use super::cursor::Cursors;
use super::deferred::Deferred;
use super::metrics::Metrics;
use super::session::{Command, Reply, Session};
use crate::catalog::{Database, Outcome};
use crate::error::Error;
use crate::sql::{self, Planned};

/// Everything connections share; [`PgHandlers::connection`] adds what each one owns.
pub struct PgHandlers {
    /// Startup completions, for the accept loop's startup deadline.
    pub startup_watch: Arc<StartupWatch>,
    queries: Arc<QueryHandler>,
    authenticator: Arc<Authenticator>,
    cancel: Arc<DefaultCancelHandler>,
    errors: Arc<ErrorCounter>,
}

impl PgHandlers {
    pub fn new(db: Database, metrics: Arc<Metrics>, auth: Auth) -> Self {
        let connections = Arc::new(ConnectionManager::new());
        let startup_watch = Arc::new(StartupWatch::default());
        PgHandlers {
            startup_watch: startup_watch.clone(),
            queries: Arc::new(QueryHandler {
                db: db.clone(),
                parser: Arc::new(Parser { db }),
                metrics: metrics.clone(),
            }),
            authenticator: Arc::new(Authenticator::new(auth, connections.clone(), startup_watch)),
            cancel: Arc::new(DefaultCancelHandler::new(connections)),
            errors: Arc::new(ErrorCounter { metrics }),
        }
    }

    /// The handlers for one new connection (its startup keeps per-connection state).
    pub fn connection(self: &Arc<Self>) -> ConnectionHandlers {
        ConnectionHandlers { shared: self.clone(), startup: Arc::new(self.authenticator.connection()) }
    }
}

/// One connection's handlers: the shared ones plus its own startup.
pub struct ConnectionHandlers {
    shared: Arc<PgHandlers>,
    startup: Arc<ConnectionStartup>,
}

impl PgWireServerHandlers for ConnectionHandlers {
    fn simple_query_handler(&self) -> Arc<impl SimpleQueryHandler> {
        self.shared.queries.clone()
    }

    fn extended_query_handler(&self) -> Arc<impl ExtendedQueryHandler> {
        self.shared.queries.clone()
    }

    fn startup_handler(&self) -> Arc<impl StartupHandler> {
        self.startup.clone()
    }

    fn error_handler(&self) -> Arc<impl ErrorHandler> {
        self.shared.errors.clone()
    }

    fn cancel_handler(&self) -> Arc<impl CancelHandler> {
        self.shared.cancel.clone()
    }
}

/// Lets the accept loop give up on connections that never finish startup: pgwire waits a
/// minute, far too long for a peer that sent garbage.
#[derive(Default)]
pub struct StartupWatch {
    pending: std::sync::Mutex<std::collections::HashMap<std::net::SocketAddr, tokio::sync::oneshot::Sender<()>>>,
}

impl StartupWatch {
    /// Resolves when the connection from `peer` completes startup.
    pub fn expect(&self, peer: std::net::SocketAddr) -> tokio::sync::oneshot::Receiver<()> {
        let (done, finished) = tokio::sync::oneshot::channel();
        if let Ok(mut pending) = self.pending.lock() {
            pending.insert(peer, done);
        }
        finished
    }

    /// Forgets `peer` (its connection ended or timed out).
    pub fn forget(&self, peer: std::net::SocketAddr) {
        if let Ok(mut pending) = self.pending.lock() {
            pending.remove(&peer);
        }
    }

    /// Marks the connection from `peer` as started.
    pub fn finished(&self, peer: std::net::SocketAddr) {
        let done = self.pending.lock().ok().and_then(|mut pending| pending.remove(&peer));
        if let Some(done) = done {
            let _ = done.send(());
        }
    }
}

struct ErrorCounter {
    metrics: Arc<Metrics>,
}

impl ErrorHandler for ErrorCounter {
    fn on_error<C: ClientInfo>(&self, client: &C, error: &mut PgWireError) {
        self.metrics.statement_errors.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(peer = %client.socket_addr(), "statement failed: {error}");
    }
}

/// A statement prepared with Parse: its text and its plan.
#[derive(Clone, Debug)]
pub struct Prepared {
    sql: String,
    kind: PreparedKind,
}

#[derive(Clone, Debug)]
enum PreparedKind {
    /// A statement the database runs.
    Plan(Box<Planned>),
    /// A session statement (SET, SHOW, BEGIN, …) the connection answers itself.
    Session(Command),
}

/// Plans statements for the extended protocol (Parse), so Describe can report parameter
/// and result types before anything runs.
pub struct Parser {
    db: Database,
}

impl Parser {
    async fn plan_prepared(&self, sql: &str, setting: &Setting<'_>) -> Result<Option<Prepared>, Error> {
        let mut statements = parse(sql, setting)?;
        let Some(statement) = statements.pop_front() else { return Ok(None) };
        if !statements.is_empty() {
            return Err(Error::Syntax {
                message: "cannot insert multiple commands into a prepared statement".into(),
                position: None,
            });
        }
        if let Some(command) = Command::from_statement(&statement) {
            return Ok(Some(Prepared { sql: sql.to_string(), kind: PreparedKind::Session(command?) }));
        }
        let planned = self.db.plan(&statement, sql).await?;
        Ok(Some(Prepared { sql: sql.to_string(), kind: PreparedKind::Plan(Box::new(planned)) }))
    }
}

#[async_trait]
impl QueryParser for Parser {
    type Statement = Arc<Prepared>;

    async fn parse_sql<C>(
        &self,
        client: &C,
        sql: &str,
        _types: &[Option<Type>],
    ) -> PgWireResult<Option<Self::Statement>>
    where
        C: ClientInfo + Unpin + Send + Sync,
    {
        let session = session_of(client);
        let setting = |name: &str| lock(&session).get(name);
        let mut prepared = self.plan_prepared(sql, &setting).await.map_err(to_pg)?;
        // Describe reports the rows of a FETCH: the cursor's columns, when it is open.
        if let Some(Prepared { kind: PreparedKind::Plan(planned), .. }) = &mut prepared
            && let Planned::Fetch { cursor, schema, .. } = planned.as_mut()
            && let Some(cursors) = client.session_extensions().get::<Cursors>()
        {
            *schema = cursors.schema(cursor).await;
        }
        Ok(prepared.map(Arc::new))
    }

    fn get_parameter_types(&self, stmt: &Self::Statement) -> PgWireResult<Vec<Type>> {
        let PreparedKind::Plan(planned) = &stmt.kind else { return Ok(Vec::new()) };
        let types = planned.parameter_types().map_err(to_pg)?;
        types
            .iter()
            .map(|t| match t {
                Some(t) => into_pg_type(t),
                None => Ok(Type::UNKNOWN),
            })
            .collect()
    }

    fn get_result_schema(
        &self,
        stmt: &Self::Statement,
        column_format: Option<&Format>,
    ) -> PgWireResult<Vec<FieldInfo>> {
        let schema = match &stmt.kind {
            PreparedKind::Plan(planned) => planned.result_schema(),
            PreparedKind::Session(command) => command_schema(command),
        };
        match schema {
            Some(schema) => pg_fields(&schema, column_format.unwrap_or(&Format::UnifiedText), None),
            None => Ok(Vec::new()),
        }
    }
}

/// Runs statements for both protocols.
pub struct QueryHandler {
    db: Database,
    parser: Arc<Parser>,
    metrics: Arc<Metrics>,
}

impl QueryHandler {
    /// SUBSCRIBE over the simple protocol: rows are sent and flushed as each epoch commits
    /// (pgwire's generic path would hold them until its buffer fills), until the client
    /// cancels, disconnects, or the view is dropped.
    async fn subscribe<C>(&self, client: &mut C, statement: &sql::Statement, query: &str) -> PgWireResult<()>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        use futures::SinkExt;
        use pgwire::messages::data::{FieldDescription, RowDescription};
        use pgwire::messages::response::{CommandComplete, ReadyForQuery};

        self.metrics.statements.fetch_add(1, Ordering::Relaxed);
        let _in_flight = self.metrics.statement_started();
        client.set_state(pgwire::api::PgWireConnectionState::QueryInProgress);
        let started = async {
            let planned = self.db.plan(statement, query).await?;
            match self.db.execute(planned, query).await? {
                Outcome::Rows { schema, stream } => Ok((schema, stream)),
                Outcome::Command { .. } => Err(Error::Internal("SUBSCRIBE returned no rows".into())),
            }
        };
        let ending = match started.await {
            Err(e) => Some(error_info(&e)),
            Ok((schema, mut stream)) => {
                let options = Arc::new(FormatOptions::from_client_metadata(client.metadata()));
                let fields = Arc::new(pg_fields(&schema, &Format::UnifiedText, Some(options))?);
                let description = RowDescription::new(fields.iter().map(FieldDescription::from).collect());
                client.send(PgWireBackendMessage::RowDescription(description)).await?;
                let handle = client.session_extensions().get::<Arc<pgwire::api::ConnectionHandle>>();
                let cancel = match handle {
                    Some(handle) => Some(handle.start_query().await),
                    None => None,
                };
                let cancelled = async move {
                    let requested = match cancel {
                        Some(receiver) => receiver.await.is_ok(),
                        None => false,
                    };
                    if !requested {
                        std::future::pending::<()>().await;
                    }
                };
                let mut rows = 0usize;
                tokio::pin!(cancelled);
                loop {
                    tokio::select! {
                        _ = &mut cancelled => break Some(error_info(&Error::Canceled)),
                        next = stream.next() => match next {
                            Some(Ok(batch)) => {
                                for row in encode_recordbatch(fields.clone(), batch) {
                                    client.feed(PgWireBackendMessage::DataRow(row?)).await?;
                                    rows += 1;
                                }
                                client.flush().await?;
                            }
                            Some(Err(e)) => break Some(error_info(&Error::from_datafusion(e, query))),
                            None => {
                                let tag = Tag::new("SUBSCRIBE").with_rows(rows);
                                client.send(PgWireBackendMessage::CommandComplete(CommandComplete::from(tag))).await?;
                                break None;
                            }
                        },
                    }
                }
            }
        };
        if let Some(info) = ending {
            self.metrics.statement_errors.fetch_add(1, Ordering::Relaxed);
            client.send(PgWireBackendMessage::ErrorResponse(info.into())).await?;
        }
        client.set_state(pgwire::api::PgWireConnectionState::ReadyForQuery);
        // Inside a BEGIN block the client stays "in transaction".
        let status = client.transaction_status();
        client.send(PgWireBackendMessage::ReadyForQuery(ReadyForQuery::new(status))).await?;
        Ok(())
    }

    async fn run(
        &self,
        planned: Planned,
        sql: &str,
        format: &Format,
        options: Arc<FormatOptions>,
        limits: Limits,
        cursors: Arc<Cursors>,
    ) -> Result<Response, Error> {
        let _in_flight = self.metrics.statement_started();
        if limits.read_only && !is_read(&planned) {
            return Err(Error::Plan {
                code: "25006",
                message: "cannot change data or the catalog in a read-only transaction".into(),
                position: None,
            });
        }
        let planned = match planned {
            Planned::DeclareSubscribe { cursor, view, snapshot, schema } => {
                let subscribe = Planned::Subscribe { view, snapshot, schema };
                let Outcome::Rows { schema, stream } = self.db.execute(subscribe, sql).await? else {
                    return Err(Error::Internal("SUBSCRIBE returned no rows".into()));
                };
                cursors.declare(cursor, schema, stream).await?;
                return Ok(Response::Execution(Tag::new("DECLARE CURSOR")));
            }
            Planned::Fetch { cursor, count, timeout, .. } => {
                // statement_timeout bounds a FETCH that waits for changes, like any read.
                let timeout = match (timeout, limits.statement_timeout) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                let (schema, batch) = cursors.fetch(&cursor, count, timeout).await?;
                let stream = RecordBatchStreamAdapter::new(schema.clone(), stream::iter([Ok(batch)]));
                let mut response = rows_response(schema, Box::pin(stream), format, options)?;
                response.set_command_tag("FETCH");
                return Ok(Response::Query(response));
            }
            Planned::Close { cursor } => {
                cursors.close(cursor.as_deref()).await?;
                return Ok(Response::Execution(Tag::new("CLOSE CURSOR")));
            }
            other => other,
        };
        // statement_timeout applies to reads; writes and DDL always run to the end, so a
        // timeout can never leave a write half-acknowledged.
        let deadline = match (&planned, limits.statement_timeout) {
            (Planned::Query(_), Some(timeout)) => Some(tokio::time::Instant::now() + timeout),
            _ => None,
        };
        let started = async {
            let outcome = self.db.execute(planned, sql).await?;
            Ok::<_, Error>(match outcome {
                Outcome::Rows { schema, mut stream } => {
                    // Wait for the first batch here, where a CancelRequest can still interrupt
                    // the statement (an aggregate does all its work before its first batch),
                    // and so an error before any row is an ordinary statement error.
                    let first = match stream.next().await {
                        Some(Ok(batch)) => Some(Ok(batch)),
                        Some(Err(e)) => return Err(Error::from_datafusion(e, sql)),
                        None => None,
                    };
                    let rest = match deadline {
                        Some(deadline) => with_deadline(stream, deadline),
                        None => stream,
                    };
                    Outcome::Rows {
                        schema: schema.clone(),
                        stream: Box::pin(RecordBatchStreamAdapter::new(schema, stream::iter(first).chain(rest))),
                    }
                }
                command => command,
            })
        };
        let outcome = match deadline {
            Some(deadline) => {
                tokio::time::timeout_at(deadline, started).await.map_err(|_| Error::StatementTimeout)??
            }
            None => started.await?,
        };
        Ok(match outcome {
            Outcome::Rows { schema, stream } => Response::Query(rows_response(schema, stream, format, options)?),
            Outcome::Command { tag, rows } => {
                let mut t = Tag::new(tag);
                if tag == "INSERT" {
                    t = t.with_oid(0);
                }
                if let Some(rows) = rows {
                    t = t.with_rows(rows);
                    if tag == "INSERT" {
                        self.metrics.rows_inserted.fetch_add(rows as u64, Ordering::Relaxed);
                    }
                }
                Response::Execution(t)
            }
        })
    }
}

#[async_trait]
impl SimpleQueryHandler for QueryHandler {
    async fn on_query<C>(&self, client: &mut C, query: pgwire::messages::simplequery::Query) -> PgWireResult<()>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        match sql::parse(&query.query) {
            Ok(statements) if statements.len() == 1 && matches!(statements[0], sql::Statement::Subscribe { .. }) => {
                self.subscribe(client, &statements[0], &query.query).await
            }
            _ => self._on_query(client, query).await,
        }
    }

    async fn do_query<C>(&self, client: &mut C, query: &str) -> PgWireResult<Vec<Response>>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let session = session_of(client);
        let setting = |name: &str| lock(&session).get(name);
        let statements = parse(query, &setting).map_err(to_pg)?;
        let cursors = client.session_extensions().get_or_insert_with(Cursors::default);
        let mut responses = Vec::with_capacity(statements.len());
        for statement in statements {
            self.metrics.statements.fetch_add(1, Ordering::Relaxed);
            let result = match Command::from_statement(&statement) {
                Some(Ok(command)) => session_command(client, &command, &Format::UnifiedText).await,
                Some(Err(e)) => Err(e),
                None => match self.db.plan(&statement, query).await {
                    Ok(planned) => {
                        let options = Arc::new(FormatOptions::from_client_metadata(client.metadata()));
                        let limits = Limits::of(client);
                        self.run(planned, query, &Format::UnifiedText, options, limits, cursors.clone()).await
                    }
                    Err(e) => Err(e),
                },
            };
            match result {
                Ok(response) => responses.push(response),
                Err(e) => {
                    // Postgres stops at the first failing statement of a simple query.
                    self.metrics.statement_errors.fetch_add(1, Ordering::Relaxed);
                    responses.push(Response::Error(Box::new(error_info(&e))));
                    break;
                }
            }
        }
        Ok(responses)
    }
}

#[async_trait]
impl ExtendedQueryHandler for QueryHandler {
    type Statement = Arc<Prepared>;
    type QueryParser = Parser;

    fn query_parser(&self) -> Arc<Self::QueryParser> {
        self.parser.clone()
    }

    /// Stores the portal as pgwire does, but holds BindComplete until Sync (see `deferred`).
    async fn on_bind<C>(&self, client: &mut C, message: Bind) -> PgWireResult<()>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = Self::Statement>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let statement = message.statement_name.as_deref().unwrap_or(DEFAULT_NAME);
        match client.portal_store().get_statement(statement) {
            Some(Entry::Value(stored)) => {
                client.portal_store().put_portal(Arc::new(Portal::try_new(&message, stored)?))
            }
            Some(Entry::Empty) if message.parameters.is_empty() => {
                client.portal_store().put_empty_portal(message.portal_name.as_deref().unwrap_or(DEFAULT_NAME))
            }
            Some(Entry::Empty) => {
                return Err(PgWireError::UserError(Box::new(ErrorInfo::new(
                    "ERROR".into(),
                    "08P01".into(),
                    format!(
                        "the prepared statement {} is empty and takes no parameters; the Bind gave {}",
                        message.statement_name.as_deref().map_or("(unnamed)".to_string(), |n| format!("\"{n}\"")),
                        message.parameters.len()
                    ),
                ))));
            }
            None => return Err(PgWireError::StatementNotFound(statement.to_string())),
        }
        client.feed(PgWireBackendMessage::BindComplete(BindComplete::new())).await?;
        Ok(())
    }

    /// Runs the portal as pgwire does, with its replies held until Sync (see `deferred`).
    async fn on_execute<C>(&self, client: &mut C, message: Execute) -> PgWireResult<()>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = Self::Statement>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        self._on_execute(&mut Deferred(client), message).await
    }

    async fn do_query<C>(
        &self,
        client: &mut C,
        portal: &Portal<Self::Statement>,
        _max_rows: usize,
    ) -> PgWireResult<Response>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = Self::Statement>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        self.metrics.statements.fetch_add(1, Ordering::Relaxed);
        let prepared = &portal.statement.statement;
        let planned = match &prepared.kind {
            PreparedKind::Plan(planned) => planned,
            PreparedKind::Session(command) => {
                return session_command(client, command, &portal.result_column_format).await.map_err(to_pg);
            }
        };
        let inferred = planned.parameter_types().map_err(to_pg)?;
        let inferred_refs: Vec<Option<&DataType>> = inferred.iter().map(|t| t.as_ref()).collect();
        let params = deserialize_parameters(portal, &inferred_refs)?;
        let planned = planned.as_ref().clone().with_parameters(params).map_err(|e| to_pg(e.with_position(None)))?;
        let options = Arc::new(FormatOptions::from_client_metadata(client.metadata()));
        let limits = Limits::of(client);
        let cursors = client.session_extensions().get_or_insert_with(Cursors::default);
        self.run(planned, &prepared.sql, &portal.result_column_format, options, limits, cursors).await.map_err(to_pg)
    }
}

/// What the session allows the next statement.
#[derive(Debug, Clone, Copy, Default)]
struct Limits {
    statement_timeout: Option<std::time::Duration>,
    /// Inside `BEGIN READ ONLY`: refuse writes.
    read_only: bool,
}

impl Limits {
    fn of<C: ClientInfo>(client: &C) -> Limits {
        let session = session_of(client);
        let session = lock(&session);
        Limits { statement_timeout: session.statement_timeout(), read_only: session.read_only() }
    }
}

/// Whether a planned statement only reads.
fn is_read(planned: &Planned) -> bool {
    matches!(
        planned,
        Planned::Query(_)
            | Planned::ShowTables
            | Planned::ShowViews
            | Planned::ExplainView(_)
            | Planned::Subscribe { .. }
            | Planned::Flush
            | Planned::ShowSources
            | Planned::ShowSinks
            | Planned::DeclareSubscribe { .. }
            | Planned::Fetch { .. }
            | Planned::Close { .. }
            | Planned::Model(sql::model::ModelStatement::Show | sql::model::ModelStatement::Describe { .. })
    )
}

/// Looks up a session setting by name (for `current_setting`).
type Setting<'a> = dyn Fn(&str) -> Result<String, Error> + Send + Sync + 'a;

/// Splits a query string into statements; catalog queries go through the rewriting
/// parser that makes client introspection plannable (see [`crate::catalog::system`]).
fn parse(sql: &str, setting: &Setting<'_>) -> Result<std::collections::VecDeque<sql::Statement>, Error> {
    crate::catalog::system::parse(sql, setting)
}

/// This connection's session, created from its startup parameters on first use.
fn session_of<C: ClientInfo>(client: &C) -> Arc<std::sync::Mutex<Session>> {
    client.session_extensions().get_or_insert_with(|| std::sync::Mutex::new(Session::new(client.metadata())))
}

fn lock(session: &std::sync::Mutex<Session>) -> std::sync::MutexGuard<'_, Session> {
    match session.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// Runs a session command for `client` and tells it about changed settings.
async fn session_command<C>(client: &mut C, command: &Command, format: &Format) -> Result<Response, Error>
where
    C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
    C::Error: Debug,
{
    use futures::SinkExt;
    use pgwire::messages::startup::ParameterStatus;

    let session = session_of(client);
    let (reply, format_metadata) = {
        let mut session = lock(&session);
        (session.apply(command)?, session.format_metadata())
    };
    client.metadata_mut().extend(format_metadata.into_iter().map(|(k, v)| (k.to_string(), v)));
    Ok(match reply {
        Reply::Done { tag, changed } => {
            for (name, value) in changed {
                let status = ParameterStatus::new(name.to_string(), value);
                client
                    .feed(PgWireBackendMessage::ParameterStatus(status))
                    .await
                    .map_err(|e| Error::Internal(format!("sending a parameter status: {e:?}")))?;
            }
            Response::Execution(Tag::new(tag))
        }
        Reply::BlockStarted => Response::TransactionStart(Tag::new("BEGIN")),
        Reply::BlockEnded { tag } => Response::TransactionEnd(Tag::new(tag)),
        Reply::Rows { rows, .. } => {
            let schema = command_schema(command).ok_or_else(|| Error::Internal("SHOW without columns".into()))?;
            let columns: Vec<datafusion::arrow::array::ArrayRef> = (0..schema.fields().len())
                .map(|i| {
                    let values: Vec<&str> = rows.iter().map(|row| row.get(i).map_or("", String::as_str)).collect();
                    Arc::new(datafusion::arrow::array::StringArray::from(values)) as datafusion::arrow::array::ArrayRef
                })
                .collect();
            let batch = RecordBatch::try_new(schema.clone(), columns)?;
            let stream = Box::pin(RecordBatchStreamAdapter::new(schema.clone(), stream::iter([Ok(batch)])));
            let options = Arc::new(FormatOptions::from_client_metadata(client.metadata()));
            Response::Query(rows_response(schema, stream, format, options)?)
        }
    })
}

/// The columns a session command returns, if it returns rows (SHOW does).
fn command_schema(command: &Command) -> Option<SchemaRef> {
    use datafusion::arrow::datatypes::Field;
    let Command::Show { name } = command else { return None };
    let fields = if name.eq_ignore_ascii_case("all") {
        ["name", "setting", "description"].iter().map(|n| Field::new(*n, DataType::Utf8, false)).collect()
    } else {
        vec![Field::new(name.to_ascii_lowercase(), DataType::Utf8, false)]
    };
    Some(Arc::new(Schema::new(fields)))
}

/// Ends `stream` with a statement-timeout error once `deadline` passes.
fn with_deadline(stream: SendableRecordBatchStream, deadline: tokio::time::Instant) -> SendableRecordBatchStream {
    let schema = stream.schema();
    let timed = stream::unfold(Some(stream), move |state| async move {
        let mut stream = state?;
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => Some((
                Err(datafusion::error::DataFusionError::External(Box::new(Error::StatementTimeout))),
                None,
            )),
            next = stream.next() => next.map(|batch| (batch, Some(stream))),
        }
    });
    Box::pin(RecordBatchStreamAdapter::new(schema, timed))
}

/// Streams Arrow batches to the client as DataRows, encoding each batch as it arrives.
fn rows_response(
    schema: SchemaRef,
    stream: SendableRecordBatchStream,
    format: &Format,
    options: Arc<FormatOptions>,
) -> Result<QueryResponse, Error> {
    let fields = Arc::new(
        pg_fields(&schema, format, Some(options))
            .map_err(|e| Error::not_supported(format!("returning this column type ({e})")))?,
    );
    let encode_fields = fields.clone();
    let rows = stream
        .map(move |batch: datafusion::error::Result<RecordBatch>| {
            let rows: Box<dyn Iterator<Item = PgWireResult<DataRow>> + Send + Sync> = match batch {
                Ok(batch) => encode_recordbatch(encode_fields.clone(), batch),
                Err(e) => Box::new(std::iter::once(Err(to_pg(Error::from_datafusion(e, ""))))),
            };
            stream::iter(rows)
        })
        .flatten();
    Ok(QueryResponse::new(fields, rows))
}

/// Column descriptions for the client: arrow-pg's type mapping, plus the Postgres types
/// Arrow cannot express (JSON columns are UTF-8 text tagged in their field metadata; the
/// json wire format, text or binary, is the text itself).
fn pg_fields(schema: &Schema, format: &Format, options: Option<Arc<FormatOptions>>) -> PgWireResult<Vec<FieldInfo>> {
    let fields = arrow_schema_to_pg_fields(schema, format, options.clone())?;
    Ok(fields
        .into_iter()
        .zip(schema.fields())
        .enumerate()
        .map(|(i, (info, field))| {
            if !sql::is_json(field) {
                return info;
            }
            let json = FieldInfo::new(info.name().to_string(), None, None, Type::JSON, format.format_for(i));
            match &options {
                Some(options) => json.with_format_options(options.clone()),
                None => json,
            }
        })
        .collect())
}

/// The Postgres error fields for a freshet error.
pub fn error_info(e: &Error) -> ErrorInfo {
    let mut info = ErrorInfo::new("ERROR".to_string(), e.sqlstate().to_string(), e.to_string());
    info.detail = e.detail();
    info.hint = e.hint();
    info.position = e.position().map(|p| p.to_string());
    info
}

fn to_pg(e: Error) -> PgWireError {
    PgWireError::UserError(Box::new(error_info(&e)))
}
