//! The `sluice` binary: `serve`, `check-config`, and operator commands that use the HTTP API of
//! a running node (`domains`, `queue`, `suspend`, `resume`, `campaign`, `suppressions`, `send`,
//! `sources`, `shaping`), and `sink`, a capture SMTP server for development.

mod cli;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use sluice::config::{Config, LogFormat};
use sluice::server::Settings;

/// See `Cargo.toml` for why.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "High-throughput bulk outbound mail engine"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    api: cli::ApiArgs,
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
        /// Also check each sending domain's DNS (DKIM keys published, SPF authorising the
        /// sources, DMARC alignment, PTR, MTA-STS and TLS-RPT) through `dns.nameservers`: every
        /// `[[dkim]]` domain and each `--domain`. Exit 1 when a check fails.
        #[arg(long)]
        dns: bool,
        /// A From domain to check with `--dns` (repeatable).
        #[arg(long = "domain", requires = "dns")]
        domains: Vec<String>,
    },
    /// Destination sites (queue, connections, rate, state, last reply) and domains.
    Domains {
        /// Domains to list, most queued first.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Queue totals.
    Queue,
    /// Stop delivering to a recipient domain (queued mail waits) until resumed.
    Suspend { domain: String },
    /// Resume delivery to a suspended domain.
    Resume { domain: String },
    /// List, show, pause, resume or cancel campaigns.
    #[command(subcommand)]
    Campaign(cli::CampaignCommand),
    /// Look up a message or a campaign recipient by id: state and every attempt and report.
    #[command(subcommand)]
    Message(cli::MessageCommand),
    /// List, look up, add, remove, import or export suppressions.
    #[command(subcommand)]
    Suppressions(cli::SuppressionCommand),
    /// Create a campaign from a template file and send it to the rows of a CSV file.
    Send(cli::SendArgs),
    /// Shaping actions in force per (source, site): list, or lift one early.
    #[command(subcommand)]
    Shaping(cli::ShapingCommand),
    /// Egress sources: address, EHLO name, pools, actions in force, warm-up standing.
    Sources,
    /// Tenants and their API keys (operator keys only): list, add, key-add, key-revoke, keys;
    /// hash-key prints a key's hash for `api_key_hashes` without a node.
    #[command(subcommand)]
    Tenant(cli::TenantCommand),
    /// Print the OpenAPI 3.1 description of the HTTP API (the same as `GET /v1/openapi.json`).
    /// Needs no running node.
    Openapi,
    /// A capture SMTP server for development (`--list`: the latest captured messages with their
    /// DKIM result). Needs no running node.
    Sink(cli::SinkArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Openapi => {
            let doc = sluice::intake::api::openapi::description();
            println!(
                "{}",
                serde_json::to_string_pretty(doc).expect("JSON serialises")
            );
            ExitCode::SUCCESS
        }
        Command::CheckConfig {
            config,
            dns,
            domains,
        } => match Settings::load(&config) {
            Ok(settings) => {
                let file = config.display().to_string();
                for w in ptr_warnings(&settings.config, &file) {
                    eprintln!("{w}");
                }
                for w in settings.config.transport_warnings(&file) {
                    eprintln!("{w}");
                }
                println!("{}: ok", config.display());
                if dns {
                    return preflight(&settings, domains);
                }
                ExitCode::SUCCESS
            }
            Err(errors) => {
                eprintln!("{errors}");
                ExitCode::from(2)
            }
        },
        Command::Serve { config: path } => {
            let settings = match Settings::load(&path) {
                Ok(s) => s,
                Err(errors) => {
                    eprintln!("{errors}");
                    return ExitCode::from(2);
                }
            };
            init_logging(&settings.config);
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .thread_name("sluice")
                .on_thread_start(sluice::schedule_as_batch)
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("starting the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(serve(settings, path)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    eprintln!("sluice: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Sink(args) => {
            let Some(rt) = runtime(tokio::runtime::Builder::new_multi_thread()) else {
                return ExitCode::from(2);
            };
            match rt.block_on(cli::sink(args, cli.api.json)) {
                Ok(_) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("sluice: {e:#}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Tenant(cli::TenantCommand::HashKey) => match cli::hash_key() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("sluice: {e:#}");
                ExitCode::from(2)
            }
        },
        command => operate(&cli.api, command),
    }
}

/// A runtime from `builder` with I/O and timers, or `None` after saying why not.
fn runtime(mut builder: tokio::runtime::Builder) -> Option<tokio::runtime::Runtime> {
    match builder.enable_all().build() {
        Ok(rt) => Some(rt),
        Err(e) => {
            eprintln!("sluice: starting the runtime: {e}");
            None
        }
    }
}

/// Runs an operator command against the API: exit 0 when all went well, 1 when it finished
/// with rows refused or malformed (`send`), 2 when it failed.
fn operate(args: &cli::ApiArgs, command: Command) -> ExitCode {
    let Some(rt) = runtime(tokio::runtime::Builder::new_current_thread()) else {
        return ExitCode::from(2);
    };
    let result = rt.block_on(async {
        let api = cli::Api::new(args)?;
        match command {
            Command::Domains { limit } => cli::domains(&api, limit).await.map(|()| true),
            Command::Queue => cli::queue(&api).await.map(|()| true),
            Command::Suspend { domain } => {
                cli::set_domain(&api, &domain, true).await.map(|()| true)
            }
            Command::Resume { domain } => {
                cli::set_domain(&api, &domain, false).await.map(|()| true)
            }
            Command::Campaign(c) => cli::campaign(&api, c).await.map(|()| true),
            Command::Message(c) => cli::message(&api, c).await.map(|()| true),
            Command::Suppressions(c) => cli::suppressions(&api, c).await.map(|()| true),
            Command::Send(a) => cli::send(&api, a).await,
            Command::Shaping(c) => cli::shaping(&api, c).await.map(|()| true),
            Command::Sources => cli::sources(&api).await.map(|()| true),
            Command::Tenant(c) => cli::tenant(&api, c).await.map(|()| true),
            Command::Serve { .. }
            | Command::CheckConfig { .. }
            | Command::Sink(_)
            | Command::Openapi => Ok(true),
        }
    });
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("sluice: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// `check-config`'s warnings about the egress sources: an address whose PTR record does not
/// give the source's EHLO name, or whose EHLO name does not resolve back to it (providers
/// check both). Looked up through `dns.nameservers` (or the system's resolver); a lookup that
/// fails is a warning too.
fn ptr_warnings(config: &Config, file: &str) -> Vec<String> {
    let sources = config.egress_sources();
    if config.sources.is_empty() || sources.iter().all(|s| s.address.is_none()) {
        return Vec::new();
    }
    let Some(rt) = runtime(tokio::runtime::Builder::new_current_thread()) else {
        return vec![format!("{file}: source: warning: PTR not checked")];
    };
    rt.block_on(async {
        let dns = match sluice::outbound::dns::Dns::new(&config.dns.nameservers, config.dns.timeout)
        {
            Ok(d) => d,
            Err(e) => return vec![format!("{file}: source: warning: PTR not checked: {e}")],
        };
        let mut out = Vec::new();
        for (i, s) in sources
            .iter()
            .enumerate()
            .filter(|(_, s)| s.address.is_some())
        {
            let c = sluice::outbound::preflight::ptr_check(&dns, s).await;
            if c.verdict != sluice::outbound::preflight::Verdict::Pass {
                out.push(format!(
                    "{file}: source[{i}].ehlo_name: warning: {}",
                    c.message
                ));
            }
        }
        out
    })
}

/// `check-config --dns`: the authentication preflight of every `[[dkim]]` domain and `extra`,
/// one line per check; exit 1 when one fails.
fn preflight(settings: &Settings, extra: Vec<String>) -> ExitCode {
    use sluice::outbound::preflight::{Verdict, check_domain};
    let config = &settings.config;
    let mut domains: Vec<String> = config
        .dkim
        .iter()
        .map(|d| d.domain.to_ascii_lowercase())
        .chain(extra.iter().map(|d| d.to_ascii_lowercase()))
        .collect();
    domains.sort_unstable();
    domains.dedup();
    if domains.is_empty() {
        eprintln!("sluice: no domain to check: add [[dkim]] keys or give --domain");
        return ExitCode::from(2);
    }
    let Some(rt) = runtime(tokio::runtime::Builder::new_current_thread()) else {
        return ExitCode::from(2);
    };
    let failed = rt.block_on(async {
        let dns = match sluice::outbound::dns::Dns::new(&config.dns.nameservers, config.dns.timeout)
        {
            Ok(d) => d,
            Err(e) => {
                eprintln!("sluice: {e}");
                return true;
            }
        };
        let mut failed = false;
        for domain in &domains {
            let report = check_domain(config, &settings.dkim, &dns, domain).await;
            println!("{domain}: {:?}", report.verdict);
            for c in &report.checks {
                println!(
                    "  {:<5} {:<8} {}: {}",
                    format!("{:?}", c.verdict).to_ascii_lowercase(),
                    c.check,
                    c.subject,
                    c.message
                );
                if let Some(seen) = &c.seen {
                    println!("                 seen: {seen}");
                }
                if let Some(publish) = c.publish.as_ref().filter(|_| c.verdict != Verdict::Pass) {
                    println!("                 publish: {publish}");
                }
            }
            failed |= report.verdict == Verdict::Fail;
        }
        failed
    });
    if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
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

async fn serve(settings: Settings, path: PathBuf) -> anyhow::Result<()> {
    let config = Arc::clone(&settings.config);
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
    let shutdown_timeout = config.delivery.shutdown_timeout;
    let running = sluice::server::start_with(settings).await?;
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
                // Re-read the file: DKIM keys and the rules files change in place; anything else waits
                // for a restart.
                let loaded = {
                    let path = path.clone();
                    tokio::task::spawn_blocking(move || Settings::load(&path)).await
                };
                match loaded {
                    Ok(Ok(s)) => {
                        running.apply(s);
                        tracing::info!(config = %path.display(), "SIGHUP: DKIM keys, bounce rules and shaping rules reloaded");
                    }
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
    // Bounded: in-flight transactions get `delivery.shutdown_timeout`, the rest (HTTP requests,
    // webhook POSTs, the spool flush) 10 s more. Past that the process exits anyway: what was
    // acknowledged is on disk already.
    let limit = shutdown_timeout + Duration::from_secs(10);
    if tokio::time::timeout(limit, running.shutdown())
        .await
        .is_err()
    {
        tracing::error!("shutdown did not finish within {limit:?}; exiting");
    }
    Ok(())
}
