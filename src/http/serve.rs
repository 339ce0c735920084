//! Serving connections, plain or TLS, with the limits a public listener needs:
//! - at most `max_connections` open at once: past it, new connections wait in the kernel's
//!   backlog while established ones are served;
//! - a TLS handshake and each request head must complete within `header_timeout`;
//! - a connection with no request in flight for `idle_timeout` is closed;
//! - on shutdown: stop accepting, close connections with no request in flight (idle, or
//!   still sending a head), let requests in flight finish within the deadline the caller
//!   puts on [`Server::shutdown`].

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::App;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

/// The listener's limits (configuration keys under `listen`).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
}

/// Connections being served; [`Server::shutdown`] ends them.
pub struct Server {
    stop: CancellationToken,
    connections: TaskTracker,
    acceptor: tokio::task::JoinHandle<()>,
}

/// Starts accepting on `listener` and returns at once.
pub fn start(listener: TcpListener, app: App, tls: Option<ServerConfig>, limits: Limits) -> Server {
    let stop = CancellationToken::new();
    let connections = TaskTracker::new();
    let acceptor = tokio::spawn(accept_loop(
        listener,
        app,
        tls.map(|c| TlsAcceptor::from(Arc::new(c))),
        limits,
        stop.clone(),
        connections.clone(),
    ));
    Server {
        stop,
        connections,
        acceptor,
    }
}

impl Server {
    /// Stops accepting (the listening socket is closed), asks every connection to close
    /// once its request in flight is answered, and waits for that up to `deadline`.
    /// Returns how many connections were still open at the deadline.
    pub async fn shutdown(self, deadline: Duration) -> usize {
        self.stop.cancel();
        let _ = self.acceptor.await;
        self.connections.close();
        if tokio::time::timeout(deadline, self.connections.wait())
            .await
            .is_err()
        {
            return self.connections.len();
        }
        0
    }
}

async fn accept_loop(
    listener: TcpListener,
    app: App,
    tls: Option<TlsAcceptor>,
    limits: Limits,
    stop: CancellationToken,
    connections: TaskTracker,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    builder.http2().timer(TokioTimer::new());
    let builder = Arc::new(builder);
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    loop {
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => permit.expect("never closed"),
            () = stop.cancelled() => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors, most likely: let some close first.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = stop.cancelled() => break,
        };
        // Answers are small and latency matters: no Nagle delay.
        let _ = stream.set_nodelay(true);
        let (app, builder, tls, stop) = (app.clone(), builder.clone(), tls.clone(), stop.clone());
        connections.spawn(async move {
            let _permit = permit;
            match tls {
                None => connection(stream, app, &builder, limits, stop).await,
                Some(acceptor) => {
                    match tokio::time::timeout(limits.header_timeout, acceptor.accept(stream)).await
                    {
                        Ok(Ok(tls)) => connection(tls, app, &builder, limits, stop).await,
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                }
            }
        });
    }
    // Dropping the listener here closes the socket: nothing new is accepted.
}

/// Whether a connection has a request in flight, and since when it has had none.
struct Activity {
    in_flight: AtomicUsize,
    idle_since: Mutex<Instant>,
}

impl Activity {
    /// How long until the connection has been idle for `limit`; `None` once it has.
    fn idle_remaining(&self, limit: Duration) -> Option<Duration> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return Some(limit);
        }
        let since = *self.idle_since.lock().expect("activity lock");
        limit.checked_sub(since.elapsed()).filter(|d| !d.is_zero())
    }
}

/// Ends a request's count when its answer (or the request) is dropped.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        *self.0.idle_since.lock().expect("activity lock") = Instant::now();
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

async fn connection<I>(
    io: I,
    app: App,
    builder: &auto::Builder<TokioExecutor>,
    limits: Limits,
    stop: CancellationToken,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Arc::new(Activity {
        in_flight: AtomicUsize::new(0),
        idle_since: Mutex::new(Instant::now()),
    });
    let counted = activity.clone();
    let service =
        hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
            counted.in_flight.fetch_add(1, Ordering::AcqRel);
            let guard = InFlight(counted.clone());
            let router = app.0.clone();
            async move {
                let response = router.oneshot(request.map(axum::body::Body::new)).await;
                drop(guard);
                response
            }
        });
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(connection);
    let mut closing = false;
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            () = stop.cancelled(), if !closing => {
                // Nothing in flight (idle, or half a request head): close now. Otherwise
                // the answer goes out first, then the connection closes.
                if activity.in_flight.load(Ordering::Acquire) == 0 {
                    return;
                }
                connection.as_mut().graceful_shutdown();
                closing = true;
            }
            () = idle(&activity, limits.idle_timeout), if !closing => {
                connection.as_mut().graceful_shutdown();
                closing = true;
            }
        }
    }
}

/// Resolves once the connection has had no request in flight for `limit`.
async fn idle(activity: &Activity, limit: Duration) {
    while let Some(wait) = activity.idle_remaining(limit) {
        tokio::time::sleep(wait).await;
    }
}
