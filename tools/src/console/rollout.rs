//! Rollouts: waves, thresholds, rate limit, deadlines, and the operator's actions. Everything a
//! rollout knows is in the database; [`tick`] moves each live rollout one step from what is
//! there, so a console restarted mid-rollout carries on from exactly where it was.

use rusqlite::{Connection, OptionalExtension, params};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::db::event;

/// One wave: a number of devices or a share of the selected devices (cumulative).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Wave {
    Count(u64),
    Percent(f64),
}

impl Wave {
    fn parse(s: &str) -> Result<Wave, String> {
        let s = s.trim();
        if let Some(p) = s.strip_suffix('%') {
            let p: f64 = p.trim().parse().map_err(|_| format!("wave `{s}`: not a percentage"))?;
            if !(p > 0.0 && p <= 100.0) {
                return Err(format!("wave `{s}`: a share must be above 0% and at most 100%"));
            }
            Ok(Wave::Percent(p))
        } else {
            let n: u64 = s.parse().map_err(|_| format!("wave `{s}`: a device count or a share like 10%"))?;
            if n == 0 {
                return Err(format!("wave `{s}`: at least one device"));
            }
            Ok(Wave::Count(n))
        }
    }

    fn label(&self) -> String {
        match self {
            Wave::Count(n) => n.to_string(),
            Wave::Percent(p) => format!("{p}%"),
        }
    }

    /// How many of `total` devices this wave reaches.
    fn reach(&self, total: u64) -> u64 {
        match *self {
            Wave::Count(n) => n.min(total),
            Wave::Percent(p) => ((p / 100.0 * total as f64).ceil() as u64).min(total),
        }
    }
}

/// Parses `1,10%,50%,100%`. The last wave must be 100%: a rollout is complete when every
/// selected device has it, and devices that join later get it too.
pub fn parse_waves(s: &str) -> Result<Vec<Wave>, String> {
    let waves = s.split(',').map(Wave::parse).collect::<Result<Vec<_>, _>>()?;
    if waves.len() > 20 {
        return Err("at most 20 waves".into());
    }
    if waves.last() != Some(&Wave::Percent(100.0)) {
        return Err("the last wave must be 100%".into());
    }
    Ok(waves)
}

/// An error threshold: a count (`5`) or a share of the devices offered so far (`10%`).
pub fn parse_errors(s: &str) -> Result<(f64, bool), String> {
    let s = s.trim();
    match s.strip_suffix('%') {
        Some(p) => match p.trim().parse::<f64>() {
            Ok(p) if (0.0..=100.0).contains(&p) => Ok((p, true)),
            _ => Err(format!("error threshold `{s}`: a share from 0% to 100%")),
        },
        None => s
            .parse::<u64>()
            .map(|n| (n as f64, false))
            .map_err(|_| format!("error threshold `{s}`: a count or a share like 10%")),
    }
}

/// A rollout request (the JSON API's `POST /api/rollouts`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartRequest {
    /// A release id or a unique prefix of one (8 characters or more).
    #[serde(default)]
    pub release: Option<String>,
    /// Or the release number, with `fleet` (and `group`, default `default`).
    #[serde(default)]
    pub number: Option<u64>,
    #[serde(default)]
    pub fleet: Option<String>,
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub labels: Map<String, Value>,
    #[serde(default = "default_waves")]
    pub waves: String,
    /// Per wave: the share of its devices that must succeed before the next wave.
    #[serde(default = "default_success")]
    pub success_pct: f64,
    #[serde(default)]
    pub soak_secs: f64,
    /// Failures (count or share) that pause the rollout.
    #[serde(default = "default_errors")]
    pub errors: String,
    /// Devices offered per minute at most (0: no limit).
    #[serde(default)]
    pub rate_per_min: u64,
    /// A device that has not answered within this many seconds of its offer counts as timed out.
    #[serde(default = "default_deadline")]
    pub deadline_secs: f64,
}

fn default_waves() -> String {
    "1,10%,50%,100%".into()
}
fn default_success() -> f64 {
    100.0
}
fn default_errors() -> String {
    "5%".into()
}
fn default_deadline() -> f64 {
    900.0
}

/// Starts a rollout; older live rollouts of the same fleet and group are superseded.
pub fn start(conn: &Connection, req: &StartRequest, now: i64) -> Result<i64, String> {
    let waves = parse_waves(&req.waves)?;
    let (error_limit, error_is_pct) = parse_errors(&req.errors)?;
    if !(0.0..=100.0).contains(&req.success_pct) {
        return Err("success_pct: from 0 to 100".into());
    }
    let secs = |what: &str, v: f64, max: f64| {
        if v.is_finite() && (0.0..=max).contains(&v) {
            Ok((v * 1000.0) as i64)
        } else {
            Err(format!("{what}: 0 to {max} seconds"))
        }
    };
    let soak_ms = secs("soak_secs", req.soak_secs, 7.0 * 86400.0)?;
    let deadline_ms = secs("deadline_secs", req.deadline_secs, 30.0 * 86400.0)?;
    if deadline_ms < 1000 {
        return Err("deadline_secs: at least 1 second".into());
    }
    for (k, v) in &req.labels {
        if !v.is_string() {
            return Err(format!("label `{k}`: values are strings"));
        }
    }
    let (release_id, fleet, group) = find_release(conn, req)?;
    let db = |e: rusqlite::Error| e.to_string();
    let mut stmt = conn
        .prepare(
            "SELECT id FROM rollouts WHERE fleet = ?1 AND grp = ?2 AND state IN ('running', 'paused', 'completed')",
        )
        .map_err(db)?;
    let older: Vec<i64> =
        stmt.query_map(params![fleet, group], |r| r.get(0)).map_err(db)?.collect::<Result<_, _>>().map_err(db)?;
    let waves_json = json!(waves.iter().map(Wave::label).collect::<Vec<_>>()).to_string();
    conn.execute(
        "INSERT INTO rollouts (release_id, fleet, grp, labels, waves, success_pct, soak_ms, error_limit, error_is_pct, \
         rate_per_min, deadline_ms, state, created, updated)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, 'running', ?12, ?12)",
        params![
            release_id,
            fleet,
            group,
            Value::Object(req.labels.clone()).to_string(),
            waves_json,
            req.success_pct,
            soak_ms,
            error_limit,
            error_is_pct,
            req.rate_per_min as i64,
            deadline_ms,
            now
        ],
    )
    .map_err(db)?;
    let id = conn.last_insert_rowid();
    for old in older {
        conn.execute(
            "UPDATE rollouts SET state = 'superseded', reason = ?2, updated = ?3 WHERE id = ?1",
            params![old, format!("superseded by rollout {id}"), now],
        )
        .map_err(db)?;
        event(conn, now, Some(old), None, "superseded", &format!("by rollout {id}")).map_err(db)?;
    }
    event(
        conn,
        now,
        Some(id),
        None,
        "started",
        &format!("release {} in waves {}", crate::short(&release_id), req.waves),
    )
    .map_err(db)?;
    Ok(id)
}

fn find_release(conn: &Connection, req: &StartRequest) -> Result<(String, String, String), String> {
    let row = |r: &rusqlite::Row<'_>| Ok((r.get(0)?, r.get(1)?, r.get(2)?));
    let found: Vec<(String, String, String)> = match (&req.release, req.number) {
        (Some(prefix), None) => {
            if prefix.len() < 8 || !prefix.chars().all(|c| c.is_ascii_hexdigit()) {
                return Err("release: an id or at least 8 hex characters of one".into());
            }
            let mut s = conn
                .prepare("SELECT id, fleet, grp FROM releases WHERE id LIKE ?1 || '%'")
                .map_err(|e| e.to_string())?;
            s.query_map([prefix.to_ascii_lowercase()], row).map_err(|e| e.to_string())?.collect::<Result<_, _>>()
        }
        (None, Some(n)) => {
            let fleet = req.fleet.as_deref().ok_or("number needs fleet")?;
            let group = req.group.as_deref().unwrap_or("default");
            let mut s = conn
                .prepare("SELECT id, fleet, grp FROM releases WHERE number = ?1 AND fleet = ?2 AND grp = ?3")
                .map_err(|e| e.to_string())?;
            s.query_map(params![n as i64, fleet, group], row).map_err(|e| e.to_string())?.collect::<Result<_, _>>()
        }
        _ => return Err("name the release: `release` (id) or `number` with `fleet`".into()),
    }
    .map_err(|e| e.to_string())?;
    match found.len() {
        1 => Ok(found.into_iter().next().expect("one")),
        0 => Err("no such release on this console (outpostctl release upload)".into()),
        _ => Err("that prefix names several releases".into()),
    }
}

/// An operator's action on a rollout.
pub fn act(conn: &Connection, id: i64, action: &str, now: i64) -> Result<Value, String> {
    let db = |e: rusqlite::Error| e.to_string();
    let state: String = conn
        .query_row("SELECT state FROM rollouts WHERE id = ?1", [id], |r| r.get(0))
        .optional()
        .map_err(db)?
        .ok_or_else(|| format!("no rollout {id}"))?;
    let set = |to: &str, reason: Option<&str>| {
        conn.execute(
            "UPDATE rollouts SET state = ?2, reason = ?3, updated = ?4 WHERE id = ?1",
            params![id, to, reason, now],
        )
    };
    match (action, state.as_str()) {
        ("pause", "running") => set("paused", Some("paused by the operator")).map_err(db)?,
        ("resume", "paused") => {
            // Failures so far are acknowledged: the threshold counts new ones from here. The
            // current wave is taken as it stands (a wave below its success share goes on).
            conn.execute(
                "UPDATE rollouts SET resumed = ?2, wave_done = CASE
                     WHEN wave_done IS NULL AND state = 'paused' AND reason LIKE 'wave %' THEN ?2 ELSE wave_done END
                 WHERE id = ?1",
                params![id, now],
            )
            .map_err(db)?;
            set("running", None).map_err(db)?
        }
        ("abort", "running" | "paused" | "completed") => set("aborted", Some("aborted by the operator")).map_err(db)?,
        ("retry", "running" | "paused" | "completed") => {
            let n = conn
                .execute(
                    "UPDATE rollout_devices SET status = 'pending', attempt = attempt + 1, reason = NULL, finished = NULL
                     WHERE rollout_id = ?1 AND status IN ('failed', 'timed_out')",
                    [id],
                )
                .map_err(db)?;
            event(conn, now, Some(id), None, "retry", &format!("{n} device(s) to be offered again")).map_err(db)?;
            return Ok(json!({"rollout": id, "retried": n}));
        }
        _ => return Err(format!("cannot {action} a rollout that is {state}")),
    };
    event(conn, now, Some(id), None, action, &format!("{state} -> {action}")).map_err(db)?;
    Ok(json!({"rollout": id, "action": action}))
}

fn count(conn: &Connection, id: i64, filter: &str) -> rusqlite::Result<i64> {
    conn.query_row(&format!("SELECT count(*) FROM rollout_devices WHERE rollout_id = ?1 AND {filter}"), [id], |r| {
        r.get(0)
    })
}

struct Live {
    id: i64,
    release_id: String,
    fleet: String,
    group: String,
    labels: Map<String, Value>,
    waves: Vec<Wave>,
    success_pct: f64,
    soak_ms: i64,
    error_limit: f64,
    error_is_pct: bool,
    rate_per_min: i64,
    deadline_ms: i64,
    state: String,
    wave: usize,
    wave_done: Option<i64>,
    resumed: i64,
}

/// Sends one offer: `(fleet, device, release id, attempt)`; false when it could not be queued
/// (the device stays pending and is offered on a later tick).
pub type Offer<'a> = dyn FnMut(&str, &str, &str, u32) -> bool + 'a;

/// Moves every live rollout one step: adopts newly selected devices, times out silent ones,
/// pauses on the error threshold, offers the current wave (within the rate limit), and after
/// a wave has succeeded and soaked, opens the next.
pub fn tick(conn: &Connection, now: i64, offer: &mut Offer<'_>) -> rusqlite::Result<()> {
    let mut stmt = conn.prepare(
        "SELECT id, release_id, fleet, grp, labels, waves, success_pct, soak_ms, error_limit, error_is_pct, rate_per_min,
                deadline_ms, state, wave, wave_done, resumed
         FROM rollouts WHERE state IN ('running', 'paused', 'completed') ORDER BY id",
    )?;
    let live: Vec<Live> = stmt
        .query_map([], |r| {
            let labels: String = r.get(4)?;
            let waves: String = r.get(5)?;
            let waves: Vec<String> = serde_json::from_str(&waves).unwrap_or_default();
            Ok(Live {
                id: r.get(0)?,
                release_id: r.get(1)?,
                fleet: r.get(2)?,
                group: r.get(3)?,
                labels: serde_json::from_str(&labels).unwrap_or_default(),
                waves: waves.iter().filter_map(|w| Wave::parse(w).ok()).collect(),
                success_pct: r.get(6)?,
                soak_ms: r.get(7)?,
                error_limit: r.get(8)?,
                error_is_pct: r.get(9)?,
                rate_per_min: r.get(10)?,
                deadline_ms: r.get(11)?,
                state: r.get(12)?,
                wave: r.get::<_, i64>(13)? as usize,
                wave_done: r.get(14)?,
                resumed: r.get(15)?,
            })
        })?
        .collect::<Result<_, _>>()?;
    drop(stmt);
    for r in live {
        step(conn, &r, now, offer)?;
    }
    Ok(())
}

fn step(conn: &Connection, r: &Live, now: i64, offer: &mut Offer<'_>) -> rusqlite::Result<()> {
    adopt(conn, r, now)?;
    // A device whose state already shows the release has it, whatever its row says (say the
    // console was killed between an offer and its record).
    conn.execute(
        "UPDATE rollout_devices SET status = 'succeeded', finished = ?4, reason = NULL, wave = coalesce(wave, ?5)
         WHERE rollout_id = ?1 AND status != 'succeeded'
           AND device_id IN (SELECT id FROM devices WHERE fleet = ?2 AND release_id = ?3)",
        params![r.id, r.fleet, r.release_id, now, r.wave as i64],
    )?;
    time_out(conn, r, now)?;
    let set_state = |to: &str, reason: &str| -> rusqlite::Result<()> {
        conn.execute(
            "UPDATE rollouts SET state = ?2, reason = ?3, updated = ?4 WHERE id = ?1",
            params![r.id, to, reason, now],
        )?;
        event(conn, now, Some(r.id), None, to, reason)
    };
    if r.state == "paused" {
        return Ok(());
    }
    let total = count(conn, r.id, "1")? as u64;
    if total == 0 {
        return Ok(());
    }
    let offered_so_far = count(conn, r.id, "status != 'pending'")?;
    let new_failures: i64 = conn.query_row(
        "SELECT count(*) FROM rollout_devices WHERE rollout_id = ?1 AND status IN ('failed', 'timed_out') AND finished > ?2",
        params![r.id, r.resumed],
        |x| x.get(0),
    )?;
    let new_failures = new_failures as f64;
    let limit = if r.error_is_pct { r.error_limit / 100.0 * offered_so_far as f64 } else { r.error_limit };
    if new_failures > 0.0 && new_failures > limit {
        let how = if r.error_is_pct { format!("{}%", r.error_limit) } else { format!("{}", r.error_limit) };
        return set_state("paused", &format!("error threshold: {new_failures} failed or timed out, over {how}"));
    }
    let last = r.waves.len().saturating_sub(1);
    let wave = if r.state == "completed" { last } else { r.wave.min(last) };
    let target = r.waves[..=wave].iter().map(|w| w.reach(total)).max().unwrap_or(total);
    let in_flight = count(conn, r.id, "status = 'offered'")?;
    let pending = count(conn, r.id, "status = 'pending'")?;
    if (offered_so_far as u64) < target && pending > 0 {
        let budget = target - offered_so_far as u64;
        let budget = if r.rate_per_min > 0 {
            let recent: i64 = conn.query_row(
                "SELECT count(*) FROM rollout_devices WHERE rollout_id = ?1 AND offered > ?2",
                params![r.id, now - 60_000],
                |x| x.get(0),
            )?;
            budget.min((r.rate_per_min - recent).max(0) as u64)
        } else {
            budget
        };
        return offer_some(conn, r, wave, budget, now, offer);
    }
    if r.state == "completed" || in_flight > 0 {
        return Ok(());
    }
    // The wave is fully offered and answered: did enough of it succeed?
    let (ok, all): (i64, i64) = conn.query_row(
        "SELECT count(*) FILTER (WHERE status = 'succeeded'), count(*) FROM rollout_devices
         WHERE rollout_id = ?1 AND wave = ?2 AND status != 'pending'",
        params![r.id, wave as i64],
        |x| Ok((x.get(0)?, x.get(1)?)),
    )?;
    let pct = if all == 0 { 100.0 } else { ok as f64 * 100.0 / all as f64 };
    if r.wave_done.is_none() && pct + 1e-9 < r.success_pct {
        return set_state("paused", &format!("wave {}: {pct:.1}% succeeded, below {}%", wave + 1, r.success_pct));
    }
    match r.wave_done {
        None => {
            conn.execute("UPDATE rollouts SET wave_done = ?2, updated = ?2 WHERE id = ?1", params![r.id, now])?;
            event(conn, now, Some(r.id), None, "wave", &format!("wave {} done: {ok} of {all} succeeded", wave + 1))?;
        }
        Some(done) if now - done >= r.soak_ms => {
            if wave >= last {
                set_state("completed", "every wave done")?;
            } else {
                conn.execute(
                    "UPDATE rollouts SET wave = ?2, wave_done = NULL, updated = ?3 WHERE id = ?1",
                    params![r.id, wave as i64 + 1, now],
                )?;
                event(conn, now, Some(r.id), None, "wave", &format!("wave {} opened", wave + 2))?;
            }
        }
        Some(_) => {}
    }
    Ok(())
}

/// Adds devices the selector now matches (late joiners included); those that already run the
/// release count as succeeded without an offer.
fn adopt(conn: &Connection, r: &Live, now: i64) -> rusqlite::Result<()> {
    let mut stmt = conn.prepare(
        "SELECT d.id, d.labels, d.release_id FROM devices d
         WHERE d.fleet = ?1 AND d.grp = ?2
           AND NOT EXISTS (SELECT 1 FROM rollout_devices rd WHERE rd.rollout_id = ?3 AND rd.device_id = d.id)",
    )?;
    let new: Vec<(String, String, Option<String>)> = stmt
        .query_map(params![r.fleet, r.group, r.id], |x| Ok((x.get(0)?, x.get(1)?, x.get(2)?)))?
        .collect::<Result<_, _>>()?;
    for (device, labels, release) in new {
        let labels: Map<String, Value> = serde_json::from_str(&labels).unwrap_or_default();
        if !r.labels.iter().all(|(k, v)| labels.get(k) == Some(v)) {
            continue;
        }
        if release.as_deref() == Some(r.release_id.as_str()) {
            conn.execute(
                "INSERT INTO rollout_devices (rollout_id, device_id, status, wave, finished, reason)
                 VALUES (?1, ?2, 'succeeded', ?4, ?3, 'already ran the release')",
                params![r.id, device, now, r.wave as i64],
            )?;
        } else {
            conn.execute(
                // The device may have refused this release's offer in an earlier rollout: the
                // next attempt makes a new offer, which it considers afresh.
                "INSERT INTO rollout_devices (rollout_id, device_id, status, attempt)
                 VALUES (?1, ?2, 'pending', (SELECT coalesce(max(rd.attempt) + 1, 0) FROM rollout_devices rd
                     JOIN rollouts o ON o.id = rd.rollout_id
                     WHERE rd.device_id = ?2 AND o.release_id = ?3 AND rd.status != 'pending'))",
                params![r.id, device, r.release_id],
            )?;
        }
    }
    Ok(())
}

fn time_out(conn: &Connection, r: &Live, now: i64) -> rusqlite::Result<()> {
    let mut stmt = conn.prepare(
        "SELECT device_id FROM rollout_devices WHERE rollout_id = ?1 AND status = 'offered' AND offered <= ?2",
    )?;
    let late: Vec<String> =
        stmt.query_map(params![r.id, now - r.deadline_ms], |x| x.get(0))?.collect::<Result<_, _>>()?;
    let reason = format!("no answer within {} s of the offer", r.deadline_ms / 1000);
    for device in late {
        conn.execute(
            "UPDATE rollout_devices SET status = 'timed_out', finished = ?3, reason = ?4 WHERE rollout_id = ?1 AND device_id = ?2",
            params![r.id, device, now, reason],
        )?;
        event(conn, now, Some(r.id), Some(&device), "timed_out", &reason)?;
    }
    Ok(())
}

fn offer_some(
    conn: &Connection,
    r: &Live,
    wave: usize,
    budget: u64,
    now: i64,
    offer: &mut Offer<'_>,
) -> rusqlite::Result<()> {
    // Retried devices first (their wave is open already), then online devices, then by id: a
    // wave is not filled with devices that cannot answer.
    let mut stmt = conn.prepare(
        "SELECT rd.device_id, rd.attempt FROM rollout_devices rd
         LEFT JOIN devices d ON d.fleet = ?2 AND d.id = rd.device_id
         WHERE rd.rollout_id = ?1 AND rd.status = 'pending'
         ORDER BY rd.wave IS NOT NULL DESC, coalesce(d.online, 0) DESC, rd.device_id LIMIT ?3",
    )?;
    let picked: Vec<(String, u32)> = stmt
        .query_map(params![r.id, r.fleet, budget as i64], |x| Ok((x.get(0)?, x.get(1)?)))?
        .collect::<Result<_, _>>()?;
    for (device, attempt) in picked {
        if !offer(&r.fleet, &device, &r.release_id, attempt) {
            break;
        }
        conn.execute(
            // A retried device stays in the wave it was first offered in.
            "UPDATE rollout_devices SET status = 'offered', wave = coalesce(wave, ?3), offered = ?4
             WHERE rollout_id = ?1 AND device_id = ?2",
            params![r.id, device, wave as i64, now],
        )?;
        event(conn, now, Some(r.id), Some(&device), "offered", &format!("wave {}, attempt {}", wave + 1, attempt + 1))?;
    }
    Ok(())
}

/// Offers recorded as sent in live rollouts: `(fleet, device, release, attempt)`. At start the
/// console sends them again: one queued just before the console was killed may never have left.
pub fn outstanding(conn: &Connection) -> rusqlite::Result<Vec<(String, String, String, u32)>> {
    let mut s = conn.prepare(
        "SELECT r.fleet, rd.device_id, r.release_id, rd.attempt FROM rollout_devices rd JOIN rollouts r ON r.id = rd.rollout_id
         WHERE rd.status = 'offered' AND r.state IN ('running', 'paused', 'completed')",
    )?;
    s.query_map([], |x| Ok((x.get(0)?, x.get(1)?, x.get(2)?, x.get(3)?)))?.collect()
}

/// A rollout as the API shows it: settings, per-wave progress and the failures with reasons.
pub fn show(conn: &Connection, id: i64) -> rusqlite::Result<Option<Value>> {
    let Some(mut v) = conn
        .query_row(
            "SELECT r.id, r.release_id, rel.number, r.fleet, r.grp, r.labels, r.waves, r.success_pct, r.soak_ms,
                    r.error_limit, r.error_is_pct, r.rate_per_min, r.deadline_ms, r.state, r.reason, r.wave, r.created, r.updated
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
         WHERE rollout_id = ?1 AND status IN ('failed', 'timed_out') ORDER BY finished DESC LIMIT 200",
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waves_and_thresholds_parse_and_bad_ones_say_why() {
        assert_eq!(
            parse_waves("1,10%,50%,100%").unwrap(),
            vec![Wave::Count(1), Wave::Percent(10.0), Wave::Percent(50.0), Wave::Percent(100.0)]
        );
        assert!(parse_waves("1,10%").unwrap_err().contains("100%"));
        assert!(parse_waves("0,100%").unwrap_err().contains("at least one"));
        assert!(parse_waves("150%").unwrap_err().contains("at most 100%"));
        assert!(parse_waves("x,100%").unwrap_err().contains("device count"));
        assert_eq!(parse_errors("5").unwrap(), (5.0, false));
        assert_eq!(parse_errors("10%").unwrap(), (10.0, true));
        assert!(parse_errors("-1").is_err());
        assert!(parse_errors("120%").is_err());
        // Reach rounds up, and never past the devices there are.
        assert_eq!(Wave::Percent(10.0).reach(51), 6);
        assert_eq!(Wave::Count(5).reach(3), 3);
    }
}

/// The state machine driven by hand: states recorded as devices would send them, steps at
/// chosen times, offers collected instead of published.
#[cfg(test)]
mod machine {
    use super::*;
    use crate::console::{db, ingest};

    struct Fleet {
        conn: Connection,
        now: i64,
        offers: Vec<(String, u32)>,
    }

    const RELEASE: &str = "ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12";

    impl Fleet {
        fn new(name: &str, devices: usize) -> Fleet {
            let dir = std::env::temp_dir().join(format!("outpost-rollout-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let conn = db::open(&dir.join("console.db")).unwrap();
            conn.execute(
                "INSERT INTO releases (id, fleet, grp, number, models, offer, bytes, uploaded)
                 VALUES (?1, 'f', 'default', 2, '[]', x'00', 0, 0)",
                [RELEASE],
            )
            .unwrap();
            let mut f = Fleet { conn, now: 1_000_000, offers: Vec::new() };
            for n in 1..=devices {
                f.report(&format!("d{n}"), json!({}));
            }
            f
        }

        fn report(&mut self, id: &str, extra: Value) {
            let mut doc = json!({"device": id, "fleet": "f", "group": "default", "online": true});
            for (k, v) in extra.as_object().unwrap() {
                doc[k] = v.clone();
            }
            let s = ingest::parse("f", id, doc.to_string().as_bytes()).unwrap();
            ingest::record(&self.conn, &s, self.now).unwrap();
        }

        fn succeed(&mut self, id: &str) {
            self.report(id, json!({"release": {"id": RELEASE, "number": 2}}));
        }

        fn refuse(&mut self, id: &str, attempt: u32) {
            self.report(
                id,
                json!({"update": {"state": "refused", "release": {"id": RELEASE, "attempt": attempt},
                                  "last_error": {"kind": "health_check", "reason": "no"}}}),
            );
        }

        fn start(&mut self, req: Value) -> i64 {
            let mut req = req;
            req["release"] = json!(RELEASE);
            start(&self.conn, &serde_json::from_value(req).unwrap(), self.now).unwrap()
        }

        /// One step, `ms` later; the devices offered in it.
        fn step(&mut self, ms: i64) -> Vec<String> {
            self.now += ms;
            let mut sent = Vec::new();
            tick(&self.conn, self.now, &mut |_, d, _, a| {
                sent.push((d.to_owned(), a));
                true
            })
            .unwrap();
            self.offers.extend(sent.iter().cloned());
            sent.into_iter().map(|s| s.0).collect()
        }

        fn show(&self, id: i64) -> Value {
            show(&self.conn, id).unwrap().unwrap()
        }
    }

    #[test]
    fn waves_open_one_after_another_after_success_and_soak() {
        let mut f = Fleet::new("waves", 4);
        let id = f.start(json!({"waves": "1,50%,100%", "soak_secs": 10}));
        assert_eq!(f.step(1), ["d1"]);
        assert!(f.step(1000).is_empty(), "wave 1 waits for its answer");
        f.succeed("d1");
        assert!(f.step(1).is_empty(), "the wave is done: the soak starts");
        assert!(f.step(5_000).is_empty(), "still soaking");
        assert!(f.step(5_000).is_empty(), "wave 2 opens");
        assert_eq!(f.step(1), ["d2"]);
        f.succeed("d2");
        f.step(1);
        f.step(10_000);
        assert_eq!(f.step(1), ["d3", "d4"]);
        f.succeed("d3");
        f.succeed("d4");
        f.step(1);
        f.step(10_000);
        let r = f.show(id);
        assert_eq!(r["state"], "completed", "{r:#}");
        assert_eq!(r["counts"]["succeeded"], 4);
        // A device that joins later is offered the release.
        f.report("d5", json!({}));
        assert_eq!(f.step(1), ["d5"]);
    }

    #[test]
    fn a_wave_below_its_share_pauses_and_resume_takes_it_as_it_stands() {
        let mut f = Fleet::new("share", 4);
        let id = f.start(json!({"waves": "2,100%", "errors": "5"}));
        assert_eq!(f.step(1), ["d1", "d2"]);
        f.succeed("d1");
        f.refuse("d2", 0);
        f.step(1);
        let r = f.show(id);
        assert_eq!(r["state"], "paused");
        assert_eq!(r["reason"], "wave 1: 50.0% succeeded, below 100%");
        assert_eq!(r["failures"][0]["reason"], "health_check: no");
        act(&f.conn, id, "resume", f.now).unwrap();
        f.step(1);
        assert_eq!(f.step(1), ["d3", "d4"], "wave 2 opened");
        // Retry: d2 gets a second attempt (a new offer it considers afresh).
        act(&f.conn, id, "retry", f.now).unwrap();
        assert_eq!(f.step(1), ["d2"]);
        assert_eq!(f.offers.last(), Some(&("d2".to_owned(), 1)));
        // A stale report of the first attempt does not fail the second.
        f.refuse("d2", 0);
        assert_eq!(f.show(id)["counts"]["offered"], 3);
    }

    #[test]
    fn errors_pause_counting_only_failures_after_a_resume_and_silence_times_out() {
        let mut f = Fleet::new("errors", 6);
        let id = f.start(json!({"waves": "100%", "errors": "1", "success_pct": 0, "deadline_secs": 60}));
        assert_eq!(f.step(1).len(), 6);
        f.refuse("d1", 0);
        f.step(1);
        assert_eq!(f.show(id)["state"], "running", "one failure is within the threshold");
        f.refuse("d2", 0);
        f.step(1);
        let r = f.show(id);
        assert_eq!(r["reason"], "error threshold: 2 failed or timed out, over 1", "{r:#}");
        f.now += 1;
        act(&f.conn, id, "resume", f.now).unwrap();
        f.now += 1;
        f.succeed("d1"); // an acknowledged failure that recovers does not hide new ones
        f.refuse("d3", 0);
        f.step(1);
        assert_eq!(f.show(id)["state"], "running", "one new failure since the resume");
        // d4, d5, d6 never answer: timed out after the deadline, and the threshold trips.
        f.step(60_000);
        let r = f.show(id);
        assert_eq!(r["counts"]["timed_out"], 3, "{r:#}");
        assert_eq!(r["state"], "paused", "{r:#}");
        assert!(r["reason"].as_str().unwrap().starts_with("error threshold: 4"), "{r:#}");
        assert!(act(&f.conn, id, "pause", f.now).unwrap_err().contains("cannot pause"));
        act(&f.conn, id, "abort", f.now).unwrap();
        act(&f.conn, id, "retry", f.now).unwrap_err();
    }
}
