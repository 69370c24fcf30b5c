//! A rollout as the API shows it.

use crate::console::db::{self, Connection, OptionalExtension};
use serde_json::{Map, Value, json};

use super::spec::Wave;

/// A rollout as the API shows it: settings, per-wave progress and the failures with reasons.
pub fn show(conn: &Connection, id: i64) -> db::Result<Option<Value>> {
    let Some(mut v) = conn
        .query_row(
            "SELECT r.id, r.release_id, rel.number, r.fleet, r.grp, r.labels, r.waves, r.success_pct, r.soak_ms,
                    r.error_limit, r.error_is_pct, r.rate_per_min, r.deadline_ms, r.state, r.reason, r.wave, r.created, r.updated,
                    r.shadow_agreement, r.shadow_rows, r.drift_max, r.escalation_rise, r.p99_ratio, r.rollback
             FROM rollouts r JOIN releases rel ON rel.id = r.release_id WHERE r.id = ?1",
            [id],
            |r| {
                let waves: Vec<String> = serde_json::from_str(&r.get::<_, String>(6)?).unwrap_or_default();
                let limit: f64 = r.get(9)?;
                let pct: bool = r.get(10)?;
                Ok(json!({
                    "id": r.get::<_, i64>(0)?,
                    "release": r.get::<_, String>(1)?,
                    "number": r.get::<_, i64>(2)?,
                    "fleet": r.get::<_, String>(3)?,
                    "group": r.get::<_, String>(4)?,
                    "labels": serde_json::from_str::<Value>(&r.get::<_, String>(5)?).unwrap_or(json!({})),
                    "wave_spec": waves,
                    "success_pct": r.get::<_, f64>(7)?,
                    "soak_secs": r.get::<_, i64>(8)? as f64 / 1000.0,
                    "errors": if pct { format!("{limit}%") } else { format!("{limit}") },
                    "rate_per_min": r.get::<_, i64>(11)?,
                    "deadline_secs": r.get::<_, i64>(12)? as f64 / 1000.0,
                    "state": r.get::<_, String>(13)?,
                    "reason": r.get::<_, Option<String>>(14)?,
                    "wave": r.get::<_, i64>(15)? + 1,
                    "created": r.get::<_, i64>(16)?,
                    "updated": r.get::<_, i64>(17)?,
                    "shadow_gate": match (r.get::<_, Option<f64>>(18)?, r.get::<_, Option<i64>>(19)?) {
                        (Some(agreement), Some(rows)) => json!({"agreement": agreement, "rows": rows}),
                        _ => Value::Null,
                    },
                    "soak_gate": match (r.get::<_, Option<f64>>(20)?, r.get::<_, Option<f64>>(21)?, r.get::<_, Option<f64>>(22)?) {
                        (None, None, None) => Value::Null,
                        (drift_max, escalation_rise, p99_ratio) => json!({"drift_max": drift_max,
                            "escalation_rise": escalation_rise, "p99_ratio": p99_ratio, "rollback": r.get::<_, bool>(23)?}),
                    },
                }))
            },
        )
        .optional()?
    else {
        return Ok(None);
    };
    let mut by =
        conn.prepare("SELECT wave, status, count(*) FROM rollout_devices WHERE rollout_id = ?1 GROUP BY wave, status")?;
    let rows: Vec<(Option<i64>, String, i64)> =
        by.query_map([id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?.collect::<Result<_, _>>()?;
    let total: i64 = rows.iter().map(|r| r.2).sum();
    let spec: Vec<Wave> =
        v["wave_spec"].as_array().into_iter().flatten().filter_map(|w| Wave::parse(w.as_str()?).ok()).collect();
    let mut totals = Map::new();
    for (_, status, n) in &rows {
        let e = totals.entry(status.clone()).or_insert(json!(0));
        *e = json!(e.as_i64().unwrap_or(0) + n);
    }
    let mut reached_before = 0;
    let waves: Vec<Value> = spec
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let reach = spec[..=i].iter().map(|w| w.reach(total as u64)).max().unwrap_or(0);
            let mut counts = Map::new();
            for (wave, status, n) in &rows {
                if *wave == Some(i as i64) {
                    counts.insert(status.clone(), json!(n));
                }
            }
            let size = reach.saturating_sub(reached_before);
            reached_before = reached_before.max(reach);
            json!({"wave": i + 1, "spec": w.label(), "size": size, "counts": counts})
        })
        .collect();
    v["devices"] = json!(total);
    v["counts"] = Value::Object(totals);
    v["waves"] = json!(waves);
    let mut f = conn.prepare(
        "SELECT device_id, status, reason, attempt, finished FROM rollout_devices
         WHERE rollout_id = ?1 AND status IN ('failed', 'timed_out', 'degraded', 'rolled_back') ORDER BY finished DESC LIMIT 200",
    )?;
    let failures: Vec<Value> = f
        .query_map([id], |r| {
            Ok(json!({"device": r.get::<_, String>(0)?, "status": r.get::<_, String>(1)?,
                      "reason": r.get::<_, Option<String>>(2)?, "attempt": r.get::<_, i64>(3)? + 1,
                      "at": r.get::<_, Option<i64>>(4)?}))
        })?
        .collect::<Result<_, _>>()?;
    v["failures"] = json!(failures);
    Ok(Some(v))
}
