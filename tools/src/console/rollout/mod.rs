//! Rollouts: waves, thresholds, rate limit, deadlines, and the operator's actions. Everything a
//! rollout knows is in the database; [`store::tick`] moves each live rollout one step from what is
//! there, so a console restarted mid-rollout carries on from exactly where it was.
//!
//! - [`spec`]: what a rollout is asked to do (waves, thresholds: the start request);
//! - [`decide`]: the next step of a live rollout from the counts of its devices, a pure function;
//! - [`store`]: the SQL: start, actions, and the tick that gathers counts and carries out decisions;
//! - [`view`]: a rollout as the API shows it.

pub mod decide;
pub mod gate;
pub mod spec;
pub mod store;
pub mod view;
