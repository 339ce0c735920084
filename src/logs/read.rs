//! `brokerage logs INSTANCE_ID [--follow]`: an instance's kept lines, read from the state
//! store, or, when the running broker holds the store (the embedded file), from that
//! broker's `/logs/instances/{id}` with its own credentials.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use serde::Deserialize;

use super::{Line, Logs};
use crate::config::Config;

/// Where the lines are read from.
pub enum Source {
    Store(Arc<Logs>),
    Broker {
        client: reqwest::Client,
        url: String,
        user: String,
        password: String,
    },
}

#[derive(Deserialize)]
struct Page {
    lines: Vec<Line>,
    #[serde(default)]
    dropped: BTreeMap<String, u64>,
}

impl Source {
    /// The store when it opens; otherwise the broker at `broker` (default: the configured
    /// listen address).
    pub async fn open(config: &Config, broker: Option<&str>) -> anyhow::Result<Source> {
        if broker.is_none() {
            if let Ok(store) = crate::store::open(&config.store).await {
                return Ok(Source::Store(Logs::new(store, 0)));
            }
        }
        let url = match broker {
            Some(url) => url.trim_end_matches('/').to_string(),
            None => {
                let host = match config.listen.host.as_str() {
                    "0.0.0.0" | "::" => "127.0.0.1",
                    host => host,
                };
                let scheme = if config.listen.tls.is_some() {
                    "https"
                } else {
                    "http"
                };
                format!("{scheme}://{host}:{}", config.listen.port)
            }
        };
        let credential = config
            .auth
            .credentials
            .first()
            .context("auth.credentials: none configured")?;
        Ok(Source::Broker {
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()?,
            url,
            user: credential.username.clone(),
            password: credential.password.expose().to_string(),
        })
    }

    async fn after(&self, instance_id: &str, seq: u64) -> anyhow::Result<Page> {
        match self {
            Source::Store(logs) => {
                let book = logs
                    .book(instance_id)
                    .await?
                    .with_context(|| format!("instance {instance_id} keeps no logs"))?;
                Ok(Page {
                    lines: book.lines.into_iter().filter(|l| l.seq > seq).collect(),
                    dropped: book.dropped,
                })
            }
            Source::Broker {
                client,
                url,
                user,
                password,
            } => {
                let response = client
                    .get(format!("{url}/logs/instances/{instance_id}?after={seq}"))
                    .basic_auth(user, Some(password))
                    .send()
                    .await
                    .with_context(|| format!("the broker at {url} does not answer"))?;
                let status = response.status();
                let body = upstreams::bounded::read(response, 64 << 20).await?;
                if !status.is_success() {
                    let text = String::from_utf8_lossy(&body);
                    anyhow::bail!("the broker answered {status}: {text}");
                }
                Ok(serde_json::from_slice(&body).context("the broker's answer")?)
            }
        }
    }
}

/// One line as printed: time, app, process, text.
pub fn format(line: &Line) -> String {
    let app = if line.host.is_empty() {
        line.app.clone()
    } else {
        format!("{} ({})", line.host, line.app)
    };
    format!("{} {app} [{}] {}", line.at, line.process, line.text)
}

/// Prints the kept lines; with `follow`, keeps printing new ones every second.
pub async fn print(source: &Source, instance_id: &str, follow: bool) -> anyhow::Result<()> {
    let mut seq = 0;
    let mut out = std::io::stdout();
    loop {
        let page = source.after(instance_id, seq).await?;
        for line in &page.lines {
            writeln!(out, "{}", format(line))?;
            seq = seq.max(line.seq);
        }
        out.flush()?;
        if !follow {
            for (app, n) in &page.dropped {
                eprintln!("{n} older lines of {app} were dropped to stay within the plan");
            }
            return Ok(());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
