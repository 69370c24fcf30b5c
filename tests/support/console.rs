//! Console fixtures: `outpostctl console` on a loopback port with its own data folder, the
//! `outpostctl` client commands against it, and `outpostctl simulate` fleets.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::free_port;
use crate::mqtt::{Broker, FLEET, outpostctl, wait_for};

/// The console, killed on drop.
pub struct Console {
    child: Option<Child>,
    pub port: u16,
    pub data: PathBuf,
    args: Vec<String>,
    log: PathBuf,
}

pub const TOKEN: &str = "test-token-0123456789abcdef";

impl Console {
    /// Starts a console for the demo fleet (root `root`), as the broker's `console` user.
    pub fn start(dir: &Path, broker: &Broker, root: &Path) -> Console {
        Console::start_named(dir, broker, root, "console", &[])
    }

    /// A console with its own data folder `dir/NAME` and log, and `extra` arguments (say
    /// `--database postgres://...` and a `--client-id` of its own).
    pub fn start_named(dir: &Path, broker: &Broker, root: &Path, name: &str, extra: &[&str]) -> Console {
        let data = dir.join(name);
        std::fs::create_dir_all(&data).unwrap();
        let token = dir.join("console.token");
        std::fs::write(&token, format!("{TOKEN}\n")).unwrap();
        let port = free_port();
        let mut args: Vec<String> = vec![
            "console".into(),
            "--data".into(),
            data.display().to_string(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--token-file".into(),
            token.display().to_string(),
            "--root".into(),
            root.display().to_string(),
            "--tick-ms".into(),
            "200".into(),
            "--drift-sample-secs".into(),
            "1".into(),
        ];
        args.extend(broker.ctl_args("console"));
        args.extend(extra.iter().map(|a| a.to_string()));
        let mut c = Console { child: None, port, data, args, log: dir.join(format!("{name}.log")) };
        c.restart();
        c
    }

    pub fn restart(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let child = Command::new(outpostctl()).args(&self.args).stdout(Stdio::null()).stderr(log).spawn().unwrap();
        self.child = Some(child);
        let addr = format!("127.0.0.1:{}", self.port);
        wait_for(Duration::from_secs(20), "the console to listen", || {
            std::net::TcpStream::connect(&addr).ok().map(drop)
        });
    }

    /// SIGKILL: no goodbye, whatever it was doing.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `outpostctl ARGS --console ... --token-file ...`; stdout, or a panic with the output.
    pub fn ctl(&self, args: &[&str]) -> String {
        let out = self.try_ctl(args);
        assert!(
            out.status.success(),
            "outpostctl {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn try_ctl(&self, args: &[&str]) -> std::process::Output {
        Command::new(outpostctl())
            .args(args)
            .args(["--console", &format!("127.0.0.1:{}", self.port)])
            .env("OUTPOST_CONSOLE_TOKEN_FILE", self.data.parent().unwrap().join("console.token"))
            .output()
            .unwrap()
    }

    /// `ARGS --json`, parsed.
    pub fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.push("--json");
        serde_json::from_str(&self.ctl(&a)).unwrap()
    }

    pub fn rollout(&self, id: u64) -> Value {
        self.json(&["rollout", "status", &id.to_string()])
    }

    /// Waits for rollout `id` to reach `state`; returns it.
    pub fn wait_rollout(&self, id: u64, state: &str, limit: Duration) -> Value {
        let mut last = Value::Null;
        let found = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            wait_for(limit, &format!("rollout {id} to be {state}"), || {
                last = self.rollout(id);
                (last["state"] == state).then(|| last.clone())
            })
        }));
        found.unwrap_or_else(|_| panic!("rollout {id} never {state}: {last:#}\nconsole log:\n{}", self.log()))
    }

    /// Devices the console sees online.
    pub fn online(&self) -> usize {
        self.json(&["fleet", "ls"]).as_array().unwrap().iter().filter(|d| d["online"] == true).count()
    }

    pub fn device(&self, id: &str) -> Value {
        self.json(&["fleet", "show", id])
    }

    /// The web page in headless Chromium (logged in with the token), with `extra` arguments
    /// such as `--dump-dom` (the DOM after its first data load) or `--screenshot=PATH`; its
    /// stdout. Each call gets its own profile folder under `dir`.
    pub fn page(&self, dir: &Path, extra: &[&str]) -> String {
        self.page_at(dir, "", extra)
    }

    /// The page opened at `view` (the rest of its address after the token, such as
    /// `release=3`: the fleet table's filters).
    pub fn page_at(&self, dir: &Path, view: &str, extra: &[&str]) -> String {
        static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let out = Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--hide-scrollbars",
                "--window-size=1400,1100",
                "--virtual-time-budget=5000",
            ])
            .arg(format!("--user-data-dir={}", dir.join(format!("chromium-{n}")).display()))
            .args(extra)
            .arg(format!(
                "http://127.0.0.1:{}/#token={TOKEN}{}{view}",
                self.port,
                if view.is_empty() { "" } else { "&" }
            ))
            .output()
            .expect("chromium (Debian package chromium)");
        assert!(out.status.success(), "chromium: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `outpostctl simulate` running until dropped.
pub struct Sim {
    child: Option<Child>,
}

impl Sim {
    /// `n` devices PREFIX-0001.. with stores under `dir/sim` (kept across restarts).
    pub fn start(dir: &Path, broker: &Broker, root: &Path, prefix: &str, n: usize, extra: &[&str]) -> Sim {
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(dir.join(format!("sim-{prefix}.log"))).unwrap();
        let child = Command::new(outpostctl())
            .args(["simulate", "--devices", &n.to_string(), "--id-prefix", prefix, "--fleet", FLEET, "--every", "3600"])
            .arg("--root")
            .arg(root)
            .arg("--state-dir")
            .arg(dir.join("sim"))
            .args(["--broker", &broker.address()])
            .args(extra)
            .env("OUTPOST_SIM_PASSWORD", "pw-{id}")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Sim { child: Some(child) }
    }

    /// Kills the simulator: its devices' wills say they went offline.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Device ids PREFIX-0001..=PREFIX-n.
pub fn ids(prefix: &str, n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("{prefix}-{i:04}")).collect()
}
