//! What every reader shares: decompressing, splitting into lines with their numbers, rejecting invalid
//! UTF-8, and the bad-record policy (error naming file and line, or skip and count).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use serde::Serialize;
use sha2::{Digest, Sha256};

use super::config::OnBadRecord;
use super::error::{DataError, Result};

/// One interaction as read from a source file.
#[derive(Debug, Clone, PartialEq)]
pub struct RawInteraction {
    pub user: String,
    pub item: String,
    /// Seconds (or any increasing unit: a sequences file's position). f64 keeps RecBole's float
    /// timestamps whole: truncating 1.7 and 1.2 to 1 would order them by file line.
    pub timestamp: f64,
}

/// Item metadata as read from a source file (any field may be empty).
#[derive(Debug, Clone, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct ItemMeta {
    pub title: String,
    pub brand: String,
    pub categories: Vec<String>,
    pub features: Vec<String>,
    pub description: String,
}

/// A source file that went into a snapshot: recorded in the manifest.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct SourceFile {
    pub path: String,
    pub sha256: String,
    pub bytes: u64,
}

/// Skipped records, by reason, with the first few places for the report.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct SkipReport {
    pub counts: BTreeMap<String, usize>,
    pub examples: Vec<String>,
}

impl SkipReport {
    pub fn total(&self) -> usize {
        self.counts.values().sum()
    }
}

/// Applies the job's bad-record policy and keeps the skip counts.
#[derive(Debug)]
pub struct BadRecords {
    policy: OnBadRecord,
    pub report: SkipReport,
}

const MAX_EXAMPLES: usize = 10;

impl BadRecords {
    pub fn new(policy: OnBadRecord) -> Self {
        Self { policy, report: SkipReport::default() }
    }

    /// Reports a bad record: an error under `error`, a counted skip under `skip`.
    /// `kind` groups the counts ("malformed JSON", "duplicate interaction", ...).
    pub fn bad(&mut self, file: &Path, line: usize, kind: &str, detail: String) -> Result<()> {
        let reason = if detail.is_empty() { kind.to_string() } else { format!("{kind}: {detail}") };
        match self.policy {
            OnBadRecord::Error => Err(DataError::BadRecord { file: file.to_path_buf(), line, reason }),
            OnBadRecord::Skip => {
                *self.report.counts.entry(kind.to_string()).or_default() += 1;
                if self.report.examples.len() < MAX_EXAMPLES {
                    self.report.examples.push(format!("{}:{line}: {reason}", file.display()));
                }
                Ok(())
            }
        }
    }

    /// A bad file that is one record by itself (an item image).
    pub fn bad_file(&mut self, file: &Path, kind: &str, detail: String) -> Result<()> {
        match self.policy {
            OnBadRecord::Error => {
                Err(DataError::BadFile { file: file.to_path_buf(), reason: format!("{kind}: {detail}") })
            }
            OnBadRecord::Skip => {
                *self.report.counts.entry(kind.to_string()).or_default() += 1;
                if self.report.examples.len() < MAX_EXAMPLES {
                    self.report.examples.push(format!("{}: {kind}: {detail}", file.display()));
                }
                Ok(())
            }
        }
    }
}

fn io_err(file: &Path) -> impl FnOnce(std::io::Error) -> DataError + '_ {
    move |source| DataError::Io { file: file.to_path_buf(), source }
}

/// Reads a whole file, gunzipping it when it starts with the gzip magic; returns the decoded bytes
/// and the hash of the file as stored.
pub fn read_source(path: &Path) -> Result<(Vec<u8>, SourceFile)> {
    let raw = std::fs::read(path).map_err(io_err(path))?;
    let source = SourceFile {
        path: path.display().to_string(),
        sha256: hex::encode(Sha256::digest(&raw)),
        bytes: raw.len() as u64,
    };
    let decoded = if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| DataError::BadFile { file: path.to_path_buf(), reason: format!("corrupt gzip data: {e}") })?;
        out
    } else {
        raw
    };
    if decoded.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(DataError::Empty { file: path.to_path_buf() });
    }
    Ok((decoded, source))
}

/// The non-blank lines of a decoded file with 1-based line numbers. A line that is not valid UTF-8 goes
/// through the bad-record policy.
pub fn lines<'a>(file: &'a Path, bytes: &'a [u8], bad: &mut BadRecords) -> Result<Vec<(usize, &'a str)>> {
    let mut out = Vec::new();
    for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        match std::str::from_utf8(raw) {
            Ok(s) if s.trim().is_empty() => {}
            Ok(s) => out.push((i + 1, s)),
            Err(e) => bad.bad(file, i + 1, "invalid UTF-8", format!("at byte {}", e.valid_up_to()))?,
        }
    }
    Ok(out)
}

/// Hash of a set of files by name and content, for sources that are folders (item images).
pub fn hash_files(root: &Path, files: &[PathBuf]) -> Result<SourceFile> {
    let mut h = Sha256::new();
    let mut total = 0u64;
    for f in files {
        let mut r = BufReader::new(std::fs::File::open(f).map_err(io_err(f))?);
        h.update(f.strip_prefix(root).unwrap_or(f).display().to_string().as_bytes());
        loop {
            let buf = r.fill_buf().map_err(io_err(f))?;
            if buf.is_empty() {
                break;
            }
            let n = buf.len();
            h.update(buf);
            total += n as u64;
            r.consume(n);
        }
    }
    Ok(SourceFile { path: root.display().to_string(), sha256: hex::encode(h.finalize()), bytes: total })
}

/// Collects interactions in file order, treating a repeated (user, item) pair as a bad record
/// ("duplicate interaction"); under `skip` the first occurrence is kept.
#[derive(Debug, Default)]
pub struct Interactions {
    first_line: std::collections::HashMap<(String, String), usize>,
    pub list: Vec<RawInteraction>,
}

impl Interactions {
    pub fn push(&mut self, file: &Path, line: usize, it: RawInteraction, bad: &mut BadRecords) -> Result<()> {
        let key = (it.user.clone(), it.item.clone());
        if let Some(first) = self.first_line.get(&key) {
            return bad.bad(
                file,
                line,
                "duplicate interaction",
                format!("user `{}` item `{}` first at line {first}", it.user, it.item),
            );
        }
        self.first_line.insert(key, line);
        self.list.push(it);
        Ok(())
    }
}

/// Items by id; a repeated id is a bad record ("duplicate item"), the first one is kept.
#[derive(Debug, Default)]
pub struct Items {
    first_line: std::collections::HashMap<String, usize>,
    pub map: BTreeMap<String, ItemMeta>,
}

impl Items {
    /// Whether the item was kept (false: a repeated id, skipped under the bad-record policy).
    pub fn insert(
        &mut self,
        file: &Path,
        line: usize,
        id: String,
        meta: ItemMeta,
        bad: &mut BadRecords,
    ) -> Result<bool> {
        if let Some(first) = self.first_line.get(&id) {
            bad.bad(file, line, "duplicate item", format!("item `{id}` first at line {first}"))?;
            return Ok(false);
        }
        self.first_line.insert(id.clone(), line);
        self.map.insert(id, meta);
        Ok(true)
    }
}

/// Everything a source reader produces, before filtering.
#[derive(Debug)]
pub struct RawData {
    pub interactions: Vec<RawInteraction>,
    pub items: BTreeMap<String, ItemMeta>,
    /// Image files found for items (not yet decoded).
    pub images: BTreeMap<String, PathBuf>,
    pub sources: Vec<SourceFile>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gzip_and_plain_read_the_same_and_hash_the_stored_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("a.jsonl");
        std::fs::write(&plain, b"x\ny\n").unwrap();
        let gz = dir.path().join("a.jsonl.gz");
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        std::io::Write::write_all(&mut enc, b"x\ny\n").unwrap();
        std::fs::write(&gz, enc.finish().unwrap()).unwrap();
        let (a, sa) = read_source(&plain).unwrap();
        let (b, sb) = read_source(&gz).unwrap();
        assert_eq!(a, b);
        assert_ne!(sa.sha256, sb.sha256);
    }

    #[test]
    fn line_numbers_skip_blank_lines_and_count_bad_utf8() {
        let mut bad = BadRecords::new(OnBadRecord::Skip);
        let f = Path::new("f.txt");
        let got = lines(f, b"a\n\nb\xff\nc\r\n", &mut bad).unwrap();
        assert_eq!(got, vec![(1, "a"), (4, "c")]);
        assert_eq!(bad.report.counts["invalid UTF-8"], 1);
        let mut strict = BadRecords::new(OnBadRecord::Error);
        let err = lines(f, b"a\nb\xff\n", &mut strict).unwrap_err().to_string();
        assert!(err.starts_with("f.txt:2: invalid UTF-8"), "{err}");
    }
}
