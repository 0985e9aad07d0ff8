//! Data: ingest (RecBole atomic files, Amazon Reviews 2018, ready-made sequences with an item table,
//! synthetic catalogs), k-core filtering, the leave-one-out split, sampled negatives, fixed candidate
//! lists, and the snapshot every later stage reads.

pub mod amazon;
pub mod candidates;
mod config;
mod dataset;
mod error;
mod feature_kind;
pub mod ingest;
mod item_table;
pub mod kcore;
pub mod negatives;
pub mod prepare;
pub mod prompt;
pub mod recbole;
pub mod sequences;
pub mod snapshot;
pub mod synth;
pub mod windows;

pub use config::{DataConfig, OnBadRecord, SourceConfig, SynthConfig};
pub use dataset::{Dataset, Item, Negatives, Split};
pub use error::{DataError, Result};
pub use feature_kind::FeatureKind;
