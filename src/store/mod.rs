//! Storage roots: every stage reads its inputs from and writes its outputs to one root, so a stage can
//! run on another machine than the one before it. Roots are URLs: `file://PATH` (the default; a bare
//! path means the same), `s3://BUCKET/PREFIX` (any S3-compatible server, see `s3.rs`), and `memory://`
//! for tests. Keys are `/`-separated paths below the root.
//!
//! Two kinds of object: immutable ones (snapshot files, feature shards, checkpoint payloads, written
//! under keys that name their content or their attempt) and pointers (`LATEST`, `index.json`) that are
//! rewritten last to commit what they name. Immutable objects are written create-only where the server
//! honours conditional puts (probed when the root opens) and are read through a local cache.
//!
//! The API is synchronous: stages are CPU-bound, and a small current-thread runtime drives
//! `object_store` underneath.

mod cache;
mod s3;

use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::{
    memory::InMemory, path::Path as ObjPath, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload,
    UpdateVersion, WriteMultipart,
};

pub use s3::S3Config;

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
    #[error("storage root `{root}`: `{key}` changed while this run was committing to it (another writer?)")]
    Conflict { root: String, key: String },
    #[error("local cache {path}: {source}")]
    Cache {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl StoreError {
    /// Another writer moved a pointer this one was committing to: no retry can fix that.
    pub fn is_conflict(&self) -> bool {
        matches!(self, StoreError::Conflict { .. })
    }
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// The `storage` section of a job.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// `file://PATH` (a relative PATH is taken from the working directory), `s3://BUCKET/PREFIX` or
    /// `memory://`.
    #[serde(default = "default_root")]
    pub root: String,
    #[serde(default)]
    pub s3: S3Config,
    /// Where a node keeps copies of immutable objects read from a remote root (default:
    /// `$XDG_CACHE_HOME/illmrec` or `~/.cache/illmrec`).
    #[serde(default)]
    pub cache_dir: Option<PathBuf>,
    /// Objects larger than this many MiB are uploaded in parts of this size.
    #[serde(default = "default_part_mib")]
    pub multipart_mib: usize,
}

fn default_root() -> String {
    "file://illmrec-data".into()
}
fn default_part_mib() -> usize {
    16
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self { root: default_root(), s3: S3Config::default(), cache_dir: None, multipart_mib: default_part_mib() }
    }
}

impl StorageConfig {
    pub fn validate(&self) -> std::result::Result<(), crate::invalid::Invalid> {
        let r = &self.root;
        let known = r == "memory://" || r.starts_with("file://") || r.starts_with("s3://") || !r.contains("://");
        if !known || r.is_empty() || r == "file://" || r == "s3://" {
            return Err(crate::invalid::Invalid::new(
                "root",
                format!("`{r}`: use file://PATH, a plain path, s3://BUCKET/PREFIX or memory://"),
            ));
        }
        if self.multipart_mib < 5 {
            return Err(crate::invalid::Invalid::new("multipart_mib", "S3 parts must be at least 5 MiB"));
        }
        self.s3.validate().map_err(|e| crate::invalid::Invalid::new(format!("s3.{}", e.key), e.message))
    }
}

/// A storage root.
#[derive(Clone)]
pub struct Store {
    url: String,
    inner: Arc<dyn ObjectStore>,
    runtime: Arc<tokio::runtime::Runtime>,
    cache: Option<cache::ReadCache>,
    /// The server refuses a create-only put over an existing object (probed).
    create_only: bool,
    part_bytes: usize,
    /// How long one request may take, retries included (zero for local roots).
    request_budget: std::time::Duration,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Store({})", self.url)
    }
}

impl Store {
    /// Opens a root URL with default settings.
    pub fn open(url: &str) -> Result<Self> {
        Self::open_with(&StorageConfig { root: url.to_string(), ..StorageConfig::default() })
    }

    /// Opens the configured root. A local root is created when missing; an S3 root is checked with
    /// one request and probed for conditional puts.
    pub fn open_with(cfg: &StorageConfig) -> Result<Self> {
        let url = cfg.root.as_str();
        let bad = |reason: String| StoreError::BadRoot { url: url.to_string(), reason };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| bad(format!("cannot start the I/O runtime: {e}")))?;
        let (inner, remote): (Arc<dyn ObjectStore>, bool) = if url == "memory://" {
            (Arc::new(InMemory::new()), false)
        } else if let Some(rest) = url.strip_prefix("s3://") {
            (s3::build(url, rest, &cfg.s3).map_err(bad)?, true)
        } else if let Some(rest) = url.strip_prefix("file://").or(if url.contains("://") { None } else { Some(url) }) {
            if rest.is_empty() {
                return Err(bad("empty path".into()));
            }
            std::fs::create_dir_all(rest).map_err(|e| bad(format!("cannot create folder: {e}")))?;
            let local = object_store::local::LocalFileSystem::new_with_prefix(rest).map_err(|e| bad(e.to_string()))?;
            (Arc::new(local.with_automatic_cleanup(true)), false)
        } else {
            return Err(bad("unsupported scheme: use file://, s3:// or memory://".into()));
        };
        let cache = if remote { Some(cache::ReadCache::new(cfg.cache_dir.clone(), url)) } else { None };
        let mut store = Self {
            url: url.to_string(),
            inner,
            runtime: Arc::new(runtime),
            cache,
            create_only: false,
            part_bytes: cfg.multipart_mib << 20,
            request_budget: if remote { cfg.s3.retry_budget() } else { std::time::Duration::ZERO },
        };
        if remote || url == "memory://" {
            store.create_only = store.probe_create_only()?;
            tracing::debug!("{url}: conditional create {}", if store.create_only { "honoured" } else { "ignored" });
        }
        Ok(store)
    }

    /// Writes the same probe object twice create-only: a server that honours If-None-Match refuses the
    /// second. Also the first request, so wrong credentials or a wrong endpoint fail here, clearly.
    fn probe_create_only(&self) -> Result<bool> {
        let k = format!(".illmrec-probe/{}", cache::attempt_id());
        let create = || PutOptions { mode: PutMode::Create, ..Default::default() };
        let put = |opts: PutOptions| {
            self.runtime.block_on(self.inner.put_opts(
                &ObjPath::from(k.as_str()),
                PutPayload::from_static(b"probe"),
                opts,
            ))
        };
        put(create()).map_err(|e| match e {
            object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. } => {
                StoreError::BadRoot {
                    url: self.url.clone(),
                    reason: format!(
                        "the server refused the credentials: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY \
                         and the endpoint ({e})"
                    ),
                }
            }
            e => self.io_err(&k, e),
        })?;
        let refused = match put(create()) {
            Err(object_store::Error::AlreadyExists { .. }) | Err(object_store::Error::Precondition { .. }) => true,
            Ok(_) => false,
            Err(object_store::Error::NotImplemented { .. }) | Err(object_store::Error::NotSupported { .. }) => false,
            Err(e) => return Err(self.io_err(&k, e)),
        };
        self.delete(&k)?;
        Ok(refused)
    }

    /// How long one request may legitimately take, retries included: what ranks waiting for a
    /// writer should add to their deadline.
    pub fn request_budget(&self) -> std::time::Duration {
        self.request_budget
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Whether the server refused a second create-only put of the same key (If-None-Match).
    pub fn honours_conditional_put(&self) -> bool {
        self.create_only
    }

    fn io_err(&self, key: &str, source: object_store::Error) -> StoreError {
        match source {
            object_store::Error::NotFound { .. } => StoreError::NotFound { root: self.url.clone(), key: key.into() },
            source => StoreError::Io { root: self.url.clone(), key: key.into(), source },
        }
    }

    /// Writes (or overwrites) an object; large ones go up in parts, each retried on its own.
    pub fn put(&self, key: &str, bytes: impl Into<Bytes>) -> Result<()> {
        self.put_mode(key, bytes.into(), PutMode::Overwrite).map(|_| ())
    }

    /// Writes an immutable object: create-only where the server honours it. Returns false when the
    /// object was there already (content-addressed keys: the same content).
    pub fn put_new(&self, key: &str, bytes: impl Into<Bytes>) -> Result<bool> {
        let mode = if self.create_only { PutMode::Create } else { PutMode::Overwrite };
        self.put_mode(key, bytes.into(), mode)
    }

    fn put_mode(&self, key: &str, bytes: Bytes, mode: PutMode) -> Result<bool> {
        let path = ObjPath::from(key);
        let result = if bytes.len() > self.part_bytes && mode == PutMode::Overwrite {
            let part = self.part_bytes;
            self.runtime.block_on(async {
                let upload = self.inner.put_multipart(&path).await?;
                let mut w = WriteMultipart::new_with_chunk_size(upload, part);
                w.put(bytes);
                w.finish().await
            })
        } else {
            let opts = PutOptions { mode, ..Default::default() };
            self.runtime.block_on(self.inner.put_opts(&path, PutPayload::from_bytes(bytes), opts))
        };
        match result {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. }) | Err(object_store::Error::Precondition { .. }) => Ok(false),
            Err(e) => Err(self.io_err(key, e)),
        }
    }

    /// Reads a pointer object (a small text such as LATEST) and the version a later
    /// [`Store::put_pointer`] must find for its update to go through.
    pub fn get_pointer(&self, key: &str) -> Result<Option<(String, PointerVersion)>> {
        let got = self.runtime.block_on(async {
            let got = self.inner.get(&ObjPath::from(key)).await?;
            let version = UpdateVersion { e_tag: got.meta.e_tag.clone(), version: got.meta.version.clone() };
            Ok::<_, object_store::Error>((got.bytes().await?, version))
        });
        match got {
            Ok((bytes, v)) => Ok(Some((String::from_utf8_lossy(&bytes).trim().to_string(), PointerVersion(v)))),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.io_err(key, e)),
        }
    }

    /// Moves a pointer: where the server honours conditional puts, only if it still is at `seen`
    /// (`None`: it must not exist yet), so of two writers racing on one commit, one fails with
    /// [`StoreError::Conflict`] instead of both succeeding. Elsewhere a plain overwrite.
    pub fn put_pointer(&self, key: &str, value: &str, seen: Option<&PointerVersion>) -> Result<()> {
        let mode = match (self.create_only, seen) {
            (false, _) => PutMode::Overwrite,
            (true, None) => PutMode::Create,
            (true, Some(PointerVersion(v))) if v.e_tag.is_some() || v.version.is_some() => PutMode::Update(v.clone()),
            (true, Some(_)) => PutMode::Overwrite,
        };
        let opts = PutOptions { mode, ..Default::default() };
        let payload = PutPayload::from(value.to_string());
        match self.runtime.block_on(self.inner.put_opts(&ObjPath::from(key), payload, opts)) {
            Ok(_) => Ok(()),
            Err(object_store::Error::AlreadyExists { .. }) | Err(object_store::Error::Precondition { .. }) => {
                Err(StoreError::Conflict { root: self.url.clone(), key: key.into() })
            }
            Err(e) => Err(self.io_err(key, e)),
        }
    }

    pub fn get(&self, key: &str) -> Result<Bytes> {
        self.runtime
            .block_on(async {
                let got = self.inner.get(&ObjPath::from(key)).await?;
                got.bytes().await
            })
            .map_err(|e| self.io_err(key, e))
    }

    /// Reads an immutable object, through the local cache when the root is remote.
    pub fn get_immutable(&self, key: &str) -> Result<Bytes> {
        match &self.cache {
            None => self.get(key),
            Some(c) => match c.read(key)? {
                Some(b) => Ok(b),
                None => {
                    let b = self.get(key)?;
                    c.write(key, &b)?;
                    Ok(b)
                }
            },
        }
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

/// The version of a pointer object as read; opaque to callers.
#[derive(Debug, Clone)]
pub struct PointerVersion(UpdateVersion);

/// Joins key segments with `/`.
pub fn key(parts: &[&str]) -> String {
    parts.iter().filter(|p| !p.is_empty()).copied().collect::<Vec<_>>().join("/")
}

/// A name no other attempt will use: for payloads written before the pointer that commits them.
pub fn attempt_id() -> String {
    cache::attempt_id()
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
            assert_eq!(&s.get_immutable("a/b/one.json").unwrap()[..], b"1");
            assert!(s.get_opt("a/none").unwrap().is_none());
            assert!(matches!(s.get("a/none"), Err(StoreError::NotFound { .. })));
            assert_eq!(s.list("a").unwrap(), vec!["a/b/one.json", "a/two.json"]);
            s.delete("a/two.json").unwrap();
            s.delete("a/two.json").unwrap();
            assert_eq!(s.list("a").unwrap(), vec!["a/b/one.json"]);
            assert!(s.put_new("a/new", b"x".to_vec()).unwrap());
        }
    }

    #[test]
    fn unknown_scheme_is_rejected_with_the_url() {
        let err = Store::open("ftp://x").unwrap_err().to_string();
        assert!(err.contains("ftp://x"), "{err}");
    }

    #[test]
    fn attempt_ids_differ() {
        assert_ne!(attempt_id(), attempt_id());
    }
}
