//! Where a configuration comes from: a file (relative paths taken from its folder), a folder of
//! `*.onnx` files, or a model repository of version folders.

use std::path::{Path, PathBuf};

use super::Config;
use super::error::{ConfigError, invalid};
use super::model::{ModelConfig, REPOSITORY_MODEL_CONFIG};

impl Config {
    /// Reads and parses a file (not yet validated). Relative model paths are taken from the
    /// file's folder.
    pub fn read(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        let mut config: Config =
            toml::from_str(&text).map_err(|e| ConfigError::Parse { path: path.to_owned(), message: e.to_string() })?;
        let base = path.parent().unwrap_or(Path::new("."));
        if let Some(p) = config.server.auth_token_file.as_mut().filter(|p| p.is_relative()) {
            *p = base.join(&*p);
        }
        for m in &mut config.models {
            if m.path.is_relative() {
                m.path = base.join(&m.path);
            }
            if let Some(p) =
                m.escalation.as_mut().and_then(|e| e.central_token_file.as_mut()).filter(|p| p.is_relative())
            {
                *p = base.join(&*p);
            }
            for p in [&mut m.golden, &mut m.profile].into_iter().flatten().filter(|p| p.is_relative()) {
                *p = base.join(&*p);
            }
        }
        if let Some(u) = config.updates.as_mut() {
            if u.state_dir.is_relative() {
                u.state_dir = base.join(&u.state_dir);
            }
            if let Some(m) = u.mqtt.as_mut() {
                for p in [&mut m.password_file, &mut m.ca_file].into_iter().flatten() {
                    if p.is_relative() {
                        *p = base.join(&*p);
                    }
                }
            }
        }
        if let Some(repo) = &config.server.model_repository {
            let repo = base.join(repo);
            config.models.extend(Config::from_repository(&repo)?.models);
        }
        Ok(config)
    }

    /// A configuration serving every `*.onnx` in `dir` (sorted by name) on defaults.
    pub fn from_model_dir(dir: &Path) -> Result<Config, ConfigError> {
        let read_err = |source| ConfigError::Read { path: dir.to_owned(), source };
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(read_err)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "onnx") && p.is_file())
            .collect();
        paths.sort();
        if paths.is_empty() {
            return Err(invalid("models", format!("no *.onnx file in {}", dir.display())));
        }
        Ok(Config { models: paths.iter().map(|p| ModelConfig::for_path(p, None)).collect(), ..Config::default() })
    }

    /// A configuration serving every model folder of a repository (`REPO/NAME/<version>/model.onnx`,
    /// with optional `REPO/NAME/config.toml` holding that model's `[[models]]` keys but `name`
    /// and `path`), sorted by name.
    pub fn from_repository(repo: &Path) -> Result<Config, ConfigError> {
        let read_err = |source| ConfigError::Read { path: repo.to_owned(), source };
        let mut dirs: Vec<PathBuf> = std::fs::read_dir(repo)
            .map_err(read_err)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_dir())
            .collect();
        dirs.sort();
        if dirs.is_empty() {
            return Err(invalid("models", format!("no model folder in repository {}", repo.display())));
        }
        let mut models = Vec::new();
        for dir in dirs {
            let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let file = dir.join(REPOSITORY_MODEL_CONFIG);
            let mut table = match std::fs::read_to_string(&file) {
                Ok(text) => toml::from_str::<toml::Table>(&text)
                    .map_err(|e| ConfigError::Parse { path: file.clone(), message: e.to_string() })?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => toml::Table::new(),
                Err(source) => return Err(ConfigError::Read { path: file, source }),
            };
            for key in ["name", "path", "version"] {
                if table.contains_key(key) {
                    return Err(ConfigError::Parse {
                        path: file,
                        message: format!("`{key}` comes from the folder layout and cannot be set here"),
                    });
                }
            }
            table.insert("name".into(), name.into());
            table.insert("path".into(), dir.to_string_lossy().into_owned().into());
            let model: ModelConfig = table
                .try_into()
                .map_err(|e: toml::de::Error| ConfigError::Parse { path: file, message: e.to_string() })?;
            models.push(model);
        }
        Ok(Config { models, ..Config::default() })
    }
}
