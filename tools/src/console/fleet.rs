//! The fleet at any size: devices counted by release, update state and drift band, and listed a
//! page at a time under filters. What the page polls, so its cost does not grow with the fleet
//! past one `GROUP BY` per grouping and one page of rows.

use super::db::{self, Connection, ToSql};
use serde::Deserialize;
use serde_json::{Value, json};

use super::ingest;

/// Drift bands: a device's largest drift score (last closed window) falls in one, or in
/// `none` (no score yet). The bounds are PSI's customary reading: under 0.1 no shift, 0.1 to
/// 0.25 a moderate one (the device's default alert threshold is 0.25), past 1 a large one.
pub const DRIFT_BANDS: [(&str, f64, f64); 4] =
    [("<0.1", 0.0, 0.1), ("0.1-0.25", 0.1, 0.25), ("0.25-1", 0.25, 1.0), (">=1", 1.0, f64::INFINITY)];

/// Most devices a page holds.
pub const MAX_PAGE: i64 = 1000;

/// Which devices to list (each filter optional; all given must hold).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Filter {
    pub fleet: Option<String>,
    /// A release number, or `none` (devices that run no release).
    pub release: Option<String>,
    /// An update state (`idle`, `downloading`, `failed`, ...).
    pub state: Option<String>,
    pub online: Option<bool>,
    /// A drift band (`none`, `<0.1`, `0.1-0.25`, `0.25-1`, `>=1`).
    pub drift: Option<String>,
    /// Part of the device id.
    pub q: Option<String>,
    pub limit: Option<i64>,
    pub offset: Option<i64>,
}

impl Filter {
    /// The `WHERE` clause and its parameters.
    fn clause(&self) -> Result<(String, Vec<Box<dyn ToSql>>), String> {
        let mut terms: Vec<String> = vec!["1 = 1".into()];
        let mut params: Vec<Box<dyn ToSql>> = Vec::new();
        let mut bind = |terms: &mut Vec<String>, sql: &str, v: Box<dyn ToSql>| {
            params.push(v);
            terms.push(sql.replace('?', &format!("?{}", params.len())));
        };
        if let Some(f) = &self.fleet {
            bind(&mut terms, "fleet = ?", Box::new(f.clone()));
        }
        match self.release.as_deref() {
            None => {}
            Some("none") => terms.push("release_number IS NULL".into()),
            Some(n) => {
                let n: i64 = n.parse().map_err(|_| format!("release `{n}`: a release number or `none`"))?;
                bind(&mut terms, "release_number = ?", Box::new(n));
            }
        }
        if let Some(s) = &self.state {
            bind(&mut terms, "coalesce(update_state, 'none') = ?", Box::new(s.clone()));
        }
        if let Some(on) = self.online {
            bind(&mut terms, "online = ?", Box::new(on as i64));
        }
        match self.drift.as_deref() {
            None => {}
            Some("none") => terms.push("drift IS NULL".into()),
            Some(band) => {
                let Some(&(_, lo, hi)) = DRIFT_BANDS.iter().find(|b| b.0 == band) else {
                    let names: Vec<&str> = DRIFT_BANDS.iter().map(|b| b.0).collect();
                    return Err(format!("drift `{band}`: one of none, {}", names.join(", ")));
                };
                bind(&mut terms, "drift >= ?", Box::new(lo));
                if hi.is_finite() {
                    bind(&mut terms, "drift < ?", Box::new(hi));
                }
            }
        }
        if let Some(q) = &self.q {
            // A substring, with LIKE's own wildcards taken literally.
            let escaped = q.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_");
            // Case-insensitive on both engines (SQLite's LIKE ignores ASCII case, PostgreSQL's does not).
            bind(&mut terms, "lower(id) LIKE '%' || lower(?) || '%' ESCAPE '\\'", Box::new(escaped));
        }
        Ok((terms.join(" AND "), params))
    }
}

/// Devices under `filter`, a page at a time: `{"total", "offset", "limit", "devices"}`.
pub fn page(conn: &Connection, filter: &Filter) -> Result<Value, String> {
    let (clause, params) = filter.clause()?;
    let refs: Vec<&dyn ToSql> = params.iter().map(|p| p.as_ref()).collect();
    let db = |e: db::Error| format!("database: {e}");
    let total: i64 = conn
        .query_row(&format!("SELECT count(*) FROM devices WHERE {clause}"), refs.as_slice(), |r| r.get(0))
        .map_err(db)?;
    let limit = filter.limit.unwrap_or(50).clamp(1, MAX_PAGE);
    let offset = filter.offset.unwrap_or(0).max(0);
    let sql = format!("SELECT * FROM devices WHERE {clause} ORDER BY fleet, id LIMIT {limit} OFFSET {offset}");
    let mut stmt = conn.prepare(&sql).map_err(db)?;
    let devices: Vec<Value> =
        stmt.query_map(refs.as_slice(), ingest::device_json).map_err(db)?.collect::<Result<_, _>>().map_err(db)?;
    Ok(json!({"total": total, "offset": offset, "limit": limit, "devices": devices}))
}

/// Devices counted by release, by update state and by drift band (of one fleet, or all).
pub fn groups(conn: &Connection, fleet: Option<&str>) -> db::Result<Value> {
    let count = |key: &str, column: &str| -> db::Result<Vec<Value>> {
        let sql = format!(
            "SELECT {column} AS k, count(*), sum(online) FROM devices WHERE (fleet = ?1 OR ?1 IS NULL)
             GROUP BY k ORDER BY count(*) DESC, k NULLS FIRST"
        );
        let mut s = conn.prepare(&sql)?;
        s.query_map([fleet], |r| {
            let k = match r.get::<_, db::Value>(0)? {
                db::Value::Integer(n) => json!(n),
                db::Value::Text(t) => json!(t),
                _ => Value::Null,
            };
            Ok(json!({key: k, "devices": r.get::<_, i64>(1)?, "online": r.get::<_, i64>(2)?}))
        })?
        .collect()
    };
    let mut band = String::from("CASE WHEN drift IS NULL THEN 'none'");
    for (name, _, hi) in DRIFT_BANDS {
        if hi.is_finite() {
            band.push_str(&format!(" WHEN drift < {hi} THEN '{name}'"));
        } else {
            band.push_str(&format!(" ELSE '{name}' END"));
        }
    }
    Ok(json!({
        "release": count("release", "release_number")?,
        "state": count("state", "coalesce(update_state, 'none')")?,
        "drift": count("band", &band)?,
    }))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::console::ingest;

    /// 25 devices: d00..d24; every 5th runs no release, the rest release 1 (even) or 2 (odd); d03
    /// failed its update; every 4th has drifted far; d07 is offline.
    fn fleet(database: &db::Database) -> Connection {
        let conn = db::open(database).unwrap();
        for n in 0..25 {
            let id = format!("d{n:02}");
            let mut doc = json!({"device": id, "fleet": "f", "group": "default", "online": true});
            if n % 5 != 0 {
                doc["release"] = json!({"id": format!("{:064}", n % 2 + 1), "number": n % 2 + 1});
            }
            if n == 3 {
                doc["update"] = json!({"state": "failed"});
            }
            let psi = if n % 4 == 0 { 2.5 } else { 0.05 };
            doc["models"] = json!([{"name": "m", "versions": ["1"],
                "drift": [{"version": "1", "windows": 1, "psi": {"class": psi}}]}]);
            let s = ingest::parse("f", &id, doc.to_string().as_bytes()).unwrap();
            ingest::record(&conn, &s, 1).unwrap();
        }
        let off = ingest::parse("f", "d07", br#"{"device": "d07", "fleet": "f", "online": false}"#).unwrap();
        ingest::record(&conn, &off, 2).unwrap();
        conn
    }

    fn ids(v: &Value) -> Vec<&str> {
        v["devices"].as_array().unwrap().iter().map(|d| d["id"].as_str().unwrap()).collect()
    }

    fn query(q: Value) -> Filter {
        serde_json::from_value(q).unwrap()
    }

    #[test]
    fn devices_page_under_filters_and_bad_filters_say_why() {
        for database in db::testing::databases("fleet-page") {
            let conn = fleet(&database);
            let all = page(&conn, &query(json!({"limit": 10, "offset": 20}))).unwrap();
            assert_eq!((all["total"].as_i64(), ids(&all)), (Some(25), vec!["d20", "d21", "d22", "d23", "d24"]));
            let none = page(&conn, &query(json!({"release": "none"}))).unwrap();
            assert_eq!(ids(&none), ["d00", "d05", "d10", "d15", "d20"]);
            let one = page(&conn, &query(json!({"release": "1", "drift": ">=1"}))).unwrap();
            assert_eq!(ids(&one), ["d04", "d08", "d12", "d16", "d24"]);
            let calm = page(&conn, &query(json!({"drift": "<0.1", "online": false}))).unwrap();
            assert_eq!(ids(&calm), ["d07"]);
            assert_eq!(ids(&page(&conn, &query(json!({"state": "failed"}))).unwrap()), ["d03"]);
            assert_eq!(
                ids(&page(&conn, &query(json!({"q": "2"}))).unwrap()),
                ["d02", "d12", "d20", "d21", "d22", "d23", "d24"]
            );
            assert_eq!(page(&conn, &query(json!({"q": "%"}))).unwrap()["total"], 0, "wildcards are literal");
            assert!(page(&conn, &query(json!({"release": "two"}))).unwrap_err().contains("release number"));
            assert!(page(&conn, &query(json!({"drift": "high"}))).unwrap_err().contains("one of none"));
            assert_eq!(page(&conn, &query(json!({"limit": 100000}))).unwrap()["limit"], MAX_PAGE);
            assert_eq!(ids(&page(&conn, &query(json!({"q": "D2"}))).unwrap()), ["d20", "d21", "d22", "d23", "d24"]);
        }
    }

    #[test]
    fn groups_count_devices_by_release_state_and_drift_band() {
        for database in db::testing::databases("fleet-groups") {
            let conn = fleet(&database);
            let g = groups(&conn, None).unwrap();
            assert_eq!(
                g["release"],
                json!([{"release": 1, "devices": 10, "online": 10}, {"release": 2, "devices": 10, "online": 9},
                   {"release": null, "devices": 5, "online": 5}])
            );
            assert_eq!(
                g["state"],
                json!([{"state": "none", "devices": 24, "online": 23}, {"state": "failed", "devices": 1, "online": 1}])
            );
            assert_eq!(
                g["drift"],
                json!([{"band": "<0.1", "devices": 18, "online": 17}, {"band": ">=1", "devices": 7, "online": 7}])
            );
            assert_eq!(groups(&conn, Some("other")).unwrap()["release"], json!([]));
        }
    }
}
