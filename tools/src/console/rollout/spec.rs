//! What a rollout is asked to do: its waves, error threshold and the rest of a start request.

use serde::Deserialize;
use serde_json::{Map, Value};

/// One wave: a number of devices or a share of the selected devices (cumulative).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Wave {
    Count(u64),
    Percent(f64),
}

impl Wave {
    pub fn parse(s: &str) -> Result<Wave, String> {
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

    pub fn label(&self) -> String {
        match self {
            Wave::Count(n) => n.to_string(),
            Wave::Percent(p) => format!("{p}%"),
        }
    }

    /// How many of `total` devices this wave reaches.
    pub fn reach(&self, total: u64) -> u64 {
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
    /// Shadow gate: offer the release as a candidate, and activate it on a device once at
    /// least this share (0..1) of the rows it compared agree with the serving model...
    #[serde(default)]
    pub shadow_agreement: Option<f64>,
    /// ...over at least this many compared rows.
    #[serde(default)]
    pub shadow_rows: Option<u64>,
    /// Soak gate: after a device activates the release and until the rollout completes, its
    /// largest drift score must stay at or below this...
    #[serde(default)]
    pub drift_max: Option<f64>,
    /// ...its escalation rate at most this much (0..1, absolute) above its rate when offered...
    #[serde(default)]
    pub escalation_rise: Option<f64>,
    /// ...and its p99 at most this many times its p99 when offered.
    #[serde(default)]
    pub p99_ratio: Option<f64>,
    /// A device past a soak bound is offered the release it ran before.
    #[serde(default)]
    pub rollback: bool,
}

/// A rollout's shadow gate.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Gate {
    pub agreement: f64,
    pub rows: u64,
}

/// A rollout's soak gate: bounds on each activated device's signals. Unset bounds are not
/// checked.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SoakGate {
    pub drift_max: Option<f64>,
    pub escalation_rise: Option<f64>,
    pub p99_ratio: Option<f64>,
    pub rollback: bool,
}

impl SoakGate {
    pub fn is_set(&self) -> bool {
        self.drift_max.is_some() || self.escalation_rise.is_some() || self.p99_ratio.is_some()
    }
}

impl StartRequest {
    /// The soak gate asked for, if any; `rollback` needs a bound to act on.
    pub fn soak_gate(&self) -> Result<Option<SoakGate>, String> {
        let check = |what: &str, v: Option<f64>, lo: f64, hi: f64| match v {
            Some(x) if !(x.is_finite() && x > lo && x <= hi) => Err(format!("{what}: above {lo} and at most {hi}")),
            _ => Ok(v),
        };
        let gate = SoakGate {
            drift_max: check("drift_max", self.drift_max, 0.0, 1000.0)?,
            escalation_rise: check("escalation_rise", self.escalation_rise, 0.0, 1.0)?,
            p99_ratio: check("p99_ratio", self.p99_ratio, 1.0, 1000.0)?,
            rollback: self.rollback,
        };
        match (gate.is_set(), gate.rollback) {
            (true, _) => Ok(Some(gate)),
            (false, true) => Err("rollback needs a soak bound: drift_max, escalation_rise or p99_ratio".into()),
            (false, false) => Ok(None),
        }
    }

    /// The shadow gate asked for, if any: both settings or neither.
    pub fn gate(&self) -> Result<Option<Gate>, String> {
        match (self.shadow_agreement, self.shadow_rows) {
            (None, None) => Ok(None),
            (Some(agreement), Some(rows)) => {
                if !(agreement > 0.0 && agreement <= 1.0) {
                    return Err("shadow_agreement: a share above 0 and at most 1".into());
                }
                if !(1..=1_000_000_000).contains(&rows) {
                    return Err("shadow_rows: from 1 to 1000000000".into());
                }
                Ok(Some(Gate { agreement, rows }))
            }
            _ => Err("a shadow gate needs both shadow_agreement and shadow_rows".into()),
        }
    }
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
