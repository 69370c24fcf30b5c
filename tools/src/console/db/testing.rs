//! Databases for the console's unit tests: each test runs on a new SQLite file and on a new
//! database of a real PostgreSQL server (tools/postgres-test.sh, one per test process).

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, OnceLock};

use super::Database;

/// The test process's PostgreSQL server: its URL. The server stops when the process exits
/// (the script's standard input, kept open here, closes).
fn server() -> &'static str {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/postgres-test.sh");
        let mut child = Command::new(script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting tools/postgres-test.sh");
        let mut url = String::new();
        std::io::BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut url).expect("its URL");
        assert!(url.starts_with("postgres://"), "tools/postgres-test.sh did not start a server (needs postgresql)");
        // Kept open for the life of the process.
        std::mem::forget(child.stdin.take());
        // Reaped when it exits.
        std::thread::spawn(move || child.wait());
        url.trim().to_owned()
    })
}

/// One of a test's databases. The test's folder (the SQLite file's, and any the test puts in
/// [`TestDatabase::folder`]) is removed when the last of its databases is dropped, or kept, with
/// its path printed, when the test panicked.
pub struct TestDatabase {
    database: Database,
    folder: Arc<Folder>,
}

impl TestDatabase {
    /// The test's own folder, shared by its databases.
    pub fn folder(&self) -> &Path {
        &self.folder.0
    }
}

impl std::ops::Deref for TestDatabase {
    type Target = Database;

    fn deref(&self) -> &Database {
        &self.database
    }
}

impl std::fmt::Display for TestDatabase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.database.fmt(f)
    }
}

struct Folder(PathBuf);

impl Drop for Folder {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("the failed test's files are kept in {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A new, empty database named after the test on each engine.
pub fn databases(name: &str) -> Vec<TestDatabase> {
    let dir = std::env::temp_dir().join(format!("outpost-console-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let server = server();
    let db = format!("t_{}_{}", name.replace('-', "_"), std::process::id());
    let admin = super::open_raw(&Database::Postgres(server.to_owned())).unwrap();
    // One statement each: CREATE DATABASE takes no transaction block.
    admin.execute_batch(&format!("DROP DATABASE IF EXISTS {db}")).unwrap();
    admin.execute_batch(&format!("CREATE DATABASE {db}")).unwrap();
    let sqlite = Database::Sqlite(dir.join("console.db"));
    let postgres = Database::Postgres(format!("{}/{db}", server.rsplit_once('/').expect("a URL path").0));
    let folder = Arc::new(Folder(dir));
    [sqlite, postgres].into_iter().map(|database| TestDatabase { database, folder: folder.clone() }).collect()
}
