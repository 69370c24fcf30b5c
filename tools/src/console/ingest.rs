//! Devices' retained `state` messages (and the offline will) into the database: the device row,
//! its events, and what the state says about the rollouts offering it a release.

use rusqlite::{Connection, OptionalExtension, params};
use serde_json::{Value, json};

use super::db::event;

/// The largest state document taken (a device's report is a few KiB).
pub const MAX_STATE_BYTES: usize = 256 * 1024;

/// What the console takes from one state document.
#[derive(Debug, PartialEq)]
pub struct DeviceState {
    pub fleet: String,
    pub id: String,
    pub online: bool,
    pub group: Option<String>,
    pub labels: Option<Value>,
    pub release: Option<(String, u64)>,
    pub update_state: Option<String>,
    /// The release the update state is about, and which offer of it.
    pub working_on: Option<(String, u32)>,
    pub last_error: Option<String>,
    pub raw: Value,
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
    let online = raw["online"].as_bool().ok_or("state has no `online`")?;
    let text = |v: &Value| v.as_str().map(str::to_owned);
    let release = match (raw["release"]["id"].as_str(), raw["release"]["number"].as_u64()) {
        (Some(i), Some(n)) => Some((i.to_owned(), n)),
        _ => None,
    };
    let u = &raw["update"];
    let working_on = u["release"]["id"]
        .as_str()
        .map(|i| (i.to_owned(), u["release"]["attempt"].as_u64().unwrap_or(0).min(u32::MAX as u64) as u32));
    let last_error = u["last_error"]["kind"].as_str().map(|k| {
        let reason: String = u["last_error"]["reason"].as_str().unwrap_or_default().chars().take(500).collect();
        format!("{k}: {reason}")
    });
    Ok(DeviceState {
        fleet: fleet.to_owned(),
        id: id.to_owned(),
        online,
        group: text(&raw["group"]),
        labels: raw.get("labels").filter(|l| l.is_object()).cloned(),
        release,
        update_state: text(&u["state"]),
        working_on,
        last_error,
        raw,
    })
}

/// Records a state: the device row (created on first sight), events for what changed, and
/// the outcome for every live rollout that offered this device a release.
pub fn record(conn: &Connection, s: &DeviceState, now: i64) -> rusqlite::Result<()> {
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
    let labels = s.labels.as_ref().map_or_else(|| "{}".to_owned(), Value::to_string);
    conn.execute(
        "INSERT INTO devices (id, fleet, grp, labels, online, release_id, release_number, update_state, last_error, \
         state, first_seen, last_seen) VALUES (?1, ?2, ?3, ?4, 1, ?5, ?6, ?7, ?8, ?9, ?10, ?10)
         ON CONFLICT (fleet, id) DO UPDATE SET grp = ?3, labels = ?4, online = 1, release_id = ?5, \
         release_number = ?6, update_state = ?7, last_error = ?8, state = ?9, last_seen = ?10",
        params![
            s.id,
            s.fleet,
            s.group.as_deref().unwrap_or("default"),
            labels,
            s.release.as_ref().map(|r| &r.0),
            s.release.as_ref().map(|r| r.1 as i64),
            s.update_state,
            s.last_error,
            s.raw.to_string(),
            now
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
fn outcomes(conn: &Connection, s: &DeviceState, now: i64) -> rusqlite::Result<()> {
    let mut stmt = conn.prepare(
        "SELECT rd.rollout_id, r.release_id, rd.status, rd.attempt FROM rollout_devices rd
         JOIN rollouts r ON r.id = rd.rollout_id
         WHERE rd.device_id = ?1 AND r.fleet = ?2 AND r.state IN ('running', 'paused', 'completed')
           AND rd.status IN ('offered', 'failed', 'timed_out')",
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
        let failing = matches!(s.update_state.as_deref(), Some("refused" | "failed"));
        if status == "offered" && answers_offer && failing {
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
pub fn device_json(row: &rusqlite::Row<'_>) -> rusqlite::Result<Value> {
    let state: String = row.get("state")?;
    let state: Value = serde_json::from_str(&state).unwrap_or(Value::Null);
    let labels: String = row.get("labels")?;
    let stats = &state["stats"];
    let models: Vec<Value> = state["models"]
        .as_array()
        .map(|ms| {
            // Only strings reach the page, whatever a device sent.
            ms.iter()
                .map(|m| {
                    let versions: Vec<&str> =
                        m["versions"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
                    json!({"name": m["name"].as_str().unwrap_or("?"), "versions": versions})
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(json!({
        "id": row.get::<_, String>("id")?,
        "fleet": row.get::<_, String>("fleet")?,
        "group": row.get::<_, String>("grp")?,
        "labels": serde_json::from_str::<Value>(&labels).unwrap_or(json!({})),
        "online": row.get::<_, i64>("online")? == 1,
        "release": row.get::<_, Option<i64>>("release_number")?,
        "release_id": row.get::<_, Option<String>>("release_id")?,
        "update_state": row.get::<_, Option<String>>("update_state")?,
        "last_error": row.get::<_, Option<String>>("last_error")?,
        "models": models,
        "requests": stats["count"],
        "p50_ms": stats["p50_ms"],
        "p99_ms": stats["p99_ms"],
        "escalation_rate": stats["escalation_rate"],
        "runtime": state["runtime"],
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
        assert!(parse("f", "d1", &vec![b' '; MAX_STATE_BYTES + 1]).unwrap_err().contains("over"));
    }
}
