//! `outpost serve`'s options, and the configuration they make (a file, or flags on defaults).

use std::path::{Path, PathBuf};

use anyhow::Result;
use outpost_runtime::config::{Config, DEFAULT_MODEL_DIR, EscalationConfig, ModelConfig};

#[derive(clap::Args)]
pub struct ServeArgs {
    /// Configuration file (outpost.toml). Conflicts with --model and --model-dir.
    #[arg(long, short, conflicts_with_all = ["model", "model_dir"])]
    config: Option<PathBuf>,
    /// A model to serve, as PATH or PATH:NAME (name defaults to the file stem). Repeatable.
    #[arg(long, short)]
    model: Vec<String>,
    /// Serve every *.onnx in this folder (default: ./models when neither --config nor --model is given).
    #[arg(long, conflicts_with = "model")]
    model_dir: Option<PathBuf>,
    /// Serve a model repository: REPO/NAME/<version>/model.onnx, with optional REPO/NAME/config.toml.
    #[arg(long, conflicts_with_all = ["config", "model", "model_dir"])]
    model_repository: Option<PathBuf>,
    /// Address to listen on (overrides the configuration), e.g. 127.0.0.1:8000.
    #[arg(long)]
    listen: Option<String>,
    /// Backend for the models of --model and --model-dir: tract, ort, or auto (the default: the
    /// fastest of this build's backends on each model).
    #[arg(long, conflicts_with = "config")]
    backend: Option<String>,
    /// Escalate unsure cases of the --model models to this central V2 server (http://host:port
    /// or https://host:port with --central-ca).
    #[arg(long, requires = "model", conflicts_with = "config")]
    central: Option<String>,
    /// The central model's name (default: the local model's name).
    #[arg(long, requires = "central")]
    central_model: Option<String>,
    /// PEM file of the CAs that sign an https central's certificate.
    #[arg(long, requires = "central")]
    central_ca: Option<PathBuf>,
    /// Escalate when the confidence is below this.
    #[arg(long, requires = "central", default_value_t = 0.9)]
    threshold: f64,
    /// Confidence measure: max_probability, margin or entropy.
    #[arg(long, requires = "central", default_value = "max_probability")]
    policy: String,
    /// Keep hard examples here while the central is unreachable.
    #[arg(long, requires = "central")]
    hard_example_queue: Option<PathBuf>,
    /// Collect hard examples uploaded by edges (POST /v2/hard-examples) in this folder.
    #[arg(long, conflicts_with = "config")]
    hard_example_sink: Option<PathBuf>,
}

pub fn build_config(args: &ServeArgs) -> Result<Config, outpost_runtime::config::ConfigError> {
    let mut config = if let Some(path) = &args.config {
        Config::read(path)?
    } else if let Some(repo) = &args.model_repository {
        Config::from_repository(repo)?
    } else if !args.model.is_empty() {
        let models = args
            .model
            .iter()
            .map(|m| match m.rsplit_once(':') {
                Some((path, name)) if !name.contains('/') => ModelConfig::for_path(Path::new(path), Some(name)),
                _ => ModelConfig::for_path(Path::new(m), None),
            })
            .collect();
        Config { models, ..Config::default() }
    } else {
        Config::from_model_dir(args.model_dir.as_deref().unwrap_or(Path::new(DEFAULT_MODEL_DIR)))?
    };
    if let Some(listen) = &args.listen {
        config.server.listen = Some(listen.clone());
    }
    if let Some(backend) = &args.backend {
        for m in &mut config.models {
            m.backend = Some(backend.clone());
        }
    }
    if let Some(central) = &args.central {
        for m in &mut config.models {
            m.escalation = Some(EscalationConfig {
                central_url: central.clone(),
                central_model: args.central_model.clone().unwrap_or_else(|| m.name.clone()),
                threshold: args.threshold,
                policy: Some(args.policy.clone()),
                central_ca: args.central_ca.clone(),
                queue_dir: args.hard_example_queue.as_ref().map(|q| q.join(&m.name)),
                ..EscalationConfig::default()
            });
        }
    }
    if let Some(sink) = &args.hard_example_sink {
        config.server.hard_example_sink = Some(sink.clone());
    }
    Ok(config)
}
