//! Who may connect, and over what: the startup phase of every Postgres connection.
//!
//! With a password configured ([`Auth::password`]) clients authenticate with
//! SCRAM-SHA-256 (pgwire's implementation) as [`Auth::user`]; a wrong password or user
//! gets `28P01` and nothing more. Without one, only loopback clients are let in (any
//! user name, as a local Postgres with `trust` would), and a client from any other
//! address is refused with `28000`, so a server bound to a public address never serves
//! data to strangers by accident. [`tls_acceptor`] loads `--tls-cert`/`--tls-key` so
//! clients can ask for TLS (`sslmode=require`).
//!
//! Each connection gets its own [`ConnectionStartup`], because the SCRAM exchange keeps
//! per-connection state between messages.

use std::fmt::Debug;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use futures::Sink;
use pgwire::api::auth::sasl::SASLAuthStartupHandler;
use pgwire::api::auth::sasl::scram::{ScramAuth, gen_salted_password, random_nonce};
use pgwire::api::auth::{
    AuthSource, DefaultServerParameterProvider, LoginInfo, Password, StartupHandler, finish_authentication,
    protocol_negotiation, save_startup_parameters_to_metadata,
};
use pgwire::api::{
    ClientInfo, ConnectionHandle, ConnectionManager, PgWireConnectionState, PidSecretKeyGenerator,
    RandomPidSecretKeyGenerator,
};
use pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use pgwire::messages::{PgWireBackendMessage, PgWireFrontendMessage};

use super::pg::StartupWatch;
use crate::error::{Error, Result};

/// The user clients connect as unless `--user` says otherwise.
pub const DEFAULT_USER: &str = "freshet";

/// How clients prove who they are.
#[derive(Clone, PartialEq, Eq)]
pub struct Auth {
    /// The one user name clients log in as (checked when a password is set).
    pub user: String,
    /// With a password, every client authenticates with SCRAM-SHA-256; without one, only
    /// loopback clients may connect.
    pub password: Option<String>,
}

impl Default for Auth {
    fn default() -> Self {
        Auth { user: DEFAULT_USER.to_string(), password: None }
    }
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the password.
        f.debug_struct("Auth")
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "…"))
            .finish()
    }
}

/// How the Postgres listener guards its door: who may log in, and TLS if configured.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Security {
    pub auth: Auth,
    /// `--tls-cert`/`--tls-key`; without them clients asking for TLS are told it is
    /// unavailable (`sslmode=prefer` falls back to plain, `require` fails).
    pub tls: Option<TlsFiles>,
}

/// A certificate chain and its private key, both PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Builds the TLS acceptor for `files`.
pub fn tls_acceptor(files: &TlsFiles) -> Result<pgwire::tokio::TlsAcceptor> {
    use pgwire::tokio::tokio_rustls::rustls;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .and_then(|certs| certs.collect())
        .map_err(|e| Error::Config(format!("cannot read --tls-cert {}: {e}", files.cert.display())))?;
    if certs.is_empty() {
        return Err(Error::Config(format!("--tls-cert {} holds no certificate", files.cert.display())));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| Error::Config(format!("cannot read --tls-key {}: {e}", files.key.display())))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|builder| builder.with_no_client_auth().with_single_cert(certs, key))
        .map_err(|e| Error::Config(format!("--tls-cert and --tls-key do not make a usable TLS identity: {e}")))?;
    Ok(pgwire::tokio::TlsAcceptor::from(Arc::new(config)))
}

/// What every connection's startup shares: the login rules and the salted password.
pub struct Authenticator {
    /// The password as SCRAM stores it: salted and hashed once, at start.
    source: Option<Arc<PasswordSource>>,
    parameters: Arc<DefaultServerParameterProvider>,
    connections: Arc<ConnectionManager>,
    watch: Arc<StartupWatch>,
}

impl Authenticator {
    pub fn new(auth: Auth, connections: Arc<ConnectionManager>, watch: Arc<StartupWatch>) -> Authenticator {
        let source = auth.password.as_ref().map(|password| Arc::new(PasswordSource::new(&auth.user, password)));
        let mut parameters = DefaultServerParameterProvider::default();
        parameters.server_version =
            format!("{} (freshet {})", super::session::SERVER_VERSION, env!("CARGO_PKG_VERSION"));
        Authenticator { source, parameters: Arc::new(parameters), connections, watch }
    }

    /// The startup handler for one new connection.
    pub fn connection(self: &Arc<Self>) -> ConnectionStartup {
        let sasl = self.source.as_ref().map(|source| {
            SASLAuthStartupHandler::new(self.parameters.clone())
                .with_scram(ScramAuth::new(source.clone()))
                .with_connection_manager(self.connections.clone())
        });
        ConnectionStartup { shared: self.clone(), sasl }
    }
}

/// Answers SCRAM with the configured user's salted password; any other user name gets a
/// password no one knows, so it fails exactly like a wrong password.
#[derive(Debug)]
pub struct PasswordSource {
    user: String,
    salt: Vec<u8>,
    salted: Vec<u8>,
    unknown_user: Vec<u8>,
}

/// Postgres' default SCRAM iteration count.
const SCRAM_ITERATIONS: usize = 4096;

impl PasswordSource {
    fn new(user: &str, password: &str) -> PasswordSource {
        // pgwire's nonce is 18 random bytes (base64): random enough for a salt, and the
        // decoy is random so no password matches it.
        let salt = random_nonce().into_bytes();
        let decoy = gen_salted_password(&random_nonce(), &salt, 1);
        PasswordSource {
            user: user.to_string(),
            salted: gen_salted_password(password, &salt, SCRAM_ITERATIONS),
            salt,
            unknown_user: decoy,
        }
    }
}

#[async_trait]
impl AuthSource for PasswordSource {
    async fn get_password(&self, login: &LoginInfo) -> PgWireResult<Password> {
        let secret = if login.user() == Some(self.user.as_str()) { &self.salted } else { &self.unknown_user };
        Ok(Password::new(Some(self.salt.clone()), secret.clone()))
    }
}

/// One connection's startup: the loopback rule, then SCRAM or trust.
pub struct ConnectionStartup {
    shared: Arc<Authenticator>,
    sasl: Option<SASLAuthStartupHandler<DefaultServerParameterProvider>>,
}

/// Whether a client at `peer` may connect without a password.
pub fn trusted_without_password(peer: &SocketAddr) -> bool {
    peer.ip().is_loopback() || peer.ip().to_canonical().is_loopback()
}

/// The FATAL error for a non-loopback client when no password is configured.
pub fn remote_refused(peer: &SocketAddr) -> ErrorInfo {
    ErrorInfo::new(
        "FATAL".into(),
        "28000".into(),
        format!(
            "no password is configured, so freshet accepts only loopback clients and refuses {}; \
             start freshet with --password (or FRESHET_PASSWORD) to let other hosts connect",
            peer.ip()
        ),
    )
}

#[async_trait]
impl StartupHandler for ConnectionStartup {
    async fn on_startup<C>(&self, client: &mut C, message: PgWireFrontendMessage) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let peer = client.socket_addr();
        match &self.sasl {
            Some(sasl) => sasl.on_startup(client, message).await?,
            None => {
                if let PgWireFrontendMessage::Startup(startup) = &message {
                    if !trusted_without_password(&peer) {
                        tracing::info!(%peer, "refused a non-loopback client: no password is configured");
                        return Err(PgWireError::UserError(Box::new(remote_refused(&peer))));
                    }
                    protocol_negotiation(client, startup).await?;
                    save_startup_parameters_to_metadata(client, startup);
                    let (pid, secret_key) = RandomPidSecretKeyGenerator::default().generate(client);
                    client.set_pid_and_secret_key(pid, secret_key.clone());
                    // Registered so a CancelRequest carrying this key finds the connection.
                    let (handle, guard) = self.shared.connections.register(pid, secret_key);
                    client.session_extensions().insert::<Arc<ConnectionHandle>>(handle);
                    client.session_extensions().insert(guard);
                    finish_authentication(client, self.shared.parameters.as_ref()).await?;
                }
            }
        }
        if matches!(client.state(), PgWireConnectionState::ReadyForQuery) {
            self.shared.watch.finished(peer);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_is_trusted_without_a_password() {
        let local: SocketAddr = "127.0.0.1:5000".parse().expect("address");
        let local6: SocketAddr = "[::1]:5000".parse().expect("address");
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:5000".parse().expect("address");
        let remote: SocketAddr = "192.0.2.7:5000".parse().expect("address");
        assert!(trusted_without_password(&local));
        assert!(trusted_without_password(&local6));
        assert!(trusted_without_password(&mapped));
        assert!(!trusted_without_password(&remote));
        let refused = remote_refused(&remote);
        assert_eq!(refused.code, "28000");
        assert!(refused.message.contains("--password"), "{}", refused.message);
    }

    #[tokio::test]
    async fn unknown_users_get_a_password_no_one_knows() {
        let source = PasswordSource::new("freshet", "s3cret");
        let addr: SocketAddr = "127.0.0.1:1".parse().expect("address");
        let ours = source.get_password(&LoginInfo::new(Some("freshet"), None, addr.ip().to_string())).await;
        let other = source.get_password(&LoginInfo::new(Some("mallory"), None, addr.ip().to_string())).await;
        let (ours, other) = (ours.expect("password"), other.expect("password"));
        assert_eq!(ours.salt(), other.salt(), "the salt must not reveal whether a user exists");
        assert_ne!(ours.password(), other.password());
        assert_eq!(ours.password(), gen_salted_password("s3cret", &source.salt, SCRAM_ITERATIONS));
    }
}
