//! The rollout state machine's SQL side: starting a rollout, the operator's actions, and
//! [`tick`], which reads each live rollout and the counts the decision needs, asks
//! [`decide`](super::decide::decide) what to do, and does it.

use crate::console::db::{self, Connection, OptionalExtension, event, params};
use serde_json::{Map, Value, json};

use super::decide::{Counts, Decision, Live, decide};
use super::spec::{Gate, SoakGate, StartRequest, Wave, parse_errors, parse_waves};

/// Starts a rollout; older live rollouts of the same fleet and group are superseded.
pub fn start(conn: &Connection, req: &StartRequest, now: i64) -> Result<i64, String> {
    let waves = parse_waves(&req.waves)?;
    let (error_limit, error_is_pct) = parse_errors(&req.errors)?;
    let gate = req.gate()?;
    let soak = req.soak_gate()?;
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
    let db = |e: db::Error| e.to_string();
    let mut stmt = conn
        .prepare(
            "SELECT id FROM rollouts WHERE fleet = ?1 AND grp = ?2 AND state IN ('running', 'paused', 'completed')",
        )
        .map_err(db)?;
    let older: Vec<i64> =
        stmt.query_map(params![fleet, group], |r| r.get(0)).map_err(db)?.collect::<Result<_, _>>().map_err(db)?;
    let waves_json = json!(waves.iter().map(Wave::label).collect::<Vec<_>>()).to_string();
    let id: i64 = conn.query_row(
        "INSERT INTO rollouts (release_id, fleet, grp, labels, waves, success_pct, soak_ms, error_limit, error_is_pct, \
         rate_per_min, deadline_ms, state, created, updated, shadow_agreement, shadow_rows, drift_max, escalation_rise, \
         p99_ratio, rollback)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, 'running', ?12, ?12, ?13, ?14, ?15, ?16, ?17, ?18)
         RETURNING id",
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
            now,
            gate.map(|g| g.agreement),
            gate.map(|g| g.rows as i64),
            soak.and_then(|s| s.drift_max),
            soak.and_then(|s| s.escalation_rise),
            soak.and_then(|s| s.p99_ratio),
            soak.is_some_and(|s| s.rollback)
        ],
        |r| r.get(0),
    )
    .map_err(db)?;
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
    let row = |r: &db::Row| Ok((r.get(0)?, r.get(1)?, r.get(2)?));
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
    let db = |e: db::Error| e.to_string();
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

pub use super::decide::Offer;

/// Moves every live rollout one step: adopts newly selected devices, times out silent ones,
/// pauses on the error threshold, offers the current wave (within the rate limit), and after
/// a wave has succeeded and soaked, opens the next.
pub fn tick(conn: &Connection, now: i64, offer: &mut Offer<'_>) -> db::Result<()> {
    let mut stmt = conn.prepare(
        "SELECT id, release_id, fleet, grp, labels, waves, success_pct, soak_ms, error_limit, error_is_pct, rate_per_min,
                deadline_ms, state, wave, wave_done, resumed, shadow_agreement, shadow_rows, drift_max, escalation_rise,
                p99_ratio, rollback
         FROM rollouts WHERE state IN ('running', 'paused', 'completed') ORDER BY id",
    )?;
    let live: Vec<Live> = stmt
        .query_map(params![], |r| {
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
                gate: match (r.get::<_, Option<f64>>(16)?, r.get::<_, Option<i64>>(17)?) {
                    (Some(agreement), Some(rows)) => Some(Gate { agreement, rows: rows as u64 }),
                    _ => None,
                },
                soak: Some(SoakGate {
                    drift_max: r.get(18)?,
                    escalation_rise: r.get(19)?,
                    p99_ratio: r.get(20)?,
                    rollback: r.get(21)?,
                })
                .filter(SoakGate::is_set),
            })
        })?
        .collect::<Result<_, _>>()?;
    drop(stmt);
    for r in live {
        step(conn, &r, now, offer)?;
    }
    Ok(())
}

/// One live rollout's step: adopt newly selected devices, take states that show the release
/// as successes, time out silent devices, then do what [`decide`] says.
fn step(conn: &Connection, r: &Live, now: i64, offer: &mut Offer<'_>) -> db::Result<()> {
    adopt(conn, r, now)?;
    // A device whose state already shows the release has it, whatever its row says (say the
    // console was killed between an offer and its record).
    conn.execute(
        "UPDATE rollout_devices SET status = 'succeeded', finished = ?4, reason = NULL, wave = coalesce(wave, ?5)
         WHERE rollout_id = ?1 AND status NOT IN ('succeeded', 'degraded', 'rolled_back')
           AND device_id IN (SELECT id FROM devices WHERE fleet = ?2 AND release_id = ?3)",
        params![r.id, r.fleet, r.release_id, now, r.wave as i64],
    )?;
    time_out(conn, r, now)?;
    let set_state = |to: &str, reason: &str| -> db::Result<()> {
        conn.execute(
            "UPDATE rollouts SET state = ?2, reason = ?3, updated = ?4 WHERE id = ?1",
            params![r.id, to, reason, now],
        )?;
        event(conn, now, Some(r.id), None, to, reason)
    };
    // A paused rollout waits whatever its counts say: skip the eight count queries per tick.
    if r.state == "paused" {
        return Ok(());
    }
    if let Some(gate) = r.gate
        && let Some(failed) = super::gate::advance(conn, r, gate, now, offer)?
    {
        return set_state("paused", &failed);
    }
    if r.state == "running"
        && let Some(soak) = &r.soak
        && let Some(failed) = super::soak::watch(conn, r, soak, now, offer)?
    {
        return set_state("paused", &failed);
    }
    match decide(r, &counts(conn, r, now)?, now) {
        Decision::Wait => Ok(()),
        Decision::Pause(reason) => set_state("paused", &reason),
        Decision::Offer { wave, budget } => offer_some(conn, r, wave, budget, now, offer),
        Decision::WaveDone { wave, succeeded, offered } => {
            conn.execute("UPDATE rollouts SET wave_done = ?2, updated = ?2 WHERE id = ?1", params![r.id, now])?;
            let what = format!("wave {} done: {succeeded} of {offered} succeeded", wave + 1);
            event(conn, now, Some(r.id), None, "wave", &what)
        }
        Decision::OpenWave(next) => {
            conn.execute(
                "UPDATE rollouts SET wave = ?2, wave_done = NULL, updated = ?3 WHERE id = ?1",
                params![r.id, next as i64, now],
            )?;
            event(conn, now, Some(r.id), None, "wave", &format!("wave {} opened", next + 1))
        }
        Decision::Complete => set_state("completed", "every wave done"),
    }
}

/// The counts [`decide`] reads, for the rollout's current wave.
fn counts(conn: &Connection, r: &Live, now: i64) -> db::Result<Counts> {
    let n = |filter: &str, p: &[&dyn db::ToSql]| -> db::Result<u64> {
        let sql = format!("SELECT count(*) FROM rollout_devices WHERE rollout_id = ?1 AND {filter}");
        let mut all: Vec<&dyn db::ToSql> = vec![&r.id];
        all.extend_from_slice(p);
        conn.query_row(&sql, all.as_slice(), |x| x.get::<_, i64>(0)).map(|v| v as u64)
    };
    let wave = r.current_wave() as i64;
    Ok(Counts {
        total: n("1 = 1", &[])?,
        offered: n("status != 'pending'", &[])?,
        new_failures: n("status IN ('failed', 'timed_out') AND finished > ?2", &[&r.resumed])?,
        in_flight: n("status IN ('offered', 'shadowing', 'promoting')", &[])?,
        pending: n("status = 'pending'", &[])?,
        recent_offers: n("offered > ?2", &[&(now - 60_000)])?,
        wave_succeeded: n("wave = ?2 AND status = 'succeeded'", &[&wave])?,
        wave_offered: n("wave = ?2 AND status != 'pending'", &[&wave])?,
    })
}

/// Adds devices the selector now matches (late joiners included); those that already run the
/// release count as succeeded without an offer.
fn adopt(conn: &Connection, r: &Live, now: i64) -> db::Result<()> {
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

fn time_out(conn: &Connection, r: &Live, now: i64) -> db::Result<()> {
    let mut stmt = conn.prepare(
        // A device shadowing a candidate has no deadline: its comparison waits for traffic.
        "SELECT device_id FROM rollout_devices
         WHERE rollout_id = ?1 AND status IN ('offered', 'promoting') AND offered <= ?2",
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
) -> db::Result<()> {
    // Retried devices first (their wave is open already), then online devices, then by id: a
    // wave is not filled with devices that cannot answer.
    let mut stmt = conn.prepare(
        "SELECT rd.device_id, rd.attempt FROM rollout_devices rd
         LEFT JOIN devices d ON d.fleet = ?2 AND d.id = rd.device_id
         WHERE rd.rollout_id = ?1 AND rd.status = 'pending'
         ORDER BY (rd.wave IS NOT NULL) DESC, coalesce(d.online, 0) DESC, rd.device_id LIMIT ?3",
    )?;
    let picked: Vec<(String, u32)> = stmt
        .query_map(params![r.id, r.fleet, budget as i64], |x| Ok((x.get(0)?, x.get(1)?)))?
        .collect::<Result<_, _>>()?;
    for (device, attempt) in picked {
        if !offer(&r.fleet, &device, &r.release_id, attempt, r.gate.is_some()) {
            break;
        }
        conn.execute(
            // A retried device stays in the wave it was first offered in. What it runs now, and
            // its figures, are what a soak gate compares with and a rollback returns it to.
            "UPDATE rollout_devices SET status = 'offered', wave = coalesce(wave, ?3), offered = ?4,
                 previous_id = (SELECT release_id FROM devices WHERE fleet = ?5 AND id = ?2),
                 base_escalation = (SELECT escalation_rate FROM devices WHERE fleet = ?5 AND id = ?2 AND requests >= ?6),
                 base_p99 = (SELECT p99_ms FROM devices WHERE fleet = ?5 AND id = ?2 AND requests >= ?6)
             WHERE rollout_id = ?1 AND device_id = ?2",
            params![r.id, device, wave as i64, now, r.fleet, super::soak::MIN_REQUESTS],
        )?;
        event(conn, now, Some(r.id), Some(&device), "offered", &format!("wave {}, attempt {}", wave + 1, attempt + 1))?;
    }
    Ok(())
}

/// An offer recorded as sent in a live rollout.
pub struct Outstanding {
    pub fleet: String,
    pub device: String,
    pub release: String,
    pub attempt: u32,
    /// A gated rollout's offer before its gate passed.
    pub candidate: bool,
}

/// Offers recorded as sent in live rollouts. At start the console sends them again: one queued
/// just before the console was killed may never have left.
pub fn outstanding(conn: &Connection) -> db::Result<Vec<Outstanding>> {
    let mut s = conn.prepare(
        // A rolled-back device's offer is its previous release.
        "SELECT r.fleet, rd.device_id, CASE rd.status WHEN 'rolled_back' THEN rd.previous_id ELSE r.release_id END,
                CASE rd.status WHEN 'rolled_back' THEN 0 ELSE rd.attempt END,
                rd.status = 'offered' AND r.shadow_rows IS NOT NULL
         FROM rollout_devices rd JOIN rollouts r ON r.id = rd.rollout_id
         WHERE rd.status IN ('offered', 'promoting', 'rolled_back') AND r.state IN ('running', 'paused', 'completed')",
    )?;
    s.query_map(params![], |x| {
        Ok(Outstanding {
            fleet: x.get(0)?,
            device: x.get(1)?,
            release: x.get(2)?,
            attempt: x.get(3)?,
            candidate: x.get(4)?,
        })
    })?
    .collect()
}

/// The state machine driven by hand: states recorded as devices would send them, steps at
/// chosen times, offers collected instead of published.
#[cfg(test)]
mod machine {
    use super::*;
    use crate::console::rollout::view::show;
    use crate::console::{db, ingest};

    struct Fleet {
        conn: Connection,
        now: i64,
        offers: Vec<(String, u32)>,
        /// Last, so that the connection closes before the database's folder goes.
        _database: db::testing::TestDatabase,
    }

    const RELEASE: &str = "ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12";

    impl Fleet {
        /// The same fleet on each engine (db::testing::databases).
        fn each(name: &str, devices: usize) -> Vec<Fleet> {
            db::testing::databases(&format!("rollout-{name}")).into_iter().map(|d| Fleet::on(d, devices)).collect()
        }

        fn on(database: db::testing::TestDatabase, devices: usize) -> Fleet {
            let conn = db::open(&database).unwrap();
            conn.execute(
                "INSERT INTO releases (id, fleet, grp, number, models, offer, bytes, uploaded)
                 VALUES (?1, 'f', 'default', 2, '[]', ?2, 0, 0)",
                params![RELEASE, vec![0u8]],
            )
            .unwrap();
            let mut f = Fleet { conn, now: 1_000_000, offers: Vec::new(), _database: database };
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
            tick(&self.conn, self.now, &mut |_, d, _, a, _| {
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
        for mut f in Fleet::each("waves", 4) {
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
    }

    #[test]
    fn a_wave_below_its_share_pauses_and_resume_takes_it_as_it_stands() {
        for mut f in Fleet::each("share", 4) {
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
    }

    #[test]
    fn errors_pause_counting_only_failures_after_a_resume_and_silence_times_out() {
        for mut f in Fleet::each("errors", 6) {
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
}
