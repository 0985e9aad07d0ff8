//! RecBole atomic files: a tab-separated header of `name:type` fields, then one record per line.
//! `.inter` needs user_id, item_id and timestamp; `.item` (optional) gives titles and categories.

use std::collections::BTreeMap;
use std::path::Path;

use super::error::{DataError, Result};
use super::ingest::{lines, read_source, BadRecords, Interactions, ItemMeta, RawData, RawInteraction};
use super::item_table::{self, ItemColumns};

/// Column names RecBole datasets use for the item fields illmrec knows.
const TITLE_COLUMNS: &[&str] = &["movie_title", "title", "item_name", "name"];
const CATEGORY_COLUMNS: &[&str] = &["class", "categories", "category", "genre"];

pub fn read(dir: &Path, name: &str, bad: &mut BadRecords) -> Result<RawData> {
    let inter_path = dir.join(format!("{name}.inter"));
    let (bytes, inter_src) = read_source(&inter_path)?;
    let mut rows = lines(&inter_path, &bytes, bad)?.into_iter();
    let (header_line, header) = rows.next().ok_or_else(|| DataError::Empty { file: inter_path.clone() })?;
    let columns = Header::parse(&inter_path, header_line, header)?;
    let (u, i, t) = (
        columns.find(&inter_path, "user_id")?,
        columns.find(&inter_path, "item_id")?,
        columns.find(&inter_path, "timestamp")?,
    );
    let mut interactions = Interactions::default();
    for (line, text) in rows {
        let fields: Vec<&str> = text.split('\t').collect();
        if fields.len() != columns.names.len() {
            bad.bad(
                &inter_path,
                line,
                "malformed record",
                format!("{} fields, the header has {}", fields.len(), columns.names.len()),
            )?;
            continue;
        }
        let (user, item) = (fields[u].trim(), fields[i].trim());
        if user.is_empty() || item.is_empty() {
            bad.bad(&inter_path, line, "missing field", "empty user_id or item_id".into())?;
            continue;
        }
        let timestamp = match fields[t].trim().parse::<f64>() {
            Ok(v) if v.is_finite() => v,
            _ => {
                bad.bad(&inter_path, line, "malformed record", format!("timestamp `{}` is not a number", fields[t]))?;
                continue;
            }
        };
        interactions.push(
            &inter_path,
            line,
            RawInteraction { user: user.into(), item: item.into(), timestamp },
            bad,
        )?;
    }

    let mut sources = vec![inter_src];
    let item_path = dir.join(format!("{name}.item"));
    let items = if item_path.exists() {
        let (bytes, src) = read_source(&item_path)?;
        sources.push(src);
        read_items(&item_path, &bytes, bad)?
    } else {
        BTreeMap::new()
    };
    Ok(RawData { interactions: interactions.list, items, images: BTreeMap::new(), sources })
}

fn read_items(path: &Path, bytes: &[u8], bad: &mut BadRecords) -> Result<BTreeMap<String, ItemMeta>> {
    let mut rows = lines(path, bytes, bad)?.into_iter();
    let (header_line, header) = rows.next().ok_or_else(|| DataError::Empty { file: path.to_path_buf() })?;
    let header = Header::parse(path, header_line, header)?;
    let columns = ItemColumns {
        count: header.names.len(),
        id: header.find(path, "item_id")?,
        title: header.first_of(TITLE_COLUMNS),
        brand: header.first_of(&["brand"]),
        category: header.first_of(CATEGORY_COLUMNS),
        description: header.first_of(&["description"]),
        // RecBole's token_seq fields are space-separated.
        split_categories: |field| field.split_whitespace().map(str::to_string).collect(),
    };
    item_table::read_records(path, rows, &columns, bad, |_, _| {})
}

struct Header {
    names: Vec<String>,
    /// Its line in the file (blank lines before it are skipped).
    line: usize,
}

impl Header {
    fn parse(path: &Path, line: usize, text: &str) -> Result<Self> {
        let names = text
            .split('\t')
            .map(|f| match f.trim().split_once(':') {
                Some((name, _type)) => Ok(name.to_string()),
                None => Err(DataError::BadRecord {
                    file: path.to_path_buf(),
                    line,
                    reason: format!("header field `{f}` is not `name:type`"),
                }),
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { names, line })
    }

    fn find(&self, path: &Path, name: &str) -> Result<usize> {
        self.names.iter().position(|n| n == name).ok_or_else(|| DataError::BadRecord {
            file: path.to_path_buf(),
            line: self.line,
            reason: format!("the header has no `{name}` column (it has: {})", self.names.join(", ")),
        })
    }

    fn first_of(&self, names: &[&str]) -> Option<usize> {
        names.iter().find_map(|want| self.names.iter().position(|n| n == want))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::config::OnBadRecord;

    fn write(dir: &Path, name: &str, text: &[u8]) {
        std::fs::write(dir.join(name), text).unwrap();
    }

    #[test]
    fn reads_interactions_and_titles() {
        let d = tempfile::tempdir().unwrap();
        write(
            d.path(),
            "x.inter",
            b"user_id:token\titem_id:token\trating:float\ttimestamp:float\n1\t10\t3\t100\n1\t11\t4\t90.0\n",
        );
        write(
            d.path(),
            "x.item",
            b"item_id:token\tmovie_title:token_seq\tclass:token_seq\n10\tToy Story\tAnimation Comedy\n",
        );
        let raw = read(d.path(), "x", &mut BadRecords::new(OnBadRecord::Error)).unwrap();
        assert_eq!(raw.interactions.len(), 2);
        assert_eq!(raw.interactions[1].timestamp, 90.0);
        assert_eq!(raw.items["10"].title, "Toy Story");
        assert_eq!(raw.items["10"].categories, vec!["Animation", "Comedy"]);
        assert_eq!(raw.sources.len(), 2);
    }

    #[test]
    fn missing_timestamp_column_names_the_file() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), "x.inter", b"user_id:token\titem_id:token\n1\t2\n");
        let err = read(d.path(), "x", &mut BadRecords::new(OnBadRecord::Error)).unwrap_err().to_string();
        assert!(err.contains("x.inter:1") && err.contains("timestamp"), "{err}");
        // Blank lines before the header move it: the error names its real line.
        write(d.path(), "x.inter", b"\n\nuser_id:token\titem_id\n1\t2\n");
        let err = read(d.path(), "x", &mut BadRecords::new(OnBadRecord::Error)).unwrap_err().to_string();
        assert!(err.contains("x.inter:3: header field `item_id` is not `name:type`"), "{err}");
    }

    #[test]
    fn short_line_is_an_error_or_a_counted_skip() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), "x.inter", b"user_id:token\titem_id:token\ttimestamp:float\n1\t2\t5\n1\t3\n");
        let err = read(d.path(), "x", &mut BadRecords::new(OnBadRecord::Error)).unwrap_err().to_string();
        assert!(err.contains("x.inter:3: malformed record"), "{err}");
        let mut bad = BadRecords::new(OnBadRecord::Skip);
        let raw = read(d.path(), "x", &mut bad).unwrap();
        assert_eq!(raw.interactions.len(), 1);
        assert_eq!(bad.report.counts["malformed record"], 1);
    }
}
