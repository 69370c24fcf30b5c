//! Shadow gates: a gated rollout offers its release as a candidate; each device stages it and
//! runs it as a shadow of its serving models, and reports how often the two agree. Once a
//! device has compared enough rows, the gate either passes (the release is offered for real:
//! the device promotes its candidate) or fails (the device is offered its active release again,
//! which drops the candidate, and the rollout pauses, naming the device and its figures).
//!
//! A device's row moves `offered` → `shadowing` (its state names the candidate) → `promoting`
//! (the gate passed) → `succeeded` (its state names the release as active), or to `failed`.

use super::decide::{Live, Offer};
use super::spec::Gate;
use crate::console::db::{self, Connection, event, params};

/// Moves a gated rollout's devices through the gate; returns why the rollout must pause when a
/// device failed it. `offer` sends `(fleet, device, release, attempt, as a candidate)`.
pub fn advance(conn: &Connection, r: &Live, gate: Gate, now: i64, offer: &mut Offer<'_>) -> db::Result<Option<String>> {
    // Staged: the device's state names the candidate.
    let mut stmt = conn.prepare(
        "SELECT device_id FROM rollout_devices WHERE rollout_id = ?1 AND status = 'offered'
           AND device_id IN (SELECT id FROM devices WHERE fleet = ?2 AND candidate_id = ?3)",
    )?;
    let staged: Vec<String> =
        stmt.query_map(params![r.id, r.fleet, r.release_id], |x| x.get(0))?.collect::<Result<_, _>>()?;
    for device in staged {
        conn.execute(
            "UPDATE rollout_devices SET status = 'shadowing' WHERE rollout_id = ?1 AND device_id = ?2",
            params![r.id, device],
        )?;
        event(
            conn,
            now,
            Some(r.id),
            Some(&device),
            "shadowing",
            "staged the candidate; comparing it on live requests",
        )?;
    }
    // Compared enough: pass or fail.
    let mut stmt = conn.prepare(
        "SELECT rd.device_id, rd.attempt, d.shadow_rows, d.shadow_agreed, d.release_id
         FROM rollout_devices rd JOIN devices d ON d.fleet = ?2 AND d.id = rd.device_id
         WHERE rd.rollout_id = ?1 AND rd.status = 'shadowing' AND d.candidate_id = ?3 AND d.shadow_rows >= ?4
         ORDER BY rd.device_id",
    )?;
    let judged: Vec<(String, u32, i64, i64, Option<String>)> = stmt
        .query_map(params![r.id, r.fleet, r.release_id, gate.rows as i64], |x| {
            Ok((x.get(0)?, x.get(1)?, x.get(2)?, x.get(3)?, x.get(4)?))
        })?
        .collect::<Result<_, _>>()?;
    let mut pause = None;
    for (device, attempt, rows, agreed, active) in judged {
        let agreement = agreed as f64 / rows as f64;
        let figures = format!("agreed on {:.1}% of {rows} rows", agreement * 100.0);
        if agreement + 1e-9 >= gate.agreement {
            if offer(&r.fleet, &device, &r.release_id, attempt, false) {
                conn.execute(
                    "UPDATE rollout_devices SET status = 'promoting', offered = ?3 WHERE rollout_id = ?1 AND device_id = ?2",
                    params![r.id, device, now],
                )?;
                event(conn, now, Some(r.id), Some(&device), "gate_passed", &format!("{figures}: activating"))?;
            }
            continue;
        }
        let reason = format!("shadow gate: device {device} {figures}, below {:.1}%", gate.agreement * 100.0);
        conn.execute(
            "UPDATE rollout_devices SET status = 'failed', finished = ?3, reason = ?4 WHERE rollout_id = ?1 AND device_id = ?2",
            params![r.id, device, now, reason],
        )?;
        event(conn, now, Some(r.id), Some(&device), "gate_failed", &reason)?;
        // The active release offered again: the device drops the candidate.
        if let Some(active) = active {
            offer(&r.fleet, &device, &active, 0, false);
        }
        pause.get_or_insert(reason);
    }
    Ok(pause)
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use crate::console::rollout::store::start;
    use crate::console::rollout::testing::{Fleet, R1, R2, offer};

    /// A state: running release 1, with `candidate` staged and compared on `rows` rows.
    fn report(f: &mut Fleet, id: &str, candidate: &str, rows: u64, agreement: f64) {
        let extra = json!({"candidate": {"id": candidate, "number": 2},
            "models": [{"name": "m", "versions": ["1"],
                        "shadow": {"candidate": "2", "rows": rows, "agreement": agreement}}]});
        f.state(id, R1, extra);
    }

    #[test]
    fn a_device_activates_once_its_shadow_agrees_and_one_that_disagrees_pauses_the_rollout() {
        for mut f in Fleet::each("pass-fail", 3) {
            let req = json!({"release": R2, "waves": "1,100%", "shadow_agreement": 0.95, "shadow_rows": 100});
            let id = start(&f.conn, &serde_json::from_value(req).unwrap(), f.now).unwrap();
            assert_eq!(f.show(id)["shadow_gate"], json!({"agreement": 0.95, "rows": 100}));
            // Wave 1: one device, offered as a candidate.
            assert_eq!(f.step(), [offer("d1", "ab12", true)]);
            report(&mut f, "d1", R2, 40, 0.99);
            assert!(f.step().is_empty(), "too few rows compared: wait");
            assert_eq!(f.show(id)["counts"]["shadowing"], 1);
            report(&mut f, "d1", R2, 120, 0.975);
            assert_eq!(f.step(), [offer("d1", "ab12", false)], "the gate passed: offered for real");
            assert_eq!(f.show(id)["counts"]["promoting"], 1);
            f.state("d1", R2, json!({}));
            assert!(f.step().is_empty(), "wave 1 done");
            assert!(f.step().is_empty(), "wave 2 opened");
            // Wave 2: the other two, as candidates; d3 disagrees too often.
            let mut offers = f.step();
            offers.sort();
            assert_eq!(offers, [offer("d2", "ab12", true), offer("d3", "ab12", true)]);
            report(&mut f, "d2", R2, 30, 0.99);
            report(&mut f, "d3", R2, 150, 0.80);
            assert_eq!(f.step(), [offer("d3", "aa11", false)], "d3 is offered its active release again");
            let v = f.show(id);
            assert_eq!(v["state"], "paused", "{v}");
            assert_eq!(v["reason"], "shadow gate: device d3 agreed on 80.0% of 150 rows, below 95.0%", "{v}");
            assert_eq!(v["failures"][0]["device"], "d3", "{v}");
            // Paused: d2 passing its gate now waits for the operator.
            report(&mut f, "d2", R2, 200, 0.99);
            assert!(f.step().is_empty());
        }
    }

    #[test]
    fn a_gate_needs_both_settings_in_range() {
        for f in Fleet::each("settings", 0) {
            for (agreement, rows, why) in [
                (json!(0.9), Value::Null, "needs both"),
                (json!(1.5), json!(10), "shadow_agreement"),
                (json!(0.9), json!(0), "shadow_rows"),
            ] {
                let req = json!({"release": R2, "shadow_agreement": agreement, "shadow_rows": rows});
                let e = start(&f.conn, &serde_json::from_value(req).unwrap(), f.now).unwrap_err();
                assert!(e.contains(why), "{e}");
            }
        }
    }
}
