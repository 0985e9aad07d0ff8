//! Storage roots: every stage reads its inputs from and writes its outputs to one root, so a stage can
//! run on another machine than the one before it. Roots are URLs: `file://PATH` (the default; a bare
//! path means the same) and `memory://` for tests. Keys are `/`-separated paths below the root.
//!
//! The API is synchronous: stages are CPU-bound, and a small current-thread runtime drives
//! `object_store` underneath.

use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::{memory::InMemory, path::Path as ObjPath, ObjectStore, ObjectStoreExt, PutPayload};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage root `{url}`: {reason}")]
    BadRoot { url: String, reason: String },
    #[error("`{key}` not found under storage root `{root}`")]
    NotFound { root: String, key: String },
    #[error("storage root `{root}`, key `{key}`: {source}")]
    Io {
        root: String,
        key: String,
        #[source]
        source: object_store::Error,
    },
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// The `storage` section of a job.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// `file://PATH` (a relative PATH is taken from the working directory) or `memory://`.
    #[serde(default = "default_root")]
    pub root: String,
}

fn default_root() -> String {
    "file://illmrec-data".into()
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self { root: default_root() }
    }
}

impl StorageConfig {
    pub fn validate(&self) -> std::result::Result<(), crate::config::Invalid> {
        let ok = self.root == "memory://" || self.root.starts_with("file://") || !self.root.contains("://");
        if !ok || self.root.is_empty() || self.root == "file://" {
            return Err(crate::config::Invalid::new(
                "root",
                format!("`{}`: use file://PATH, a plain path, or memory://", self.root),
            ));
        }
        Ok(())
    }
}

/// A storage root.
#[derive(Clone)]
pub struct Store {
    url: String,
    inner: Arc<dyn ObjectStore>,
    runtime: Arc<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Store({})", self.url)
    }
}

impl Store {
    /// Opens a root URL. A local root is created when missing.
    pub fn open(url: &str) -> Result<Self> {
        let bad = |reason: String| StoreError::BadRoot { url: url.to_string(), reason };
        let inner: Arc<dyn ObjectStore> = if url == "memory://" {
            Arc::new(InMemory::new())
        } else if let Some(rest) = url.strip_prefix("file://").or(if url.contains("://") { None } else { Some(url) }) {
            if rest.is_empty() {
                return Err(bad("empty path".into()));
            }
            std::fs::create_dir_all(rest).map_err(|e| bad(format!("cannot create folder: {e}")))?;
            let local = object_store::local::LocalFileSystem::new_with_prefix(rest).map_err(|e| bad(e.to_string()))?;
            Arc::new(local.with_automatic_cleanup(true))
        } else {
            return Err(bad(
                "unsupported scheme: this build reads file:// (or a plain path) and memory:// roots".into()
            ));
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| bad(format!("cannot start the I/O runtime: {e}")))?;
        Ok(Self { url: url.to_string(), inner, runtime: Arc::new(runtime) })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    fn io_err(&self, key: &str, source: object_store::Error) -> StoreError {
        match source {
            object_store::Error::NotFound { .. } => StoreError::NotFound { root: self.url.clone(), key: key.into() },
            source => StoreError::Io { root: self.url.clone(), key: key.into(), source },
        }
    }

    pub fn put(&self, key: &str, bytes: impl Into<Bytes>) -> Result<()> {
        let payload = PutPayload::from_bytes(bytes.into());
        self.runtime.block_on(self.inner.put(&ObjPath::from(key), payload)).map(|_| ()).map_err(|e| self.io_err(key, e))
    }

    pub fn get(&self, key: &str) -> Result<Bytes> {
        self.runtime
            .block_on(async {
                let got = self.inner.get(&ObjPath::from(key)).await?;
                got.bytes().await
            })
            .map_err(|e| self.io_err(key, e))
    }

    /// `Ok(None)` when the key does not exist.
    pub fn get_opt(&self, key: &str) -> Result<Option<Bytes>> {
        match self.get(key) {
            Ok(b) => Ok(Some(b)),
            Err(StoreError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn get_string(&self, key: &str) -> Result<Option<String>> {
        Ok(self.get_opt(key)?.map(|b| String::from_utf8_lossy(&b).trim().to_string()))
    }

    /// Removes a key; removing a key that does not exist is not an error.
    pub fn delete(&self, key: &str) -> Result<()> {
        match self.runtime.block_on(self.inner.delete(&ObjPath::from(key))) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.io_err(key, e)),
        }
    }

    /// Keys below `prefix`, sorted.
    pub fn list(&self, prefix: &str) -> Result<Vec<String>> {
        let prefix_path = ObjPath::from(prefix);
        let mut keys: Vec<String> = self
            .runtime
            .block_on(self.inner.list(Some(&prefix_path)).map_ok(|m| m.location.to_string()).try_collect())
            .map_err(|e| self.io_err(prefix, e))?;
        keys.sort();
        Ok(keys)
    }
}

/// Joins key segments with `/`.
pub fn key(parts: &[&str]) -> String {
    parts.iter().filter(|p| !p.is_empty()).copied().collect::<Vec<_>>().join("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_list_in_memory_and_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        for url in ["memory://".to_string(), format!("file://{}", dir.path().display())] {
            let s = Store::open(&url).unwrap();
            s.put("a/b/one.json", b"1".to_vec()).unwrap();
            s.put("a/two.json", b"2".to_vec()).unwrap();
            assert_eq!(&s.get("a/b/one.json").unwrap()[..], b"1");
            assert!(s.get_opt("a/none").unwrap().is_none());
            assert!(matches!(s.get("a/none"), Err(StoreError::NotFound { .. })));
            assert_eq!(s.list("a").unwrap(), vec!["a/b/one.json", "a/two.json"]);
            s.delete("a/two.json").unwrap();
            s.delete("a/two.json").unwrap();
            assert_eq!(s.list("a").unwrap(), vec!["a/b/one.json"]);
        }
    }

    #[test]
    fn unknown_scheme_is_rejected_with_the_url() {
        let err = Store::open("ftp://x").unwrap_err().to_string();
        assert!(err.contains("ftp://x"), "{err}");
    }
}
