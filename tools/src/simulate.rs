//! `outpostctl simulate`: many lightweight devices in one process, each the real MQTT agent and
//! the real updater (its own store, signatures, deltas, chunk checks) over its own connection,
//! with a fake inference backend: staging a release checks the model files and can be told to
//! fail. For rollout tests and fleet-scale measurements against a real broker.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use outpost_updater::Refusal;
use outpost_updater::apply::{Applied, Updater};
use outpost_updater::envelope::Envelope;
use outpost_updater::host::{ModelHost, StageError, StageStep, StagedModel};
use outpost_updater::mqtt::agent::{AgentConfig, Device};
use outpost_updater::mqtt::report::{DeviceReport, ModelReport, Resources, StatsReport};
use outpost_updater::mqtt::{Topics, valid_id};
use outpost_updater::release::Target;
use outpost_updater::store::Store;

use crate::broker::BrokerArgs;

#[derive(clap::Args)]
pub struct SimulateArgs {
    /// How many devices.
    #[arg(long, default_value_t = 10)]
    pub devices: usize,
    /// Device ids are PREFIX-0001, PREFIX-0002, ...
    #[arg(long, default_value = "sim")]
    pub id_prefix: String,
    #[arg(long)]
    pub fleet: String,
    #[arg(long, default_value = "default")]
    pub group: String,
    /// The fleet's first root document, provisioned into every new device's store.
    #[arg(long)]
    pub root: PathBuf,
    /// Where the devices' stores live (one folder per device; kept across runs).
    #[arg(long)]
    pub state_dir: PathBuf,
    /// The devices' MQTT password, with `{id}` standing for the device id.
    #[arg(long, env = "OUTPOST_SIM_PASSWORD", default_value = "")]
    pub password: String,
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// Share of devices (0..1) whose health check fails (the release is refused).
    #[arg(long, default_value_t = 0.0)]
    pub fail_health: f64,
    /// Every device crashes when it applies a release: `panic` (in the update task) or `abort`
    /// (the whole process), as a backend on a hostile model, or the out-of-memory killer, would.
    #[arg(long, value_enum)]
    pub crash_on_apply: Option<Crash>,
    /// Share of devices that never connect (silent).
    #[arg(long, default_value_t = 0.0)]
    pub silent: f64,
    /// Share of devices that refuse every release before looking at it (reported as `policy`).
    #[arg(long, default_value_t = 0.0)]
    pub refuse: f64,
    /// Labels every device reports (key=value, repeatable).
    #[arg(long = "label")]
    pub labels: Vec<String>,
    /// Exit once every connected device runs this release number (prints the time it took).
    #[arg(long)]
    pub until_release: Option<u64>,
    /// Seconds between progress lines.
    #[arg(long, default_value_t = 5)]
    pub every: u64,
}

/// How a device told to crash while applying does it.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Crash {
    Panic,
    Abort,
}

/// The fake backend: a release stages when its model files are there (the updater has already
/// checked their hashes), unless this device is told to fail or crash.
struct FakeHost {
    fail: bool,
    crash: Option<Crash>,
    serving: Mutex<Vec<(String, String)>>,
    /// A candidate release's models, staged beside what serves.
    candidate: Mutex<Option<Vec<(String, String)>>>,
}

impl ModelHost for FakeHost {
    type Staged = Vec<(String, String)>;

    fn stage(&self, models: &[StagedModel]) -> Result<Self::Staged, StageError> {
        match self.crash {
            Some(Crash::Panic) => panic!("simulated crash while staging"),
            Some(Crash::Abort) => {
                eprintln!("simulated abort while staging");
                std::process::abort()
            }
            None => {}
        }
        if self.fail {
            let first = models.first().map_or("", |m| m.name.as_str());
            return Err(StageError::new(first, StageStep::Golden, "simulated health-check failure"));
        }
        for m in models {
            let len = std::fs::metadata(&m.model).map(|md| md.len()).unwrap_or(0);
            if len == 0 {
                return Err(StageError::new(&m.name, StageStep::Load, "no file"));
            }
        }
        Ok(models.iter().map(|m| (m.name.clone(), m.version.clone())).collect())
    }

    fn activate(&self, staged: Self::Staged) {
        *self.serving.lock().unwrap_or_else(|e| e.into_inner()) = staged;
    }

    fn shadow(&self, staged: Self::Staged) -> Result<(), StageError> {
        *self.candidate.lock().unwrap_or_else(|e| e.into_inner()) = Some(staged);
        Ok(())
    }

    fn take_shadow(&self) -> Option<Self::Staged> {
        self.candidate.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

struct SimDevice {
    updater: Mutex<Updater>,
    host: FakeHost,
    refuse: bool,
    labels: BTreeMap<String, String>,
    requests: AtomicU64,
    started: Instant,
}

impl Device for SimDevice {
    fn with_updater<R>(&self, f: impl FnOnce(&Updater) -> R) -> R {
        f(&self.updater.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn apply(&self, dir: &Path) -> Result<Applied, Refusal> {
        if self.refuse {
            return Err(Refusal::new(outpost_updater::error::RefusalKind::Policy, "simulated refusal"));
        }
        self.updater.lock().unwrap_or_else(|e| e.into_inner()).apply_dir(dir, &self.host)
    }

    fn stage_candidate(&self, dir: &Path) -> Result<Applied, Refusal> {
        if self.refuse {
            return Err(Refusal::new(outpost_updater::error::RefusalKind::Policy, "simulated refusal"));
        }
        self.updater.lock().unwrap_or_else(|e| e.into_inner()).stage_candidate_dir(dir, &self.host)
    }

    fn promote(&self) -> Result<Applied, Refusal> {
        self.updater.lock().unwrap_or_else(|e| e.into_inner()).promote(&self.host)
    }

    fn drop_candidate(&self) -> Result<u64, Refusal> {
        self.updater.lock().unwrap_or_else(|e| e.into_inner()).drop_candidate(&self.host)
    }

    fn revert(&self) -> Result<Applied, Refusal> {
        self.updater.lock().unwrap_or_else(|e| e.into_inner()).revert(&self.host)
    }

    fn report(&self) -> DeviceReport {
        let serving = self.host.serving.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let count = self.requests.swap(0, Ordering::Relaxed);
        DeviceReport {
            runtime: Some(format!("outpostctl simulate {}", env!("CARGO_PKG_VERSION"))),
            models: serving
                .into_iter()
                .map(|(name, v)| ModelReport {
                    name,
                    versions: vec![v],
                    state: "READY".into(),
                    ..ModelReport::default()
                })
                .collect(),
            stats: Some(StatsReport { count, simulated: true, ..StatsReport::default() }),
            resources: Some(Resources { uptime_secs: self.started.elapsed().as_secs(), ..Resources::default() }),
            labels: self.labels.clone(),
        }
    }
}

fn open_device(
    args: &SimulateArgs,
    id: &str,
    root: &Envelope,
    fail: bool,
    refuse: bool,
) -> anyhow::Result<Arc<SimDevice>> {
    let dir = args.state_dir.join(id);
    let store = Store::open(&dir).map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
    if store.current().map_err(anyhow::Error::msg)?.is_none() {
        store.provision(root, &args.fleet).map_err(anyhow::Error::msg)?;
    }
    let updater = Updater { store, target: Target { fleet: args.fleet.clone(), group: args.group.clone() } };
    Ok(Arc::new(SimDevice {
        updater: Mutex::new(updater),
        host: FakeHost {
            fail,
            crash: args.crash_on_apply,
            serving: Mutex::new(Vec::new()),
            candidate: Mutex::new(None),
        },
        refuse,
        labels: labels(&args.labels)?,
        requests: AtomicU64::new(0),
        started: Instant::now(),
    }))
}

pub fn simulate(args: SimulateArgs) -> anyhow::Result<()> {
    if !valid_id(&args.fleet) || !valid_id(&args.group) || !valid_id(&format!("{}-0000", args.id_prefix)) {
        bail!("--fleet, --group and --id-prefix: letters, digits, - _ . only");
    }
    let root_bytes = std::fs::read(&args.root).with_context(|| format!("{}", args.root.display()))?;
    let root = Envelope::parse(&root_bytes).map_err(anyhow::Error::msg)?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async {
        let mut agents = Vec::new();
        let mut devices = Vec::new();
        for n in 1..=args.devices {
            let id = format!("{}-{n:04}", args.id_prefix);
            // Spread the injected faults evenly: device n fails when the running share crosses.
            let picked = |share: f64| ((n as f64) * share).floor() > ((n as f64 - 1.0) * share).floor();
            let device = open_device(&args, &id, &root, picked(args.fail_health), picked(args.refuse))?;
            if picked(args.silent) {
                continue;
            }
            let mut broker = args.broker.config(&id)?;
            broker.username = Some(id.clone());
            broker.password = Some(args.password.replace("{id}", &id));
            let cfg = AgentConfig {
                broker,
                device_id: id.clone(),
                fleet: args.fleet.clone(),
                group: args.group.clone(),
                topics: Topics::new(&args.broker.topic_prefix, &args.fleet),
                downloads: args.state_dir.join(&id).join("downloads"),
                report_interval: Duration::from_secs(60),
                window: 4,
                chunk_timeout: Duration::from_secs(10),
                chunk_tries: 5,
                max_bytes_per_second: 0,
                min_bytes_per_second: 0,
                watchdog_window: Duration::from_secs(60),
                reconnect_min: Duration::from_millis(500),
                reconnect_max: Duration::from_secs(30),
                retry_after: Duration::from_secs(30),
                max_attempts: 5,
            };
            agents.push(outpost_updater::mqtt::agent::start(cfg, device.clone()).map_err(anyhow::Error::msg)?);
            devices.push(device);
        }
        eprintln!("outpostctl simulate: {} devices running ({} silent)", devices.len(), args.devices - devices.len());
        let started = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_secs(args.every.max(1))).await;
            let mut by_release = std::collections::BTreeMap::<String, usize>::new();
            let mut connected = 0;
            for (d, a) in devices.iter().zip(&agents) {
                let number = d.with_updater(|u| {
                    let c = u.store.current().ok().flatten()?;
                    u.store.release(&c.active?).ok().map(|r| r.number)
                });
                *by_release.entry(number.map_or("none".into(), |n| n.to_string())).or_default() += 1;
                connected += usize::from(a.status()["connection"]["connected"] == true);
            }
            eprintln!(
                "outpostctl simulate: {:.0} s, {connected} connected, releases {by_release:?}",
                started.elapsed().as_secs_f64()
            );
            if let Some(want) = args.until_release
                && by_release.get(&want.to_string()).copied().unwrap_or(0) == devices.len() - failing(&devices)
            {
                println!(
                    "all {} healthy devices run release {want} after {:.1} s",
                    by_release[&want.to_string()],
                    started.elapsed().as_secs_f64()
                );
                break;
            }
        }
        // Reports are sent at most once a second per device: let the last ones go out. Exiting
        // then closes every connection, and the broker publishes each device's will (offline).
        tokio::time::sleep(Duration::from_millis(1500)).await;
        Ok::<_, anyhow::Error>(())
    })
}

fn failing(devices: &[Arc<SimDevice>]) -> usize {
    devices.iter().filter(|d| d.host.fail || d.refuse).count()
}

fn labels(list: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    let mut m = BTreeMap::new();
    for l in list {
        let (k, v) = l.split_once('=').ok_or_else(|| anyhow::anyhow!("--label `{l}`: key=value"))?;
        m.insert(k.to_owned(), v.to_owned());
    }
    Ok(m)
}
