//! MovieLens-100k, real data nobody here wrote (RecBole's atomic files, fetched by
//! scripts/fetch-assets.sh ml100k). Checks the counts of the standard 5-core and that the stored split
//! and negatives obey the protocol for every user.

use std::collections::HashSet;
use std::path::PathBuf;

use illmrec::config::JobConfig;
use illmrec::data::prepare::prepare;
use illmrec::data::{snapshot, SourceConfig, Split};
use illmrec::store::Store;
use illmrec::telemetry::ProgressMode;

mod assets;

fn ml100k() -> PathBuf {
    assets::asset("ml-100k", "ml100k")
}

#[test]
fn ml100k_five_core_counts_split_and_negatives() {
    let dir = ml100k();
    assert!(dir.join("ml-100k.inter").exists(), "{} is missing: run scripts/fetch-assets.sh ml100k", dir.display());
    let mut job = JobConfig::load(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("jobs/ml100k.yaml")).unwrap();
    job.data.source = SourceConfig::Recbole { dir, name: "ml-100k".into() };
    job.telemetry.progress = ProgressMode::Off;
    let store = Store::open("memory://").unwrap();
    let report = prepare(&job.name, &job.data, &store, &job.telemetry).unwrap();
    let m = &report.manifest;
    assert_eq!((m.counts_read.users, m.counts_read.items, m.counts_read.interactions), (943, 1682, 100_000));
    assert_eq!((m.counts.users, m.counts.items, m.counts.interactions), (943, 1349, 99_287));
    assert_eq!(m.skipped.total(), 0);
    assert_eq!(m.sources.len(), 2, "the .inter and .item files are hashed");

    let ds = snapshot::load(&store, "ml100k").unwrap();
    assert_eq!(ds.items.iter().find(|i| i.id == "1").map(|i| i.meta.title.as_str()), Some("Toy Story"));
    for u in 0..ds.num_users() {
        let seq = &ds.sequences[u];
        let seen: HashSet<u32> = seq.iter().copied().collect();
        assert_eq!(seen.len(), seq.len(), "no repeated items");
        assert_eq!(ds.history(u, Split::Test).len(), seq.len() - 1);
        for split in [Split::Valid, Split::Test] {
            let neg = ds.negatives(u, split, 100);
            assert_eq!(neg.iter().collect::<HashSet<_>>().len(), 100);
            assert!(neg.iter().all(|n| !seen.contains(n)), "negatives exclude the whole history and targets");
        }
    }
}
