//! Which files a model's versions come from: one file, or a version folder
//! (`DIR/<number>/model.onnx`, golden outputs in `model.golden.json` beside each) filtered by the
//! model's version policy.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::config::{GoldenSource, ModelSpec, Source, VersionPolicy};
use crate::drift::Profile;
use crate::golden::Golden;

/// The file name of a model inside a version folder.
pub const VERSION_MODEL_FILE: &str = "model.onnx";

/// One version to serve and the files it is made of.
#[derive(Clone, Debug, PartialEq)]
pub struct VersionFiles {
    pub version: String,
    pub model: PathBuf,
    pub golden: Option<PathBuf>,
    /// The reference profile drift is measured against, when one ships beside the model.
    pub profile: Option<PathBuf>,
}

/// What a version's files looked like when loaded: a changed file means a reload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fingerprint(Vec<(u64, Option<SystemTime>)>);

impl VersionFiles {
    /// Size and modification time of the model, golden and profile files.
    pub fn fingerprint(&self) -> Fingerprint {
        let stamp = |p: &Path| std::fs::metadata(p).map(|m| (m.len(), m.modified().ok())).unwrap_or((0, None));
        Fingerprint(std::iter::once(&self.model).chain(&self.golden).chain(&self.profile).map(|p| stamp(p)).collect())
    }
}

/// Sort key for versions: numbers in numeric order, then other names.
pub fn version_order(v: &str) -> (u8, u64, &str) {
    match v.parse::<u64>() {
        Ok(n) => (0, n, ""),
        Err(_) => (1, 0, v),
    }
}

/// The versions `spec` should serve now, lowest first.
pub fn versions(spec: &ModelSpec) -> Result<Vec<VersionFiles>, String> {
    match &spec.source {
        Source::File { path, version } => {
            let golden = match &spec.golden {
                GoldenSource::Beside => Golden::beside(path),
                GoldenSource::File(g) => Some(g.clone()),
                GoldenSource::Skip => None,
            };
            Ok(vec![VersionFiles {
                version: version.clone(),
                model: path.clone(),
                golden,
                profile: spec.profile.clone().or_else(|| Profile::beside(path)),
            }])
        }
        Source::Directory { path, policy } => {
            let entries = std::fs::read_dir(path).map_err(|e| format!("{}: {e}", path.display()))?;
            let mut found: Vec<(u64, PathBuf)> = entries
                .filter_map(|e| e.ok())
                .filter_map(|e| Some((e.file_name().to_str()?.parse::<u64>().ok()?, e.path().join(VERSION_MODEL_FILE))))
                .filter(|(_, model)| model.is_file())
                .collect();
            found.sort();
            if found.is_empty() {
                return Err(format!(
                    "{}: no versions (expected {}/<number>/{VERSION_MODEL_FILE})",
                    path.display(),
                    path.display()
                ));
            }
            let chosen: Vec<(u64, PathBuf)> = match policy {
                VersionPolicy::All => found,
                VersionPolicy::Latest(n) => found.split_off(found.len().saturating_sub(*n)),
                VersionPolicy::Specific(wanted) => {
                    if let Some(missing) = wanted.iter().find(|w| !found.iter().any(|(v, _)| v == *w)) {
                        return Err(format!(
                            "{}: version {missing} (named in version_policy) is not there",
                            path.display()
                        ));
                    }
                    found.into_iter().filter(|(v, _)| wanted.contains(v)).collect()
                }
            };
            Ok(chosen
                .into_iter()
                .map(|(v, model)| {
                    let golden = if spec.golden == GoldenSource::Skip { None } else { Golden::beside(&model) };
                    let profile = Profile::beside(&model);
                    VersionFiles { version: v.to_string(), model, golden, profile }
                })
                .collect())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(dir: &Path, policy: VersionPolicy) -> ModelSpec {
        let mut config = crate::config::Config::default();
        config.models.push(crate::config::ModelConfig::for_path(Path::new("x.onnx"), Some("m")));
        let mut spec = config.validate().unwrap().models.remove(0);
        spec.source = Source::Directory { path: dir.to_owned(), policy };
        spec
    }

    #[test]
    fn policies_pick_versions() {
        let dir = std::env::temp_dir().join(format!("outpost-versions-{}", std::process::id()));
        for v in ["1", "2", "10", "notaversion"] {
            std::fs::create_dir_all(dir.join(v)).unwrap();
            std::fs::write(dir.join(v).join(VERSION_MODEL_FILE), b"x").unwrap();
        }
        std::fs::create_dir_all(dir.join("3")).unwrap(); // no model file: not a version
        let names = |p| versions(&spec(&dir, p)).map(|v| v.into_iter().map(|v| v.version).collect::<Vec<_>>());
        assert_eq!(names(VersionPolicy::Latest(1)).unwrap(), vec!["10"]);
        assert_eq!(names(VersionPolicy::Latest(2)).unwrap(), vec!["2", "10"]);
        assert_eq!(names(VersionPolicy::All).unwrap(), vec!["1", "2", "10"]);
        assert_eq!(names(VersionPolicy::Specific(vec![1, 10])).unwrap(), vec!["1", "10"]);
        assert!(names(VersionPolicy::Specific(vec![3])).unwrap_err().contains("version 3"));
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(names(VersionPolicy::All).is_err());
    }

    #[test]
    fn versions_sort_numerically() {
        let mut v = vec!["10", "9", "b", "a"];
        v.sort_by_key(|s| version_order(s));
        assert_eq!(v, vec!["9", "10", "a", "b"]);
    }
}
