//! Rollouts: waves, thresholds, rate limit, deadlines, and the operator's actions. Everything a
//! rollout knows is in the database; [`store::tick`] moves each live rollout one step from what is
//! there, so a console restarted mid-rollout carries on from exactly where it was.
//!
//! - [`spec`]: what a rollout is asked to do (waves, thresholds: the start request);
//! - [`decide`]: the next step of a live rollout from the counts of its devices, a pure function;
//! - [`store`]: the SQL: start, actions, and the tick that gathers counts and carries out decisions;
//! - [`gate`], [`soak`]: the quality gates, before activation (shadow agreement) and after it
//!   (drift, escalation, p99; with rollback);
//! - [`view`]: a rollout as the API shows it.

pub mod decide;
pub mod gate;
pub mod soak;
pub mod spec;
pub mod store;
#[cfg(test)]
mod testing;
pub mod view;
