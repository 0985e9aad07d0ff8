//! Per-layer hidden states of the job's frozen text and image encoders, one row per item: what
//! IISAN's side adapter networks read. They are computed once per item and cached like the other
//! features (content-keyed, resumable), so the backbones never run while a model trains.
//!
//! A row holds the pooled state after each selected layer, in order: `layers.len() * width` values.
//! The cache is named by the encoder's id and the layer list (`<encoder>+layers-0-2-4-6`).

use candle_core::Device;

use super::{
    assemble, build_encoder, encode_missing, import_of, item_texts, read_images, snapshot, CacheTarget, Encoder,
    FeatureCache, FeatureError, FeatureKind, FeaturesConfig, ItemFeatures, KindReport,
};
use crate::data::{Dataset, Item};
use crate::store::Store;
use crate::telemetry::TelemetryConfig;

/// `blocks + 1` layers of a `depth`-layer encoder, evenly spaced from 0 (the embeddings) to the
/// last: depth 12 and 6 blocks keep every other layer (IISAN's LayerDrop), depth 6 and 3 blocks
/// 0, 2, 4, 6. A shallow encoder repeats layers rather than changing the block count, so every
/// modality gives the side networks the same number of steps.
pub fn selected_layers(depth: usize, blocks: usize) -> Vec<usize> {
    let blocks = blocks.max(1);
    (0..=blocks).map(|i| (i * depth + blocks / 2) / blocks).collect()
}

/// One modality's per-layer states for every item.
#[derive(Debug, Clone)]
pub struct LayeredFeatures {
    /// The selected layers, in the order a row holds them.
    pub layers: Vec<usize>,
    /// Width of one layer's state.
    pub width: usize,
    /// `(num_items + 1) * layers.len() * width` values, row 0 (padding) zero.
    pub features: ItemFeatures,
}

/// The per-layer states of the `kind` encoder (`features.text` or `features.image`) for every item
/// of `ds`, `blocks + 1` layers each; items not cached yet are encoded first. Returns them with
/// what was computed.
pub fn layered(
    cfg: &FeaturesConfig,
    kind: FeatureKind,
    blocks: usize,
    ds: &Dataset,
    store: &Store,
    telemetry: &TelemetryConfig,
    device: &Device,
) -> Result<(LayeredFeatures, KindReport), FeatureError> {
    if import_of(cfg, kind).is_some() || kind == FeatureKind::Cf {
        return Err(FeatureError::Invalid(format!(
            "per-layer {kind} states need an encoder to run: features.{kind} is a table, not a model"
        )));
    }
    let encoder = build_encoder(cfg, kind, device)?;
    let depth = match &encoder {
        Encoder::Image(e) => e.depth(),
        Encoder::Text(e) => e.depth(),
    };
    let layers = selected_layers(depth, blocks);
    let width = encoder.dim();
    let names: Vec<String> = layers.iter().map(ToString::to_string).collect();
    let id = format!("{}+layers-{}", encoder.id(), names.join("-"));
    let dim = layers.len() * width;
    let snapshot_dir = snapshot::dir(&ds.name, &ds.key);
    // The cut encoders are built on the first batch that needs them: a fully cached run loads none.
    let (mut text, mut image) = (None, None);
    let mut encode = |batch: &[(&Item, String)]| match &encoder {
        Encoder::Text(e) => built(&mut text, || e.layered(&layers))?.encode(&item_texts(batch)),
        Encoder::Image(e) => {
            let imgs = read_images(store, &snapshot_dir, batch)?;
            built(&mut image, || e.layered(&layers))?.encode(&imgs)
        }
    };
    let target = CacheTarget { id: &id, dim, kind };
    let report = encode_missing(&target, cfg, ds, store, telemetry, &mut encode)?;
    let cache = FeatureCache::open(store, &id, dim)?;
    let features = assemble(kind, id.clone(), dim, ds, |item| {
        super::content_key(kind, item).and_then(|k| cache.get(&k).map(<[f32]>::to_vec))
    })?;
    Ok((LayeredFeatures { layers, width, features }, report))
}

/// The value in `slot`, built by `make` the first time.
fn built<T>(slot: &mut Option<T>, make: impl FnOnce() -> Result<T, FeatureError>) -> Result<&T, FeatureError> {
    if slot.is_none() {
        *slot = Some(make()?);
    }
    slot.as_ref().ok_or_else(|| FeatureError::Invalid("an encoder cut was not built".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_are_spread_from_the_embeddings_to_the_last() {
        assert_eq!(selected_layers(12, 6), [0, 2, 4, 6, 8, 10, 12]);
        assert_eq!(selected_layers(6, 3), [0, 2, 4, 6]);
        assert_eq!(selected_layers(6, 6), [0, 1, 2, 3, 4, 5, 6]);
        assert_eq!(selected_layers(2, 3), [0, 1, 1, 2]);
    }
}
