//! What the MySQL store and the MySQL backend share: pools built from a URL, connections
//! that never hang past a deadline, and errors that say what failed without secrets.

use std::time::Duration;

use mysql_async::prelude::*;
use mysql_async::{Conn, Opts, OptsBuilder, Pool, PoolConstraints, PoolOpts, SslOpts};

#[derive(Debug, Clone, thiserror::Error)]
pub enum SqlError {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("server error {code}: {message}")]
    Server { code: u16, message: String },
    #[error("cannot reach the server: {0}")]
    Unreachable(String),
    #[error("{0}")]
    Other(String),
}

impl SqlError {
    /// The server could not be reached at all, as opposed to refusing a statement.
    pub fn is_unreachable(&self) -> bool {
        matches!(self, SqlError::Timeout(_) | SqlError::Unreachable(_))
    }
}

impl From<mysql_async::Error> for SqlError {
    fn from(e: mysql_async::Error) -> Self {
        match e {
            mysql_async::Error::Server(s) => SqlError::Server {
                code: s.code,
                message: s.message,
            },
            mysql_async::Error::Io(io) => SqlError::Unreachable(io.to_string()),
            mysql_async::Error::Driver(d) => SqlError::Unreachable(d.to_string()),
            other => SqlError::Other(other.to_string()),
        }
    }
}

fn opts(url: &str) -> Result<Opts, SqlError> {
    Opts::from_url(url).map_err(|e| SqlError::Other(format!("bad MySQL URL: {e}")))
}

/// A pool that opens connections lazily: building it needs no server. With `ca_pem`, every
/// connection uses TLS and checks the server's certificate against that CA.
pub fn pool(url: &str, max: usize, ca_pem: Option<&[u8]>) -> Result<Pool, SqlError> {
    let constraints = PoolConstraints::new(0, max.max(1)).expect("0 <= max");
    let opts = OptsBuilder::from_opts(opts(url)?)
        // No COM_RESET_CONNECTION round trip each time a connection goes back to the pool:
        // the broker keeps no session state on its admin connections.
        // Idle connections are kept for a minute: with the default (0 s) and no lower bound
        // every connection was closed as it went back, so each operation paid a new
        // connection (handshake and login) on both sides.
        .pool_opts(
            PoolOpts::default()
                .with_constraints(constraints)
                .with_inactive_connection_ttl(Duration::from_secs(60))
                .with_reset_connection(false),
        )
        .tcp_keepalive(Some(Duration::from_secs(30)))
        .prefer_socket(false)
        .ssl_opts(ca_pem.map(|pem| SslOpts::default().with_root_certs(vec![pem.to_vec().into()])));
    Ok(Pool::new(opts))
}

/// A connection from the pool, or an error once `timeout` has passed.
pub async fn conn(pool: &Pool, timeout: Duration) -> Result<Conn, SqlError> {
    match tokio::time::timeout(timeout, pool.get_conn()).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(SqlError::Timeout(timeout)),
    }
}

/// Creates the database a URL names, connecting without it.
pub async fn create_database_of(url: &str, timeout: Duration) -> Result<(), SqlError> {
    let opts = opts(url)?;
    let Some(db) = opts.db_name().map(str::to_string) else {
        return Ok(());
    };
    if db.is_empty() || db.len() > 64 || !db.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    {
        return Err(SqlError::Other(format!(
            "database name {db:?} must be 1 to 64 of a-z, A-Z, 0-9 and _"
        )));
    }
    let without_db = OptsBuilder::from_opts(opts).db_name(None::<String>);
    let connect = async {
        let mut conn = Conn::new(without_db).await?;
        conn.query_drop(format!("CREATE DATABASE IF NOT EXISTS `{db}`"))
            .await?;
        conn.disconnect().await?;
        Ok::<_, mysql_async::Error>(())
    };
    match tokio::time::timeout(timeout, connect).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(SqlError::Timeout(timeout)),
    }
}
