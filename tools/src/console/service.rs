//! The console process: its arguments, the HTTP server, the state subscriptions feeding
//! SQLite, and the loop that steps rollouts and sends their offers.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use outpost_updater::mqtt::blobserver::{self, BlobServerConfig, ServerStats};
use outpost_updater::mqtt::{Backoff, Topics, check_suback, valid_id};
use outpost_updater::offer::Offer;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event};
use tokio::sync::mpsc;

use super::db::{self, Connection, Database};
use super::state::{Console, LEASE_ELSEWHERE, LEASE_HELD};
use super::{api, catalog, ingest, lease, objects, rollout};
use crate::broker::BrokerArgs;

#[derive(clap::Args)]
pub struct ConsoleArgs {
    /// Where the console keeps its token and its copy of the uploaded objects (and, by default,
    /// its database: DATA/console.db).
    #[arg(long, default_value = "console-data")]
    pub data: PathBuf,
    /// The database: `sqlite:PATH` (default: sqlite:DATA/console.db), or `postgres://USER@HOST/NAME`
    /// for a database several console instances share (docs/scale.md). From the environment, a
    /// URL with a password stays off the command line.
    #[arg(long, env = "OUTPOST_CONSOLE_DATABASE")]
    pub database: Option<Database>,
    /// The HTTP address of the API and the web page (loopback by default).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// A file holding the access token (first line). Without it, the console makes one in
    /// DATA/token (mode 0600) on first start and keeps it.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Each fleet's first root document (the fleet comes from the document): uploads are
    /// verified against it, and the fleet's device states are followed.
    #[arg(long = "root", required = true)]
    pub roots: Vec<PathBuf>,
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// MQTT client id prefix (unique per console instance).
    #[arg(long, default_value = "outpost-console")]
    pub client_id: String,
    /// The blob servers' shared-subscription group (consoles in one group share requests).
    #[arg(long, default_value = "outpost-blobs")]
    pub share_group: String,
    /// Milliseconds between rollout steps.
    #[arg(long, default_value_t = 500)]
    pub tick_ms: u64,
    /// Seconds between samples of the fleet's drift scores (the page's drift over time).
    #[arg(long, default_value_t = 60.0)]
    pub drift_sample_secs: f64,
    /// Seconds the rollout lease lasts without renewal: with several consoles on one database,
    /// how long after its holder dies another takes over stepping rollouts.
    #[arg(long, default_value_t = 10.0)]
    pub lease_secs: f64,
}

pub fn run(a: ConsoleArgs) -> anyhow::Result<()> {
    crate::init_logging();
    let roots = catalog::Roots::load(&a.roots)?;
    if let Some(bad) = roots.fleets().find(|f| !valid_id(f)) {
        anyhow::bail!("fleet `{bad}`: letters, digits, - _ . only");
    }
    if !valid_id(&a.client_id) || !valid_id(&a.share_group) {
        anyhow::bail!("--client-id and --share-group: letters, digits, - _ . only");
    }
    let objects = a.data.join("objects");
    std::fs::create_dir_all(&objects).with_context(|| format!("creating {}", objects.display()))?;
    let token = token(&a)?;
    let database = a.database.clone().unwrap_or_else(|| Database::Sqlite(a.data.join("console.db")));
    let conn = db::open(&database).with_context(|| format!("opening the console database {database}"))?;
    let fleets: Vec<String> = roots.fleets().map(str::to_owned).collect();
    let console = Arc::new(Console {
        db: Mutex::new(conn),
        objects: objects.clone(),
        roots,
        token,
        blob_stats: Arc::new(ServerStats::default()),
        bad_states: Default::default(),
        states_ready: Default::default(),
        holder: a.client_id.clone(),
        lease: Default::default(),
    });
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async move {
        let listener =
            tokio::net::TcpListener::bind(a.listen).await.with_context(|| format!("listening on {}", a.listen))?;
        let mut broker = a.broker.config(&format!("{}-states", a.client_id))?;
        broker.max_packet = ingest::MAX_STATE_BYTES as u32 + 1024;
        let (client, eventloop) = AsyncClient::new(broker.options().map_err(anyhow::Error::msg)?, 8192);
        let (states_tx, states_rx) = mpsc::channel(8192);
        let prefix = a.broker.topic_prefix.clone();
        tokio::spawn(follow_states(
            console.clone(),
            eventloop,
            client.clone(),
            prefix.clone(),
            fleets.clone(),
            states_tx,
        ));
        tokio::spawn(record_states(console.clone(), prefix.clone(), states_rx));
        let every = Duration::from_millis(a.tick_ms.max(50));
        let sample_ms = (a.drift_sample_secs.clamp(0.1, 86_400.0) * 1000.0) as i64;
        let lease_ms = (a.lease_secs.clamp(1.0, 3600.0) * 1000.0) as i64;
        let steps = Steps { every, sample_ms, lease_ms, fleets: fleets.clone() };
        tokio::spawn(drive_rollouts(console.clone(), client, prefix.clone(), steps));
        tokio::spawn(sync_objects(console.clone()));
        let blobs = BlobServerConfig {
            broker: a.broker.config(&format!("{}-blobs", a.client_id))?,
            prefix,
            fleets,
            share_group: a.share_group.clone(),
            dirs: vec![objects],
        };
        let stats = console.blob_stats.clone();
        tokio::spawn(async move {
            if let Err(e) = blobserver::serve(blobs, stats).await {
                tracing::error!(error = %e, "the blob server stopped");
            }
        });
        tracing::info!(listen = %a.listen, data = %a.data.display(), %database, "console ready");
        axum::serve(listener, api::router(console))
            .with_graceful_shutdown(async {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = crate::broker::sigterm() => {}
                }
            })
            .await?;
        Ok(())
    })
}

fn token(a: &ConsoleArgs) -> anyhow::Result<String> {
    let read = |p: &PathBuf| -> anyhow::Result<String> {
        let t = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
        let t = t.lines().next().unwrap_or_default().trim().to_owned();
        anyhow::ensure!(t.len() >= 16, "{}: the token must be at least 16 characters", p.display());
        Ok(t)
    };
    if let Some(p) = &a.token_file {
        return read(p);
    }
    let p = a.data.join("token");
    if p.exists() {
        return read(&p);
    }
    let mut raw = [0u8; 24];
    getrandom::fill(&mut raw).map_err(|e| anyhow::anyhow!("no randomness for the token: {e}"))?;
    let t: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&p)?;
    std::io::Write::write_all(&mut f, format!("{t}\n").as_bytes())?;
    eprintln!("outpostctl console: made an access token in {}", p.display());
    Ok(t)
}

/// Keeps the states connection: subscribes to every fleet's state topics at each connect
/// (the retained states arrive again) and passes messages on without waiting.
async fn follow_states(
    console: Arc<Console>,
    mut eventloop: rumqttc::v5::EventLoop,
    client: AsyncClient,
    prefix: String,
    fleets: Vec<String>,
    tx: mpsc::Sender<(String, bytes::Bytes)>,
) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff.reset();
                tracing::info!("console connected to the broker");
                subscribe_states(&client, &prefix, &fleets);
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                check_suback(&ack);
                console.states_ready.store(true, std::sync::atomic::Ordering::SeqCst);
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let topic = String::from_utf8_lossy(&p.topic).into_owned();
                // A full queue drops the message: the device reports again on change and
                // periodically, and the retained copy comes back at reconnect.
                if let Err(mpsc::error::TrySendError::Closed(_)) = tx.try_send((topic, p.payload)) {
                    return;
                }
            }
            Ok(_) => {}
            Err(e) => {
                let wait = backoff.next_delay();
                tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "console lost the broker");
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// Subscribes to every fleet's device states; the broker sends the retained ones (again, for a
/// subscription it already has).
fn subscribe_states(client: &AsyncClient, prefix: &str, fleets: &[String]) {
    for f in fleets {
        let filter = format!("{prefix}/{f}/devices/+/state");
        if let Err(e) = client.try_subscribe(filter, QoS::AtLeastOnce) {
            tracing::warn!(error = %e, "subscribe not queued");
        }
    }
}

/// Writes states in batches, one transaction each (a thousand devices reporting at once is a
/// few transactions, not a thousand fsyncs).
async fn record_states(console: Arc<Console>, prefix: String, mut rx: mpsc::Receiver<(String, bytes::Bytes)>) {
    let mut batch = Vec::new();
    while rx.recv_many(&mut batch, 512).await > 0 {
        let mut items = std::mem::take(&mut batch);
        // The console holding the rollout lease records states; the others serve what it wrote.
        if console.lease.load(Ordering::SeqCst) == LEASE_ELSEWHERE {
            continue;
        }
        // In one order, so that consoles sharing a database lock the same rows in the same order.
        items.sort_by(|a, b| a.0.cmp(&b.0));
        let c = console.clone();
        let prefix = prefix.clone();
        let done = tokio::task::spawn_blocking(move || {
            let now = db::now_ms();
            let mut conn = c.db();
            let tx = match conn.transaction() {
                Ok(tx) => tx,
                Err(e) => return tracing::error!(error = %e, "cannot record states"),
            };
            for (topic, payload) in items {
                if payload.is_empty() {
                    continue;
                }
                let parsed = state_topic(&prefix, &topic)
                    .ok_or_else(|| format!("not a state topic: {topic}"))
                    .and_then(|(fleet, id)| ingest::parse(fleet, id, &payload));
                match parsed {
                    Ok(s) => {
                        if let Err(e) = ingest::record(&tx, &s, now) {
                            tracing::error!(error = %e, device = s.id, "state not recorded");
                        }
                    }
                    Err(e) => {
                        c.bad_states.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        tracing::warn!(topic, error = %e, "state ignored");
                    }
                }
            }
            if let Err(e) = tx.commit() {
                tracing::error!(error = %e, "states not committed");
            }
        })
        .await;
        if done.is_err() {
            tracing::error!("recording states panicked");
        }
    }
}

/// `{prefix}/{fleet}/devices/{id}/state` → (fleet, id).
fn state_topic<'a>(prefix: &str, topic: &'a str) -> Option<(&'a str, &'a str)> {
    let rest = topic.strip_prefix(prefix)?.strip_prefix('/')?;
    let mut parts = rest.split('/');
    let (fleet, devices, id, state) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    (devices == "devices" && state == "state" && parts.next().is_none() && valid_id(id)).then_some((fleet, id))
}

/// Publishes offers as retained `desired` messages: a release's signed offer (read once per
/// release and step) with the device's attempt. Queued without waiting; false when the client's
/// queue is full or the release is unreadable.
struct OfferSender {
    client: AsyncClient,
    prefix: String,
    offers: std::collections::HashMap<String, Option<Offer>>,
}

impl OfferSender {
    fn new(client: &AsyncClient, prefix: &str) -> OfferSender {
        OfferSender { client: client.clone(), prefix: prefix.to_owned(), offers: Default::default() }
    }

    fn send(
        &mut self,
        conn: &Connection,
        fleet: &str,
        device: &str,
        release: &str,
        attempt: u32,
        candidate: bool,
    ) -> bool {
        let offer = self.offers.entry(release.to_owned()).or_insert_with(|| {
            let bytes: Vec<u8> =
                conn.query_row("SELECT offer FROM releases WHERE id = ?1", [release], |r| r.get(0)).ok()?;
            Offer::parse(&bytes).ok()
        });
        let Some(offer) = offer else { return false };
        offer.attempt = attempt;
        offer.candidate = candidate;
        let topic = Topics::new(&self.prefix, fleet).desired(device);
        self.client.try_publish(topic, QoS::AtLeastOnce, true, offer.to_bytes()).is_ok()
    }
}

/// How the console steps rollouts.
struct Steps {
    every: Duration,
    sample_ms: i64,
    lease_ms: i64,
    fleets: Vec<String>,
}

/// Steps every live rollout on a timer while this console holds the rollout lease, and samples
/// the fleet's drift every `sample_ms`. Offers are queued to the MQTT client without waiting;
/// one that cannot be queued leaves its device pending for the next step.
async fn drive_rollouts(console: Arc<Console>, client: AsyncClient, prefix: String, steps: Steps) {
    // No step before the devices' retained states are in: a console that was down longer than
    // a deadline would otherwise time out devices that answered while it was away.
    while !console.states_ready.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut timer = tokio::time::interval(steps.every);
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut held = false;
    loop {
        timer.tick().await;
        let (c, mut sender) = (console.clone(), OfferSender::new(&client, &prefix));
        let (sample_ms, lease_ms) = (steps.sample_ms, steps.lease_ms);
        let done = tokio::task::spawn_blocking(move || {
            let now = db::now_ms();
            let mut conn = c.db();
            let tx = conn.transaction()?;
            if !lease::hold(&tx, &c.holder, now, lease_ms)? {
                return Ok(false);
            }
            if !held {
                // Taking the lease (at start, or from a console that died): offers recorded as
                // sent go out again, as one queued just before a kill may never have left.
                for o in rollout::store::outstanding(&tx)? {
                    sender.send(&tx, &o.fleet, &o.device, &o.release, o.attempt, o.candidate);
                }
            }
            rollout::store::tick(&tx, now, &mut |fleet, device, release, attempt, candidate| {
                sender.send(&tx, fleet, device, release, attempt, candidate)
            })?;
            super::history::sample(&tx, now, sample_ms)?;
            tx.commit()?;
            Ok::<_, db::Error>(true)
        })
        .await;
        let now_held = match done {
            Ok(Ok(h)) => h,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "rollout step failed");
                false
            }
            Err(_) => {
                tracing::error!("rollout step panicked");
                false
            }
        };
        if now_held != held {
            tracing::info!(
                holder = console.holder,
                "{}",
                if now_held { "this console steps rollouts" } else { "another console steps rollouts" }
            );
        }
        let before = console.lease.swap(if now_held { LEASE_HELD } else { LEASE_ELSEWHERE }, Ordering::SeqCst);
        if now_held && before == LEASE_ELSEWHERE {
            // The states this console let pass while another recorded them: the broker sends
            // the retained ones again.
            subscribe_states(&client, &prefix, &steps.fleets);
        }
        held = now_held;
    }
}

/// Keeps the objects folder in step with the database (another console may have taken an
/// upload), every second.
async fn sync_objects(console: Arc<Console>) {
    let mut timer = tokio::time::interval(Duration::from_secs(1));
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        timer.tick().await;
        let c = console.clone();
        match tokio::task::spawn_blocking(move || objects::sync(&c.db(), &c.objects)).await {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => tracing::info!(objects = n, "objects copied from the database"),
            Ok(Err(e)) => tracing::error!(error = %e, "objects not copied from the database"),
            Err(_) => tracing::error!("copying objects panicked"),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn state_topics_name_a_fleet_and_a_device() {
        assert_eq!(super::state_topic("outpost/v1", "outpost/v1/demo/devices/d-1/state"), Some(("demo", "d-1")));
        assert_eq!(super::state_topic("outpost/v1", "outpost/v1/demo/devices/d-1/desired"), None);
        assert_eq!(super::state_topic("outpost/v1", "outpost/v1/demo/devices/d-1/state/x"), None);
        assert_eq!(super::state_topic("outpost/v1", "other/demo/devices/d/state"), None);
    }
}
