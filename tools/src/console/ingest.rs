//! Devices' retained `state` messages (and the offline will) into the database: the device row,
//! its events, and what the state says about the rollouts offering it a release.

use std::collections::BTreeMap;

use super::db::{self, Connection, OptionalExtension, Row, params};
use outpost_updater::mqtt::report::{StateReport, UpdateState};
use serde_json::{Value, json};

use super::db::event;

/// The largest state document taken (a device's report is a few KiB).
pub const MAX_STATE_BYTES: usize = 256 * 1024;

/// What the console takes from one state document.
#[derive(Debug)]
pub struct DeviceState {
    pub fleet: String,
    pub id: String,
    pub online: bool,
    pub group: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub release: Option<(String, u64)>,
    pub update_state: Option<UpdateState>,
    /// The release the update state is about, and which offer of it.
    pub working_on: Option<(String, u32)>,
    pub last_error: Option<String>,
    /// The candidate release it stages, and its comparison summed over its models: rows
    /// compared, rows whose top class agreed.
    pub candidate: Option<String>,
    pub shadow: (u64, u64),
    /// The largest drift score (population stability index) of any served version's last
    /// closed window, over every signal; none until a window closes.
    pub drift: Option<f64>,
    pub report: StateReport,
}

/// Parses a state message from `fleet`'s topic for device `id`. A document that names another
/// device or fleet than its topic is refused (the broker's ACL makes that impossible for a
/// device; the check keeps a misconfigured broker from mixing devices up).
pub fn parse(fleet: &str, id: &str, payload: &[u8]) -> Result<DeviceState, String> {
    if payload.len() > MAX_STATE_BYTES {
        return Err(format!("state of {} bytes is over {MAX_STATE_BYTES}", payload.len()));
    }
    let raw: Value = serde_json::from_slice(payload).map_err(|e| format!("state is not JSON: {e}"))?;
    if !raw.is_object() {
        return Err("state is not a JSON object".into());
    }
    if raw["device"] != id || raw["fleet"] != fleet {
        return Err(format!("state names device {} of fleet {}, not its topic's", raw["device"], raw["fleet"]));
    }
    let report: StateReport = serde_json::from_value(raw).map_err(|e| format!("state is not a state report: {e}"))?;
    let u = report.update.as_ref();
    let last_error = u.and_then(|u| u.last_error.as_ref()).map(|e| {
        let reason: String = e.reason.chars().take(500).collect();
        format!("{}: {reason}", e.kind)
    });
    Ok(DeviceState {
        fleet: fleet.to_owned(),
        id: id.to_owned(),
        online: report.online,
        group: report.group.clone(),
        labels: report.body.labels.clone(),
        release: report.release.as_ref().map(|r| (r.id.clone(), r.number)),
        update_state: u.map(|u| u.state),
        working_on: u.and_then(|u| u.release.as_ref()).map(|r| (r.id.clone(), r.attempt)),
        last_error,
        candidate: report.candidate.as_ref().map(|c| c.id.clone()),
        shadow: report.body.models.iter().filter_map(|m| m.shadow.as_ref()).fold((0, 0), |(rows, agreed), s| {
            let a = s.agreement.unwrap_or(0.0).clamp(0.0, 1.0);
            (rows + s.rows, agreed + (a * s.rows as f64).round() as u64)
        }),
        drift: largest_drift(&report),
        report,
    })
}

fn largest_drift(report: &StateReport) -> Option<f64> {
    let scores = report.body.models.iter().flat_map(|m| &m.drift).flat_map(|d| d.psi.values());
    scores.copied().filter(|x| x.is_finite()).reduce(f64::max)
}

/// Records a state: the device row (created on first sight), events for what changed, and
/// the outcome for every live rollout that offered this device a release.
pub fn record(conn: &Connection, s: &DeviceState, now: i64) -> db::Result<()> {
    let before: Option<(i64, Option<i64>, Option<String>)> = conn
        .query_row(
            "SELECT online, release_number, last_error FROM devices WHERE fleet = ?1 AND id = ?2",
            params![s.fleet, s.id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?;
    let dev = Some(s.id.as_str());
    if !s.online {
        // The will or a goodbye: only the device's presence changes.
        if let Some((1, ..)) = before {
            event(conn, now, None, dev, "offline", "went offline")?;
        }
        conn.execute(
            "UPDATE devices SET online = 0, last_seen = ?3 WHERE fleet = ?1 AND id = ?2",
            params![s.fleet, s.id, now],
        )?;
        return Ok(());
    }
    let labels = serde_json::to_string(&s.labels).expect("json");
    let stats = s.report.body.stats.as_ref();
    conn.execute(
        "INSERT INTO devices (id, fleet, grp, labels, online, release_id, release_number, update_state, last_error, \
         state, first_seen, last_seen, candidate_id, shadow_rows, shadow_agreed, drift, requests, escalation_rate, p99_ms)
         VALUES (?1, ?2, ?3, ?4, 1, ?5, ?6, ?7, ?8, ?9, ?10, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)
         ON CONFLICT (fleet, id) DO UPDATE SET grp = ?3, labels = ?4, online = 1, release_id = ?5, \
         release_number = ?6, update_state = ?7, last_error = ?8, state = ?9, last_seen = ?10, candidate_id = ?11, \
         shadow_rows = ?12, shadow_agreed = ?13, drift = ?14, requests = ?15, escalation_rate = ?16, p99_ms = ?17",
        params![
            s.id,
            s.fleet,
            s.group.as_deref().unwrap_or("default"),
            labels,
            s.release.as_ref().map(|r| &r.0),
            s.release.as_ref().map(|r| r.1 as i64),
            s.update_state.map(UpdateState::as_str),
            s.last_error,
            serde_json::to_string(&s.report).expect("json"),
            now,
            s.candidate,
            s.shadow.0 as i64,
            s.shadow.1 as i64,
            s.drift,
            stats.map(|x| x.count as i64),
            stats.and_then(|x| x.escalation_rate),
            stats.and_then(|x| x.p99_ms)
        ],
    )?;
    match &before {
        None => event(conn, now, None, dev, "joined", "first state seen")?,
        Some((0, ..)) => event(conn, now, None, dev, "online", "came online")?,
        _ => {}
    }
    let old_number = before.as_ref().and_then(|b| b.1);
    if let Some((_, n)) = &s.release
        && old_number != Some(*n as i64)
    {
        event(conn, now, None, dev, "release", &format!("runs release {n}"))?;
    }
    let old_error = before.as_ref().and_then(|b| b.2.clone());
    if let Some(e) = &s.last_error
        && old_error.as_ref() != Some(e)
    {
        event(conn, now, None, dev, "error", e)?;
    }
    outcomes(conn, s, now)
}

/// Marks this device's rows in live rollouts: succeeded when it runs the rollout's release,
/// failed when it reports refusing or failing the very offer the rollout made.
fn outcomes(conn: &Connection, s: &DeviceState, now: i64) -> db::Result<()> {
    let mut stmt = conn.prepare(
        "SELECT rd.rollout_id, r.release_id, rd.status, rd.attempt FROM rollout_devices rd
         JOIN rollouts r ON r.id = rd.rollout_id
         WHERE rd.device_id = ?1 AND r.fleet = ?2 AND r.state IN ('running', 'paused', 'completed')
           AND rd.status IN ('offered', 'shadowing', 'promoting', 'failed', 'timed_out')",
    )?;
    let rows: Vec<(i64, String, String, u32)> = stmt
        .query_map(params![s.id, s.fleet], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
        .collect::<Result<_, _>>()?;
    for (rollout, release, status, attempt) in rows {
        let dev = Some(s.id.as_str());
        if s.release.as_ref().is_some_and(|r| r.0 == release) {
            conn.execute(
                "UPDATE rollout_devices SET status = 'succeeded', finished = ?3, reason = NULL
                 WHERE rollout_id = ?1 AND device_id = ?2",
                params![rollout, s.id, now],
            )?;
            event(conn, now, Some(rollout), dev, "succeeded", "runs the release")?;
            continue;
        }
        let answers_offer = s.working_on.as_ref().is_some_and(|(id, a)| *id == release && *a == attempt);
        let failing = matches!(s.update_state, Some(UpdateState::Refused | UpdateState::Failed));
        if matches!(status.as_str(), "offered" | "shadowing" | "promoting") && answers_offer && failing {
            let reason = s.last_error.clone().unwrap_or_else(|| "failed without a reason".into());
            conn.execute(
                "UPDATE rollout_devices SET status = 'failed', finished = ?3, reason = ?4
                 WHERE rollout_id = ?1 AND device_id = ?2",
                params![rollout, s.id, now, reason],
            )?;
            event(conn, now, Some(rollout), dev, "failed", &reason)?;
        }
    }
    Ok(())
}

/// The device list as the API shows it.
pub fn device_json(row: &Row) -> db::Result<Value> {
    let state: String = row.get("state")?;
    // Written by `record` from a parsed report; a row from an older console reads as empty.
    let state: StateReport = serde_json::from_str(&state).unwrap_or_default();
    let labels: String = row.get("labels")?;
    let stats = state.body.stats.as_ref();
    let models: Vec<Value> = state
        .body
        .models
        .iter()
        .map(|m| json!({"name": m.name, "versions": m.versions, "drift": m.drift, "shadow": m.shadow}))
        .collect();
    Ok(json!({
        "id": row.get::<_, String>("id")?,
        "fleet": row.get::<_, String>("fleet")?,
        "group": row.get::<_, String>("grp")?,
        "labels": serde_json::from_str::<Value>(&labels).unwrap_or(json!({})),
        "online": row.get::<_, i64>("online")? == 1,
        "release": row.get::<_, Option<i64>>("release_number")?,
        "release_id": row.get::<_, Option<String>>("release_id")?,
        "candidate": state.candidate.as_ref().map(|c| c.number),
        "update_state": row.get::<_, Option<String>>("update_state")?,
        "last_error": row.get::<_, Option<String>>("last_error")?,
        "models": models,
        "requests": stats.map(|s| s.count),
        "p50_ms": stats.and_then(|s| s.p50_ms),
        "p99_ms": stats.and_then(|s| s.p99_ms),
        "escalation_rate": stats.and_then(|s| s.escalation_rate),
        "drift": row.get::<_, Option<f64>>("drift")?,
        "runtime": state.body.runtime,
        "first_seen": row.get::<_, i64>("first_seen")?,
        "last_seen": row.get::<_, i64>("last_seen")?,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(extra: Value) -> Vec<u8> {
        let mut d = json!({"device": "d1", "fleet": "f", "group": "g", "online": true});
        for (k, v) in extra.as_object().unwrap() {
            d[k] = v.clone();
        }
        d.to_string().into_bytes()
    }

    #[test]
    fn states_parse_and_bad_ones_are_refused_with_a_reason() {
        let s = parse(
            "f",
            "d1",
            &doc(json!({"release": {"id": "ab", "number": 2},
                "update": {"state": "refused", "release": {"id": "cd", "attempt": 1},
                           "last_error": {"kind": "health_check", "reason": "boom"}}})),
        )
        .unwrap();
        assert_eq!(s.release, Some(("ab".into(), 2)));
        assert_eq!(s.working_on, Some(("cd".into(), 1)));
        assert_eq!(s.last_error.as_deref(), Some("health_check: boom"));
        assert!(parse("f", "d2", &doc(json!({}))).unwrap_err().contains("not its topic"));
        assert!(parse("other", "d1", &doc(json!({}))).unwrap_err().contains("not its topic"));
        assert!(parse("f", "d1", b"{\"device\"").unwrap_err().contains("not JSON"));
        assert!(parse("f", "d1", b"[1]").unwrap_err().contains("not a JSON object"));
        assert!(parse("f", "d1", br#"{"device":"d1","fleet":"f"}"#).unwrap_err().contains("online"));
        let e = parse("f", "d1", &doc(json!({"update": {"state": "idle", "attempt": "two"}}))).unwrap_err();
        assert!(e.contains("not a state report") && e.contains("invalid type"), "{e}");
        assert!(parse("f", "d1", &vec![b' '; MAX_STATE_BYTES + 1]).unwrap_err().contains("over"));
    }
}
