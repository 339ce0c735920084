//! The `brokerage` command: parse, load configuration, then hand over to the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use brokerage::config::Config;
use brokerage::startup;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    version,
    about = "A marketplace aggregator Open Service Broker for Cloud Foundry"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the OSB API.
    Serve {
        /// A YAML file laid over the built-in defaults.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Print the catalog this configuration serves, as JSON.
    Catalog {
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Print a log instance's kept lines (time, app, process, text).
    Logs {
        instance_id: String,
        #[arg(long)]
        config: Option<PathBuf>,
        /// Keep printing new lines as they arrive.
        #[arg(long)]
        follow: bool,
        /// Ask this running broker (its base URL) instead of opening the store.
        #[arg(long)]
        broker: Option<String>,
    },
    /// Validate the configuration and reach the store and every backend.
    Check {
        #[arg(long)]
        config: Option<PathBuf>,
        /// Also print the effective configuration, secrets masked.
        #[arg(long)]
        show_config: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("brokerage: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve { config } => {
            let config = Config::load(config.as_deref())?;
            let prepared = startup::prepare(&config)?;
            startup::init_tracing(&config);
            let address = format!("{}:{}", config.listen.host, config.listen.port);
            let listener = tokio::net::TcpListener::bind(&address)
                .await
                .with_context(|| format!("listen: cannot bind {address}"))?;
            startup::serve(&config, prepared, listener, startup::shutdown_signal()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Catalog { config } => {
            let config = Config::load(config.as_deref())?;
            let prepared = startup::prepare(&config)?;
            // The live broker may hold the store; last good copies matter only when an
            // upstream is down, so fall back to a store of our own.
            let store: std::sync::Arc<dyn brokerage::store::StateStore> =
                match brokerage::store::open(&config.store).await {
                    Ok(store) => store,
                    Err(_) => std::sync::Arc::new(brokerage::store::EmbeddedStore::in_memory()?),
                };
            let metrics = brokerage::metrics::Metrics::new();
            let federation = startup::federation(
                &config,
                prepared.upstreams,
                &prepared.catalog,
                store,
                metrics,
            )
            .await;
            federation.refresh().await;
            let snapshot = federation.snapshot();
            for problem in &snapshot.merged.problems {
                eprintln!("left out: {problem}");
            }
            println!(
                "{}",
                serde_json::to_string_pretty(&snapshot.merged.catalog)?
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Logs {
            instance_id,
            config,
            follow,
            broker,
        } => {
            let config = Config::load(config.as_deref())?;
            let source = brokerage::logs::read::Source::open(&config, broker.as_deref()).await?;
            brokerage::logs::read::print(&source, &instance_id, follow).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Check {
            config,
            show_config,
        } => {
            let config = Config::load(config.as_deref())?;
            let prepared = startup::prepare(&config)?;
            println!("ok    configuration");
            if show_config {
                print!("{}", config.to_masked_yaml());
            }
            let mut failed = false;
            for probe in startup::check(&config, &prepared).await {
                match probe.result {
                    Ok(detail) => println!("ok    {}: {detail}", probe.what),
                    Err(detail) => {
                        failed = true;
                        println!("FAIL  {}: {detail}", probe.what)
                    }
                }
            }
            Ok(if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
    }
}
