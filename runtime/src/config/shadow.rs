//! `[models.shadow]`: a candidate model run beside the configured one on a share of its requests
//! (`crate::shadow`).

use std::path::PathBuf;

use serde::Deserialize;

use super::error::{ConfigError, check_name, invalid};

/// Share of answered requests run on the candidate when the config gives none.
pub const DEFAULT_SHADOW_SHARE: f64 = 0.1;
/// Candidate runs started per second at most, when the config gives none.
pub const DEFAULT_SHADOW_MAX_PER_SECOND: f64 = 50.0;
/// Candidate runs at once at most, when the config gives none.
pub const DEFAULT_SHADOW_MAX_IN_FLIGHT: usize = 2;
/// The candidate's version label when the config gives none.
pub const DEFAULT_SHADOW_VERSION: &str = "candidate";

/// `[models.shadow]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShadowConfig {
    /// The candidate model file (its golden file and reference profile beside it, if present).
    pub path: PathBuf,
    /// The candidate's version label in metrics and reports; default [`DEFAULT_SHADOW_VERSION`].
    pub version: Option<String>,
    /// Share of answered requests also run on the candidate; default [`DEFAULT_SHADOW_SHARE`].
    pub share: Option<f64>,
    /// Most candidate runs started per second; default [`DEFAULT_SHADOW_MAX_PER_SECOND`].
    pub max_per_second: Option<f64>,
    /// Most candidate runs at once; default [`DEFAULT_SHADOW_MAX_IN_FLIGHT`].
    pub max_in_flight: Option<usize>,
}

/// Validated `[models.shadow]`.
#[derive(Clone, Debug, PartialEq)]
pub struct ShadowSettings {
    pub path: PathBuf,
    pub version: String,
    pub share: f64,
    pub max_per_second: f64,
    pub max_in_flight: usize,
}

impl ShadowSettings {
    /// The settings of a candidate release's model at `path`: its own version label, and the
    /// bounds of the serving model's `[models.shadow]` if it has one, else the defaults.
    pub fn for_candidate(path: PathBuf, version: String, configured: Option<&ShadowSettings>) -> ShadowSettings {
        match configured {
            Some(c) => ShadowSettings { path, version, ..c.clone() },
            None => ShadowSettings {
                path,
                version,
                share: DEFAULT_SHADOW_SHARE,
                max_per_second: DEFAULT_SHADOW_MAX_PER_SECOND,
                max_in_flight: DEFAULT_SHADOW_MAX_IN_FLIGHT,
            },
        }
    }
}

impl ShadowConfig {
    pub(crate) fn validate(&self, key: &dyn Fn(&str) -> String) -> Result<ShadowSettings, ConfigError> {
        let invalid = |field: &str, reason: String| invalid(key(&format!("shadow.{field}")), reason);
        if !self.path.is_file() {
            return Err(invalid("path", format!("{} is not a file", self.path.display())));
        }
        let version = self.version.clone().unwrap_or_else(|| DEFAULT_SHADOW_VERSION.into());
        check_name(&version).map_err(|r| invalid("version", r))?;
        let share = self.share.unwrap_or(DEFAULT_SHADOW_SHARE);
        if !(share > 0.0 && share <= 1.0) {
            return Err(invalid("share", "must be a number above 0 and at most 1".into()));
        }
        let max_per_second = self.max_per_second.unwrap_or(DEFAULT_SHADOW_MAX_PER_SECOND);
        if !(max_per_second.is_finite() && max_per_second > 0.0) {
            return Err(invalid("max_per_second", "must be a number above 0".into()));
        }
        let max_in_flight = self.max_in_flight.unwrap_or(DEFAULT_SHADOW_MAX_IN_FLIGHT);
        if !(1..=64).contains(&max_in_flight) {
            return Err(invalid("max_in_flight", "must be between 1 and 64".into()));
        }
        Ok(ShadowSettings { path: self.path.clone(), version, share, max_per_second, max_in_flight })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(toml: &str) -> Result<ShadowSettings, String> {
        let c: ShadowConfig = toml::from_str(toml).map_err(|e| e.to_string())?;
        c.validate(&|f| format!("models[0].{f}")).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_and_bounds() {
        let ok = check("path = \"Cargo.toml\"\n").unwrap();
        assert_eq!((ok.version.as_str(), ok.share, ok.max_in_flight), ("candidate", 0.1, 2));
        let e = check("path = \"no/such.onnx\"\n").unwrap_err();
        assert!(e.starts_with("models[0].shadow.path: no/such.onnx is not a file"), "{e}");
        for (field, bad) in [("share", "0"), ("share", "1.5"), ("max_per_second", "0"), ("max_in_flight", "0")] {
            let e = check(&format!("path = \"Cargo.toml\"\n{field} = {bad}\n")).unwrap_err();
            assert!(e.starts_with(&format!("models[0].shadow.{field}:")), "{e}");
        }
        assert!(check("path = \"Cargo.toml\"\nversion = \"a/b\"\n").unwrap_err().contains("shadow.version"));
        assert!(check("path = \"Cargo.toml\"\nratio = 1\n").unwrap_err().contains("unknown field"));
    }
}
