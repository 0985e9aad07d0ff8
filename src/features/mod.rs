//! Item features: one vector per item, stored as a table every model can read. SASRec's item
//! embeddings are the first such table (the CF feature of I-LLMRec).

mod table;

pub use table::{FeatureTable, FeatureTableError};

use serde::{Deserialize, Serialize};

/// The `features` section. Encoders (image, text) and their cache arrive with the I-LLMRec stage;
/// until then the section takes no keys, and any key is rejected as unknown.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FeaturesConfig {}
