//! What the agent needs from the device it runs on.

use std::path::Path;

use crate::Refusal;
use crate::apply::{Applied, Updater};
use crate::mqtt::report::DeviceReport;

/// What the agent needs from the device.
pub trait Device: Send + Sync + 'static {
    /// Runs `f` with the device's updater (store and target), one caller at a time.
    fn with_updater<R>(&self, f: impl FnOnce(&Updater) -> R) -> R;
    /// Applies a release directory (verify, stage, health check, commit, activate).
    fn apply(&self, dir: &Path) -> Result<Applied, Refusal>;
    /// Stages a release directory as the candidate: verified and health-checked like an
    /// apply, then run beside the serving models as shadows.
    fn stage_candidate(&self, dir: &Path) -> Result<Applied, Refusal>;
    /// Activates the candidate release.
    fn promote(&self) -> Result<Applied, Refusal>;
    /// Drops the candidate release; returns its number.
    fn drop_candidate(&self) -> Result<u64, Refusal>;
    /// Activates the previous release in place of the active one.
    fn revert(&self) -> Result<Applied, Refusal>;
    /// The device's part of its state report (`stats` since the last call).
    fn report(&self) -> DeviceReport;
}
