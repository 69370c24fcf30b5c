//! Helpers for the end-to-end tests: a server in this process on an ephemeral loopback port, or
//! the real `outpost` binary as a child process, each torn down on drop.

pub mod console;
pub mod mqtt;
pub mod postgres;
pub mod releases;
pub mod tls;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outpost_runtime::App;
use outpost_runtime::config::Config;
use outpost_tools::http::Conn;

/// A fresh folder for one test's files: `outpost-NAME-PID` under the system's temporary
/// folder, emptied first. Removed when dropped after the test passed; kept, its path printed,
/// when the test fails (dropped during the panic), so that its logs and state can be read.
pub struct Scratch(PathBuf);

pub fn scratch(name: &str) -> Scratch {
    let dir = std::env::temp_dir().join(format!("outpost-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    Scratch(dir)
}

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for Scratch {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("the failed test's files are kept in {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// The repository's root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_owned()
}

/// The sample models' folder.
pub fn models_dir() -> PathBuf {
    repo_root().join("models")
}

/// A server running inside the test process.
pub struct Server {
    pub addr: SocketAddr,
    pub app: Arc<App>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Server {
    /// Serves the models of `config` (TOML text; model paths relative to the repository root),
    /// once every model is loaded.
    pub async fn start(config_toml: &str) -> Server {
        let mut config: Config = toml::from_str(config_toml).expect("test config parses");
        for m in &mut config.models {
            m.path = repo_root().join(&m.path);
        }
        if config.models.iter().any(|m| m.backend.as_deref() == Some("ort")) && config.server.ort_library.is_none() {
            config.server.ort_library = Some(ort_library());
        }
        config.server.listen = Some("127.0.0.1:0".into());
        let validated = config.validate().expect("test config is valid");
        let app = App::new(&validated);
        let failures = {
            let app = app.clone();
            tokio::task::spawn_blocking(move || app.registry.load_all()).await.unwrap()
        };
        assert!(failures.is_empty(), "models failed to load: {failures:?}");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(outpost_runtime::server::serve(listener, app.clone(), async move {
            let _ = rx.await;
        }));
        Server { addr, app, stop: Some(tx) }
    }

    /// Serves the given models (paths relative to the repository root, named by file stem) on
    /// one backend with default settings.
    pub async fn models_on(backend: &str, paths: &[PathBuf]) -> Server {
        let mut toml = String::new();
        if backend == "ort" {
            toml.push_str(&format!("[server]\nort_library = {:?}\n", ort_library()));
        }
        for p in paths {
            let stem = p.file_stem().unwrap().to_string_lossy().into_owned();
            toml.push_str(&format!("[[models]]\nname = \"{stem}\"\npath = {:?}\nbackend = \"{backend}\"\n", p));
        }
        Server::start(&toml).await
    }

    /// A new keep-alive connection.
    pub async fn conn(&self) -> Conn {
        Conn::connect(self.addr).await.expect("connect to the test server")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// The `outpost` binary cargo built next to this test.
pub fn outpost_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe.parent().and_then(Path::parent).expect("target/<profile>/deps");
    let bin = dir.join(format!("outpost{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.is_file(),
        "{} is missing: build it first (cargo build --workspace --bins; tools/test.sh does)",
        bin.display()
    );
    bin
}

/// One HTTP/1.1 exchange on a new connection, for tests that are not async: the status (0 when
/// the server cannot be reached or answers nonsense) and the body. `headers` go after `host`.
pub fn http(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, String) {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else { return (0, String::new()) };
    let mut head = format!("{method} {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(&format!("content-length: {}\r\n\r\n", body.len()));
    if s.write_all(head.as_bytes()).and_then(|()| s.write_all(body)).is_err() {
        return (0, String::new());
    }
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    let status = text.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

/// A free loopback port (bound, then released).
/// `qemu-aarch64` for a glibc aarch64 binary: the emulator and the guest root it takes (`-L`).
/// The root has Debian's cross glibc and libstdc++ (`libc6-arm64-cross`,
/// `libstdc++6-arm64-cross`) as its `/lib`, and a `/proc/cpuinfo` of a two-core Neoverse N1:
/// qemu 7.2 shows an aarch64 guest the host's x86 `/proc/cpuinfo`, on which ONNX Runtime's CPU
/// detection (cpuinfo) dereferences a null pointer and the process dies. qemu looks a guest's
/// absolute paths up under `-L` first, so the guest reads this one.
pub fn qemu_aarch64_glibc() -> Vec<String> {
    const CROSS_LIB: &str = "/usr/aarch64-linux-gnu/lib";
    assert!(
        Path::new(CROSS_LIB).join("libc.so.6").is_file(),
        "no aarch64 glibc in {CROSS_LIB}: apt-get install libc6-arm64-cross libstdc++6-arm64-cross (.ci/run does)"
    );
    let root = repo_root().join("target/qemu-aarch64-glibc-root");
    std::fs::create_dir_all(root.join("proc")).unwrap();
    let core = |i: usize| {
        format!(
            "processor\t: {i}\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp \
             asimdhp cpuid asimdrdm lrcpc dcpop asimddp\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: \
             0x3\nCPU part\t: 0xd0c\nCPU revision\t: 1\n\n"
        )
    };
    std::fs::write(root.join("proc/cpuinfo"), (0..2).map(core).collect::<String>()).unwrap();
    let lib = root.join("lib");
    match std::os::unix::fs::symlink(CROSS_LIB, &lib) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => panic!("{}: {e}", lib.display()),
    }
    vec!["qemu-aarch64".into(), "-L".into(), root.display().to_string()]
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The real daemon as a child process, killed on drop. Its stderr is read as it comes (a pipe
/// left unread fills and stops the daemon at its next log line); the last lines are kept.
pub struct Daemon {
    pub child: Child,
    pub addr: SocketAddr,
    log: Arc<Mutex<std::collections::VecDeque<String>>>,
}

/// Lines of a daemon's log kept for a failure message.
const LOG_LINES: usize = 400;

impl Daemon {
    /// Starts `outpost serve ARGS --listen 127.0.0.1:PORT` from the repository root and waits
    /// until it is ready. Panics with its stderr if it exits first.
    pub fn serve(args: &[&str]) -> Daemon {
        Daemon::serve_at(format!("127.0.0.1:{}", free_port()).parse().unwrap(), args)
    }

    /// Like [`Daemon::serve`], on a given address.
    pub fn serve_at(addr: SocketAddr, args: &[&str]) -> Daemon {
        Daemon::start(&outpost_bin(), addr, args)
    }

    /// Like [`Daemon::serve`], with another build of the binary (a static or cross build), run
    /// under `runner` when it is not empty: an emulator and its arguments, such as
    /// `["qemu-aarch64"]` or `["qemu-x86_64", "-cpu", "Haswell"]`.
    pub fn serve_with(bin: &Path, runner: &[&str], args: &[&str]) -> Daemon {
        Daemon::serve_command(Daemon::command(bin, runner, &[]), args)
    }

    /// The command that runs `bin`, under `runner` (an emulator and its arguments) when given,
    /// with `env` set in the program's own environment (an emulator's `-E`, which reaches the
    /// guest only: the emulator is a host binary and must not see a guest's `LD_LIBRARY_PATH`).
    pub fn command(bin: &Path, runner: &[&str], env: &[(&str, &str)]) -> Command {
        match runner {
            [emulator, emulator_args @ ..] => {
                let mut cmd = Command::new(emulator);
                for (key, value) in env {
                    cmd.arg("-E").arg(format!("{key}={value}"));
                }
                cmd.args(emulator_args).arg(bin);
                cmd
            }
            [] => {
                let mut cmd = Command::new(bin);
                cmd.envs(env.iter().copied());
                cmd
            }
        }
    }

    /// Starts `cmd serve ARGS --listen ADDR` on a free port and waits until it is ready: for a
    /// caller that sets the command's environment.
    pub fn serve_command(cmd: Command, args: &[&str]) -> Daemon {
        Daemon::start_cmd(cmd, format!("127.0.0.1:{}", free_port()).parse().unwrap(), args)
    }

    fn start(bin: &Path, addr: SocketAddr, args: &[&str]) -> Daemon {
        Daemon::start_cmd(Command::new(bin), addr, args)
    }

    fn start_cmd(mut cmd: Command, addr: SocketAddr, args: &[&str]) -> Daemon {
        let child = cmd
            .arg("serve")
            .args(args)
            .args(["--listen", &addr.to_string()])
            .current_dir(repo_root())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn outpost");
        let mut child = child;
        let log = Arc::new(Mutex::new(std::collections::VecDeque::new()));
        let stderr = child.stderr.take().expect("piped stderr");
        let lines = log.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut lines = lines.lock().unwrap_or_else(|e| e.into_inner());
                if lines.len() == LOG_LINES {
                    lines.pop_front();
                }
                lines.push_back(line);
            }
        });
        let mut d = Daemon { child, addr, log };
        d.wait_ready(Duration::from_secs(120));
        d
    }

    /// The last lines the daemon logged.
    pub fn log(&self) -> String {
        let lines = self.log.lock().unwrap_or_else(|e| e.into_inner());
        lines.iter().map(String::as_str).collect::<Vec<_>>().join("\n")
    }

    fn wait_ready(&mut self, limit: Duration) {
        let started = Instant::now();
        while started.elapsed() < limit {
            if let Ok(Some(status)) = self.child.try_wait() {
                // The reader thread has the rest of the log once the pipe closes.
                std::thread::sleep(Duration::from_millis(100));
                panic!("outpost exited with {status} before it was ready:\n{}", self.log());
            }
            if http(self.addr, "GET", "/v2/health/ready", &[], b"").0 == 200 {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("outpost was not ready within {limit:?}");
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let ok = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().unwrap().success();
        assert!(ok, "kill -TERM failed");
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `outpost ARGS` from the repository root to completion.
pub fn outpost(args: &[&str]) -> std::process::Output {
    Command::new(outpost_bin()).args(args).current_dir(repo_root()).output().expect("run outpost")
}

/// Runs `outpost ARGS --config CONFIG` (the update commands): exit code, the JSON it printed
/// (null when none) and its stderr.
pub fn outpost_with_config(args: &[&str], config: &Path) -> (i32, serde_json::Value, String) {
    let out = Command::new(outpost_bin()).args(args).arg("--config").arg(config).output().expect("run outpost");
    let json = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    (out.status.code().unwrap_or(-1), json, String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Puts sample model `sample` (with its golden outputs) into model repository `repo` as
/// `digits` version `version`.
pub fn add_repository_version(repo: &Path, version: u32, sample: &str) {
    let dir = repo.join("digits").join(version.to_string());
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(models_dir().join(format!("{sample}.onnx")), dir.join("model.onnx")).unwrap();
    std::fs::copy(models_dir().join(format!("{sample}.golden.json")), dir.join("model.golden.json")).unwrap();
}

/// The Python with the test requirements (`tritonclient[http]`, numpy): `OUTPOST_PYTHON`, else
/// the repository's `.venv` that `tools/test.sh` makes.
pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("OUTPOST_PYTHON") {
        return p.into();
    }
    let venv = repo_root().join(".venv/bin/python");
    assert!(venv.is_file(), "no Python for the client tests: run tools/test.sh, or set OUTPOST_PYTHON");
    venv
}

/// The sample models (`models/*.onnx`), sorted, relative to the repository root.
pub fn sample_models() -> Vec<PathBuf> {
    let mut models: Vec<PathBuf> = std::fs::read_dir(models_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "onnx"))
        .map(|p| p.strip_prefix(repo_root()).unwrap().to_owned())
        .collect();
    models.sort();
    models
}

/// ONNX Runtime's `libonnxruntime.so` from the PyPI `onnxruntime` wheel: `ORT_DYLIB_PATH`, else
/// the one in the repository's `.venv` that `tools/test.sh` makes.
pub fn ort_library() -> PathBuf {
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH") {
        return p.into();
    }
    let lib = repo_root().join(".venv/lib");
    let found = std::fs::read_dir(&lib).ok().into_iter().flatten().find_map(|e| {
        let capi = e.ok()?.path().join("site-packages/onnxruntime/capi");
        std::fs::read_dir(capi)
            .ok()?
            .filter_map(|f| f.ok().map(|f| f.path()))
            .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("libonnxruntime.so.")))
    });
    found.unwrap_or_else(|| {
        panic!("no libonnxruntime.so: run tools/test.sh (it installs the onnxruntime wheel), or set ORT_DYLIB_PATH")
    })
}

/// Serves each model's golden inputs over JSON and over binary tensors, and checks every
/// output against the golden outputs within the file's tolerance (looser than 1e-4 only where
/// the file says why); each model is named by its file stem and must run on `backend`.
pub async fn check_golden_models(conn: &mut Conn, backend: &str, models: &[PathBuf]) {
    for path in models {
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        let meta = conn.get(&format!("/v2/models/{name}")).await.unwrap().json();
        assert_eq!(meta["parameters"]["backend"], backend, "{name}");
        check_golden_as(conn, &name, path).await;
    }
}

/// [`check_golden_models`] for one model served as `name`, from the file at `path`, on whichever
/// backend serves it.
pub async fn check_golden_as(conn: &mut Conn, name: &str, path: &Path) {
    let golden = outpost_runtime::golden::Golden::read(
        &outpost_runtime::golden::Golden::beside(&repo_root().join(path)).expect("a golden file"),
    )
    .unwrap();
    let meta = conn.get(&format!("/v2/models/{name}")).await.unwrap().json();
    let backend = meta["parameters"]["backend"].as_str().unwrap_or("?").to_owned();
    let inputs: Vec<_> = golden.inputs.iter().map(|g| g.to_tensor().unwrap()).collect();
    let tolerance = golden.tolerance.unwrap();
    assert!(
        tolerance <= 1e-4 || golden.tolerance_reason.is_some(),
        "{name}: tolerance {tolerance} is looser than 1e-4 and the golden file does not say why"
    );
    for (form, body) in [
        ("json", outpost_tools::v2client::json_request(&inputs)),
        ("binary", outpost_tools::v2client::binary_request(&inputs)),
    ] {
        let path = format!("/v2/models/{name}/infer");
        let reply = conn.send(hyper::Method::POST, &path, &body.headers, body.bytes).await.unwrap();
        assert_eq!(reply.status, 200, "{name} on {backend} over {form}: {}", reply.error());
        let outputs = outpost_tools::v2client::outputs(&reply).unwrap();
        for expected in &golden.outputs {
            let want = expected.to_tensor().unwrap();
            let got =
                outputs.iter().find(|o| o.name == want.name).unwrap_or_else(|| panic!("{name}: no {}", want.name));
            let diff = outpost_runtime::golden::max_abs_diff(&want, got);
            assert!(diff <= tolerance, "{name} on {backend} over {form}: `{}` differs by {diff:e}", want.name);
        }
        if form == "binary" {
            assert!(reply.headers.contains_key(outpost_runtime::v2::HEADER_LENGTH), "{name}: binary answer");
        }
    }
}
