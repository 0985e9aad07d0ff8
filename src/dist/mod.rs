//! Distributed execution. This build runs one process (`single`); the MPI and NCCL collectives and
//! the coordinator's shard plan arrive with the distributed-training stage. The section is parsed
//! and checked now so job files written today keep working.

use serde::{Deserialize, Serialize};

use crate::config::Invalid;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// The best backend available (in this build: single).
    #[default]
    Auto,
    Single,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DistConfig {
    #[serde(default)]
    pub backend: Backend,
    /// Ranks the job expects; checked against what the launcher started.
    #[serde(default = "one")]
    pub world_size: usize,
}

fn one() -> usize {
    1
}

impl Default for DistConfig {
    fn default() -> Self {
        Self { backend: Backend::Auto, world_size: 1 }
    }
}

impl DistConfig {
    pub fn validate(&self) -> Result<(), Invalid> {
        if self.world_size != 1 {
            return Err(Invalid::new(
                "world_size",
                format!("{} ranks requested, but this build runs a single process", self.world_size),
            ));
        }
        Ok(())
    }
}
