//! `outpostctl publish` and `outpostctl serve-blobs`: the publisher's side of the MQTT path.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, bail};
use outpost_updater::mqtt::blobserver::{self, BlobServerConfig, ServerStats};
use outpost_updater::mqtt::publish::{offer_from_dir, publish_desired};
use outpost_updater::mqtt::{BrokerConfig, DEFAULT_PREFIX, Topics};

/// How to reach the broker (shared by the MQTT subcommands).
#[derive(clap::Args, Clone)]
pub struct BrokerArgs {
    /// The broker, `host:port`.
    #[arg(long, default_value = "127.0.0.1:1883")]
    pub broker: String,
    #[arg(long, env = "OUTPOST_MQTT_USERNAME")]
    pub username: Option<String>,
    /// A file holding the password (first line).
    #[arg(long)]
    pub password_file: Option<PathBuf>,
    /// Connect with TLS, trusting only this CA (PEM).
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// Topic prefix (the fleet follows it).
    #[arg(long, default_value = DEFAULT_PREFIX)]
    pub topic_prefix: String,
}

impl BrokerArgs {
    pub fn config(&self, client_id: &str) -> anyhow::Result<BrokerConfig> {
        let mut b = BrokerConfig::new(&self.broker, client_id, self.ca_file.clone()).map_err(anyhow::Error::msg)?;
        b.username = self.username.clone();
        if let Some(p) = &self.password_file {
            let text = std::fs::read_to_string(p).with_context(|| format!("{}", p.display()))?;
            b.password = Some(text.lines().next().unwrap_or_default().to_owned());
        }
        Ok(b)
    }
}

#[derive(clap::Args)]
pub struct PublishArgs {
    /// A signed release directory (its release.json and root/*.json are published).
    pub release_dir: PathBuf,
    /// Comma-separated device ids.
    #[arg(long, value_delimiter = ',', required = true)]
    pub devices: Vec<String>,
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// Seconds to wait for the broker's acknowledgements.
    #[arg(long, default_value_t = 30)]
    pub timeout: u64,
    /// Offer it as a candidate: devices stage it and run its models as shadows of the serving
    /// ones; publishing the same release without this flag promotes it.
    #[arg(long)]
    pub candidate: bool,
}

pub fn publish(a: PublishArgs) -> anyhow::Result<()> {
    let (mut offer, doc) = offer_from_dir(&a.release_dir).map_err(anyhow::Error::msg)?;
    offer.candidate = a.candidate;
    let topics = Topics::new(&a.broker.topic_prefix, &doc.fleet);
    let client_id = format!("outpostctl-publish-{}", std::process::id());
    let broker = a.broker.config(&client_id)?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let acked = rt
        .block_on(publish_desired(&broker, &topics, &a.devices, offer.to_bytes(), Duration::from_secs(a.timeout)))
        .map_err(anyhow::Error::msg)?;
    println!(
        "release {}{} ({}/{}, id {}) published to {acked} device(s)",
        doc.number,
        if a.candidate { " as a candidate" } else { "" },
        doc.fleet,
        doc.group,
        outpost_updater::short(&offer.release_id())
    );
    Ok(())
}

#[derive(clap::Args)]
pub struct ServeBlobsArgs {
    /// Directories holding blobs and deltas by hash (release directories work as they are).
    #[arg(required = true)]
    pub dirs: Vec<PathBuf>,
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// Fleets to serve (comma-separated; one shared subscription each).
    #[arg(long, value_delimiter = ',', required = true)]
    pub fleet: Vec<String>,
    /// The shared-subscription group: servers in the same group share the requests.
    #[arg(long, default_value = "outpost-blobs")]
    pub share_group: String,
    /// The MQTT client id (unique per instance).
    #[arg(long)]
    pub client_id: Option<String>,
}

pub fn serve_blobs(a: ServeBlobsArgs) -> anyhow::Result<()> {
    crate::init_logging();
    for d in &a.dirs {
        if !d.is_dir() {
            bail!("{} is not a directory", d.display());
        }
    }
    if let Some(bad) = a.fleet.iter().find(|f| !outpost_updater::mqtt::valid_id(f)) {
        bail!("--fleet `{bad}`: letters, digits, - _ . only");
    }
    if !outpost_updater::mqtt::valid_id(&a.share_group) {
        bail!("--share-group: letters, digits, - _ . only");
    }
    let client_id = a.client_id.clone().unwrap_or_else(|| format!("outpostctl-blobs-{}", std::process::id()));
    let cfg = BlobServerConfig {
        broker: a.broker.config(&client_id)?,
        prefix: a.broker.topic_prefix.clone(),
        fleets: a.fleet.clone(),
        share_group: a.share_group.clone(),
        dirs: a.dirs.clone(),
    };
    let stats = Arc::new(ServerStats::default());
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async {
        let s = stats.clone();
        tokio::spawn(async move {
            let mut last = 0;
            loop {
                tokio::time::sleep(Duration::from_secs(10)).await;
                let served = s.served.load(Ordering::Relaxed);
                if served != last {
                    last = served;
                    eprintln!(
                        "outpostctl serve-blobs: {served} chunks, {} bytes served; {} requests refused",
                        s.bytes.load(Ordering::Relaxed),
                        s.refused.load(Ordering::Relaxed)
                    );
                }
            }
        });
        tokio::select! {
            r = blobserver::serve(cfg, stats.clone()) => r.map_err(anyhow::Error::msg),
            _ = tokio::signal::ctrl_c() => Ok(()),
            _ = sigterm() => Ok(()),
        }
    })?;
    eprintln!(
        "outpostctl serve-blobs: stopping; {} chunks, {} bytes served; {} requests refused; {} replies dropped",
        stats.served.load(Ordering::Relaxed),
        stats.bytes.load(Ordering::Relaxed),
        stats.refused.load(Ordering::Relaxed),
        stats.dropped.load(Ordering::Relaxed)
    );
    Ok(())
}

pub async fn sigterm() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut s) => {
            s.recv().await;
        }
        Err(_) => std::future::pending().await,
    }
}
