//! Uploaded objects in the database. An object is taken into the console's objects/ folder
//! first (streamed, hashed, renamed into place: [`catalog::ObjectWriter`]), then copied into the
//! database in pieces of [`PIECE`] bytes. Every console keeps its folder in step with the
//! database ([`sync`]), so a chunk request answered by any console of a shared database finds
//! the object; the blob server reads only the folder. Reference: docs/scale.md.

use std::io::Read;
use std::path::Path;

use super::catalog::ObjectWriter;
use super::db::{self, Connection, params};

/// The size of an object's pieces in the database (bounded memory both ways).
pub const PIECE: usize = 1 << 20;

/// Copies the stored object `sha256` (in `objects`) into the database, with its `blobs` row, in
/// one transaction. An object already there is left as it is.
pub fn store(conn: &mut Connection, objects: &Path, sha256: &str, now: i64) -> Result<u64, String> {
    let dbe = |e: db::Error| format!("database: {e}");
    let mut file = std::fs::File::open(objects.join(sha256)).map_err(|e| format!("reading the object: {e}"))?;
    let len = file.metadata().map_err(|e| e.to_string())?.len();
    let tx = conn.transaction().map_err(dbe)?;
    let pieces: i64 =
        tx.query_row("SELECT count(*) FROM object_chunks WHERE sha256 = ?1", [sha256], |r| r.get(0)).map_err(dbe)?;
    if pieces == 0 {
        let mut buf = vec![0u8; PIECE];
        for seq in 0i64.. {
            let n = read_full(&mut file, &mut buf).map_err(|e| format!("reading the object: {e}"))?;
            if n == 0 && seq > 0 {
                break;
            }
            tx.execute(
                "INSERT INTO object_chunks (sha256, seq, data) VALUES (?1, ?2, ?3)",
                params![sha256, seq, &buf[..n]],
            )
            .map_err(dbe)?;
            if n < PIECE {
                break;
            }
        }
    }
    tx.execute(
        "INSERT INTO blobs (sha256, length, stored) VALUES (?1, ?2, ?3)
         ON CONFLICT (sha256) DO UPDATE SET length = ?2, stored = ?3",
        params![sha256, len as i64, now],
    )
    .map_err(dbe)?;
    tx.commit().map_err(dbe)?;
    Ok(len)
}

fn read_full(file: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Copies into `objects` every object the database holds and the folder lacks; how many. An
/// object whose pieces do not hash to its name is not kept (and is reported).
pub fn sync(conn: &Connection, objects: &Path) -> db::Result<usize> {
    let known: Vec<(String, i64)> = conn
        .prepare("SELECT sha256, length FROM blobs")?
        .query_map(params![], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    let mut copied = 0;
    for (sha256, length) in known {
        if std::fs::metadata(objects.join(&sha256)).is_ok_and(|m| m.len() == length as u64) {
            continue;
        }
        match copy_out(conn, objects, &sha256) {
            Ok(true) => copied += 1,
            Ok(false) => {}
            Err(e) => tracing::warn!(object = sha256, error = e, "object not copied from the database"),
        }
    }
    Ok(copied)
}

/// One object from its pieces; false when the database has none (an object stored before
/// objects were kept in the database, which only its own console's folder holds).
fn copy_out(conn: &Connection, objects: &Path, sha256: &str) -> Result<bool, String> {
    let dbe = |e: db::Error| format!("database: {e}");
    let pieces: i64 =
        conn.query_row("SELECT count(*) FROM object_chunks WHERE sha256 = ?1", [sha256], |r| r.get(0)).map_err(dbe)?;
    if pieces == 0 {
        return Ok(false);
    }
    let mut w = ObjectWriter::create(objects, sha256).map_err(|e| e.to_string())?;
    for seq in 0..pieces {
        // One piece per query: memory stays at a piece whatever the object's size.
        let data: Vec<u8> = conn
            .query_row("SELECT data FROM object_chunks WHERE sha256 = ?1 AND seq = ?2", params![sha256, seq], |r| {
                r.get(0)
            })
            .map_err(dbe)?;
        w.write(&data)?;
    }
    w.finish()?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use sha2::Digest;

    use super::*;

    #[test]
    fn objects_go_through_the_database_to_another_consoles_folder() {
        for database in db::testing::databases("objects") {
            let mut conn = db::open(&database).unwrap();
            let dir = database.folder().join(format!("objects-{}", conn.is_postgres()));
            let (a, b) = (dir.join("a"), dir.join("b"));
            std::fs::create_dir_all(&a).unwrap();
            std::fs::create_dir_all(&b).unwrap();
            // Three pieces, the last short; and an empty object.
            let big: Vec<u8> = (0..(2 * PIECE + 5)).map(|i| (i % 251) as u8).collect();
            let mut names = Vec::new();
            for body in [big.as_slice(), b""] {
                let name: String = sha2::Sha256::digest(body).iter().map(|b| format!("{b:02x}")).collect();
                let mut w = ObjectWriter::create(&a, &name).unwrap();
                w.write(body).unwrap();
                w.finish().unwrap();
                assert_eq!(store(&mut conn, &a, &name, 1).unwrap(), body.len() as u64);
                assert_eq!(store(&mut conn, &a, &name, 2).unwrap(), body.len() as u64, "stored twice: kept once");
                names.push(name);
            }
            assert_eq!(sync(&conn, &b).unwrap(), 2, "{database}");
            assert_eq!(std::fs::read(b.join(&names[0])).unwrap(), big);
            assert_eq!(std::fs::read(b.join(&names[1])).unwrap(), b"");
            assert_eq!(sync(&conn, &b).unwrap(), 0, "{database}: nothing new");
            // A piece changed in the database: the copy is refused, nothing is left behind.
            conn.execute(
                "UPDATE object_chunks SET data = ?2 WHERE sha256 = ?1 AND seq = 1",
                params![names[0], vec![0u8; 3]],
            )
            .unwrap();
            std::fs::remove_file(b.join(&names[0])).unwrap();
            assert_eq!(sync(&conn, &b).unwrap(), 0, "{database}");
            assert!(!b.join(&names[0]).exists());
            assert_eq!(std::fs::read_dir(&b).unwrap().count(), 1, "{database}: no temporary file left");
        }
    }
}
