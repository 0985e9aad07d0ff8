//! The job file: one YAML document with the sections data / features / model / train / dist /
//! storage / eval / telemetry / lvlm. A job may `include:` presets (paths relative to the including file);
//! later files override earlier ones key by key. Unknown keys are rejected, and every error names the
//! file that set the offending key and the key's dotted path.
//!
//! Each section's type lives with the component that owns it and validates itself
//! (`validate() -> Result<(), Invalid>`); this module only assembles and attributes errors.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_norway::{Mapping, Value};

use crate::data::DataConfig;
use crate::distributed::DistConfig;
use crate::eval::EvalConfig;
use crate::features::FeaturesConfig;
use crate::invalid::Invalid;
use crate::lvlm::LvlmConfig;
use crate::model::ModelConfig;
use crate::store::StorageConfig;
use crate::telemetry::TelemetryConfig;
use crate::train::TrainConfig;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read the job file: {source}")]
    Read {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: invalid YAML: {message}")]
    Yaml { file: PathBuf, message: String },
    #[error("{file}: key `{key}`: {message}")]
    Key { file: PathBuf, key: String, message: String },
    #[error("{file}: include cycle through {cycle}")]
    IncludeCycle { file: PathBuf, cycle: String },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobConfig {
    /// Names the runs of this job (`runs/<name>-<model>`) and, unless `data.dataset` says
    /// otherwise, its dataset.
    pub name: String,
    pub data: DataConfig,
    #[serde(default)]
    pub features: FeaturesConfig,
    #[serde(default)]
    pub model: ModelConfig,
    #[serde(default)]
    pub train: TrainConfig,
    #[serde(default)]
    pub dist: DistConfig,
    #[serde(default)]
    pub storage: StorageConfig,
    #[serde(default)]
    pub eval: EvalConfig,
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    /// MSRBench's LVLM strategies (`illmrec lvlm`).
    #[serde(default)]
    pub lvlm: LvlmConfig,
}

impl JobConfig {
    /// The name of the job's dataset in storage.
    pub fn dataset(&self) -> &str {
        self.data.dataset.as_deref().unwrap_or(&self.name)
    }

    /// Loads a job file with its includes, then validates every section.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let mut loader = Loader::default();
        let merged = loader.load_file(path, &mut Vec::new())?;
        loader.finish(merged, path)
    }

    /// The job file with its includes merged in, as YAML: one self-contained file for a cluster
    /// (`illmrec submit k8s` ships it in a ConfigMap). Checked like `load`.
    pub fn load_merged_yaml(path: &Path) -> Result<(Self, String), ConfigError> {
        let mut loader = Loader::default();
        let merged = loader.load_file(path, &mut Vec::new())?;
        let text = serde_norway::to_string(&merged)
            .map_err(|e| ConfigError::Yaml { file: path.to_path_buf(), message: e.to_string() })?;
        Ok((loader.finish(merged, path)?, text))
    }

    /// Parses a job from text (the embedded default job); includes are resolved against `base_dir`.
    pub fn from_str_with_base(text: &str, name: &Path, base_dir: &Path) -> Result<Self, ConfigError> {
        let mut loader = Loader::default();
        let value = parse_yaml(text, name)?;
        let merged = loader.resolve(value, name, base_dir, &mut Vec::new())?;
        loader.finish(merged, name)
    }

    fn validate(&self) -> Vec<(String, Invalid)> {
        let mut out = Vec::new();
        let mut check = |section: &str, r: Result<(), Invalid>| {
            if let Err(e) = r {
                out.push((section.to_string(), e));
            }
        };
        if self.name.is_empty() || !self.name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
            check("", Err(Invalid::new("name", "must be non-empty, made of letters, digits, '-', '_' or '.'")));
        }
        check("data", self.data.validate());
        check("features", self.features.validate());
        check("model", self.model.validate());
        check("train", self.train.validate());
        check("dist", self.dist.validate());
        check("storage", self.storage.validate());
        check("eval", self.eval.validate());
        check("telemetry", self.telemetry.validate());
        check("lvlm", self.lvlm.validate());
        // The GRU ablation backbone has no language head for L_RISA.
        if self.model.illmrec.backbone == crate::model::illmrec::Backbone::Gru && self.train.illmrec.risa_weight > 0.0 {
            check(
                "train",
                Err(Invalid::new(
                    "illmrec.risa_weight",
                    "must be 0 with model.illmrec.backbone: gru (no language head)",
                )),
            );
        }
        out
    }
}

/// Loads YAML files, merges includes and remembers which file set each key path.
#[derive(Default)]
struct Loader {
    origin: HashMap<String, PathBuf>,
}

fn parse_yaml(text: &str, file: &Path) -> Result<Value, ConfigError> {
    serde_norway::from_str::<Value>(text)
        .map_err(|e| ConfigError::Yaml { file: file.to_path_buf(), message: e.to_string() })
}

impl Loader {
    fn load_file(&mut self, path: &Path, stack: &mut Vec<PathBuf>) -> Result<Value, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { file: path.to_path_buf(), source })?;
        let value = parse_yaml(&text, path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        self.resolve(value, path, base, stack)
    }

    /// Expands `include:` of one document and overlays the document on its includes.
    fn resolve(
        &mut self,
        value: Value,
        file: &Path,
        base: &Path,
        stack: &mut Vec<PathBuf>,
    ) -> Result<Value, ConfigError> {
        let canonical = std::fs::canonicalize(file).unwrap_or_else(|_| file.to_path_buf());
        if stack.contains(&canonical) {
            let cycle = stack.iter().chain([&canonical]).map(|p| p.display().to_string()).collect::<Vec<_>>();
            return Err(ConfigError::IncludeCycle { file: file.to_path_buf(), cycle: cycle.join(" -> ") });
        }
        let mut map = match value {
            Value::Mapping(m) => m,
            Value::Null => Mapping::new(),
            _ => {
                return Err(ConfigError::Yaml {
                    file: file.to_path_buf(),
                    message: "the job file must be a mapping of sections".into(),
                })
            }
        };
        let includes = match map.remove("include") {
            None => Vec::new(),
            Some(Value::String(s)) => vec![s],
            Some(Value::Sequence(seq)) => seq
                .into_iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s),
                    _ => Err(key_error(file, "include", "must be a list of file paths")),
                })
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(key_error(file, "include", "must be a file path or a list of them")),
        };
        stack.push(canonical);
        let mut merged = Value::Mapping(Mapping::new());
        for inc in includes {
            let inc_path = base.join(&inc);
            if !inc_path.exists() {
                return Err(key_error(
                    file,
                    "include",
                    &format!("included file `{}` does not exist", inc_path.display()),
                ));
            }
            let inc_value = self.load_file(&inc_path, stack)?;
            merged = overlay(merged, inc_value);
        }
        stack.pop();
        let own = Value::Mapping(map);
        self.record_origins(&own, "", file);
        Ok(overlay(merged, own))
    }

    fn record_origins(&mut self, value: &Value, prefix: &str, file: &Path) {
        if let Value::Mapping(m) = value {
            for (k, v) in m {
                let k = match k {
                    Value::String(s) => s.clone(),
                    other => serde_norway::to_string(other).unwrap_or_default().trim().to_string(),
                };
                let path = if prefix.is_empty() { k } else { format!("{prefix}.{k}") };
                self.origin.insert(path.clone(), file.to_path_buf());
                self.record_origins(v, &path, file);
            }
        }
    }

    /// The file that set `key`, or the closest ancestor key's file.
    fn file_of(&self, key: &str, fallback: &Path) -> PathBuf {
        let mut k = key;
        loop {
            if let Some(f) = self.origin.get(k) {
                return f.clone();
            }
            match k.rfind('.') {
                Some(i) => k = &k[..i],
                None => return fallback.to_path_buf(),
            }
        }
    }

    fn finish(&self, merged: Value, top: &Path) -> Result<JobConfig, ConfigError> {
        // serde_norway's Value cannot drive externally tagged enums from plain mappings (it wants
        // YAML tags); the same tree as JSON can, and JSON keeps every message and path.
        let json = serde_json::to_value(&merged)
            .map_err(|e| ConfigError::Yaml { file: top.to_path_buf(), message: e.to_string() })?;
        let job: JobConfig = serde_path_to_error::deserialize(json).map_err(|e| {
            let path = e.path().to_string();
            let key = if path == "." { String::new() } else { path };
            ConfigError::Key { file: self.file_of(&key, top), key, message: e.inner().to_string() }
        })?;
        if let Some((section, invalid)) = job.validate().into_iter().next() {
            let key = if section.is_empty() { invalid.key } else { format!("{section}.{}", invalid.key) };
            return Err(ConfigError::Key { file: self.file_of(&key, top), key, message: invalid.message });
        }
        Ok(job)
    }
}

fn key_error(file: &Path, key: &str, message: &str) -> ConfigError {
    ConfigError::Key { file: file.to_path_buf(), key: key.to_string(), message: message.to_string() }
}

/// Keys whose value picks one of several kinds (`model.llm: {gguf: ...}` or `{tiny: ...}`): a later
/// file replaces the choice instead of merging two kinds into one invalid mapping.
const CHOICES: &[&str] =
    &["data.source", "model.llm", "features.image", "features.text", "features.cf", "features.captions"];

/// Deep merge: mappings merge key by key (except at `CHOICES`), anything else in `top` replaces `base`.
fn overlay(base: Value, top: Value) -> Value {
    overlay_at(base, top, "")
}

fn overlay_at(base: Value, top: Value, path: &str) -> Value {
    match (base, top) {
        (Value::Mapping(mut b), Value::Mapping(t)) if !CHOICES.contains(&path) => {
            for (k, v) in t {
                let child = match &k {
                    Value::String(name) if path.is_empty() => name.clone(),
                    Value::String(name) => format!("{path}.{name}"),
                    _ => String::new(),
                };
                let merged = match b.remove(&k) {
                    Some(old) => overlay_at(old, v, &child),
                    None => v,
                };
                b.insert(k, merged);
            }
            Value::Mapping(b)
        }
        (_, t) => t,
    }
}

#[cfg(test)]
mod tests;
