//! Wiring: configuration in, a running server out. `main` calls these; so do the tests.

use std::future::Future;
use std::time::Duration;

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_rustls::rustls::ServerConfig;

use crate::broker::{Broker, Timing};
use crate::catalog::LocalCatalog;
use crate::config::{Config, LogFormat};
use crate::dashboard::{Dashboard, Platforms};
use crate::federation::Federation;
use crate::http::{self, App, AppState};
use crate::{backend, store};

/// Logs to stderr, text or JSON; `RUST_LOG` overrides the configured level.
pub fn init_tracing(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.log.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match config.log.format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// What the configuration describes, built once each and handed to whoever needs it.
/// Building it is where a configuration that parses but cannot work (a catalog naming an
/// unconfigured backend, an unreadable certificate) is refused, before a port is bound.
pub struct Prepared {
    pub catalog: LocalCatalog,
    pub links: sso::DashboardLinks,
    pub upstreams: Vec<upstreams::Upstream>,
    pub uaa: Option<sso::Uaa>,
    pub platforms: Arc<Platforms>,
    pub tls: Option<ServerConfig>,
}

pub fn prepare(config: &Config) -> anyhow::Result<Prepared> {
    let links = sso::DashboardLinks::new(&config.broker.external_url)
        .map_err(|e| anyhow::anyhow!("broker.external_url: {e}"))?;
    let catalog = LocalCatalog::build(&config.catalog.services, &config.backends, &links)?;
    let upstreams = config
        .upstreams
        .iter()
        .enumerate()
        .map(|(i, u)| {
            upstreams::Upstream::new(u.clone()).map_err(|e| anyhow::anyhow!("upstreams[{i}]: {e}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let s = &config.sso;
    let uaa = match (&s.authorization_endpoint, &s.token_endpoint) {
        (Some(a), Some(t)) => Some(
            sso::Uaa::new(a, t)
                .map_err(|e| anyhow::anyhow!("sso.authorization_endpoint/token_endpoint: {e}"))?,
        ),
        _ => None,
    };
    let platforms = Arc::new(Platforms::new(s)?);
    let tls = config
        .listen
        .tls
        .as_ref()
        .map(crate::http::tls::server_config)
        .transpose()?;
    Ok(Prepared {
        catalog,
        links,
        upstreams,
        uaa,
        platforms,
        tls,
    })
}

/// The broker and its routes. Opens the store; reaches no backend.
pub async fn build(config: &Config, prepared: Prepared) -> anyhow::Result<(Broker, App)> {
    let Prepared {
        catalog,
        links,
        upstreams,
        uaa,
        platforms,
        tls: _,
    } = prepared;
    let store = store::open(&config.store).await?;
    let mut backends = backend::from_config(config)?;
    let logs = config.backends.logs.as_ref().map(|c| {
        let logs = crate::logs::Logs::new(store.clone(), c.max_pending_lines);
        let backend = crate::backend::logs::LogsBackend::new(
            logs.clone(),
            store.clone(),
            &config.broker.external_url,
        );
        backends.insert(crate::config::BackendKind::Logs, Arc::new(backend) as _);
        logs
    });
    let metrics = crate::metrics::Metrics::new();
    let federation = federation(config, upstreams, &catalog, store.clone(), metrics.clone()).await;
    let timing = Timing {
        operation_timeout: Duration::from_secs(config.broker.operation_timeout_secs),
        retry_after_secs: config.broker.retry_after_secs,
    };
    let broker = Broker::new(
        store,
        catalog,
        backends,
        links.clone(),
        timing,
        federation,
        metrics,
    )
    .with_logs(logs);
    let s = &config.sso;
    let settings = sso::SsoSettings {
        uaa,
        session_secret: s.session_secret.expose().to_string(),
        session_lifetime: Duration::from_secs(s.session_lifetime_secs),
        secure_cookies: links.is_https(),
        timeout: Duration::from_secs(s.timeout_secs),
    };
    let dashboard = Arc::new(Dashboard::new(
        broker.clone(),
        Arc::new(sso::Sso::new(settings)?),
        links,
        platforms.clone(),
    ));
    let state = AppState::new(
        broker.clone(),
        &config.auth.credentials,
        &config.metrics.credentials,
        http::Limits {
            max_body_bytes: config.broker.max_body_bytes,
            body_timeout: Duration::from_secs(config.listen.body_timeout_secs),
            ready_interval: Duration::from_secs(config.broker.ready_interval_secs),
        },
        Some(dashboard),
        platforms,
    );
    Ok((broker, http::router(state)))
}

/// The upstreams, with the catalog snapshot built from their stored last good copies.
pub async fn federation(
    config: &Config,
    upstreams: Vec<upstreams::Upstream>,
    catalog: &LocalCatalog,
    store: Arc<dyn store::StateStore>,
    metrics: Arc<crate::metrics::Metrics>,
) -> Arc<Federation> {
    let federation = Federation::new(
        upstreams,
        catalog.published().clone(),
        store,
        Duration::from_secs(config.federation.refresh_secs),
        Duration::from_secs(config.federation.catalog_ttl_secs),
        metrics,
    );
    federation.rebuild().await;
    Arc::new(federation)
}

/// Serves until `shutdown` resolves, then lets background operations record their end.
pub async fn serve(
    config: &Config,
    prepared: Prepared,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let tls = prepared.tls.clone();
    let (broker, app) = build(config, prepared).await?;
    for key in config.default_secrets() {
        tracing::warn!(%key, "this secret is the one shipped with Brokerage, which anybody can read: set your own before registering this broker");
    }
    tracing::info!(
        address = %listener.local_addr()?,
        store = %broker.store().describe(),
        services = broker.catalog().services().len(),
        "brokerage serving"
    );
    let refresher = tokio::spawn(broker.federation().clone().refresh_forever());
    let enforcer = tokio::spawn(
        crate::quota::QuotaEnforcer::new(
            broker.clone(),
            Duration::from_secs(config.broker.quota_interval_secs),
        )
        .run_forever(),
    );
    let stop_logs = tokio_util::sync::CancellationToken::new();
    let mut log_tasks = Vec::new();
    if let (Some(logs), Some(c)) = (broker.logs(), &config.backends.logs) {
        let every = Duration::from_millis(c.flush_interval_ms.max(10));
        log_tasks.push(logs.spawn_flusher(every, stop_logs.clone()));
        if let Some(address) = &c.syslog_listen {
            let listener = TcpListener::bind(address)
                .await
                .map_err(|e| anyhow::anyhow!("backends.logs.syslog_listen {address}: {e}"))?;
            tracing::info!(address = %listener.local_addr()?, "syslog listener (octet counting)");
            log_tasks.push(tokio::spawn(crate::logs::syslog::serve(
                listener,
                logs.clone(),
                c.syslog_max_connections,
                stop_logs.clone(),
            )));
        }
    }
    let l = &config.listen;
    let server = http::serve::start(
        listener,
        app,
        tls,
        http::serve::Limits {
            header_timeout: Duration::from_secs(l.header_timeout_secs),
            idle_timeout: Duration::from_secs(l.idle_timeout_secs),
            max_connections: l.max_connections,
        },
    );
    shutdown.await;
    broker.announce_stop();
    if l.shutdown_delay_secs > 0 {
        tracing::info!(
            seconds = l.shutdown_delay_secs,
            "stopping: /ready answers 503 while requests are still served, so that load balancers move away"
        );
        tokio::time::sleep(Duration::from_secs(l.shutdown_delay_secs)).await;
    }
    // One deadline for everything still running: requests in flight, then background
    // operations (which record their own end).
    let grace = Duration::from_secs(l.shutdown_deadline_secs);
    let deadline = tokio::time::Instant::now() + grace;
    tracing::info!("shutting down: accepting nothing new, finishing requests in flight");
    let open = server.shutdown(grace).await;
    if open > 0 {
        tracing::warn!(
            open,
            "connections still busy at the shutdown deadline are cut"
        );
    }
    refresher.abort();
    enforcer.abort();
    tracing::info!("draining background operations");
    if tokio::time::timeout_at(deadline, broker.drain())
        .await
        .is_err()
    {
        tracing::warn!(
            "background operations still running at the shutdown deadline; they will read as interrupted"
        );
    }
    stop_logs.cancel();
    for task in log_tasks {
        let _ = tokio::time::timeout_at(deadline, task).await;
    }
    tracing::info!("stopped");
    Ok(())
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

/// One line of `brokerage check`: what was reached, and how it went.
pub struct Probe {
    pub what: String,
    pub result: Result<String, String>,
}

/// Reaches the store and every backend the configuration names.
pub async fn check(config: &Config, prepared: &Prepared) -> Vec<Probe> {
    let mut probes = Vec::new();
    match store::open(&config.store).await {
        Ok(store) => probes.push(Probe {
            what: "store".into(),
            result: store
                .check()
                .await
                .map(|()| store.describe())
                .map_err(|e| format!("{}: {e}", store.describe())),
        }),
        Err(e) => probes.push(Probe {
            what: "store".into(),
            result: Err(format!("{e:#}")),
        }),
    }
    match backend::from_config(config) {
        Ok(backends) => {
            let mut names: Vec<_> = backends.keys().copied().collect();
            names.sort_by_key(|kind| kind.name());
            for name in names {
                let backend = &backends[&name];
                probes.push(Probe {
                    what: format!("backends.{name}"),
                    result: backend
                        .check()
                        .await
                        .map(|()| backend.describe())
                        .map_err(|e| e.to_string()),
                });
            }
        }
        Err(e) => probes.push(Probe {
            what: "backends".into(),
            result: Err(format!("{e:#}")),
        }),
    }
    for u in &prepared.upstreams {
        let settings = u.settings();
        let what = format!("upstreams.{}", settings.alias);
        let result = match u.catalog(&upstreams::client::default_api_version()).await {
            Err(e) => Err(e.to_string()),
            Ok(catalog) => {
                let names: Vec<String> = catalog
                    .catalog
                    .services
                    .iter()
                    .map(|s| s.name.clone())
                    .collect();
                Ok(format!(
                    "{} offers {} service(s): {}",
                    settings.url,
                    names.len(),
                    names.join(", ")
                ))
            }
        };
        probes.push(Probe { what, result });
    }
    probes
}
