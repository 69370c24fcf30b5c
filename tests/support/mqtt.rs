//! MQTT fixtures: a real Mosquitto (Debian's) on a loopback port, configured with the
//! repository's own `cross/mosquitto/outpost.conf` and `outpost.acl`; a publisher's folder of
//! keys and signed releases made with `outpostctl`; devices as real `outpost` daemons.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{free_port, outpost_bin, repo_root};

pub const FLEET: &str = "demo";
/// The users the broker knows (password: `pw-USER`).
pub const USERS: [&str; 8] = ["console", "blobs", "bridge", "dev1", "dev2", "dev3", "dev4", "dev5"];

pub fn outpostctl() -> PathBuf {
    outpost_bin().with_file_name(format!("outpostctl{}", std::env::consts::EXE_SUFFIX))
}

/// Polls `f` every 50 ms until it returns Some, or panics after `limit` with `what`.
pub fn wait_for<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let started = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(started.elapsed() < limit, "timed out after {limit:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A Mosquitto broker on loopback, killed on drop.
pub struct Broker {
    child: Option<Child>,
    pub port: u16,
    pub dir: PathBuf,
    /// A TLS listener's port, when started with one.
    pub tls_port: Option<u16>,
}

impl Broker {
    /// Writes the password file (every user in [`USERS`]) and the config (the repository's,
    /// with this port and these paths), and starts the broker.
    pub fn start(dir: &Path) -> Broker {
        Broker::start_on(dir, free_port())
    }

    pub fn start_on(dir: &Path, port: u16) -> Broker {
        Broker::start_with(dir, port, None, &[])
    }

    /// With more users (password `pw-USER`), e.g. simulated devices.
    pub fn start_with_users(dir: &Path, extra: &[String]) -> Broker {
        Broker::start_with(dir, free_port(), None, extra)
    }

    /// An edge broker bridged to `central` with the repository's `cross/mosquitto/bridge.conf`
    /// (this address and the `bridge` user's password in place of the example's), and these
    /// extra users (its devices).
    pub fn start_bridged(dir: &Path, central: &Broker, extra: &[String]) -> Broker {
        let port = free_port();
        let bridge = std::fs::read_to_string(repo_root().join("cross/mosquitto/bridge.conf")).unwrap();
        let bridge: Vec<String> = bridge
            .lines()
            .filter_map(|l| match l.split_whitespace().next() {
                Some("address") => Some(format!("address {}", central.address())),
                Some("remote_password") => Some("remote_password pw-bridge".into()),
                Some("remote_clientid") => Some(format!("remote_clientid outpost-edge-{port}")),
                // Plain MQTT on loopback here.
                Some("bridge_cafile") => None,
                _ => Some(l.to_owned()),
            })
            .collect();
        Broker::start_full(dir, port, None, extra, &bridge)
    }

    /// With a second listener speaking TLS with this certificate and key.
    pub fn start_tls(dir: &Path, cert: &Path, key: &Path) -> Broker {
        Broker::start_with(dir, free_port(), Some((cert, key)), &[])
    }

    fn start_with(dir: &Path, port: u16, tls: Option<(&Path, &Path)>, extra: &[String]) -> Broker {
        Broker::start_full(dir, port, tls, extra, &[])
    }

    fn start_full(dir: &Path, port: u16, tls: Option<(&Path, &Path)>, extra: &[String], more: &[String]) -> Broker {
        std::fs::create_dir_all(dir).unwrap();
        // Written in plain text, then hashed in place in one pass (`mosquitto_passwd -U`).
        let passwd = dir.join("passwd");
        let users: Vec<String> = USERS.iter().map(|u| u.to_string()).chain(extra.iter().cloned()).collect();
        std::fs::write(&passwd, users.iter().map(|u| format!("{u}:pw-{u}\n")).collect::<String>()).unwrap();
        let ok = Command::new("mosquitto_passwd").arg("-U").arg(&passwd).status();
        assert!(ok.expect("mosquitto_passwd (Debian package mosquitto)").success());
        for u in USERS {
            std::fs::write(dir.join(format!("{u}.pw")), format!("pw-{u}\n")).unwrap();
        }
        let conf = std::fs::read_to_string(repo_root().join("cross/mosquitto/outpost.conf")).unwrap();
        let acl = repo_root().join("cross/mosquitto/outpost.acl");
        let mut conf: Vec<String> = conf
            .lines()
            .map(|l| match l.split_whitespace().next() {
                Some("password_file") => format!("password_file {}", passwd.display()),
                Some("acl_file") => format!("acl_file {}", acl.display()),
                Some("listener") => format!("listener {port} 127.0.0.1"),
                Some("persistence_location") => format!("persistence_location {}/", dir.display()),
                _ => l.to_owned(),
            })
            .collect();
        let tls_port = tls.map(|(cert, key)| {
            let p = free_port();
            conf.push(format!("listener {p} 127.0.0.1\ncertfile {}\nkeyfile {}", cert.display(), key.display()));
            p
        });
        conf.extend(more.iter().cloned());
        std::fs::write(dir.join("mosquitto.conf"), conf.join("\n")).unwrap();
        let mut b = Broker { child: None, port, dir: dir.to_owned(), tls_port };
        b.restart();
        b
    }

    /// Starts the broker again (after [`Broker::stop`]), on the same port and data.
    pub fn restart(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("mosquitto.log")).unwrap();
        // Debian puts the broker in /usr/sbin, which a user's PATH may lack.
        let bin = ["/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"]
            .into_iter()
            .find(|p| Path::new(p).is_file())
            .unwrap_or("mosquitto");
        let child = Command::new(bin)
            .arg("-c")
            .arg(self.dir.join("mosquitto.conf"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("mosquitto (Debian package mosquitto)");
        self.child = Some(child);
        let addr: SocketAddr = format!("127.0.0.1:{}", self.port).parse().unwrap();
        wait_for(Duration::from_secs(10), "mosquitto to listen", || std::net::TcpStream::connect(addr).ok().map(drop));
    }

    /// Stops the broker (SIGTERM; it saves retained messages).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
            let _ = c.wait();
        }
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn password_file(&self, user: &str) -> PathBuf {
        self.dir.join(format!("{user}.pw"))
    }

    /// `--broker --username --password-file` for `outpostctl` as `user`.
    pub fn ctl_args(&self, user: &str) -> Vec<String> {
        vec![
            "--broker".into(),
            self.address(),
            "--username".into(),
            user.into(),
            "--password-file".into(),
            self.password_file(user).display().to_string(),
        ]
    }

    /// The retained message on `topic` as `user` sees it (None when there is none or the ACL
    /// hides it), read with `mosquitto_sub`.
    pub fn retained(&self, user: &str, topic: &str) -> Option<String> {
        let out = Command::new("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-u", user, "-P", &format!("pw-{user}")])
            .args(["-t", topic, "-C", "1", "-W", "2", "-V", "mqttv5", "--retained-only"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        (!text.is_empty()).then_some(text)
    }

    /// A device's retained state, as the console reads it.
    pub fn state(&self, device: &str) -> Option<Value> {
        let text = self.retained("console", &format!("outpost/v1/{FLEET}/devices/{device}/state"))?;
        serde_json::from_str(&text).ok()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs `outpostctl ARGS` in `dir`; panics with its output on failure. Returns stdout.
pub fn ctl(dir: &Path, args: &[&str]) -> String {
    let out = Command::new(outpostctl()).args(args).current_dir(dir).output().unwrap();
    assert!(
        out.status.success(),
        "outpostctl {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The publisher's folder: root and release keys, root-1.json, and signed releases made from
/// the sample models with a 1 KiB chunk (so every model is several chunks):
/// r1 digits-edge; r2 the retrained head, r3 the re-quantized layer, r4 the full retrain,
/// each with deltas against the one before.
pub fn publisher(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    ctl(dir, &["keys", "gen", "root"]);
    ctl(dir, &["keys", "gen", "release"]);
    ctl(
        dir,
        &[
            "root",
            "create",
            "--fleet",
            FLEET,
            "--root-key",
            "root.pub",
            "--release-key",
            "release.pub",
            "-o",
            "root-1.json",
        ],
    );
    ctl(dir, &["sign", "root-1.json", "--key", "root.key"]);
    let models = repo_root().join("models");
    let names = [
        "digits-edge",
        "successors/digits-edge-head",
        "successors/digits-edge-requant",
        "successors/digits-edge-retrain",
    ];
    for (i, m) in names.iter().enumerate() {
        let n = i + 1;
        std::fs::write(
            dir.join(format!("r{n}.toml")),
            format!(
                "fleet = \"{FLEET}\"\nnumber = {n}\nchunk_size = 1024\n[[models]]\nname = \"digits\"\nversion = \"{n}\"\n\
                 path = {:?}\ngolden = {:?}\n",
                models.join(format!("{m}.onnx")),
                models.join(format!("{m}.golden.json"))
            ),
        )
        .unwrap();
        ctl(dir, &["release", "create", &format!("r{n}.toml"), "-o", &format!("r{n}")]);
        if n > 1 {
            ctl(dir, &["delta", &format!("r{n}"), "--base", &format!("r{}", n - 1)]);
        }
        ctl(dir, &["release", "sign", &format!("r{n}"), "--key", "release.key"]);
    }
}

/// `outpostctl serve-blobs DIRS` as the `blobs` user (log in `BROKER_DIR/NAME.log`), killed on
/// drop.
pub struct BlobServer {
    child: Option<Child>,
    log: PathBuf,
}

impl BlobServer {
    pub fn start(broker: &Broker, name: &str, dirs: &[&Path]) -> BlobServer {
        let log = broker.dir.join(format!("{name}.log"));
        let file = std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
        let child = Command::new(outpostctl())
            .arg("serve-blobs")
            .args(dirs)
            .args(["--fleet", FLEET])
            .args(broker.ctl_args("blobs"))
            .args(["--client-id", name])
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap();
        wait_for(Duration::from_secs(10), "the blob server to subscribe", || {
            std::fs::read_to_string(&log).ok().filter(|l| l.contains("blob server connected")).map(drop)
        });
        // The SUBACK follows the CONNACK on loopback within a few milliseconds.
        std::thread::sleep(Duration::from_millis(100));
        BlobServer { child: Some(child), log }
    }

    /// SIGTERM; returns the chunks it says it served.
    pub fn stop(mut self) -> u64 {
        let mut c = self.child.take().unwrap();
        let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
        let _ = c.wait();
        let log = std::fs::read_to_string(&self.log).unwrap();
        let line = log.lines().rev().find(|l| l.contains("stopping;")).unwrap_or_else(|| panic!("no summary in {log}"));
        line.split("stopping; ").nth(1).and_then(|r| r.split(' ').next()).and_then(|n| n.parse().ok()).unwrap()
    }
}

impl Drop for BlobServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A device: an `outpost` daemon with a store provisioned with the publisher's root and an
/// `[updates.mqtt]` section, its log in `DIR/ID.log`. Killed on drop.
pub struct Device {
    child: Option<Child>,
    pub id: String,
    pub dir: PathBuf,
    pub addr: SocketAddr,
    config: PathBuf,
}

impl Device {
    /// Writes the config (`mqtt_extra`: more `[updates.mqtt]` lines), provisions the root and
    /// starts the daemon (serving `digits-edge` as a configured model until a release comes).
    pub fn start(dir: &Path, id: &str, broker: &str, publisher: &Path, mqtt_extra: &str) -> Device {
        std::fs::create_dir_all(dir).unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let config = dir.join(format!("{id}.toml"));
        let password = dir.join(format!("{id}.pw"));
        std::fs::write(&password, format!("pw-{id}\n")).unwrap();
        std::fs::write(
            &config,
            format!(
                "[server]\nlisten = \"{addr}\"\n[[models]]\nname = \"digits\"\npath = {:?}\nversion = \"0\"\n\
                 [updates]\nstate_dir = \"{id}-state\"\nfleet = \"{FLEET}\"\n[updates.mqtt]\nbroker = \"{broker}\"\n\
                 device_id = \"{id}\"\npassword_file = {password:?}\nreport_interval_secs = 2\nreconnect_min_ms = 100\n\
                 reconnect_max_secs = 1\nchunk_timeout_secs = 2\n{mqtt_extra}\n",
                repo_root().join("models/digits-edge.onnx"),
            ),
        )
        .unwrap();
        let out = Command::new(outpost_bin())
            .args(["update", "provision"])
            .arg(publisher.join("root-1.json"))
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap();
        assert!(out.status.success(), "provision: {}", String::from_utf8_lossy(&out.stderr));
        let mut d = Device { child: None, id: id.into(), dir: dir.to_owned(), addr, config };
        d.restart();
        d
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.join(format!("{}-state", self.id))
    }

    /// Starts the daemon again (after a kill) and waits until it is ready.
    pub fn restart(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{}.log", self.id)))
            .unwrap();
        let child = Command::new(outpost_bin())
            .args(["serve", "--config"])
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        wait_for(Duration::from_secs(30), "the device to be ready", || {
            (self.get("/v2/health/ready").0 == 200).then_some(())
        });
    }

    /// SIGKILL: no goodbye, so the broker sends the last will.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for the exit.
    pub fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
            let _ = c.wait();
        }
    }

    /// A GET on the daemon's HTTP API: status code and body (0 when unreachable).
    pub fn get(&self, path: &str) -> (u16, String) {
        crate::http(self.addr, "GET", path, &[], b"")
    }

    /// `GET /v2/update/status`, whose `mqtt` member is the agent's own view.
    pub fn status(&self) -> Value {
        serde_json::from_str(&self.get("/v2/update/status").1).unwrap_or(Value::Null)
    }

    /// The version of `digits` the HTTP API serves.
    pub fn served_version(&self) -> Option<String> {
        let (code, body) = self.get("/v2/models/digits");
        let v: Value = serde_json::from_str(&body).ok().filter(|_| code == 200)?;
        v["versions"][0].as_str().map(str::to_owned)
    }

    /// The agent's update status once its state is `state` (and, when given, for release
    /// `number`).
    pub fn wait_update(&self, state: &str, number: Option<u64>, limit: Duration) -> Value {
        wait_for(limit, &format!("{} update state {state} (release {number:?})", self.id), || {
            let s = self.status();
            let u = &s["mqtt"]["update"];
            (u["state"] == state && number.is_none_or(|n| u["release"]["number"] == n)).then(|| u.clone())
        })
    }

    /// The agent's update status once it is idle with release `number` applied. Where the same
    /// release was handled before (staged as a candidate), `wait_update("idle", ..)` can answer
    /// before the new offer is even picked up; the applied release cannot.
    pub fn wait_applied(&self, number: u64, limit: Duration) -> Value {
        wait_for(limit, &format!("{} idle with release {number} applied", self.id), || {
            let s = self.status();
            let u = &s["mqtt"]["update"];
            (u["state"] == "idle" && u["last_applied"]["number"] == number).then(|| u.clone())
        })
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        self.kill();
    }
}
