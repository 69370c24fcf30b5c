//! A real PostgreSQL for the console's tests (Debian's postgresql package, started by
//! tools/postgres-test.sh: a throwaway cluster on a loopback port, one per test process, gone
//! when the process exits).

use std::io::BufRead;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

fn server() -> &'static str {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| {
        let mut child = Command::new(crate::repo_root().join("tools/postgres-test.sh"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting tools/postgres-test.sh");
        let mut url = String::new();
        std::io::BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut url).expect("its URL");
        assert!(url.starts_with("postgres://"), "tools/postgres-test.sh did not start a server (needs postgresql)");
        // The script stops the server when this pipe closes: at the end of the process.
        std::mem::forget(child.stdin.take());
        // Reaped when it exits.
        std::thread::spawn(move || child.wait());
        url.trim().to_owned()
    })
}

/// A new, empty database on the test server: its URL.
pub fn database(name: &str) -> String {
    let server = server();
    let db = format!("e2e_{}_{}", name.replace('-', "_"), std::process::id());
    for sql in [format!("DROP DATABASE IF EXISTS {db}"), format!("CREATE DATABASE {db}")] {
        let out = Command::new("psql").args([server, "-q", "-c", &sql]).output().expect("psql (postgresql-client)");
        assert!(out.status.success(), "{sql}: {}", String::from_utf8_lossy(&out.stderr));
    }
    format!("{}/{db}", server.rsplit_once('/').expect("a URL path").0)
}

/// How many bytes the database takes on disk.
pub fn size(url: &str) -> u64 {
    let out = Command::new("psql")
        .args([url, "-tA", "-c", "SELECT pg_database_size(current_database())"])
        .output()
        .expect("psql");
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0)
}
