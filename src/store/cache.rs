//! A node's local copies of immutable objects read from a remote root, so every node downloads a
//! dataset, a feature shard or a checkpoint once. Only immutable keys come here (their content never
//! changes under the same key); files appear by rename, so a reader never sees half of one.

use std::path::PathBuf;

use bytes::Bytes;
use sha2::{Digest, Sha256};

use super::{Result, StoreError};

#[derive(Clone, Debug)]
pub struct ReadCache {
    dir: PathBuf,
}

/// A name for one writer's attempt: process, time and a counter.
pub fn attempt_id() -> String {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let mut h = Sha256::new();
    h.update(std::process::id().to_le_bytes());
    h.update(now.to_le_bytes());
    h.update(n.to_le_bytes());
    hex::encode(&h.finalize()[..6])
}

impl ReadCache {
    /// The cache of root `url` under `dir` (default: $XDG_CACHE_HOME/illmrec or ~/.cache/illmrec).
    pub fn new(dir: Option<PathBuf>, url: &str) -> Self {
        let base = dir.unwrap_or_else(|| {
            std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
                .unwrap_or_else(|| PathBuf::from(".cache"))
                .join("illmrec")
        });
        Self { dir: base.join(hex::encode(&Sha256::digest(url.as_bytes())[..8])) }
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(key)
    }

    pub fn read(&self, key: &str) -> Result<Option<Bytes>> {
        match std::fs::read(self.path(key)) {
            Ok(b) => Ok(Some(Bytes::from(b))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StoreError::Cache { path: self.path(key), source }),
        }
    }

    pub fn write(&self, key: &str, bytes: &[u8]) -> Result<()> {
        let path = self.path(key);
        let err = |source| StoreError::Cache { path: path.clone(), source };
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(err)?;
        }
        let tmp = path.with_extension(format!("tmp-{}", attempt_id()));
        std::fs::write(&tmp, bytes).map_err(err)?;
        std::fs::rename(&tmp, &path).map_err(err)
    }
}
