//! The `sequences` data source (one line per user plus an item table, as MSRBench ships Amazon
//! Beauty) with fixed candidate lists stored in the snapshot, through the real binary: Pop ranked on
//! the lists against hand-computed ranks, the same lists read ad hoc by `eval --candidates`, and bad
//! lists refused with the file and line.

use std::path::Path;
use std::process::Command;

fn illmrec(dir: &Path, args: &[&str]) -> Result<String, String> {
    let out = Command::new(env!("CARGO_BIN_EXE_illmrec")).args(args).current_dir(dir).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(String::from_utf8_lossy(&out.stderr).to_string())
    }
}

/// Items 11..16; Pop counts the training parts (all but the last two items of each line): 11 twice,
/// 12 three times, every other item never.
const SEQUENCES: &str = "u1 11 12 13 14\nu2 12 13 15\nu3 11 12 16 13\n";
const ITEMS: &str =
    "item_id\tasin\ttitle\n11\tA\tOne\n12\tB\tTwo\n13\tC\tThree\n14\tD\tFour\n15\tE\tFive\n16\tF\tSix\n";
/// u1: target 14 (0) ties 15 and 16 (0) -> rank 2. u2: target 15 (0) under 11 (2), ties 14 -> rank 2.
/// u3 (history 11 12 16): target 13 (0) ties 14 -> rank 1.
const CANDIDATES: &str = r#"{"user": "u1", "candidates": [14, 15, 16], "target": 14}
{"user": "u2", "candidates": [15, 11, 14], "target": 15}
{"user": "u3", "candidates": [13, 14], "target": 13}
"#;

fn job(candidates: &str) -> String {
    format!(
        r#"name: seqs
data:
  source:
    sequences: {{file: seq.txt, items: items.tsv}}
  candidates: {candidates}
  k_core: 1
  negatives: 2
eval:
  ks: [1, 5]
  protocols: [candidates]
storage:
  root: store
telemetry:
  progress: off
"#
    )
}

fn setup(candidates: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("seq.txt"), SEQUENCES).unwrap();
    std::fs::write(dir.path().join("items.tsv"), ITEMS).unwrap();
    std::fs::write(dir.path().join("cands.jsonl"), candidates).unwrap();
    std::fs::write(dir.path().join("job.yaml"), job("cands.jsonl")).unwrap();
    dir
}

#[test]
fn pop_on_the_stored_lists_and_on_a_file_matches_hand_computed_ranks() {
    let dir = setup(CANDIDATES);
    let d = dir.path();
    let prepared = illmrec(d, &["prepare", "--job", "job.yaml"]).unwrap();
    assert!(prepared.contains(": prepared"), "{prepared}");
    illmrec(d, &["train", "--job", "job.yaml", "--model", "pop"]).unwrap();
    let want_ndcg5 = (2.0 / 4f64.log2() + 1.0 / 3f64.log2()) / 3.0;
    let stored = illmrec(d, &["eval", "--job", "job.yaml", "--model", "pop", "--json"]).unwrap();
    let file =
        illmrec(d, &["eval", "--job", "job.yaml", "--model", "pop", "--candidates", "cands.jsonl", "--json"]).unwrap();
    // Two lists of 1+2 and one of 1+1.
    for (out, protocol) in [(&stored, "candidates (1+1..2)"), (&file, "candidates:cands.jsonl (1+1..2)")] {
        assert_eq!(out.lines().count(), 1, "{out}");
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(v["protocol"], protocol);
        assert_eq!(v["users"], 3);
        assert_eq!(v["metrics"]["hit@1"], 0.0);
        assert_eq!(v["metrics"]["hit@5"], 1.0);
        assert!((v["metrics"]["ndcg@5"].as_f64().unwrap() - want_ndcg5).abs() < 1e-12, "{v}");
    }
}

#[test]
fn bad_candidate_lists_are_refused_with_file_and_line() {
    for (line2, want) in [
        (
            r#"{"user": "u2", "candidates": [15, 99], "target": 15}"#,
            "cands.jsonl:2: candidate `99` is not in the item table",
        ),
        (
            r#"{"user": "u2", "candidates": [11, 14], "target": 15}"#,
            "cands.jsonl:2: target `15` is not among its candidates",
        ),
        (r#"{"user": "u9", "candidates": [15, 14], "target": 15}"#, "cands.jsonl:2: user `u9` is not in dataset seqs"),
        (
            r#"{"user": "u2", "candidates": [13, 14], "target": 13}"#,
            "cands.jsonl:2: target `13` is not user `u2`'s test item (`15`)",
        ),
    ] {
        let lines: Vec<&str> = CANDIDATES.lines().collect();
        let dir = setup(&format!("{}\n{line2}\n", lines[0]));
        let err = illmrec(dir.path(), &["prepare", "--job", "job.yaml"]).unwrap_err();
        assert!(err.contains(want), "wanted `{want}` in:\n{err}");
    }
    // A user line without items.
    let dir = setup(CANDIDATES);
    std::fs::write(dir.path().join("seq.txt"), format!("{SEQUENCES}u4\n")).unwrap();
    let err = illmrec(dir.path(), &["prepare", "--job", "job.yaml"]).unwrap_err();
    assert!(err.contains("seq.txt:4: missing field: user `u4` has no items"), "{err}");
    // The stored lists are test lists: validating on them is refused where the job is read.
    let dir = setup(CANDIDATES);
    let job = job("cands.jsonl").replace("eval:", "train:\n  illmrec: {validation: {protocol: candidates}}\neval:");
    std::fs::write(dir.path().join("job.yaml"), job).unwrap();
    let err = illmrec(dir.path(), &["prepare", "--job", "job.yaml"]).unwrap_err();
    assert!(err.contains("train.illmrec.validation.protocol"), "{err}");
}
