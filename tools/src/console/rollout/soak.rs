//! Soak gates: once a device runs a rollout's release, and until the rollout completes, its
//! quality signals are held to the rollout's bounds: its largest drift score, and its
//! escalation rate and p99 against its own figures when it was offered the release. A device
//! past a bound is marked `degraded` and the rollout pauses with the reason; with the rollback
//! rule, the device is offered the release it ran before (`rolled_back`), which it still holds
//! in its store and returns to without a download.
//!
//! Escalation and p99 are compared only over report intervals with at least
//! [`MIN_REQUESTS`] requests, on both sides: a quiet interval's p99 says little.

use super::decide::{Live, Offer};
use super::spec::SoakGate;
use crate::console::db::{self, Connection, event, params};

/// Requests a report interval needs before its escalation rate and p99 are compared.
pub const MIN_REQUESTS: i64 = 20;

/// What the soak gate reads of one device.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Signals {
    /// The largest drift score of its last closed window.
    pub drift: Option<f64>,
    /// Its last report interval: requests, escalation rate, p99.
    pub requests: Option<i64>,
    pub escalation: Option<f64>,
    pub p99_ms: Option<f64>,
    /// Its figures when it was offered the release (its last interval then).
    pub base_escalation: Option<f64>,
    pub base_p99_ms: Option<f64>,
}

/// Why a device's signals break the gate, if they do.
pub fn breach(gate: &SoakGate, s: &Signals) -> Option<String> {
    if let (Some(max), Some(drift)) = (gate.drift_max, s.drift)
        && drift > max
    {
        return Some(format!("drift score {drift:.3}, over {max}"));
    }
    if s.requests.unwrap_or(0) < MIN_REQUESTS {
        return None;
    }
    if let (Some(rise), Some(now), Some(before)) = (gate.escalation_rise, s.escalation, s.base_escalation)
        && now - before > rise + 1e-9
    {
        return Some(format!(
            "escalation rate {:.1}%, up from {:.1}% (more than {:.1} points)",
            now * 100.0,
            before * 100.0,
            rise * 100.0
        ));
    }
    if let (Some(ratio), Some(now), Some(before)) = (gate.p99_ratio, s.p99_ms, s.base_p99_ms)
        && before > 0.0
        && now > before * ratio
    {
        return Some(format!("p99 {now:.2} ms, {:.1}x its {before:.2} ms before (over {ratio}x)", now / before));
    }
    None
}

/// Holds the rollout's activated devices to its soak gate; returns why the rollout must pause
/// when one broke it. `offer` sends `(fleet, device, release, attempt, as a candidate)`.
pub fn watch(
    conn: &Connection,
    r: &Live,
    gate: &SoakGate,
    now: i64,
    offer: &mut Offer<'_>,
) -> db::Result<Option<String>> {
    let mut stmt = conn.prepare(
        "SELECT rd.device_id, rd.previous_id, d.drift, d.requests, d.escalation_rate, d.p99_ms,
                rd.base_escalation, rd.base_p99, p.number
         FROM rollout_devices rd JOIN devices d ON d.fleet = ?2 AND d.id = rd.device_id
         LEFT JOIN releases p ON p.id = rd.previous_id
         WHERE rd.rollout_id = ?1 AND rd.status = 'succeeded' AND d.online = 1 AND d.release_id = ?3
         ORDER BY rd.device_id",
    )?;
    type Row = (String, Option<String>, Signals, Option<i64>);
    let rows: Vec<Row> = stmt
        .query_map(params![r.id, r.fleet, r.release_id], |x| {
            let signals = Signals {
                drift: x.get(2)?,
                requests: x.get(3)?,
                escalation: x.get(4)?,
                p99_ms: x.get(5)?,
                base_escalation: x.get(6)?,
                base_p99_ms: x.get(7)?,
            };
            Ok((x.get(0)?, x.get(1)?, signals, x.get(8)?))
        })?
        .collect::<Result<_, _>>()?;
    let mut pause = None;
    for (device, previous, signals, previous_number) in rows {
        let Some(why) = breach(gate, &signals) else { continue };
        let mut reason = format!("soak gate: device {device} {why}");
        let mut status = "degraded";
        if gate.rollback {
            match (previous, previous_number) {
                (Some(p), Some(n)) if p != r.release_id => {
                    if offer(&r.fleet, &device, &p, 0, false) {
                        status = "rolled_back";
                        reason.push_str(&format!("; rolled back to release {n}"));
                    } else {
                        reason.push_str(&format!("; the rollback to release {n} could not be sent"));
                    }
                }
                _ => reason.push_str("; no earlier release of this console to roll back to"),
            }
        }
        conn.execute(
            "UPDATE rollout_devices SET status = ?3, finished = ?4, reason = ?5 WHERE rollout_id = ?1 AND device_id = ?2",
            params![r.id, device, status, now, reason],
        )?;
        event(conn, now, Some(r.id), Some(&device), status, &reason)?;
        pause.get_or_insert(reason);
    }
    Ok(pause)
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;
    use crate::console::rollout::store::{act, start};
    use crate::console::rollout::testing::{Fleet, R1, R2, offer};

    /// A report interval's figures: 100 requests, this escalation rate and p99.
    fn stats(escalation: f64, p99_ms: f64) -> Value {
        json!({"stats": {"count": 100, "escalation_rate": escalation, "p99_ms": p99_ms}})
    }

    #[test]
    fn a_device_past_a_soak_bound_pauses_the_rollout_and_is_rolled_back() {
        for mut f in Fleet::each("soak", 3) {
            for d in ["d1", "d2", "d3"] {
                f.state(d, R1, stats(0.02, 1.0));
            }
            let req = json!({"release": R2, "waves": "1,100%", "soak_secs": 3, "drift_max": 1.0,
                         "escalation_rise": 0.05, "rollback": true});
            let id = start(&f.conn, &serde_json::from_value(req).unwrap(), f.now).unwrap();
            let gate = json!({"drift_max": 1.0, "escalation_rise": 0.05, "p99_ratio": null, "rollback": true});
            assert_eq!(f.show(id)["soak_gate"], gate);
            assert_eq!(f.step(), [offer("d1", "ab12", false)]);
            // d1 activates; within bounds through its wave's soak.
            f.state("d1", R2, stats(0.06, 1.3));
            let mut offers = Vec::new();
            for _ in 0..10 {
                offers = f.step();
                if !offers.is_empty() {
                    break;
                }
            }
            assert_eq!(offers, [offer("d2", "ab12", false), offer("d3", "ab12", false)], "wave 2 opened");
            // d3's inputs shift: its drift score passes the bound, and it goes back to release 1.
            f.state("d2", R2, stats(0.02, 1.0));
            let drift = json!({"version": "2", "windows": 4, "alerts": 1, "threshold": 0.25,
                           "psi": {"class": 2.1, "confidence": 0.4, "input:input": 7.5}});
            f.state("d3", R2, json!({"models": [{"name": "m", "versions": ["2"], "drift": [drift]}]}));
            assert_eq!(f.step(), [offer("d3", "aa11", false)], "d3 is offered release 1");
            let v = f.show(id);
            let reason = "soak gate: device d3 drift score 7.500, over 1; rolled back to release 1";
            assert_eq!((v["state"].as_str(), v["reason"].as_str()), (Some("paused"), Some(reason)), "{v:#}");
            assert_eq!(v["counts"]["rolled_back"], 1, "{v:#}");
            assert_eq!(v["failures"][0]["device"], "d3", "{v:#}");
            // Its next state still names release 2 (the revert is on its way): it stays rolled back.
            f.state("d3", R2, json!({}));
            f.step();
            assert_eq!(f.show(id)["counts"]["rolled_back"], 1);
            f.state("d3", R1, json!({}));
            // Resumed, d2's escalation rate rises 12 points over its 2% before the offer.
            act(&f.conn, id, "resume", f.now).unwrap();
            f.state("d2", R2, stats(0.14, 1.0));
            assert_eq!(f.step(), [offer("d2", "aa11", false)]);
            let v = f.show(id);
            assert_eq!(
                v["reason"],
                "soak gate: device d2 escalation rate 14.0%, up from 2.0% (more than 5.0 points); rolled back to release 1",
                "{v:#}"
            );
            assert_eq!(v["counts"]["succeeded"], 1, "d1 within bounds: {v:#}");
        }
    }

    #[test]
    fn rollback_needs_a_bound_and_bounds_must_be_in_range() {
        for f in Fleet::each("soak-settings", 0) {
            for (extra, why) in [
                (json!({"rollback": true}), "rollback needs a soak bound"),
                (json!({"drift_max": -1}), "drift_max"),
                (json!({"escalation_rise": 2}), "escalation_rise"),
                (json!({"p99_ratio": 0.5}), "p99_ratio"),
            ] {
                let mut req = json!({"release": R2});
                req.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
                let e = start(&f.conn, &serde_json::from_value(req).unwrap(), f.now).unwrap_err();
                assert!(e.contains(why), "{e}");
            }
        }
    }

    fn gate() -> SoakGate {
        SoakGate { drift_max: Some(1.0), escalation_rise: Some(0.05), p99_ratio: Some(2.0), rollback: true }
    }

    fn busy() -> Signals {
        Signals {
            drift: Some(0.2),
            requests: Some(100),
            escalation: Some(0.03),
            p99_ms: Some(1.0),
            base_escalation: Some(0.02),
            base_p99_ms: Some(0.8),
        }
    }

    #[test]
    fn each_bound_is_named_when_broken_and_quiet_intervals_are_not_judged() {
        assert_eq!(breach(&gate(), &busy()), None);
        let drift = Signals { drift: Some(7.5), ..busy() };
        assert_eq!(breach(&gate(), &drift).unwrap(), "drift score 7.500, over 1");
        let esc = Signals { escalation: Some(0.10), ..busy() };
        assert_eq!(breach(&gate(), &esc).unwrap(), "escalation rate 10.0%, up from 2.0% (more than 5.0 points)");
        let slow = Signals { p99_ms: Some(2.0), ..busy() };
        assert_eq!(breach(&gate(), &slow).unwrap(), "p99 2.00 ms, 2.5x its 0.80 ms before (over 2x)");
        // Too few requests to compare rates and tails; drift is over whole windows, so it counts.
        let quiet = Signals { requests: Some(5), ..slow.clone() };
        assert_eq!(breach(&gate(), &quiet), None);
        assert!(breach(&gate(), &Signals { drift: Some(3.0), ..quiet }).is_some());
        // No baseline (the device served nothing before), or no bound: not judged.
        assert_eq!(breach(&gate(), &Signals { base_p99_ms: None, ..slow.clone() }), None);
        assert_eq!(breach(&SoakGate { p99_ratio: None, ..gate() }, &slow), None);
    }
}
