//! `outpostctl keys|root|release|delta`: the publisher's side of signed releases.

use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow, bail};
use outpost_updater::author::{self, RootParams};
use outpost_updater::envelope::{Envelope, RELEASE_TYPE, ROOT_TYPE};
use outpost_updater::keys::{PublicKey, SecretKey};
use outpost_updater::release::{ReleaseDoc, Target};
use outpost_updater::release_dir::ReleaseDir;
use outpost_updater::root::Root;

#[derive(clap::Subcommand)]
pub enum KeysCommand {
    /// Make an ed25519 key pair: NAME.key (secret, mode 0600) and NAME.pub (hex public key).
    Gen { name: PathBuf },
}

#[derive(clap::Subcommand)]
pub enum RootCommand {
    /// Write an unsigned root document (sign it with `outpostctl sign`).
    Create(RootArgs),
    /// Print a root document.
    Show { file: PathBuf },
}

#[derive(clap::Args)]
pub struct RootArgs {
    #[arg(long)]
    fleet: String,
    /// 1 for the first root; each rotation adds one.
    #[arg(long, default_value_t = 1)]
    version: u64,
    /// Root public key files (.pub).
    #[arg(long = "root-key", required = true)]
    root_keys: Vec<PathBuf>,
    #[arg(long, default_value_t = 1)]
    root_threshold: usize,
    /// Release public key files (.pub).
    #[arg(long = "release-key", required = true)]
    release_keys: Vec<PathBuf>,
    #[arg(long, default_value_t = 1)]
    release_threshold: usize,
    #[arg(long, default_value_t = 365)]
    expires_in_days: u64,
    #[arg(long, default_value_t = 90)]
    release_expires_in_days: u64,
    /// Key ids never to trust again.
    #[arg(long = "revoke")]
    revoked: Vec<String>,
    #[arg(long, short)]
    out: PathBuf,
}

#[derive(clap::Subcommand)]
pub enum ReleaseCommand {
    /// Make an unsigned release directory from a spec (TOML: fleet, group, number, models).
    Create {
        spec: PathBuf,
        #[arg(long, short)]
        out: PathBuf,
    },
    /// Add the signature of a release key to DIR/release.json.
    Sign {
        dir: PathBuf,
        #[arg(long)]
        key: PathBuf,
    },
    /// Check a release directory as a device of FLEET/GROUP trusting ROOT would (signatures,
    /// expiry, blobs and deltas), without a store.
    Verify {
        dir: PathBuf,
        #[arg(long)]
        root: PathBuf,
        #[arg(long)]
        group: Option<String>,
    },
    /// Print a release document.
    Show { dir: PathBuf },
    /// The releases uploaded to the console.
    Ls {
        #[command(flatten)]
        conn: crate::console::client::ConsoleConn,
    },
    /// Upload a signed release directory to the console: the objects it lacks, then the release
    /// (which the console checks against the fleet's root).
    Upload {
        dir: PathBuf,
        #[command(flatten)]
        conn: crate::console::client::ConsoleConn,
    },
}

#[derive(clap::Args)]
pub struct DeltaArgs {
    /// The new (unsigned) release directory.
    dir: PathBuf,
    /// Earlier release directories whose blobs devices may hold.
    #[arg(long = "base", required = true)]
    bases: Vec<PathBuf>,
    #[arg(long, default_value_t = outpost_updater::delta::DEFAULT_LEVEL)]
    level: i32,
}

fn read_pub(path: &Path) -> anyhow::Result<PublicKey> {
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    PublicKey::from_hex(text.trim()).map_err(|e| anyhow!("{}: {e}", path.display()))
}

pub fn keys(cmd: KeysCommand) -> anyhow::Result<()> {
    let KeysCommand::Gen { name } = cmd;
    let key = SecretKey::generate()?;
    let secret = name.with_extension("key");
    key.write(&secret).with_context(|| format!("writing {}", secret.display()))?;
    let public = name.with_extension("pub");
    std::fs::write(&public, format!("{}\n", key.public().to_hex()))?;
    println!("{} (secret), {} (public), key id {}", secret.display(), public.display(), key.public().id());
    Ok(())
}

pub fn root(cmd: RootCommand) -> anyhow::Result<()> {
    match cmd {
        RootCommand::Create(a) => {
            let root_keys = a.root_keys.iter().map(|p| read_pub(p)).collect::<anyhow::Result<Vec<_>>>()?;
            let release_keys = a.release_keys.iter().map(|p| read_pub(p)).collect::<anyhow::Result<Vec<_>>>()?;
            let env = author::root_doc(&RootParams {
                fleet: &a.fleet,
                version: a.version,
                expires_in_days: a.expires_in_days,
                root_keys: &root_keys,
                root_threshold: a.root_threshold,
                release_keys: &release_keys,
                release_threshold: a.release_threshold,
                release_expires_in_days: a.release_expires_in_days,
                revoked: &a.revoked,
            });
            Root::parse(&env).map_err(|e| anyhow!("{e}"))?;
            std::fs::write(&a.out, env.to_bytes())?;
            println!(
                "{}: root version {} of fleet {} (unsigned: sign with root keys)",
                a.out.display(),
                a.version,
                a.fleet
            );
            Ok(())
        }
        RootCommand::Show { file } => {
            let env = Envelope::parse(&std::fs::read(&file)?).map_err(|e| anyhow!("{e}"))?;
            let payload = env.payload(ROOT_TYPE).map_err(|e| anyhow!("{e}"))?;
            println!("{}", String::from_utf8_lossy(&payload));
            println!(
                "signed by: {:?}",
                env.signatures.iter().map(|s| outpost_updater::short(&s.keyid)).collect::<Vec<_>>()
            );
            Ok(())
        }
    }
}

pub fn sign(file: &Path, key: &Path) -> anyhow::Result<()> {
    let key = SecretKey::read(key).map_err(|e| anyhow!(e))?;
    author::sign_file(file, &key).map_err(|e| anyhow!(e))?;
    println!("{}: signed by key {}", file.display(), outpost_updater::short(&key.public().id()));
    Ok(())
}

pub fn release(cmd: ReleaseCommand) -> anyhow::Result<()> {
    match cmd {
        ReleaseCommand::Create { spec, out } => {
            let doc = author::create(&spec, &out).map_err(|e| anyhow!(e))?;
            println!(
                "{}: release {} for {}/{}, {} model(s), unsigned",
                out.display(),
                doc.number,
                doc.fleet,
                doc.group,
                doc.models.len()
            );
            Ok(())
        }
        ReleaseCommand::Sign { dir, key } => sign(&ReleaseDir(&dir).envelope(), &key),
        ReleaseCommand::Ls { conn } => crate::console::client::release_ls(conn),
        ReleaseCommand::Upload { dir, conn } => crate::console::client::release_upload(&dir, conn),
        ReleaseCommand::Verify { dir, root, group } => {
            let env = Envelope::parse(&std::fs::read(&root)?).map_err(|e| anyhow!("{e}"))?;
            let root = Root::trust_first(&env).map_err(|e| anyhow!("root: {e}"))?;
            let (release_env, unchecked) = author::read_release(&dir).map_err(|e| anyhow!(e))?;
            let target = Target { fleet: root.doc.fleet.clone(), group: group.unwrap_or(unchecked.group) };
            let doc = ReleaseDoc::verify(&release_env, &root, std::time::SystemTime::now(), &target, None)
                .map_err(|e| anyhow!("refused: {e}"))?;
            for b in doc.blobs() {
                let (sha, len) = outpost_updater::store::hash_file(&ReleaseDir(&dir).blob(&b.sha256))
                    .with_context(|| format!("blob {}", b.sha256))?;
                if sha != b.sha256 || len != b.length {
                    bail!("blob {} differs from the signed hash or length", b.sha256);
                }
            }
            for d in &doc.deltas {
                let (sha, len) = outpost_updater::store::hash_file(&ReleaseDir(&dir).delta(&d.sha256))?;
                if sha != d.sha256 || len != d.length {
                    bail!("delta {} differs from the signed hash or length", d.sha256);
                }
            }
            println!(
                "release {} for {}/{}: signatures, expiry, blobs and deltas verify",
                doc.number, doc.fleet, doc.group
            );
            Ok(())
        }
        ReleaseCommand::Show { dir } => {
            let (env, _) = author::read_release(&dir).map_err(|e| anyhow!(e))?;
            println!("{}", String::from_utf8_lossy(&env.payload(RELEASE_TYPE).map_err(|e| anyhow!("{e}"))?));
            println!(
                "signed by: {:?}",
                env.signatures.iter().map(|s| outpost_updater::short(&s.keyid)).collect::<Vec<_>>()
            );
            Ok(())
        }
    }
}

pub fn delta(a: DeltaArgs) -> anyhow::Result<()> {
    println!(
        "{:<12} {:<7} {:<14} {:>10} {:>10} {:>7} {:>6}",
        "model", "blob", "base", "full B", "delta B", "ratio", "ms"
    );
    for base in &a.bases {
        for r in author::add_deltas(&a.dir, base, a.level).map_err(|e| anyhow!(e))? {
            let (delta, ratio) = match r.delta_bytes {
                Some(d) => (d.to_string(), format!("{:.1}%", d as f64 * 100.0 / r.full_bytes as f64)),
                None => ("(full)".into(), "-".into()),
            };
            let (model, blob, base, full, ms) =
                (&r.model, r.blob, outpost_updater::short(&r.base), r.full_bytes, r.millis);
            println!("{model:<12} {blob:<7} {base:<14} {full:>10} {delta:>10} {ratio:>7} {ms:>6}");
        }
    }
    Ok(())
}
