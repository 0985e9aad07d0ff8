//! illmrec: image-token LLM recommenders. Stages (one module each): data -> features -> train ->
//! eval, on a storage root, started from one YAML job file.

pub mod bench;
pub mod cli;
pub mod config;
pub mod data;
pub mod distributed;
pub mod eval;
pub mod features;
pub mod invalid;
pub mod launch;
pub mod lvlm;
pub mod model;
pub mod pipeline;
pub mod seed;
pub mod store;
pub mod telemetry;
pub mod tensorfile;
pub mod train;
