//! Which console steps rollouts. Every console instance on a database serves the API, the page
//! and blob chunks; exactly one at a time holds the lease and steps rollouts (and records the
//! devices' states). It renews the lease at every step, inside the step's transaction, so a
//! step never runs without it; when the holder dies, another console takes the lease once it
//! expires. Reference: docs/scale.md.

use super::db::{self, Connection, OptionalExtension, params};

/// Takes or renews the lease for `holder` until `now + ttl_ms`; whether `holder` holds it.
/// Call it inside the transaction of the work the lease guards: on PostgreSQL the row stays
/// locked until that transaction ends, so two consoles never both pass.
pub fn hold(conn: &Connection, holder: &str, now: i64, ttl_ms: i64) -> db::Result<bool> {
    conn.execute(
        "INSERT INTO leases (name, holder, expires) VALUES ('rollouts', ?1, ?2) ON CONFLICT (name) DO NOTHING",
        params![holder, now + ttl_ms],
    )?;
    let n = conn.execute(
        "UPDATE leases SET holder = ?1, expires = ?2 WHERE name = 'rollouts' AND (holder = ?1 OR expires < ?3)",
        params![holder, now + ttl_ms, now],
    )?;
    Ok(n == 1)
}

/// Who holds the lease, and until when.
pub fn holder(conn: &Connection) -> db::Result<Option<(String, i64)>> {
    conn.query_row("SELECT holder, expires FROM leases WHERE name = 'rollouts'", params![], |r| {
        Ok((r.get(0)?, r.get(1)?))
    })
    .optional()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_holder_at_a_time_and_another_after_expiry() {
        for database in db::testing::databases("lease") {
            let conn = db::open(&database).unwrap();
            assert!(hold(&conn, "a", 1_000, 5_000).unwrap(), "{database}: free: a takes it");
            assert!(!hold(&conn, "b", 2_000, 5_000).unwrap(), "{database}: held by a");
            assert!(hold(&conn, "a", 4_000, 5_000).unwrap(), "{database}: a renews it (now to 9 000)");
            assert!(!hold(&conn, "b", 8_999, 5_000).unwrap(), "{database}: not expired yet");
            assert!(hold(&conn, "b", 9_001, 5_000).unwrap(), "{database}: expired: b takes it");
            assert!(!hold(&conn, "a", 9_002, 5_000).unwrap(), "{database}: a lost it");
            assert_eq!(holder(&conn).unwrap(), Some(("b".into(), 14_001)));
        }
    }
}
