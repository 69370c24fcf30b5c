//! The daemon's life: configuration, the release store, loading and readiness (sd_notify),
//! the MQTT agent, SIGHUP reloads, and draining on SIGTERM.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use outpost_runtime::{App, server};

use crate::EXIT_CONFIG;
use crate::serve_args::{ServeArgs, build_config};

pub fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let config = match build_config(&args).and_then(|c| c.validate()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("outpost: configuration error: {e}");
            return Ok(ExitCode::from(EXIT_CONFIG));
        }
    };
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(config.http_threads).enable_all().build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        let app = App::new(&config);
        if let Some(u) = &config.updates {
            let updates = outpost_runtime::releases::ReleaseService::open(u, &app.registry)
                .with_context(|| format!("cannot open the release store {}", u.state_dir.display()))?;
            let _ = app.updates.set(updates);
            app.release_pending.store(true, std::sync::atomic::Ordering::Release);
        }
        tracing::info!(
            listen = %config.listen,
            models = config.models.len(),
            http_threads = config.http_threads,
            "outpost listening; loading models"
        );
        let notifier = outpost_runtime::systemd::Notifier::from_env().map(Arc::new);
        let notify = |message: &str| {
            if let Some(n) = &notifier {
                n.send(message);
            }
        };
        notify(&format!("STATUS=loading {} models", config.models.len()));

        // The signal is awaited here, not inside the server: STOPPING=1 must go out before the
        // drain starts, whichever finishes first (an idle server drains at once).
        let signal = wait_for_signal();
        tokio::pin!(signal);
        let (drain, drain_now) = tokio::sync::oneshot::channel::<()>();
        let mut server = tokio::spawn(server::serve(listener, app.clone(), async move {
            let _ = drain_now.await;
        }));
        tokio::spawn(reload_on_sighup(app.clone()));

        let loader = app.clone();
        let mut loading = tokio::task::spawn_blocking(move || {
            let failures = loader.registry.load_all();
            // The active release's models replace configured ones of the same name once loaded;
            // one that does not load leaves the configured models serving.
            if let Some(updates) = loader.updates.get() {
                match updates.serve_active() {
                    Ok(Some(fell_back)) => tracing::error!(report = %fell_back, "release store"),
                    Ok(None) => {}
                    Err(e) => tracing::error!(error = %e, "the active release is not served"),
                }
                loader.release_pending.store(false, std::sync::atomic::Ordering::Release);
            }
            failures
        });
        tokio::select! {
            failures = &mut loading => {
                let failures = failures.context("model loading panicked")?;
                if let Some(first) = failures.first() {
                    bail!("{} of {} models failed to load; first: {first}", failures.len(), config.models.len());
                }
                tracing::info!(ready_ms = started.elapsed().as_millis() as u64, "all models ready");
                match crate::trim::release_executable_pages() {
                    Ok(bytes) => tracing::debug!(bytes, "load-time code given back to the kernel (MADV_PAGEOUT)"),
                    Err(e) => tracing::debug!(error = %e, "the kernel did not take the load-time code back"),
                }
                if let Some(u) = config.updates.as_ref().filter(|u| u.mqtt.is_some()) {
                    start_agent(&app, u)?;
                }
                let serving = app.registry.slots().len();
                notify(&format!("READY=1\nSTATUS=serving {serving} models on {}", config.listen));
                if let (Some(n), Some(interval)) = (&notifier, outpost_runtime::systemd::watchdog_interval()) {
                    let mut probe = config.listen;
                    if probe.ip().is_unspecified() {
                        probe.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
                    }
                    tokio::spawn(outpost_runtime::systemd::feed_watchdog(n.clone(), probe, interval));
                }
            }
            _ = &mut signal => {
                tracing::info!("signal received while loading models; stopping");
                return Ok(ExitCode::SUCCESS);
            }
        }
        tokio::select! {
            result = &mut server => {
                result??;
                return Ok(ExitCode::SUCCESS);
            }
            _ = &mut signal => {}
        }
        tracing::info!(
            timeout_s = config.drain_timeout.as_secs(),
            "stopping: no new connections, finishing in-flight requests"
        );
        notify("STOPPING=1\nSTATUS=draining in-flight requests");
        let _ = drain.send(());
        if let Some(agent) = app.agent.get() {
            agent.shutdown(Duration::from_secs(2)).await;
        }
        match tokio::time::timeout(config.drain_timeout, server).await {
            Ok(result) => {
                result??;
                tracing::info!("drained; exiting");
            }
            Err(_) => tracing::warn!("drain timeout passed with requests still in flight; exiting anyway"),
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// Starts the MQTT agent on the open release store.
fn start_agent(app: &Arc<App>, u: &outpost_runtime::config::UpdatesConfig) -> Result<()> {
    let m = u.mqtt.as_ref().expect("checked by the caller");
    let mut cfg =
        outpost_runtime::config::agent_config(u, m).map_err(|(k, r)| anyhow::anyhow!("updates.mqtt.{k}: {r}"))?;
    if let Some(path) = &m.password_file {
        let password = outpost_runtime::agent::read_password(path)
            .with_context(|| format!("updates.mqtt.password_file {}", path.display()))?;
        cfg.broker.password = Some(password);
    }
    let updates = app.updates.get().context("the release store is not open")?.clone();
    let device = outpost_runtime::agent::RuntimeDevice::new(updates, app.registry.clone(), m.labels.clone());
    tracing::info!(device = %cfg.device_id, broker = %format!("{}:{}", cfg.broker.host, cfg.broker.port), "starting the MQTT agent");
    let agent = outpost_updater::mqtt::agent::start(cfg, device).map_err(|e| anyhow::anyhow!("MQTT agent: {e}"))?;
    let _ = app.agent.set(agent);
    Ok(())
}

/// SIGHUP: bring every model in line with its files (new versions in, removed ones out, changed
/// files reloaded), keeping what serves when a load fails.
async fn reload_on_sighup(app: Arc<App>) {
    #[cfg(unix)]
    {
        let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
            tracing::warn!("cannot listen for SIGHUP; reload through the repository API instead");
            return;
        };
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading models");
            let app = app.clone();
            let failures = tokio::task::spawn_blocking(move || app.registry.load_all()).await.unwrap_or_default();
            for f in &failures {
                tracing::error!(error = %f, "reload failed; the previous version keeps serving");
            }
            tracing::info!(failures = failures.len(), "reload done");
        }
    }
    #[cfg(not(unix))]
    let _ = app;
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
