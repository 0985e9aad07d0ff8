//! Fixed candidate lists: every model ranks each user's target among exactly the same items, ours or
//! a benchmark's (MSRBench ships 1 + 29 per user). A file has one JSON object per line,
//! `{"user": ID, "candidates": [ID, ...], "target": ID}` (other keys are ignored; ids are the source
//! data's, as strings or numbers). The target must be the user's test item (the history is everything
//! before it, as for the other protocols), and no candidate may be in that history or listed twice
//! (a repeated item would count twice against the target's rank). `data.candidates`
//! stores a file's lists in the snapshot (checked at prepare); `eval --candidates` reads one ad hoc.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::dataset::{Dataset, Split};
use super::error::{DataError, Result};

/// One user's list, as dataset indices.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CandidateList {
    pub user: usize,
    /// The target and the others, in the file's order.
    pub candidates: Vec<u32>,
    pub target: u32,
}

#[derive(Deserialize)]
struct Line {
    user: Id,
    candidates: Vec<Id>,
    target: Id,
}

/// An id written as a string or a number.
#[derive(Deserialize)]
#[serde(untagged)]
enum Id {
    Text(String),
    Number(u64),
}

impl Id {
    fn text(&self) -> String {
        match self {
            Id::Text(s) => s.clone(),
            Id::Number(n) => n.to_string(),
        }
    }
}

/// Reads and checks a candidates file against the dataset; every error names the file and line.
pub fn read(path: &Path, ds: &Dataset) -> Result<Vec<CandidateList>> {
    let text = std::fs::read_to_string(path).map_err(|source| DataError::Io { file: path.to_path_buf(), source })?;
    let users: HashMap<&str, usize> = ds.user_ids.iter().enumerate().map(|(i, u)| (u.as_str(), i)).collect();
    let items: HashMap<&str, u32> = ds.items.iter().map(|i| (i.id.as_str(), i.index)).collect();
    let mut seen = HashMap::new();
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let bad = |reason: String| DataError::BadRecord { file: path.to_path_buf(), line: n + 1, reason };
        let l: Line =
            serde_json::from_str(line).map_err(|e| bad(format!("not a {{user, candidates, target}} object: {e}")))?;
        let (user_id, target_id) = (l.user.text(), l.target.text());
        let user = *users
            .get(user_id.as_str())
            .ok_or_else(|| bad(format!("user `{user_id}` is not in dataset {}", ds.name)))?;
        if let Some(first) = seen.insert(user, n + 1) {
            return Err(bad(format!("user `{user_id}` has a list already (line {first})")));
        }
        if ds.history(user, Split::Test).is_empty() {
            return Err(bad(format!("user `{user_id}` has no history before the target")));
        }
        let item = |id: &Id| -> Result<u32> {
            let id = id.text();
            items.get(id.as_str()).copied().ok_or_else(|| bad(format!("candidate `{id}` is not in the item table")))
        };
        let candidates = l.candidates.iter().map(item).collect::<Result<Vec<u32>>>()?;
        let mut listed = HashSet::new();
        if let Some(twice) = candidates.iter().find(|c| !listed.insert(**c)) {
            return Err(bad(format!("candidate `{}` is listed twice", ds.item(*twice).id)));
        }
        let target = item(&l.target)?;
        if !candidates.contains(&target) {
            return Err(bad(format!("target `{target_id}` is not among its candidates")));
        }
        let test = ds.target(user, Split::Test);
        if target != test {
            return Err(bad(format!(
                "target `{target_id}` is not user `{user_id}`'s test item (`{}`)",
                ds.item(test).id
            )));
        }
        let history = ds.history(user, Split::Test);
        if let Some(h) = candidates.iter().find(|c| **c != target && history.contains(c)) {
            return Err(bad(format!("candidate `{}` is in user `{user_id}`'s history", ds.item(*h).id)));
        }
        out.push(CandidateList { user, candidates, target });
    }
    if out.is_empty() {
        return Err(DataError::Empty { file: path.to_path_buf() });
    }
    Ok(out)
}

/// The lists' sizes as a protocol names them: `1+29`, or `1+19..29` where they differ.
pub fn sizes(lists: &[CandidateList]) -> String {
    let others = |l: &CandidateList| l.candidates.len().saturating_sub(1);
    let (lo, hi) = (lists.iter().map(others).min().unwrap_or(0), lists.iter().map(others).max().unwrap_or(0));
    if lo == hi {
        format!("1+{lo}")
    } else {
        format!("1+{lo}..{hi}")
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::data::{Item, Negatives};

    pub fn ds() -> Dataset {
        let items = (1..=8)
            .map(|i| Item { index: i, id: format!("{}", 100 + i), meta: Default::default(), image: None })
            .collect();
        Dataset {
            name: "t".into(),
            key: "k".into(),
            items,
            user_ids: vec!["7".into(), "8".into()],
            // test targets: user 7 -> item 4 (id 104), user 8 -> item 1 (id 101)
            sequences: vec![vec![1, 2, 3, 4], vec![5, 6, 1]],
            negatives: Negatives { per_user: 0, valid: vec![], test: vec![] },
            candidates: vec![],
        }
    }

    pub fn write(lines: &[&str]) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.jsonl");
        std::fs::write(&p, lines.join("\n")).unwrap();
        (dir, p)
    }

    #[test]
    fn reads_ids_written_as_numbers_or_strings() {
        let (_d, p) = write(&[
            r#"{"user": 7, "candidates": [105, 104, 107, 108], "target": 104, "extra": "ignored"}"#,
            r#"{"user": "8", "candidates": ["101", "108"], "target": "101"}"#,
        ]);
        let lists = read(&p, &ds()).unwrap();
        assert_eq!(lists[0], CandidateList { user: 0, candidates: vec![5, 4, 7, 8], target: 4 });
        assert_eq!(lists[1], CandidateList { user: 1, candidates: vec![1, 8], target: 1 });
    }

    #[test]
    fn sizes_name_the_range_when_lists_differ() {
        let list = |n: u32| CandidateList { user: 0, candidates: (1..=n).collect(), target: 1 };
        assert_eq!(sizes(&[list(30), list(30)]), "1+29");
        assert_eq!(sizes(&[list(30), list(20)]), "1+19..29");
    }

    #[test]
    fn bad_lists_name_the_file_and_line() {
        let ds = ds();
        for (line, want) in [
            (r#"{"user": 7, "candidates": [104, 999], "target": 104}"#, "candidate `999` is not in the item table"),
            (r#"{"user": 9, "candidates": [104], "target": 104}"#, "user `9` is not in dataset t"),
            (r#"{"user": 7, "candidates": [105, 106], "target": 104}"#, "target `104` is not among its candidates"),
            (r#"{"user": 7, "candidates": [105, 103], "target": 105}"#, "is not user `7`'s test item (`104`)"),
            (r#"{"user": 7, "candidates": [104, 102], "target": 104}"#, "candidate `102` is in user `7`'s history"),
            (r#"{"user": 7, "target": 104}"#, "not a {user, candidates, target} object"),
            (r#"{"user": 7, "candidates": [104, 107, "107"], "target": 104}"#, "candidate `107` is listed twice"),
        ] {
            let (_d, p) = write(&["", line]);
            let err = read(&p, &ds).unwrap_err().to_string();
            assert!(err.contains(&format!("{}:2: ", p.display())) && err.contains(want), "{err}");
        }
        let (_d, p) = write(&[
            r#"{"user": 7, "candidates": [104], "target": 104}"#,
            r#"{"user": 7, "candidates": [104], "target": 104}"#,
        ]);
        assert!(read(&p, &ds).unwrap_err().to_string().contains(":2: user `7` has a list already (line 1)"));
        // A user whose whole sequence is the target has no history.
        let mut lonely = ds.clone();
        lonely.sequences[1] = vec![1];
        let (_d, p) = write(&[r#"{"user": 8, "candidates": [101], "target": 101}"#]);
        assert!(read(&p, &lonely).unwrap_err().to_string().contains("user `8` has no history"));
        let (_d, p) = write(&["", " "]);
        assert!(read(&p, &ds).unwrap_err().to_string().contains("the file is empty"));
    }
}
