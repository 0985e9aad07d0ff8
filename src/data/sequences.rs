//! Datasets shipped as ready-made sequences, the way P5, S3-Rec and MSRBench ship their Amazon
//! subsets: one line per user, `user item item ...` (whitespace-separated, oldest first), and an item
//! table as tab-separated values with a header naming at least `item_id` (and any of `title`,
//! `brand`, `categories`/`category`, `description`, `image`; other columns are ignored). The order
//! of a line is its time order: an item's position is its timestamp. A user on a second line is a
//! bad record: merging the two lines by position would interleave them.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use super::error::{DataError, Result};
use super::ingest::{hash_files, lines, read_source, BadRecords, Interactions, ItemMeta, RawData, RawInteraction};
use super::item_table::{self, ItemColumns};

pub fn read(sequences: &Path, item_table: &Path, images: Option<&Path>, bad: &mut BadRecords) -> Result<RawData> {
    let (bytes, seq_src) = read_source(sequences)?;
    let mut interactions = Interactions::default();
    let mut user_line = HashMap::new();
    for (line, text) in lines(sequences, &bytes, bad)? {
        let mut fields = text.split_whitespace();
        let Some(user) = fields.next() else { continue };
        let items: Vec<&str> = fields.collect();
        if items.is_empty() {
            bad.bad(sequences, line, "missing field", format!("user `{user}` has no items"))?;
            continue;
        }
        if let Some(first) = user_line.get(user) {
            bad.bad(
                sequences,
                line,
                "duplicate user",
                format!("user `{user}` has a sequence on line {first} already"),
            )?;
            continue;
        }
        user_line.insert(user, line);
        for (position, item) in items.into_iter().enumerate() {
            let it = RawInteraction { user: user.into(), item: item.into(), timestamp: position as f64 };
            interactions.push(sequences, line, it, bad)?;
        }
    }
    let (bytes, items_src) = read_source(item_table)?;
    let (items, image_names) = read_items(item_table, &bytes, bad)?;
    let mut sources = vec![seq_src, items_src];
    let images: BTreeMap<String, PathBuf> = match images {
        Some(dir) => {
            let found: BTreeMap<String, PathBuf> =
                image_names.into_iter().map(|(id, name)| (id, dir.join(name))).filter(|(_, p)| p.is_file()).collect();
            // The pictures are a source too: a changed picture must not reuse the old snapshot.
            sources.push(hash_files(dir, &found.values().cloned().collect::<Vec<_>>())?);
            found
        }
        None => BTreeMap::new(),
    };
    Ok(RawData { interactions: interactions.list, items, images, sources })
}

type ItemTable = (BTreeMap<String, ItemMeta>, BTreeMap<String, PathBuf>);

fn read_items(path: &Path, bytes: &[u8], bad: &mut BadRecords) -> Result<ItemTable> {
    let mut rows = lines(path, bytes, bad)?.into_iter();
    let (header_line, header) = rows.next().ok_or_else(|| DataError::Empty { file: path.to_path_buf() })?;
    let names: Vec<&str> = header.split('\t').map(str::trim).collect();
    let column = |want: &[&str]| names.iter().position(|n| want.contains(n));
    let id = column(&["item_id"]).ok_or_else(|| DataError::BadRecord {
        file: path.to_path_buf(),
        line: header_line,
        reason: format!("the header has no `item_id` column (it has {})", names.join(", ")),
    })?;
    let columns = ItemColumns {
        count: names.len(),
        id,
        title: column(&["title"]),
        brand: column(&["brand"]),
        category: column(&["categories", "category"]),
        description: column(&["description"]),
        split_categories: |field| {
            field.split(',').map(str::trim).filter(|c| !c.is_empty()).map(str::to_string).collect()
        },
    };
    let image = column(&["image"]);
    let mut image_names = BTreeMap::new();
    let items = item_table::read_records(path, rows, &columns, bad, |id, fields| {
        if let Some(picture) = image.map(|c| fields[c].trim()).filter(|p| !p.is_empty()) {
            image_names.insert(id.to_string(), PathBuf::from(picture));
        }
    })?;
    Ok((items, image_names))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::OnBadRecord;

    fn files(seqs: &str, items: &str) -> (tempfile::TempDir, PathBuf, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let (s, i) = (dir.path().join("seq.txt"), dir.path().join("items.tsv"));
        std::fs::write(&s, seqs).unwrap();
        std::fs::write(&i, items).unwrap();
        (dir, s, i)
    }

    #[test]
    fn line_order_is_time_order_and_items_carry_their_metadata() {
        let (_d, s, i) = files("u1 3 1 2\nu2 2 3\n", "item_id\tasin\ttitle\timage\n1\tA1\tOne\t\n2\tA2\tTwo\tp.jpg\n");
        let raw = read(&s, &i, None, &mut BadRecords::new(OnBadRecord::Error)).unwrap();
        let u1: Vec<(&str, f64)> =
            raw.interactions.iter().filter(|x| x.user == "u1").map(|x| (x.item.as_str(), x.timestamp)).collect();
        assert_eq!(u1, [("3", 0.0), ("1", 1.0), ("2", 2.0)]);
        assert_eq!(raw.items["2"].title, "Two");
        assert!(!raw.items.contains_key("3"), "items missing from the table have no metadata");
        assert_eq!(raw.sources.len(), 2);
    }

    #[test]
    fn a_skipped_duplicate_item_keeps_the_first_records_title_and_picture() {
        let (d, s, i) = files("u1 1\n", "item_id\ttitle\timage\n1\tOne\ta.jpg\n1\tUno\tb.jpg\n");
        for picture in ["a.jpg", "b.jpg"] {
            std::fs::write(d.path().join(picture), b"").unwrap();
        }
        let mut bad = BadRecords::new(OnBadRecord::Skip);
        let raw = read(&s, &i, Some(d.path()), &mut bad).unwrap();
        assert_eq!(raw.items["1"].title, "One");
        assert_eq!(raw.images["1"], d.path().join("a.jpg"));
    }

    #[test]
    fn a_user_on_a_second_line_is_skipped_not_interleaved() {
        let (_d, s, i) = files("u1 1 2 3\nu2 1\nu1 4 5\n", "item_id\n1\n");
        let mut bad = BadRecords::new(OnBadRecord::Skip);
        let raw = read(&s, &i, None, &mut bad).unwrap();
        let u1: Vec<&str> = raw.interactions.iter().filter(|x| x.user == "u1").map(|x| x.item.as_str()).collect();
        assert_eq!(u1, ["1", "2", "3"]);
        assert_eq!(bad.report.counts["duplicate user"], 1);
    }

    #[test]
    fn the_pictures_are_part_of_the_sources_hash() {
        let (d, s, i) = files("u1 1\n", "item_id\timage\n1\ta.jpg\n");
        std::fs::write(d.path().join("a.jpg"), b"red").unwrap();
        let hash = || {
            let raw = read(&s, &i, Some(d.path()), &mut BadRecords::new(OnBadRecord::Error)).unwrap();
            assert_eq!(raw.sources.len(), 3);
            raw.sources[2].sha256.clone()
        };
        let before = hash();
        std::fs::write(d.path().join("a.jpg"), b"blue").unwrap();
        assert_ne!(before, hash(), "a changed picture changes the hash");
    }

    #[test]
    fn bad_lines_name_the_file_and_line() {
        for (seqs, items, want) in [
            ("u1 1 2\nu2\n", "item_id\n1\n", "seq.txt:2: missing field: user `u2` has no items"),
            ("u1 1 2 1\n", "item_id\n1\n", "seq.txt:1: duplicate interaction"),
            ("u1 1 2\nu1 3\n", "item_id\n1\n", "seq.txt:2: duplicate user: user `u1` has a sequence on line 1 already"),
            ("u1 1\n", "\nid\ttitle\n1\tx\n", "items.tsv:2: the header has no `item_id` column"),
            ("u1 1\n", "id\ttitle\n1\tx\n", "items.tsv:1: the header has no `item_id` column"),
            ("u1 1\n", "item_id\ttitle\n1\tx\textra\n", "items.tsv:2: malformed record: 3 fields, the header has 2"),
            ("u1 1\n", "item_id\n1\n1\n", "items.tsv:3: duplicate item"),
        ] {
            let (_d, s, i) = files(seqs, items);
            let err = read(&s, &i, None, &mut BadRecords::new(OnBadRecord::Error)).unwrap_err().to_string();
            assert!(err.contains(want), "{err} (wanted {want})");
        }
    }
}
