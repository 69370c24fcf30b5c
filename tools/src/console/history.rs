//! Drift over time: the console samples its devices' drift scores per fleet and release at a
//! fixed interval, so the page can draw each release's drift as it moves. One row per fleet
//! and release per sample (a few hundred bytes a minute for a fleet, whatever its size); rows
//! older than [`KEEP_MS`] are dropped at each sample.

use crate::console::db::{self, Connection, OptionalExtension, params};
use serde_json::{Value, json};

/// How long samples are kept.
pub const KEEP_MS: i64 = 7 * 24 * 3600 * 1000;

/// Drift past this counts a device as drifting (the devices' default alert threshold).
pub const OVER: f64 = 0.25;

/// Takes a sample when the last one is at least `every_ms` old; returns whether it did.
pub fn sample(conn: &Connection, now: i64, every_ms: i64) -> db::Result<bool> {
    let last: Option<i64> =
        conn.query_row("SELECT max(at) FROM drift_history", params![], |r| r.get(0)).optional()?.flatten();
    if last.is_some_and(|t| now - t < every_ms) {
        return Ok(false);
    }
    conn.execute(
        "INSERT INTO drift_history (at, fleet, release_number, devices, scored, mean, max, over)
         SELECT CAST(?1 AS BIGINT), fleet, release_number, count(*), count(drift), avg(drift), max(drift),
                coalesce(sum(CASE WHEN drift > ?2 THEN 1 ELSE 0 END), 0)
         FROM devices WHERE online = 1 GROUP BY fleet, release_number",
        params![now, OVER],
    )?;
    conn.execute("DELETE FROM drift_history WHERE at < ?1", [now - KEEP_MS])?;
    Ok(true)
}

/// Each release's samples since `since` (of one fleet, or all): `[{"fleet", "release",
/// "points": [[at, mean, max, over, scored], ...]}]`, oldest point first.
pub fn drift(conn: &Connection, fleet: Option<&str>, since: i64) -> db::Result<Vec<Value>> {
    let mut s = conn.prepare(
        "SELECT fleet, release_number, at, mean, max, over, scored FROM drift_history
         WHERE at >= ?1 AND (fleet = ?2 OR ?2 IS NULL) ORDER BY fleet, release_number NULLS FIRST, at",
    )?;
    let mut out: Vec<Value> = Vec::new();
    let rows = s.query_map(params![since, fleet], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, Option<i64>>(1)?,
            json!([
                r.get::<_, i64>(2)?,
                r.get::<_, Option<f64>>(3)?,
                r.get::<_, Option<f64>>(4)?,
                r.get::<_, i64>(5)?,
                r.get::<_, i64>(6)?
            ]),
        ))
    })?;
    for row in rows {
        let (f, release, point) = row?;
        match out.last_mut() {
            Some(last) if last["fleet"] == f.as_str() && last["release"] == json!(release) => {
                last["points"].as_array_mut().expect("points").push(point);
            }
            _ => out.push(json!({"fleet": f, "release": release, "points": [point]})),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::console::{db, ingest};

    #[test]
    fn samples_per_release_at_the_interval_and_old_ones_go() {
        for database in db::testing::databases("drift-history") {
            let conn = db::open(&database).unwrap();
            let report = |id: &str, number: u64, psi: Option<f64>| {
                let mut doc = json!({"device": id, "fleet": "f", "online": true,
                                 "release": {"id": format!("{number:064}"), "number": number}});
                if let Some(p) = psi {
                    doc["models"] = json!([{"name": "m", "drift": [{"version": "1", "psi": {"class": p}}]}]);
                }
                let s = ingest::parse("f", id, doc.to_string().as_bytes()).unwrap();
                ingest::record(&conn, &s, 0).unwrap();
            };
            report("a", 1, Some(0.1));
            report("b", 1, Some(0.5));
            report("c", 2, None);
            assert!(sample(&conn, 1_000, 60_000).unwrap());
            assert!(!sample(&conn, 30_000, 60_000).unwrap(), "within the interval");
            report("c", 2, Some(3.0));
            assert!(sample(&conn, 61_000, 60_000).unwrap());
            let h = drift(&conn, None, 0).unwrap();
            assert_eq!(
                h,
                vec![
                    json!({"fleet": "f", "release": 1, "points": [[1_000, 0.3, 0.5, 1, 2], [61_000, 0.3, 0.5, 1, 2]]}),
                    json!({"fleet": "f", "release": 2, "points": [[1_000, null, null, 0, 0], [61_000, 3.0, 3.0, 1, 1]]}),
                ]
            );
            assert_eq!(drift(&conn, None, 2_000).unwrap()[0]["points"].as_array().unwrap().len(), 1);
            assert!(drift(&conn, Some("other"), 0).unwrap().is_empty());
            // A week later the first samples are gone.
            assert!(sample(&conn, 1_000 + KEEP_MS + 1, 60_000).unwrap());
            let h = drift(&conn, None, 0).unwrap();
            assert_eq!(h[0]["points"].as_array().unwrap().len(), 2, "{h:?}");
        }
    }
}
