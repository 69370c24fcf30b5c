//! The rollout state machine's decision, as a pure function: from a live rollout and the counts
//! of its devices, what to do next. [`store`](super::store) gathers the counts and carries the
//! decision out.

use serde_json::{Map, Value};

use super::spec::{Gate, SoakGate, Wave};

/// A live rollout as the database holds it: its settings and where it stands.
pub struct Live {
    pub id: i64,
    pub release_id: String,
    pub fleet: String,
    pub group: String,
    pub labels: Map<String, Value>,
    pub waves: Vec<Wave>,
    pub success_pct: f64,
    pub soak_ms: i64,
    pub error_limit: f64,
    pub error_is_pct: bool,
    pub rate_per_min: i64,
    pub deadline_ms: i64,
    pub state: String,
    pub wave: usize,
    pub wave_done: Option<i64>,
    pub resumed: i64,
    /// Offer as a candidate first; activate on each device once its shadow comparison passes.
    pub gate: Option<Gate>,
    /// Bounds on each activated device's signals until the rollout completes.
    pub soak: Option<SoakGate>,
}

impl Live {
    /// The wave being worked on: the last once the rollout completed (late joiners get it).
    pub fn current_wave(&self) -> usize {
        let last = self.waves.len().saturating_sub(1);
        if self.state == "completed" { last } else { self.wave.min(last) }
    }
}

/// What the decision reads of a rollout's devices.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Counts {
    /// Devices selected.
    pub total: u64,
    /// Offered so far (any status but pending).
    pub offered: u64,
    /// Failed or timed out since the rollout was last resumed.
    pub new_failures: u64,
    /// Offered and not answered yet (a gated offer: until the device ran the release or failed).
    pub in_flight: u64,
    pub pending: u64,
    /// Offered in the last minute (for the rate limit).
    pub recent_offers: u64,
    /// Of the current wave's devices that were offered: how many succeeded, and how many there are.
    pub wave_succeeded: u64,
    pub wave_offered: u64,
}

/// Sends one offer: `(fleet, device, release id, attempt, as a candidate)`; false when it
/// could not be queued (the device stays where it was and is offered on a later tick).
pub type Offer<'a> = dyn FnMut(&str, &str, &str, u32, bool) -> bool + 'a;

/// What to do with a live rollout now.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// Nothing this time (paused, nothing selected, answers outstanding, soaking).
    Wait,
    Pause(String),
    /// Offer the release to at most `budget` pending devices, as part of `wave`.
    Offer {
        wave: usize,
        budget: u64,
    },
    /// The wave is fully offered and answered, and enough of it succeeded: its soak starts.
    WaveDone {
        wave: usize,
        succeeded: u64,
        offered: u64,
    },
    /// The wave soaked: open this one.
    OpenWave(usize),
    /// The last wave soaked.
    Complete,
}

/// The next step of a live rollout at `now` (milliseconds): pause on the error threshold; offer
/// the current wave up to its reach within the rate limit; once it is offered and answered,
/// pause if too few succeeded, else mark it done, and after the soak open the next wave or
/// complete.
pub fn decide(r: &Live, c: &Counts, now: i64) -> Decision {
    if r.state == "paused" || c.total == 0 {
        return Decision::Wait;
    }
    let limit = if r.error_is_pct { r.error_limit / 100.0 * c.offered as f64 } else { r.error_limit };
    let failures = c.new_failures as f64;
    if failures > 0.0 && failures > limit {
        let how = if r.error_is_pct { format!("{}%", r.error_limit) } else { format!("{}", r.error_limit) };
        return Decision::Pause(format!("error threshold: {failures} failed or timed out, over {how}"));
    }
    let wave = r.current_wave();
    let target = r.waves[..=wave].iter().map(|w| w.reach(c.total)).max().unwrap_or(c.total);
    if c.offered < target && c.pending > 0 {
        let mut budget = target - c.offered;
        if r.rate_per_min > 0 {
            budget = budget.min((r.rate_per_min as u64).saturating_sub(c.recent_offers));
        }
        return Decision::Offer { wave, budget };
    }
    if r.state == "completed" || c.in_flight > 0 {
        return Decision::Wait;
    }
    let pct = if c.wave_offered == 0 { 100.0 } else { c.wave_succeeded as f64 * 100.0 / c.wave_offered as f64 };
    match r.wave_done {
        None if pct + 1e-9 < r.success_pct => {
            Decision::Pause(format!("wave {}: {pct:.1}% succeeded, below {}%", wave + 1, r.success_pct))
        }
        None => Decision::WaveDone { wave, succeeded: c.wave_succeeded, offered: c.wave_offered },
        Some(done) if now - done >= r.soak_ms => {
            if wave + 1 >= r.waves.len() {
                Decision::Complete
            } else {
                Decision::OpenWave(wave + 1)
            }
        }
        Some(_) => Decision::Wait,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rollout(waves: &[Wave]) -> Live {
        Live {
            id: 1,
            release_id: "r".into(),
            fleet: "f".into(),
            group: "default".into(),
            labels: Map::<String, Value>::new(),
            waves: waves.to_vec(),
            success_pct: 90.0,
            soak_ms: 10_000,
            error_limit: 2.0,
            error_is_pct: false,
            rate_per_min: 0,
            deadline_ms: 60_000,
            state: "running".into(),
            wave: 0,
            wave_done: None,
            resumed: 0,
            gate: None,
            soak: None,
        }
    }

    const WAVES: [Wave; 2] = [Wave::Count(1), Wave::Percent(100.0)];

    #[test]
    fn a_wave_is_offered_up_to_its_reach_within_the_rate_limit() {
        let mut r = rollout(&WAVES);
        let c = Counts { total: 10, pending: 10, ..Counts::default() };
        assert_eq!(decide(&r, &c, 0), Decision::Offer { wave: 0, budget: 1 });
        r.wave = 1;
        assert_eq!(decide(&r, &Counts { offered: 1, pending: 9, ..c }, 0), Decision::Offer { wave: 1, budget: 9 });
        r.rate_per_min = 5;
        let c = Counts { offered: 1, pending: 9, recent_offers: 3, ..c };
        assert_eq!(decide(&r, &c, 0), Decision::Offer { wave: 1, budget: 2 });
        let c = Counts { recent_offers: 7, ..c };
        assert_eq!(decide(&r, &c, 0), Decision::Offer { wave: 1, budget: 0 }, "over the rate: offer none, wait");
    }

    #[test]
    fn a_wave_done_soaks_then_opens_the_next_and_the_last_completes() {
        let mut r = rollout(&WAVES);
        // Wave 1 reached (1 device), answered, all succeeded.
        let answered =
            Counts { total: 10, offered: 1, pending: 9, wave_succeeded: 1, wave_offered: 1, ..Counts::default() };
        assert_eq!(decide(&r, &Counts { in_flight: 1, ..answered }, 0), Decision::Wait, "an answer is outstanding");
        assert_eq!(decide(&r, &answered, 0), Decision::WaveDone { wave: 0, succeeded: 1, offered: 1 });
        r.wave_done = Some(1_000);
        assert_eq!(decide(&r, &answered, 5_000), Decision::Wait, "soaking");
        assert_eq!(decide(&r, &answered, 11_000), Decision::OpenWave(1));
        r.wave = 1;
        let all = Counts { total: 10, offered: 10, wave_succeeded: 9, wave_offered: 9, ..Counts::default() };
        assert_eq!(decide(&r, &all, 20_000), Decision::Complete);
    }

    #[test]
    fn too_many_failures_or_too_few_successes_pause_with_the_reason() {
        let mut r = rollout(&WAVES);
        let c = Counts { total: 10, offered: 4, pending: 6, new_failures: 3, ..Counts::default() };
        assert_eq!(decide(&r, &c, 0), Decision::Pause("error threshold: 3 failed or timed out, over 2".into()));
        r.error_is_pct = true;
        r.error_limit = 50.0;
        assert_eq!(decide(&r, &c, 0), Decision::Pause("error threshold: 3 failed or timed out, over 50%".into()));
        r.error_limit = 80.0;
        r.wave = 1;
        assert_eq!(decide(&r, &c, 0), Decision::Offer { wave: 1, budget: 6 }, "3 of 4 offered is within 80%");
        r.error_limit = 100.0;
        let c = Counts {
            total: 10,
            offered: 10,
            new_failures: 2,
            wave_succeeded: 8,
            wave_offered: 10,
            ..Counts::default()
        };
        assert_eq!(decide(&r, &c, 0), Decision::Pause("wave 2: 80.0% succeeded, below 90%".into()));
        r.state = "paused".into();
        assert_eq!(decide(&r, &c, 0), Decision::Wait);
    }
}
