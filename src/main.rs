//! The `sluice` binary: `serve`, and `check-config` for operators.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use sluice::config::{Config, LogFormat};

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "High-throughput bulk outbound mail engine"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node: HTTP API, spool, delivery.
    Serve {
        #[arg(long, short, default_value = "config/sluice.toml")]
        config: PathBuf,
    },
    /// Validate a config file and print every problem with its file, key and reason.
    CheckConfig {
        #[arg(long, short, default_value = "config/sluice.toml")]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { config } => match Config::load(&config) {
            Ok(_) => {
                println!("{}: ok", config.display());
                ExitCode::SUCCESS
            }
            Err(errors) => {
                eprintln!("{errors}");
                ExitCode::from(2)
            }
        },
        Command::Serve { config: path } => {
            let config = match Config::load(&path) {
                Ok(c) => Arc::new(c),
                Err(errors) => {
                    eprintln!("{errors}");
                    return ExitCode::from(2);
                }
            };
            init_logging(&config);
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .thread_name("sluice")
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("starting the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(serve(config, path)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    eprintln!("sluice: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&config.log.level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match config.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

async fn serve(config: Arc<Config>, path: PathBuf) -> anyhow::Result<()> {
    if config.uses_example_key() {
        tracing::warn!(
            "the example API key {:?} is configured: replace it before exposing the API",
            sluice::config::EXAMPLE_API_KEY
        );
    }
    if config.uses_example_token_key() {
        tracing::warn!(
            "the example token key is configured: anyone can forge unsubscribe and bounce tokens; set secrets.token_keys or {}",
            sluice::config::TOKEN_KEYS_ENV
        );
    }
    let running = sluice::server::start(config).await?;
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {
                tracing::info!("SIGINT: shutting down");
                break;
            }
            _ = term.recv() => {
                tracing::info!("SIGTERM: shutting down");
                break;
            }
            _ = hup.recv() => {
                // Re-read the file: DKIM keys change in place; anything else waits for a restart.
                let loaded = {
                    let path = path.clone();
                    tokio::task::spawn_blocking(move || Config::load(&path)).await
                };
                match loaded {
                    Ok(Ok(c)) => match running.reload(Arc::new(c)).await {
                        Ok(()) => tracing::info!(config = %path.display(), "SIGHUP: DKIM keys reloaded"),
                        Err(e) => tracing::error!("SIGHUP: reload refused, old keys kept: {e}"),
                    },
                    Ok(Err(e)) => tracing::error!("SIGHUP: reload refused, old keys kept: {e}"),
                    Err(e) => tracing::error!("SIGHUP: reload failed: {e}"),
                }
            }
            _ = running.stopped() => {
                running.shutdown().await;
                anyhow::bail!("the node stopped after a fatal error");
            }
        }
    }
    running.shutdown().await;
    Ok(())
}
