//! Bad input never panics and never disappears silently: each defect is an error naming the file
//! (and line), or, under `on_bad_record: skip`, a counted skip in the manifest.

use std::path::PathBuf;

use illmrec::data::prepare::prepare;
use illmrec::data::{DataConfig, OnBadRecord, SourceConfig};
use illmrec::store::Store;
use illmrec::telemetry::{ProgressMode, TelemetryConfig};

struct Fixture {
    dir: tempfile::TempDir,
}

const USERS: [&str; 4] = ["u1", "u2", "u3", "u4"];
const ITEMS: [&str; 5] = ["a", "b", "c", "d", "e"];

impl Fixture {
    /// Four users who each reviewed items a..d (u4: b..e), metadata and a PNG for every item.
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let f = Self { dir };
        let mut reviews = String::new();
        for (u, user) in USERS.iter().enumerate() {
            for (t, item) in ITEMS[u / 3..u / 3 + 4].iter().enumerate() {
                reviews += &format!(
                    "{{\"reviewerID\":\"{user}\",\"asin\":\"{item}\",\"unixReviewTime\":{t},\"overall\":5.0}}\n"
                );
            }
        }
        f.write("reviews.jsonl", reviews.as_bytes());
        let meta: String = ITEMS.iter().map(|i| format!("{{\"asin\":\"{i}\",\"title\":\"Item {i}\"}}\n")).collect();
        f.write("meta.jsonl", meta.as_bytes());
        std::fs::create_dir(f.path("images")).unwrap();
        for i in ITEMS {
            image::RgbImage::from_pixel(4, 4, image::Rgb([200, 10, 10]))
                .save(f.path(&format!("images/{i}.png")))
                .unwrap();
        }
        f
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn write(&self, name: &str, bytes: &[u8]) {
        std::fs::write(self.path(name), bytes).unwrap();
    }

    fn append(&self, name: &str, bytes: &[u8]) {
        let mut all = std::fs::read(self.path(name)).unwrap();
        all.extend_from_slice(bytes);
        self.write(name, &all);
    }

    fn prepare(&self, policy: OnBadRecord) -> Result<illmrec::data::prepare::PrepareReport, illmrec::data::DataError> {
        let cfg = DataConfig {
            dataset: None,
            source: SourceConfig::Amazon {
                reviews: self.path("reviews.jsonl"),
                meta: self.path("meta.jsonl"),
                images: Some(self.path("images")),
            },
            synth: None,
            k_core: 1,
            min_user_interactions: 3,
            require_image: false,
            negatives: 1,
            seed: 1,
            on_bad_record: policy,
            candidates: None,
        };
        let quiet = TelemetryConfig { progress: ProgressMode::Off, ..Default::default() };
        prepare("t", &cfg, &Store::open("memory://").unwrap(), &quiet)
    }

    /// The defect is an error that names `place`, and under `skip` one counted `kind`.
    fn assert_reported(&self, place: &str, kind: &str) {
        let err = self.prepare(OnBadRecord::Error).expect_err("a bad record must fail under `error`").to_string();
        assert!(err.contains(place) && err.contains(kind), "error `{err}` should name `{place}` and `{kind}`");
        let report = self.prepare(OnBadRecord::Skip).expect("skip keeps going");
        assert_eq!(report.manifest.skipped.counts.get(kind), Some(&1), "{:?}", report.manifest.skipped);
        assert_eq!(report.manifest.skipped.total(), 1);
        assert!(report.to_string().contains(kind), "the printed report lists the skip");
    }
}

fn file(f: &Fixture, name: &str) -> String {
    f.path(name).display().to_string()
}

#[test]
fn clean_fixture_prepares_without_skips() {
    let f = Fixture::new();
    let r = f.prepare(OnBadRecord::Error).unwrap();
    assert_eq!(r.manifest.counts.interactions, 16);
    assert_eq!(r.manifest.items_with_image, 5);
    assert_eq!(r.manifest.skipped.total(), 0);
}

#[test]
fn malformed_json_line() {
    let f = Fixture::new();
    f.append("reviews.jsonl", b"{\"reviewerID\": \"u1\", \"asin\"\n");
    f.assert_reported(&format!("{}:17", file(&f, "reviews.jsonl")), "malformed JSON");
}

#[test]
fn missing_field() {
    let f = Fixture::new();
    f.append("reviews.jsonl", b"{\"reviewerID\":\"u1\",\"unixReviewTime\":9}\n");
    f.assert_reported(&format!("{}:17", file(&f, "reviews.jsonl")), "missing field");
}

#[test]
fn duplicate_interaction_and_duplicate_item() {
    let f = Fixture::new();
    f.append("reviews.jsonl", b"{\"reviewerID\":\"u1\",\"asin\":\"a\",\"unixReviewTime\":99}\n");
    f.assert_reported(&format!("{}:17", file(&f, "reviews.jsonl")), "duplicate interaction");
    let g = Fixture::new();
    g.append("meta.jsonl", b"{\"asin\":\"a\",\"title\":\"again\"}\n");
    g.assert_reported(&format!("{}:6", file(&g, "meta.jsonl")), "duplicate item");
}

#[test]
fn unreadable_image() {
    let f = Fixture::new();
    f.write("images/c.png", b"\x89PNG\r\n\x1a\n truncated");
    f.assert_reported(&file(&f, "images/c.png"), "unreadable image");
    // Skipped, the item stays without an image.
    let r = f.prepare(OnBadRecord::Skip).unwrap();
    assert_eq!(r.manifest.items_with_image, 4);
}

#[test]
fn invalid_utf8() {
    let f = Fixture::new();
    f.append("meta.jsonl", b"{\"asin\":\"z\",\"title\":\"caf\xe9\"}\n");
    f.assert_reported(&format!("{}:6", file(&f, "meta.jsonl")), "invalid UTF-8");
}

#[test]
fn empty_file_is_always_an_error() {
    let f = Fixture::new();
    f.write("meta.jsonl", b"\n  \n");
    for policy in [OnBadRecord::Error, OnBadRecord::Skip] {
        let err = f.prepare(policy).unwrap_err().to_string();
        assert_eq!(err, format!("{}: the file is empty", file(&f, "meta.jsonl")));
    }
    let g = Fixture::new();
    g.write("reviews.jsonl", b"");
    let err = g.prepare(OnBadRecord::Skip).unwrap_err().to_string();
    assert!(err.contains("reviews.jsonl: the file is empty"), "{err}");
}

#[test]
fn missing_source_file_names_it() {
    let f = Fixture::new();
    std::fs::remove_file(f.path("meta.jsonl")).unwrap();
    let err = f.prepare(OnBadRecord::Skip).unwrap_err().to_string();
    assert!(err.starts_with(&format!("{}: cannot read", file(&f, "meta.jsonl"))), "{err}");
}
