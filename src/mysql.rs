//! What the MySQL store and the MySQL backend share: pools built from a URL, connections
//! that never hang past a deadline, and errors that say what failed without secrets.
//!
//! A URL may name one server or the nodes of a Galera cluster,
//! `mysql://user:password@host1:3306,host2:3306,host3:3306/database`: [`Nodes`] keeps a
//! lazy pool for each and uses one at a time (as cf-mysql's proxy sends every client to
//! one node, so writes never race between nodes), moving to the next when it stops
//! answering or stops serving (a node outside the cluster's primary component).

use std::sync::atomic::{AtomicUsize, Ordering};
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
    /// The connection failed after a statement was sent: it may or may not have run.
    #[error("the connection was lost during a statement: {0}")]
    Lost(String),
    #[error("{0}")]
    Other(String),
}

impl SqlError {
    /// The server could not be reached at all, as opposed to refusing a statement.
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            SqlError::Timeout(_) | SqlError::Unreachable(_) | SqlError::Lost(_)
        )
    }

    /// The node refused the statement without running it because it cannot serve now:
    /// 1047 (a Galera node not in the primary component, or not yet synced), 1053 (shutting
    /// down), 1927 (its connection was killed, as a shutdown does).
    pub fn node_cannot_serve(&self) -> bool {
        matches!(
            self,
            SqlError::Server {
                code: 1047 | 1053 | 1927,
                ..
            }
        )
    }

    /// The error of a statement sent on a connection. A broken connection, or one the
    /// server ended (a shutdown, a kill) while the statement ran, is [`SqlError::Lost`]:
    /// the statement may have committed.
    pub fn of_statement(e: mysql_async::Error) -> SqlError {
        match SqlError::from(e) {
            SqlError::Unreachable(why) => SqlError::Lost(why),
            e @ SqlError::Server {
                code: 1053 | 1927, ..
            } => SqlError::Lost(e.to_string()),
            other => other,
        }
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

/// A URL's parts: scheme, user information with its `@` (or empty), hosts, and the rest
/// (path and query). `None` when the text has no scheme.
fn parts(url: &str) -> Option<(&str, &str, &str, &str)> {
    let (scheme, rest) = url.split_once("://")?;
    let (authority, tail) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
    let (user, hosts) = authority.split_at(authority.rfind('@').map_or(0, |at| at + 1));
    Some((scheme, user, hosts, tail))
}

/// The URL of each node a URL names: one for a single host, one per host of
/// `host1:port1,host2:port2`, each with the same user, password, database and options.
pub fn node_urls(url: &str) -> Vec<String> {
    let Some((scheme, user, hosts, tail)) = parts(url) else {
        return vec![url.to_string()];
    };
    hosts
        .split(',')
        .map(|host| format!("{scheme}://{user}{host}{tail}"))
        .collect()
}

/// A URL for messages: its password (if any) replaced by `***`, its hosts and path kept,
/// its query (which may carry a password) left out.
pub fn redact(url: &str) -> String {
    let Some((scheme, user, hosts, tail)) = parts(url) else {
        return "(not a URL)".into();
    };
    let path = tail.split_once('?').map_or(tail, |(path, _)| path);
    let user = match user.split_once(':') {
        Some((name, _)) => format!("{name}:***@"),
        None => user.to_string(),
    };
    format!("{scheme}://{user}{hosts}{path}")
}

fn opts(url: &str) -> Result<Opts, SqlError> {
    Opts::from_url(url).map_err(|e| SqlError::Other(format!("bad MySQL URL: {e}")))
}

/// A pool that opens connections lazily: building it needs no server. With `ca_pem`, every
/// connection uses TLS and checks the server's certificate against that CA. `session` runs
/// on each new connection.
fn pool(
    url: &str,
    max: usize,
    ca_pem: Option<&[u8]>,
    session: &[String],
) -> Result<Pool, SqlError> {
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
        .init(session.to_vec())
        .tcp_keepalive(Some(Duration::from_secs(30)))
        .prefer_socket(false)
        .ssl_opts(ca_pem.map(|pem| SslOpts::default().with_root_certs(vec![pem.to_vec().into()])));
    Ok(Pool::new(opts))
}

/// The node a connection came from, to report its failure to [`Nodes::failed`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeId(usize);

/// A connection and the node it is to; used as a [`Conn`].
pub struct NodeConn {
    pub node: NodeId,
    pub conn: Conn,
}

impl std::ops::Deref for NodeConn {
    type Target = Conn;
    fn deref(&self) -> &Conn {
        &self.conn
    }
}

impl std::ops::DerefMut for NodeConn {
    fn deref_mut(&mut self) -> &mut Conn {
        &mut self.conn
    }
}

/// One server, or the nodes of a Galera cluster: a lazy pool per node, and the node in use.
pub struct Nodes {
    nodes: Vec<(String, Pool)>,
    current: AtomicUsize,
}

impl Nodes {
    /// Pools for every node `url` names; no server is contacted. `session` (statements)
    /// runs on every new connection.
    pub fn new(
        url: &str,
        max: usize,
        ca_pem: Option<&[u8]>,
        session: &[String],
    ) -> Result<Self, SqlError> {
        let nodes = node_urls(url)
            .into_iter()
            .map(|node| {
                let address = redact(&node);
                let pool = pool(&node, max, ca_pem, session)?;
                Ok((address, pool))
            })
            .collect::<Result<Vec<_>, SqlError>>()?;
        Ok(Nodes {
            nodes,
            current: AtomicUsize::new(0),
        })
    }

    /// How many nodes there are.
    pub fn count(&self) -> usize {
        self.nodes.len()
    }

    /// A connection to the node in use or, when it cannot give one, to the next node that
    /// can (which is then the node in use). The error is the last node's.
    pub async fn conn(&self, timeout: Duration) -> Result<NodeConn, SqlError> {
        let start = self.current.load(Ordering::Relaxed);
        let mut last = None;
        for step in 0..self.nodes.len() {
            let i = (start + step) % self.nodes.len();
            match conn(&self.nodes[i].1, timeout).await {
                Ok(conn) => {
                    if step > 0 {
                        self.move_to(start, i);
                    }
                    return Ok(NodeConn {
                        node: NodeId(i),
                        conn,
                    });
                }
                Err(e) if self.nodes.len() > 1 && (e.is_unreachable() || e.node_cannot_serve()) => {
                    tracing::warn!(node = %self.nodes[i].0, error = %e, "MySQL node does not answer");
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| SqlError::Other("no MySQL node is configured".into())))
    }

    /// Notes that a statement on `node` failed with `e`: a node that is gone or cannot serve
    /// is left for the next one. Answers `e`.
    pub fn failed(&self, node: NodeId, e: SqlError) -> SqlError {
        if self.nodes.len() > 1 && (e.is_unreachable() || e.node_cannot_serve()) {
            let next = (node.0 + 1) % self.nodes.len();
            tracing::warn!(node = %self.nodes[node.0].0, error = %e, "MySQL node failed a statement");
            self.move_to(node.0, next);
        }
        e
    }

    fn move_to(&self, from: usize, to: usize) {
        if self
            .current
            .compare_exchange(from, to, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            crate::metrics::MYSQL.failovers.inc();
            tracing::warn!(
                from = %self.nodes[from].0,
                to = %self.nodes[to].0,
                "MySQL: now using another node"
            );
        }
    }

    /// Every node with its address (password hidden) and pool: for what holds per node only.
    pub fn each(&self) -> impl Iterator<Item = (NodeId, &str, &Pool)> {
        self.nodes
            .iter()
            .enumerate()
            .map(|(i, (address, pool))| (NodeId(i), address.as_str(), pool))
    }
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

#[cfg(test)]
mod tests {
    use super::{node_urls, redact};

    #[test]
    fn a_url_names_one_node_or_several() {
        assert_eq!(
            node_urls("mysql://u:p@db:3306/brokerage?ssl-mode=required"),
            ["mysql://u:p@db:3306/brokerage?ssl-mode=required"]
        );
        assert_eq!(
            node_urls("mysql://u:p,w@a:1,b:2,c/brokerage"),
            [
                "mysql://u:p,w@a:1/brokerage",
                "mysql://u:p,w@b:2/brokerage",
                "mysql://u:p,w@c/brokerage"
            ]
        );
        assert_eq!(node_urls("mysql://a,b"), ["mysql://a", "mysql://b"]);
    }

    #[test]
    fn a_redacted_url_keeps_hosts_and_hides_the_password() {
        assert_eq!(
            redact("mysql://u:s3cret@a:1,b:2/db?password=x"),
            "mysql://u:***@a:1,b:2/db"
        );
        assert_eq!(redact("mysql://a/db"), "mysql://a/db");
        assert!(!redact("mysql://u:p@ss@a/db").contains("p@ss"));
    }
}
