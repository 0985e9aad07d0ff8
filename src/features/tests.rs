//! The feature stage on a hand-built dataset: only missing items are encoded, imports and the
//! missing-image fallback are reported, and `load` lines features up with item indices.

use super::*;
use crate::data::{Item, Negatives};

fn png(rgb: [u8; 3]) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    ::image::RgbImage::from_pixel(16, 16, ::image::Rgb(rgb)).write_to(&mut out, ::image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// Three items: two with images (one image shared by content), one without.
fn dataset(store: &Store) -> Dataset {
    let (red, blue) = (png([200, 0, 0]), png([0, 0, 200]));
    let mut items = Vec::new();
    for (i, img) in [Some(&red), Some(&blue), None].into_iter().enumerate() {
        let image = img.map(|bytes| {
            let k = format!("images/{}.png", sha256_hex(bytes));
            store.put(&key(&["datasets", "t", "k", &k]), bytes.clone()).unwrap();
            k
        });
        let meta = crate::data::ingest::ItemMeta { title: format!("Item {i}"), ..Default::default() };
        items.push(Item { index: i as u32 + 1, id: format!("i{i}"), meta, image });
    }
    Dataset {
        name: "t".into(),
        key: "k".into(),
        items,
        user_ids: vec![],
        sequences: vec![],
        negatives: Negatives { per_user: 0, valid: vec![], test: vec![] },
        candidates: vec![],
    }
}

fn cfg() -> FeaturesConfig {
    FeaturesConfig {
        image: Some(ImageSource::TinySiglip(TinySiglipConfig::default())),
        text: Some(TextSource::TinyBert(TinyBertConfig::default())),
        batch_size: 2,
        shard_items: 1,
        ..Default::default()
    }
}

fn quiet() -> TelemetryConfig {
    TelemetryConfig { progress: crate::telemetry::ProgressMode::Off, ..Default::default() }
}

#[test]
fn computes_only_what_is_missing_and_loads_by_item_index() {
    let store = Store::open("memory://").unwrap();
    let mut ds = dataset(&store);
    let first = compute(&cfg(), &ds, &store, "none", &quiet(), &Device::Cpu).unwrap();
    let (img, txt) = (&first.0[0], &first.0[1]);
    assert_eq!((img.computed, img.reused, img.without_input), (2, 0, 1));
    assert_eq!((txt.computed, txt.reused), (3, 0));
    let again = compute(&cfg(), &ds, &store, "none", &quiet(), &Device::Cpu).unwrap();
    assert_eq!((again.0[0].computed, again.0[0].reused, again.0[1].computed), (0, 2, 0));

    // A grown catalog: a fourth item reusing the red image, with new text.
    let mut grown = ds.items[0].clone();
    grown.index = 4;
    grown.id = "i3".into();
    grown.meta.title = "Item 3".into();
    ds.items.push(grown);
    let grown_report = compute(&cfg(), &ds, &store, "none", &quiet(), &Device::Cpu).unwrap();
    assert_eq!((grown_report.0[0].computed, grown_report.0[0].reused), (0, 3));
    assert_eq!((grown_report.0[1].computed, grown_report.0[1].reused), (1, 3));

    let image = load(&cfg(), FeatureKind::Image, &ds, &store, "none").unwrap();
    assert_eq!(image.present, vec![false, true, true, false, true]);
    assert_eq!(image.missing(), 1);
    let d = image.dim;
    assert_eq!(image.values[d..2 * d], image.values[4 * d..5 * d], "same image, same feature");
    assert!(image.values[3 * d..4 * d].iter().all(|&v| v == 0.0));
    let text = load(&cfg(), FeatureKind::Text, &ds, &store, "none").unwrap();
    assert!(text.present[1..].iter().all(|&p| p));
}

#[test]
fn text_features_that_were_never_computed_are_an_error_naming_items() {
    let store = Store::open("memory://").unwrap();
    let ds = dataset(&store);
    let err = load(&cfg(), FeatureKind::Text, &ds, &store, "none").unwrap_err().to_string();
    assert!(err.contains("missing for 3 item(s), e.g. i0, i1, i2"), "{err}");
}

#[test]
fn imported_table_is_cached_and_aligned_by_item_id() {
    let store = Store::open("memory://").unwrap();
    let ds = dataset(&store);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("cf.safetensors");
    // Rows in another order than the dataset, plus an item the dataset does not have.
    let table = FeatureTable::new(
        vec!["i2".into(), "zz".into(), "i0".into(), "i1".into()],
        2,
        vec![3., 3., 9., 9., 1., 1., 2., 2.],
    )
    .unwrap();
    std::fs::write(&file, table.to_bytes()).unwrap();
    let cfg = FeaturesConfig { cf: Some(CfSource::Import(ImportConfig { file, ids: None })), ..Default::default() };
    let r = compute(&cfg, &ds, &store, "none", &quiet(), &Device::Cpu).unwrap();
    assert_eq!((r.0[0].computed, r.0[0].without_input), (4, 0));
    let cf = load(&cfg, FeatureKind::Cf, &ds, &store, "none").unwrap();
    assert_eq!(cf.values, vec![0., 0., 1., 1., 2., 2., 3., 3.]);
}

#[test]
fn captions_are_computed_once_per_picture_and_prompt_then_reused() {
    let store = Store::open("memory://").unwrap();
    let mut ds = dataset(&store);
    let source = |prompt: &str| captions::CaptionSource::TinyBlip { seed: 2, prompt: prompt.into(), max_tokens: 4 };
    let first = captions::compute(&source("a picture of"), &ds, &store, &quiet()).unwrap();
    assert_eq!((first.computed, first.reused, first.without_image), (2, 0, 1));
    let again = captions::compute(&source("a picture of"), &ds, &store, &quiet()).unwrap();
    assert_eq!((again.computed, again.reused), (0, 2));
    // A new item with the red picture: its caption is the red picture's, nothing is computed.
    let mut grown = ds.items[0].clone();
    grown.index = 4;
    grown.id = "i3".into();
    ds.items.push(grown);
    let grown_report = captions::compute(&source("a picture of"), &ds, &store, &quiet()).unwrap();
    assert_eq!((grown_report.computed, grown_report.reused), (0, 3));
    let c = captions::load(&source("a picture of"), &ds, &store).unwrap();
    assert_eq!(c.len(), 3);
    assert!(c.get(1).unwrap().starts_with("a picture of"));
    assert_eq!(c.get(1), c.get(4));
    assert_eq!(c.get(3), None, "no picture, no caption");
    // Another prompt is another captioner: its captions are computed afresh.
    let other = captions::compute(&source("a photo of"), &ds, &store, &quiet()).unwrap();
    assert_eq!((other.computed, other.reused), (2, 1));
}
