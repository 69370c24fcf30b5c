//! The console's database: which engine (SQLite by default, or PostgreSQL), opening and
//! migrating it, and the small helpers every part uses. Reference: docs/scale.md.

mod conn;
mod pg;
pub(crate) mod value;

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

pub use conn::{Connection, Row, Statement, Transaction};
pub(crate) use value::params;
pub use value::{Error, OptionalExtension, Result, ToSql, Value};

/// Schema migrations, applied in order. Written once, in SQLite's spelling; PostgreSQL gets
/// four type names mapped to its own (see [`postgres_spelling`]).
const MIGRATIONS: &[&str] = &[
    include_str!("../../../migrations/0001_init.sql"),
    include_str!("../../../migrations/0002_shadow_gate.sql"),
    include_str!("../../../migrations/0003_soak_gate.sql"),
    include_str!("../../../migrations/0004_several_consoles.sql"),
];

/// Where the console keeps its state: `sqlite:PATH` or `postgres://...` (`postgresql://` too).
#[derive(Clone, Debug, PartialEq)]
pub enum Database {
    Sqlite(PathBuf),
    Postgres(String),
}

impl std::str::FromStr for Database {
    type Err = String;

    fn from_str(s: &str) -> Result<Database, String> {
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            Ok(Database::Postgres(s.to_owned()))
        } else if let Some(path) = s.strip_prefix("sqlite:") {
            if path.is_empty() {
                return Err("sqlite: needs a file path (sqlite:console-data/console.db)".into());
            }
            Ok(Database::Sqlite(PathBuf::from(path)))
        } else {
            Err(format!("`{s}`: a database is sqlite:PATH or postgres://USER@HOST/NAME"))
        }
    }
}

impl std::fmt::Display for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Database::Sqlite(p) => write!(f, "sqlite:{}", p.display()),
            // The URL may carry a password: show where, not how.
            Database::Postgres(url) => {
                let host = url.split_once('@').map_or(url.as_str(), |(_, h)| h);
                write!(f, "postgres://…@{host}")
            }
        }
    }
}

/// Opens (creating if needed) and migrates the database.
///
/// SQLite runs in WAL with `synchronous=NORMAL`: a committed step survives the console being
/// killed; a power cut may lose the last steps but never corrupts the file. Several consoles
/// starting at once on one PostgreSQL database migrate it once (the first takes a lock).
pub fn open(db: &Database) -> anyhow::Result<Connection> {
    let mut conn = open_raw(db)?;
    migrate(&mut conn)?;
    Ok(conn)
}

/// Connects without migrating.
fn open_raw(db: &Database) -> anyhow::Result<Connection> {
    Ok(match db {
        Database::Sqlite(path) => sqlite(path)?,
        Database::Postgres(url) => Connection::new(conn::Engine::Postgres(Box::new(pg::Pg::connect(url)?))),
    })
}

fn sqlite(path: &Path) -> anyhow::Result<Connection> {
    let conn = rusqlite::Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    Ok(Connection::new(conn::Engine::Sqlite(conn)))
}

/// SQLite counts applied migrations in `PRAGMA user_version`; PostgreSQL in a one-row table.
fn migrate(conn: &mut Connection) -> anyhow::Result<()> {
    let pg = conn.is_postgres();
    let tx = conn.transaction()?;
    let applied: i64 = if pg {
        // One console migrates; the others wait here, then find nothing to do.
        tx.execute("SELECT pg_advisory_xact_lock(7415001)", params![])?;
        tx.execute_batch("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)")?;
        tx.query_row("SELECT coalesce(max(version), 0) FROM schema_version", params![], |r| r.get(0))?
    } else {
        tx.query_row("PRAGMA user_version", params![], |r| r.get(0))?
    };
    if applied as usize > MIGRATIONS.len() {
        anyhow::bail!(
            "the database is at schema version {applied}, newer than this console ({}); use a newer outpostctl",
            MIGRATIONS.len()
        );
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(applied as usize) {
        let version = i + 1;
        if pg {
            tx.execute_batch(&postgres_spelling(sql))?;
            tx.execute("DELETE FROM schema_version", params![])?;
            tx.execute("INSERT INTO schema_version (version) VALUES (?1)", params![version as i64])?;
        } else {
            tx.execute_batch(sql)?;
            tx.execute_batch(&format!("PRAGMA user_version = {version}"))?;
        }
        tracing::info!(version, "database migrated");
    }
    tx.commit()?;
    Ok(())
}

/// A migration in PostgreSQL's spelling: SQLite's auto-numbered key becomes an identity
/// column, and INTEGER (64-bit in SQLite), REAL (double) and BLOB become BIGINT, DOUBLE
/// PRECISION and BYTEA. Nothing else in the migrations differs between the engines.
fn postgres_spelling(sql: &str) -> String {
    let sql = sql.replace("INTEGER PRIMARY KEY AUTOINCREMENT", "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY");
    let mut out = String::with_capacity(sql.len() + 64);
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        out.push_str(match word.as_str() {
            "INTEGER" => "BIGINT",
            "REAL" => "DOUBLE PRECISION",
            "BLOB" => "BYTEA",
            w => w,
        });
        word.clear();
    };
    for c in sql.chars() {
        if c.is_ascii_alphanumeric() || c == '_' {
            word.push(c);
        } else {
            flush(&mut word, &mut out);
            out.push(c);
        }
    }
    flush(&mut word, &mut out);
    out
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// Appends to the event log.
pub fn event(
    conn: &Connection,
    at: i64,
    rollout: Option<i64>,
    device: Option<&str>,
    kind: &str,
    detail: &str,
) -> Result<()> {
    conn.execute(
        "INSERT INTO events (at, rollout_id, device_id, kind, detail) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![at, rollout, device, kind, detail],
    )?;
    Ok(())
}

#[cfg(test)]
pub mod testing;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_apply_once_and_a_newer_database_is_refused() {
        for db in testing::databases("migrations") {
            let conn = open(&db).unwrap();
            event(&conn, 1, None, Some("d1"), "test", "kept").unwrap();
            drop(conn);
            let conn = open(&db).unwrap();
            let n: i64 = conn.query_row("SELECT count(*) FROM events", params![], |r| r.get(0)).unwrap();
            assert_eq!(n, 1, "{db}: reopening keeps the data and applies nothing twice");
            if conn.is_postgres() {
                conn.execute("UPDATE schema_version SET version = 99", params![]).unwrap();
            } else {
                conn.execute_batch("PRAGMA user_version = 99").unwrap();
            }
            drop(conn);
            let err = open(&db).err().unwrap().to_string();
            assert!(err.contains("newer than this console"), "{db}: {err}");
        }
    }

    #[test]
    fn database_urls_name_an_engine() {
        assert_eq!("sqlite:x/console.db".parse(), Ok(Database::Sqlite("x/console.db".into())));
        let pg: Database = "postgres://outpost:secret@db.example:5432/console".parse().unwrap();
        assert_eq!(pg.to_string(), "postgres://…@db.example:5432/console");
        assert!("mysql://x".parse::<Database>().unwrap_err().contains("sqlite:PATH or postgres://"));
        assert!("sqlite:".parse::<Database>().is_err());
    }

    #[test]
    fn postgres_gets_its_own_type_names_and_nothing_else_changes() {
        let sql = "CREATE TABLE t (id INTEGER PRIMARY KEY AUTOINCREMENT, n INTEGER NOT NULL, x REAL, b BLOB, \
                   realm TEXT); -- INTEGERS";
        assert_eq!(
            postgres_spelling(sql),
            "CREATE TABLE t (id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, n BIGINT NOT NULL, \
             x DOUBLE PRECISION, b BYTEA, realm TEXT); -- INTEGERS"
        );
    }
}
