//! Item tables as tab-separated values with a header line: RecBole's `.item` files and the
//! sequence datasets' item tables. The two layouts name their columns differently (RecBole writes
//! `name:type`) and list several categories differently; reading the records is the same, and
//! happens here.

use std::collections::BTreeMap;
use std::path::Path;

use super::error::Result;
use super::ingest::{BadRecords, ItemMeta, Items};

/// Where the fields illmrec knows sit in a table's records, found by the layout from its header.
pub struct ItemColumns {
    /// Fields per record: the header's.
    pub count: usize,
    pub id: usize,
    pub title: Option<usize>,
    pub brand: Option<usize>,
    pub category: Option<usize>,
    pub description: Option<usize>,
    /// Splits the category field into its categories.
    pub split_categories: fn(&str) -> Vec<String>,
}

/// Reads the records that follow the header, `(line number, text)`. A record with another number of
/// fields than the header, an empty id or a repeated id goes through the bad-record policy (under
/// `skip` the first record of an id is kept). `kept` sees each kept record's id and fields, for the
/// columns only its layout knows.
pub fn read_records<'a>(
    path: &Path,
    records: impl IntoIterator<Item = (usize, &'a str)>,
    columns: &ItemColumns,
    bad: &mut BadRecords,
    mut kept: impl FnMut(&str, &[&str]),
) -> Result<BTreeMap<String, ItemMeta>> {
    let mut items = Items::default();
    for (line, text) in records {
        let fields: Vec<&str> = text.split('\t').collect();
        if fields.len() != columns.count {
            let reason = format!("{} fields, the header has {}", fields.len(), columns.count);
            bad.bad(path, line, "malformed record", reason)?;
            continue;
        }
        let get = |c: Option<usize>| c.map(|c| fields[c].trim().to_string()).unwrap_or_default();
        let id = fields[columns.id].trim();
        if id.is_empty() {
            bad.bad(path, line, "missing field", "empty item_id".into())?;
            continue;
        }
        let meta = ItemMeta {
            title: get(columns.title),
            brand: get(columns.brand),
            categories: (columns.split_categories)(&get(columns.category)),
            features: Vec::new(),
            description: get(columns.description),
        };
        if items.insert(path, line, id.to_string(), meta, bad)? {
            kept(id, &fields);
        }
    }
    Ok(items.map)
}
