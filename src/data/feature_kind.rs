//! The kinds of feature an item can have; encoders in `features` produce them, models read them.

use serde::{Deserialize, Serialize};

/// The feature types an item can have. I-LLMRec turns one of them into the item's prompt token and
/// scores items with heads over any of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FeatureKind {
    Image,
    Text,
    Cf,
}

impl FeatureKind {
    pub fn name(self) -> &'static str {
        match self {
            FeatureKind::Image => "image",
            FeatureKind::Text => "text",
            FeatureKind::Cf => "cf",
        }
    }
}

impl std::fmt::Display for FeatureKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
