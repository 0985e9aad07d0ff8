//! Amazon Reviews 2018: a reviews file (JSON lines: reviewerID, asin, unixReviewTime, overall) and a
//! metadata file (JSON lines: asin, title, brand, category[], feature[], description[], imageURL[], ...),
//! plain or gzip, plus a folder of item images named `<asin>.<jpg|jpeg|png>`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::error::{DataError, Result};
use super::ingest::{
    hash_files, lines, read_source, BadRecords, Interactions, ItemMeta, Items, RawData, RawInteraction,
};

#[derive(Deserialize)]
#[allow(non_snake_case)] // the dataset's own field names
struct Review {
    reviewerID: String,
    asin: String,
    unixReviewTime: i64,
}

#[derive(Deserialize)]
struct Meta {
    asin: String,
    #[serde(default)]
    title: String,
    #[serde(default)]
    brand: String,
    #[serde(default)]
    category: Vec<String>,
    #[serde(default)]
    feature: Vec<String>,
    #[serde(default)]
    description: OneOrMany,
}

/// `description` is a list in most files and a plain string in some.
#[derive(Deserialize, Default)]
#[serde(untagged)]
enum OneOrMany {
    #[default]
    None,
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn joined(self) -> String {
        match self {
            OneOrMany::None => String::new(),
            OneOrMany::One(s) => s,
            OneOrMany::Many(v) => v.join(" "),
        }
    }
}

pub const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png"];

pub fn read(reviews: &Path, meta: &Path, images: Option<&Path>, bad: &mut BadRecords) -> Result<RawData> {
    let (bytes, reviews_src) = read_source(reviews)?;
    let mut interactions = Interactions::default();
    for (line, text) in lines(reviews, &bytes, bad)? {
        let r: Review = match serde_json::from_str(text) {
            Ok(r) => r,
            Err(e) => {
                bad.bad(reviews, line, json_kind(&e), e.to_string())?;
                continue;
            }
        };
        if r.reviewerID.is_empty() || r.asin.is_empty() {
            bad.bad(reviews, line, "missing field", "empty reviewerID or asin".into())?;
            continue;
        }
        interactions.push(
            reviews,
            line,
            RawInteraction { user: r.reviewerID, item: r.asin, timestamp: r.unixReviewTime as f64 },
            bad,
        )?;
    }

    let (bytes, meta_src) = read_source(meta)?;
    let mut items = Items::default();
    for (line, text) in lines(meta, &bytes, bad)? {
        let m: Meta = match serde_json::from_str(text) {
            Ok(m) => m,
            Err(e) => {
                bad.bad(meta, line, json_kind(&e), e.to_string())?;
                continue;
            }
        };
        if m.asin.is_empty() {
            bad.bad(meta, line, "missing field", "empty asin".into())?;
            continue;
        }
        let item = ItemMeta {
            title: m.title.trim().to_string(),
            brand: m.brand.trim().to_string(),
            categories: m.category,
            features: m.feature,
            description: m.description.joined().trim().to_string(),
        };
        items.insert(meta, line, m.asin, item, bad)?;
    }

    let mut sources = vec![reviews_src, meta_src];
    let images = match images {
        Some(dir) => {
            let found = find_images(dir)?;
            let files: Vec<PathBuf> = found.values().cloned().collect();
            sources.push(hash_files(dir, &files)?);
            found
        }
        None => BTreeMap::new(),
    };
    Ok(RawData { interactions: interactions.list, items: items.map, images, sources })
}

/// serde_json tells a structurally valid record with a missing field from text that is not JSON.
fn json_kind(e: &serde_json::Error) -> &'static str {
    if e.is_data() && e.to_string().starts_with("missing field") {
        "missing field"
    } else if e.is_data() {
        "wrong field type"
    } else {
        "malformed JSON"
    }
}

/// Image files in `dir` by item id (file stem), sorted; the first extension in IMAGE_EXTENSIONS wins,
/// and of two spellings of one extension (`a.jpg`, `a.JPG`) the smaller name, whatever order the
/// folder lists them in.
fn find_images(dir: &Path) -> Result<BTreeMap<String, PathBuf>> {
    let entries = std::fs::read_dir(dir).map_err(|source| DataError::Io { file: dir.to_path_buf(), source })?;
    let mut found: BTreeMap<String, PathBuf> = BTreeMap::new();
    for entry in entries {
        let path = entry.map_err(|source| DataError::Io { file: dir.to_path_buf(), source })?.path();
        let Some(stem) = path.file_stem().and_then(|s| s.to_str()) else { continue };
        let Some(rank) = extension_rank(&path) else { continue };
        if found.get(stem).is_none_or(|old| (rank, &path) < (extension_rank(old).unwrap_or(usize::MAX), old)) {
            found.insert(stem.to_string(), path);
        }
    }
    Ok(found)
}

/// Where a file's extension stands in IMAGE_EXTENSIONS (any case); None for other files.
fn extension_rank(path: &Path) -> Option<usize> {
    let ext = path.extension().and_then(|e| e.to_str())?;
    IMAGE_EXTENSIONS.iter().position(|e| e.eq_ignore_ascii_case(ext))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::config::OnBadRecord;

    #[test]
    fn reads_reviews_meta_and_finds_images() {
        let d = tempfile::tempdir().unwrap();
        let reviews = d.path().join("r.json");
        std::fs::write(
            &reviews,
            concat!(
                r#"{"reviewerID":"u1","asin":"a1","unixReviewTime":5,"overall":5.0,"reviewText":"ok"}"#,
                "\n",
                r#"{"reviewerID":"u1","asin":"a2","unixReviewTime":3}"#,
                "\n"
            ),
        )
        .unwrap();
        let meta = d.path().join("m.json");
        std::fs::write(&meta, concat!(
            r#"{"asin":"a1","title":"Pen ","brand":"B","category":["Art","Pens"],"feature":["blue"],"description":["fine","tip"],"imageURL":["x"]}"#, "\n",
            r#"{"asin":"a2","description":"plain"}"#, "\n"
        )).unwrap();
        let img = d.path().join("img");
        std::fs::create_dir(&img).unwrap();
        std::fs::write(img.join("a1.png"), b"png").unwrap();
        std::fs::write(img.join("a1.txt"), b"not an image").unwrap();
        let raw = read(&reviews, &meta, Some(&img), &mut BadRecords::new(OnBadRecord::Error)).unwrap();
        assert_eq!(raw.interactions.len(), 2);
        assert_eq!(raw.items["a1"].title, "Pen");
        assert_eq!(raw.items["a1"].description, "fine tip");
        assert_eq!(raw.items["a2"].description, "plain");
        assert_eq!(raw.images.keys().collect::<Vec<_>>(), vec!["a1"]);
        assert_eq!(raw.sources.len(), 3);
    }

    #[test]
    fn the_picture_of_an_item_does_not_depend_on_the_folders_listing_order() {
        let d = tempfile::tempdir().unwrap();
        for name in ["b1.png", "b1.jpeg", "a1.JPG", "a1.jpg", "a1.png"] {
            std::fs::write(d.path().join(name), b"x").unwrap();
        }
        let found = find_images(d.path()).unwrap();
        // `jpg` before `jpeg` before `png`; of `JPG` and `jpg`, the smaller name (upper case sorts first).
        assert_eq!(found["a1"], d.path().join("a1.JPG"));
        assert_eq!(found["b1"], d.path().join("b1.jpeg"));
    }
}
