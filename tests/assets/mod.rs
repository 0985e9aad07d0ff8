//! The fetched test assets (scripts/fetch-assets.sh puts them under `.cache/assets`; `ILLMREC_ASSETS`
//! points elsewhere).

use std::path::PathBuf;

/// `path` under the asset folder; fails with the fetch command for `name` when it is missing.
pub fn asset(path: &str, name: &str) -> PathBuf {
    let f = std::env::var_os("ILLMREC_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".cache/assets"))
        .join(path);
    assert!(f.exists(), "{} is missing: run scripts/fetch-assets.sh {name}", f.display());
    f
}
