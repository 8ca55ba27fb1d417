//! Starting and stopping a Sluice node: opens the spool, binds the HTTP listener, runs recovery,
//! and shuts down in order (stop taking requests, finish in-flight ones, flush the spool).
//!
//! Used by the binary and by end-to-end tests, which start a node in-process on `127.0.0.1:0`.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, ConfigErrors};
use crate::node::Node;

/// How often expired idempotency records are purged.
const IDEMPOTENCY_SWEEP: Duration = Duration::from_secs(600);

/// A running node. Dropping it does not stop it; call [`Running::shutdown`].
pub struct Running {
    pub node: Arc<Node>,
    delivery: Arc<std::sync::Mutex<Option<Arc<crate::outbound::delivery::Delivery>>>>,
    pub http_addr: SocketAddr,
    /// Where the bounce listener listens, when `[bounce] listen` is set.
    pub bounce_addr: Option<SocketAddr>,
    /// Where the submission listeners listen (`[submission]`).
    pub submission: crate::intake::submission::Bound,
    stop: CancellationToken,
    tasks: TaskTracker,
}

/// A validated config and the files it names, each read once: what a node starts (or reloads)
/// with.
pub struct Settings {
    pub config: Arc<Config>,
    pub dkim: crate::outbound::dkim::DkimKeys,
    pub rules: crate::outbound::outcome::rules::Rules,
    pub shaping: crate::outbound::shaping::rules::ShapingRules,
    pub trust: crate::outbound::trust::Trust,
}

impl Settings {
    /// Reads and validates `path`, then loads the DKIM keys and bounce rules it names, reporting
    /// every problem as `file: key: reason`. Blocking.
    pub fn load(path: &Path) -> Result<Settings, ConfigErrors> {
        let config = Config::load(path)?;
        Settings::with_files(Arc::new(config), &path.display().to_string())
    }

    /// Loads the DKIM keys and bounce rules `config` names. Blocking.
    pub fn from_config(config: Arc<Config>) -> Result<Settings, ConfigErrors> {
        Settings::with_files(config, "config")
    }

    fn with_files(config: Arc<Config>, file: &str) -> Result<Settings, ConfigErrors> {
        let dkim = crate::outbound::dkim::DkimKeys::load(&config.dkim, file);
        let rules = crate::outbound::outcome::rules::Rules::load(config.bounce.rules.as_deref());
        let shaping = crate::outbound::shaping::rules::ShapingRules::load(
            config.delivery.shaping_rules.as_deref(),
        );
        let trust = crate::outbound::trust::Trust::load(&config, file);
        match (dkim, rules, shaping, trust) {
            (Ok(dkim), Ok(rules), Ok(shaping), Ok(trust)) => Ok(Settings {
                config,
                dkim,
                rules,
                shaping,
                trust,
            }),
            (dkim, rules, shaping, trust) => Err(ConfigErrors(
                [dkim.err(), rules.err(), shaping.err(), trust.err()]
                    .into_iter()
                    .flatten()
                    .flat_map(|e| e.0)
                    .collect(),
            )),
        }
    }
}

/// [`start_with`] a config whose files are loaded here (tests build configs in memory).
pub async fn start(config: Arc<Config>) -> anyhow::Result<Running> {
    let settings = tokio::task::spawn_blocking(move || Settings::from_config(config))
        .await?
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    start_with(settings).await
}

/// Opens the spool, binds the API and starts recovery in the background. The API answers at once;
/// `/readyz` turns 200 and `/v1` opens when recovery is done.
pub async fn start_with(settings: Settings) -> anyhow::Result<Running> {
    crate::metrics::init();
    let Settings {
        config,
        dkim,
        rules,
        shaping,
        trust,
    } = settings;
    let log = crate::effects::delivery_log::DeliveryLog::open(
        &config.log.delivery_log,
        crate::effects::delivery_log::Rotation::from_config(&config.log),
    )
    .with_context(|| {
        format!(
            "opening the delivery log {}",
            config.log.delivery_log.display()
        )
    })?;
    let cfg = Arc::clone(&config);
    let node =
        tokio::task::spawn_blocking(move || Node::open(cfg, dkim, rules, shaping, trust, log))
            .await?
            .with_context(|| format!("opening the spool at {}", config.spool.path.display()))?;
    node.join_cluster().await?;
    let listener = TcpListener::bind(config.http.listen)
        .await
        .with_context(|| format!("binding the HTTP API to {}", config.http.listen))?;
    let http_addr = listener.local_addr()?;
    let stop = CancellationToken::new();
    let tasks = TaskTracker::new();

    let engine = crate::outbound::delivery::EngineHandle::default();
    let app = crate::intake::api::router(Arc::clone(&node), engine.clone());
    let http_stop = stop.clone();
    match (&config.http.tls_cert, &config.http.tls_key) {
        (Some(cert), Some(key)) => {
            let (cert, key) = (cert.clone(), key.clone());
            let acceptor = tokio::task::spawn_blocking(move || {
                crate::tls::acceptor(&cert, &key, &[b"http/1.1"])
            })
            .await?
            .map_err(|e| anyhow::anyhow!("http.tls_cert: {e}"))?;
            tasks.spawn(serve_tls(listener, app, acceptor, http_stop));
        }
        _ => {
            tasks.spawn(async move {
                let serve =
                    axum::serve(listener, app).with_graceful_shutdown(http_stop.cancelled_owned());
                if let Err(e) = serve.await {
                    tracing::error!(error = %e, "HTTP server failed");
                }
            });
        }
    }

    let bounce_addr = match config.bounce.listen {
        None => None,
        Some(addr) => Some(
            crate::feedback::listener::serve(Arc::clone(&node), addr, stop.clone(), tasks.clone())
                .await
                .with_context(|| format!("binding the bounce listener to {addr}"))?,
        ),
    };

    tasks.spawn(crate::intake::raw::send_dsns(
        Arc::clone(&node),
        stop.clone(),
    ));
    tasks.spawn(crate::intake::raw::send_report_mail(
        Arc::clone(&node),
        stop.clone(),
    ));
    let submission =
        crate::intake::submission::serve(Arc::clone(&node), stop.clone(), tasks.clone())
            .await
            .context("binding the submission listener")?;

    let rec_node = Arc::clone(&node);
    let rec_stop = stop.clone();
    let delivery: Arc<std::sync::Mutex<Option<Arc<crate::outbound::delivery::Delivery>>>> =
        Arc::default();
    let rec_delivery = Arc::clone(&delivery);
    let rec_tasks = tasks.clone();
    tasks.spawn(async move {
        let recovering = Arc::clone(&rec_node);
        match tokio::task::spawn_blocking(move || recovering.recover()).await {
            Ok(Ok(r)) => {
                rec_node
                    .webhooks
                    .start(&rec_node.spool, rec_stop.clone(), &rec_tasks)
                    .await;
                // Checked and stored under the slot's lock, which shutdown takes after it starts
                // draining: delivery either starts before shutdown looks, or not at all.
                let started = {
                    let mut slot = rec_delivery.lock().expect("delivery slot");
                    if rec_node.config.delivery.enabled && !rec_node.is_draining() {
                        crate::outbound::delivery::Delivery::start(Arc::clone(&rec_node)).map(|d| {
                            engine.set(&d);
                            *slot = Some(d);
                        })
                    } else {
                        Ok(())
                    }
                };
                if let Err(e) = started {
                    tracing::error!(error = %e, "starting delivery failed");
                    rec_stop.cancel();
                    return;
                }
                crate::metrics::QUEUED_JOBS.set(r.queued as i64);
                tracing::info!(
                    campaigns = r.campaigns,
                    queued = r.queued,
                    rolled_back = r.rolled_back,
                    seconds = format!("{:.3}", r.seconds),
                    "recovery done; ready"
                );
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "recovery failed; the node stays unready");
                rec_stop.cancel();
            }
            Err(e) => {
                tracing::error!(error = %e, "recovery panicked; the node stays unready");
                rec_stop.cancel();
            }
        }
    });

    let sweep_node = Arc::clone(&node);
    let sweep_stop = stop.clone();
    tasks.spawn(async move {
        let mut tick = tokio::time::interval(IDEMPOTENCY_SWEEP);
        loop {
            tokio::select! {
                _ = sweep_stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            match crate::intake::api::expire_idempotency(Arc::clone(&sweep_node)).await {
                Ok(0) => {}
                Ok(n) => tracing::debug!(expired = n, "idempotency records expired"),
                Err(e) => tracing::warn!(error = %e, "expiring idempotency records failed"),
            }
        }
    });

    tasks.spawn(crate::store::retention::run(
        Arc::clone(&node),
        stop.clone(),
    ));
    tasks.spawn(crate::effects::breakers::run(
        Arc::clone(&node),
        stop.clone(),
    ));

    // Keys' `last_used` (at most once a minute each, and all at shutdown) and old usage
    // counters.
    let tenants_node = Arc::clone(&node);
    let tenants_stop = stop.clone();
    tasks.spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        loop {
            let stopping = tokio::select! {
                _ = tenants_stop.cancelled() => true,
                _ = tick.tick() => false,
            };
            if tenants_node.is_recovered()
                && let Err(e) = tenants_node
                    .tenants
                    .flush(&tenants_node.spool, stopping)
                    .await
            {
                tracing::warn!(error = %e, "writing API keys' last use failed");
            }
            if stopping {
                break;
            }
        }
    });

    let gauge_node = Arc::clone(&node);
    let gauge_stop = stop.clone();
    tasks.spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = gauge_stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            let len = gauge_node.scheduler.len();
            crate::metrics::QUEUED_JOBS.set(len as i64);
        }
    });
    if let Some(cluster) = node.cluster() {
        let report_node = Arc::clone(&node);
        let http = http_addr.to_string();
        let limits = crate::cluster::nodes::limit_fingerprints(&config);
        // Delivered per second since the last heartbeat.
        let last = std::sync::Mutex::new((0u64, std::time::Instant::now()));
        let report = move || {
            let delivered = report_node
                .delivered
                .load(std::sync::atomic::Ordering::Relaxed);
            let mut last = last.lock().expect("heartbeat rate");
            let secs = last.1.elapsed().as_secs_f64().max(1e-3);
            let rate = delivered.saturating_sub(last.0) as f64 / secs;
            *last = (delivered, std::time::Instant::now());
            crate::cluster::nodes::Report {
                queued: report_node.scheduler.len() as u64,
                rate: (rate * 10.0).round() / 10.0,
                http: http.clone(),
                limits: limits.clone(),
                ..Default::default()
            }
        };
        tasks.spawn(Arc::clone(cluster).run(report, stop.clone()));
        tasks.spawn(crate::replication::run(
            Arc::clone(&node),
            Arc::clone(cluster),
            stop.clone(),
        ));
    }
    tasks.close();
    tracing::info!(%http_addr, "HTTP API listening");
    if let Some(addr) = bounce_addr {
        tracing::info!(%addr, "bounce listener listening");
    }
    if let Some(addr) = submission.starttls {
        tracing::info!(%addr, "submission listener listening (STARTTLS)");
    }
    if let Some(addr) = submission.tls {
        tracing::info!(%addr, "submission listener listening (TLS)");
    }
    Ok(Running {
        node,
        delivery,
        http_addr,
        bounce_addr,
        submission,
        stop,
        tasks,
    })
}

/// Serves the API over TLS until `stop`, then lets open requests finish.
async fn serve_tls(
    listener: TcpListener,
    app: axum::Router,
    acceptor: tokio_rustls::TlsAcceptor,
    stop: CancellationToken,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let tcp = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => match r {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accepting an HTTPS connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let (acceptor, app, watcher) = (acceptor.clone(), app.clone(), graceful.watcher());
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
            {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "TLS handshake on the API failed");
                    return;
                }
                Err(_) => return,
            };
            let service = hyper_util::service::TowerToHyperService::new(app);
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(tls), service);
            if let Err(e) = watcher.watch(conn).await {
                tracing::debug!(error = %e, "HTTPS connection ended with an error");
            }
        });
    }
    graceful.shutdown().await;
}

/// A client that has not finished its TLS handshake by then is dropped.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

impl Running {
    /// The delivery engine, once recovery has started it (never with `delivery.enabled` off).
    pub fn delivery(&self) -> Option<Arc<crate::outbound::delivery::Delivery>> {
        self.delivery.lock().expect("delivery slot").clone()
    }

    /// Applies what can change without a restart from freshly loaded settings: the DKIM keys,
    /// the bounce rules and the shaping rules. Queued mail is signed at delivery, so it is signed with the new keys from
    /// now on. Other settings need a restart.
    pub fn apply(&self, settings: Settings) {
        self.node.assembler.replace_dkim(settings.dkim);
        self.node.replace_rules(settings.rules);
        self.node.replace_shaping_rules(settings.shaping);
    }

    /// [`Running::apply`] of `config` with its files loaded (on the blocking pool); if anything
    /// fails to load, nothing changes.
    pub async fn reload(&self, config: Arc<Config>) -> Result<(), ConfigErrors> {
        let settings = tokio::task::spawn_blocking(move || Settings::from_config(config))
            .await
            .map_err(|e| {
                ConfigErrors(vec![crate::config::ConfigError {
                    file: "config".into(),
                    key: "dkim".into(),
                    reason: format!("loading keys did not finish: {e}"),
                }])
            })??;
        self.apply(settings);
        Ok(())
    }

    /// Resolves when the node stops by itself (a fatal error such as failed recovery).
    pub async fn stopped(&self) {
        self.stop.cancelled().await;
    }

    /// Graceful stop: refuse new `/v1` requests (503), let in-flight ones finish, then flush and
    /// close the spool.
    pub async fn shutdown(self) {
        self.node.start_draining();
        let delivery = self.delivery.lock().expect("delivery slot").take();
        let started = std::time::Instant::now();
        if let Some(d) = delivery {
            d.shutdown().await;
            tracing::info!(
                seconds = format!("{:.3}", started.elapsed().as_secs_f64()),
                "delivery stopped; outcomes written"
            );
        }
        self.stop.cancel();
        self.tasks.wait().await;
        tracing::info!(
            seconds = format!("{:.3}", started.elapsed().as_secs_f64()),
            "API, listener and webhooks stopped"
        );
        let log = self.node.log.clone();
        let _ = tokio::task::spawn_blocking(move || log.flush()).await;
        if let Err(e) = self.node.spool.close().await {
            tracing::error!(error = %e, "closing the spool failed");
        }
        tracing::info!("stopped");
    }
}
