//! The `lvlm` section of a job: which strategies `illmrec run` runs, the backbones that answer, and
//! what the prompts show.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::backend::openai::OpenAiConfig;
use super::images::ImageMode;
use crate::eval::{Protocol, UserSample};
use crate::invalid::Invalid;
use crate::model::llm::LlmSource;
use crate::model::LlmMatmul;

/// The five ways MSRBench puts a large vision-language model to work (docs/msrbench-method.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Strategy {
    /// Recommender: the history's images (and titles) and the candidates' titles; the model ranks.
    S1,
    /// Item enhancer: captions + titles, text-encoded, initialise SASRec's item table.
    S2,
    /// Reranker: S1's input plus a base model's order of the candidates.
    S3,
    /// Enhancer + recommender: S1 with captions and titles instead of images.
    S4,
    /// Enhancer + reranker: S3 with captions and titles instead of images.
    S5,
}

impl Strategy {
    pub const ALL: [Strategy; 5] = [Strategy::S1, Strategy::S2, Strategy::S3, Strategy::S4, Strategy::S5];

    /// The model reorders a base model's ranking (S3, S5).
    pub fn reranks(self) -> bool {
        matches!(self, Strategy::S3 | Strategy::S5)
    }

    /// The prompt shows the history as images (S1, S3).
    pub fn shows_images(self) -> bool {
        matches!(self, Strategy::S1 | Strategy::S3)
    }

    /// The history's items are described by captions (S2, S4, S5).
    pub fn uses_captions(self) -> bool {
        matches!(self, Strategy::S2 | Strategy::S4 | Strategy::S5)
    }
}

impl FromStr for Strategy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "s1" => Ok(Strategy::S1),
            "s2" => Ok(Strategy::S2),
            "s3" => Ok(Strategy::S3),
            "s4" => Ok(Strategy::S4),
            "s5" => Ok(Strategy::S5),
            _ => Err(format!("unknown strategy `{s}` (s1, s2, s3, s4, s5)")),
        }
    }
}

impl TryFrom<String> for Strategy {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<Strategy> for String {
    fn from(s: Strategy) -> String {
        s.to_string()
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = Strategy::ALL.iter().position(|s| s == self).unwrap_or(0) + 1;
        write!(f, "s{n}")
    }
}

/// Which item content the vision strategies (S1, S3) show for the history.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Modalities {
    Title,
    Image,
    #[default]
    #[serde(rename = "title+image")]
    TitleImage,
}

impl Modalities {
    pub fn titles(self) -> bool {
        self != Modalities::Image
    }
    pub fn images(self) -> bool {
        self != Modalities::Title
    }
}

/// A model that answers prompts.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum BackboneConfig {
    /// An OpenAI-compatible chat-completions endpoint.
    Openai(OpenAiConfig),
    /// A Llama-family text model in process (`model.llm`'s kinds: hf, gguf, tiny).
    Llm(LlmSource),
    /// A moondream2 vision-language model in process, from a Hugging Face directory.
    Moondream { dir: PathBuf },
    /// moondream2's architecture, tiny, with seeded random weights (tests, code-path checks).
    TinyMoondream {
        #[serde(default)]
        seed: u64,
    },
}

/// Settings of the in-process backbones.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LocalConfig {
    /// Prompts decoded together (their prompts are read one by one, then the answers step in lockstep).
    #[serde(default = "d_batch")]
    pub batch: usize,
    /// Tokens of explanation after the list (0: the answer is the list alone, which is fastest).
    #[serde(default)]
    pub explanation_tokens: usize,
    /// The frozen products' precision: `bf16` rounds their inputs to bfloat16 and sums in f32, about
    /// twice as fast on CPUs with AVX-512 BF16 (elsewhere it stays f32, with a warning).
    #[serde(default)]
    pub matmul: LlmMatmul,
}

fn d_batch() -> usize {
    8
}

impl Default for LocalConfig {
    fn default() -> Self {
        Self { batch: d_batch(), explanation_tokens: 0, matmul: LlmMatmul::F32 }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LvlmConfig {
    /// Strategies `illmrec run` runs after the models, with the default backbone.
    #[serde(default)]
    pub strategies: Vec<Strategy>,
    /// Models that answer, by name (`illmrec lvlm --backbone NAME`).
    #[serde(default)]
    pub backbones: BTreeMap<String, BackboneConfig>,
    /// The backbone used when none is named (default: the only one there is).
    #[serde(default)]
    pub backbone: Option<String>,
    /// Whose candidates: `candidates` (the snapshot's fixed lists) or `sampled:N` (the target and the
    /// first N stored negatives, shuffled by the seed).
    #[serde(default = "d_protocol")]
    pub protocol: Protocol,
    /// Users for `sampled:N` (all, a count, cochran); fixed lists name their own.
    #[serde(default)]
    pub users: UserSample,
    /// The model whose order S3 and S5 rerank (a model of `train.models`).
    #[serde(default = "d_base")]
    pub base_model: String,
    /// History items shown: the last N before the target.
    #[serde(default = "d_history")]
    pub max_history: usize,
    /// How many candidates an answer ranks (default: all of them).
    #[serde(default)]
    pub list_length: Option<usize>,
    /// Titles in prompts are cut to this many words (default: whole).
    #[serde(default)]
    pub max_title_words: Option<usize>,
    /// What S1 and S3 show of the history: title, image or title+image.
    #[serde(default)]
    pub modalities: Modalities,
    /// How S1 and S3 send the history's images: concatenated (one image) or per_item.
    #[serde(default)]
    pub images: ImageMode,
    /// A folder of templates (s1.txt, s3.txt, s4.txt, s5.txt) to use instead of the built-in ones.
    #[serde(default)]
    pub prompts: Option<PathBuf>,
    /// Most answer tokens per request.
    #[serde(default = "d_max_tokens")]
    pub max_tokens: usize,
    #[serde(default)]
    pub local: LocalConfig,
    #[serde(default = "d_seed")]
    pub seed: u64,
}

fn d_protocol() -> Protocol {
    Protocol::Candidates
}
fn d_base() -> String {
    "sasrec".into()
}
fn d_history() -> usize {
    10
}
fn d_max_tokens() -> usize {
    512
}
fn d_seed() -> u64 {
    2024
}

impl Default for LvlmConfig {
    fn default() -> Self {
        Self {
            strategies: Vec::new(),
            backbones: BTreeMap::new(),
            backbone: None,
            protocol: d_protocol(),
            users: UserSample::default(),
            base_model: d_base(),
            max_history: d_history(),
            list_length: None,
            max_title_words: None,
            modalities: Modalities::default(),
            images: ImageMode::default(),
            prompts: None,
            max_tokens: d_max_tokens(),
            local: LocalConfig::default(),
            seed: d_seed(),
        }
    }
}

impl LvlmConfig {
    pub fn validate(&self) -> Result<(), Invalid> {
        for (name, b) in &self.backbones {
            let nested = |e: Invalid, kind: &str| Invalid::new(format!("backbones.{name}.{kind}.{}", e.key), e.message);
            match b {
                BackboneConfig::Openai(o) => o.validate().map_err(|e| nested(e, "openai"))?,
                BackboneConfig::Llm(l) => l.validate().map_err(|e| nested(e, "llm"))?,
                BackboneConfig::Moondream { dir } if dir.as_os_str().is_empty() => {
                    return Err(Invalid::new(format!("backbones.{name}.moondream.dir"), "must not be empty"))
                }
                BackboneConfig::Moondream { .. } | BackboneConfig::TinyMoondream { .. } => {}
            }
        }
        if let Some(b) = &self.backbone {
            if !self.backbones.contains_key(b) {
                return Err(Invalid::new("backbone", format!("`{b}` is not one of `backbones` ({})", self.names())));
            }
        }
        let prompted = self.strategies.iter().any(|s| *s != Strategy::S2);
        if prompted && self.backbone.is_none() && self.backbones.len() != 1 {
            return Err(Invalid::new("backbone", "name the backbone the listed strategies use (`backbone: NAME`)"));
        }
        if self.max_history == 0 || self.max_tokens == 0 || self.list_length == Some(0) {
            return Err(Invalid::new("max_history", "max_history, max_tokens and list_length must be at least 1"));
        }
        if self.max_title_words == Some(0) {
            return Err(Invalid::new("max_title_words", "must be at least 1"));
        }
        if self.local.batch == 0 {
            return Err(Invalid::new("local.batch", "must be at least 1"));
        }
        if matches!(self.protocol, Protocol::Full) {
            return Err(Invalid::new("protocol", "the prompts list candidates: use candidates or sampled:N"));
        }
        if self.users == UserSample::Count(0) {
            return Err(Invalid::new("users", "0 users would ask nothing"));
        }
        Ok(())
    }

    fn names(&self) -> String {
        self.backbones.keys().cloned().collect::<Vec<_>>().join(", ")
    }

    /// The named backbone, or the default one.
    pub fn pick_backbone(&self, name: Option<&str>) -> Result<(String, &BackboneConfig), String> {
        let name = match name.or(self.backbone.as_deref()) {
            Some(n) => n.to_string(),
            None if self.backbones.len() == 1 => self.backbones.keys().next().cloned().unwrap_or_default(),
            None if self.backbones.is_empty() => return Err("the job's `lvlm.backbones` is empty".into()),
            None => return Err(format!("name a backbone (--backbone): {}", self.names())),
        };
        let b = self
            .backbones
            .get(&name)
            .ok_or_else(|| format!("no backbone `{name}` in `lvlm.backbones` ({})", self.names()))?;
        Ok((name, b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> LvlmConfig {
        let v: serde_json::Value = serde_norway::from_str(yaml).unwrap();
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn strategies_backbones_and_defaults() {
        let c = parse(
            "strategies: [s4, s5]\nbackbones:\n  smol: {llm: {gguf: {file: m.gguf}}}\n  \
             api: {openai: {base_url: 'http://127.0.0.1:1/v1', model: m, api_key_env: KEY}}\nbackbone: smol\n",
        );
        c.validate().unwrap();
        assert_eq!(c.strategies, vec![Strategy::S4, Strategy::S5]);
        assert_eq!(c.pick_backbone(None).unwrap().0, "smol");
        assert!(matches!(c.pick_backbone(Some("api")).unwrap().1, BackboneConfig::Openai(_)));
        assert!(c.pick_backbone(Some("x")).unwrap_err().contains("no backbone `x` in `lvlm.backbones` (api, smol)"));
        assert_eq!((c.protocol, c.max_history, c.modalities), (Protocol::Candidates, 10, Modalities::TitleImage));
        assert_eq!(Strategy::S3.to_string(), "s3");
        assert!("s6".parse::<Strategy>().is_err());
    }

    #[test]
    fn invalid_sections_name_the_key() {
        let bad = parse("strategies: [s4]\nbackbones:\n  a: {openai: {base_url: 'ftp://x', model: m}}\n");
        assert_eq!(bad.validate().unwrap_err().key, "backbones.a.openai.base_url");
        let two = parse("strategies: [s1]\nbackbones:\n  a: {moondream: {dir: d}}\n  b: {moondream: {dir: e}}\n");
        assert_eq!(two.validate().unwrap_err().key, "backbone");
        let full = parse("protocol: full\n");
        assert_eq!(full.validate().unwrap_err().key, "protocol");
    }
}
