//! The frozen item features the multimodal baselines read (MoRec, FREEDOM, BM3, MMGCN): one matrix
//! per modality with a row for every item, checked whole before anything trains on it, so a gap or
//! a NaN is an error naming the item instead of a silent NaN loss.

use std::fmt;
use std::str::FromStr;

use candle_core::{Device, Tensor};

use super::{Result, TrainError, TrainJob};
use crate::data::{Dataset, FeatureKind};
use crate::store::Store;

/// The modalities a MoRec variant reads: `morec:text`, `morec:image`, `morec:text+image`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Modalities {
    Text,
    Image,
    TextImage,
}

impl Modalities {
    pub fn kinds(self) -> &'static [FeatureKind] {
        match self {
            Modalities::Text => &[FeatureKind::Text],
            Modalities::Image => &[FeatureKind::Image],
            Modalities::TextImage => &[FeatureKind::Text, FeatureKind::Image],
        }
    }
}

impl FromStr for Modalities {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "text" => Ok(Modalities::Text),
            "image" => Ok(Modalities::Image),
            "text+image" => Ok(Modalities::TextImage),
            _ => Err(format!("unknown modalities `{s}` (text, image, text+image)")),
        }
    }
}

impl fmt::Display for Modalities {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Modalities::Text => "text",
            Modalities::Image => "image",
            Modalities::TextImage => "text+image",
        })
    }
}

/// One modality's features for every item: `(num_items + 1) * dim` values, row i = item i, row 0
/// (padding) zero.
#[derive(Debug, Clone, PartialEq)]
pub struct ItemMatrix {
    pub kind: FeatureKind,
    pub dim: usize,
    pub values: Vec<f32>,
}

impl ItemMatrix {
    /// [N + 1, dim] on the CPU.
    pub fn tensor(&self) -> Result<Tensor> {
        Ok(Tensor::from_slice(&self.values, (self.values.len() / self.dim.max(1), self.dim), &Device::Cpu)?)
    }

    /// Rows 1..=N (items without the padding row): [N, dim].
    pub fn items(&self) -> &[f32] {
        &self.values[self.dim..]
    }
}

/// The image and text modalities the job's `features` section configures, in that order: what the
/// graph models mix.
pub fn configured(job: &TrainJob<'_>, model: &str) -> Result<Vec<FeatureKind>> {
    let kinds: Vec<FeatureKind> =
        job.features.kinds().into_iter().filter(|k| matches!(k, FeatureKind::Image | FeatureKind::Text)).collect();
    if kinds.is_empty() {
        return Err(TrainError::Invalid(format!(
            "{model} needs item features: configure features.text and/or features.image"
        )));
    }
    Ok(kinds)
}

/// The cached features of `kinds` for every item of `ds`, for `model`. Every item must have every
/// kind (an item without an image cannot enter an image model: run the text variant) and every
/// value must be finite; the error names the items.
pub fn load(
    job: &TrainJob<'_>,
    store: &Store,
    ds: &Dataset,
    kinds: &[FeatureKind],
    model: &str,
) -> Result<Vec<ItemMatrix>> {
    kinds
        .iter()
        .map(|&kind| {
            let f = crate::features::load(job.features, kind, ds, store, &job.cf_table)?;
            let matrix = ItemMatrix { kind, dim: f.dim, values: f.values };
            check(&matrix, &f.present, ds, model)?;
            Ok(matrix)
        })
        .collect()
}

/// Every item present, every value finite.
pub(super) fn check(m: &ItemMatrix, present: &[bool], ds: &Dataset, model: &str) -> Result<()> {
    let missing: Vec<&str> = ds.items.iter().filter(|i| !present[i.index as usize]).map(|i| i.id.as_str()).collect();
    if !missing.is_empty() {
        return Err(TrainError::Invalid(format!(
            "{model}: {} features are missing for {} item(s): {}{}; every item needs them (without images, use \
             a text-only model)",
            m.kind,
            missing.len(),
            missing.iter().take(5).copied().collect::<Vec<_>>().join(", "),
            if missing.len() > 5 { ", ..." } else { "" }
        )));
    }
    if let Some(pos) = m.values.iter().position(|v| !v.is_finite()) {
        let item = ds.item((pos / m.dim) as u32);
        return Err(TrainError::Invalid(format!(
            "{model}: the {} feature of item `{}` holds {} (value {} of {})",
            m.kind,
            item.id,
            m.values[pos],
            pos % m.dim,
            m.dim
        )));
    }
    Ok(())
}

/// The modalities side by side, text before image as listed: [N + 1, sum of dims] (MoRec T+I).
pub fn concat(mods: &[ItemMatrix]) -> Result<Tensor> {
    let rows = mods.first().map_or(0, |m| m.values.len() / m.dim.max(1));
    let width: usize = mods.iter().map(|m| m.dim).sum();
    let mut out = Vec::with_capacity(rows * width);
    for r in 0..rows {
        for m in mods {
            out.extend_from_slice(&m.values[r * m.dim..(r + 1) * m.dim]);
        }
    }
    Ok(Tensor::from_vec(out, (rows, width), &Device::Cpu)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{Item, Negatives};

    fn ds() -> Dataset {
        let items = (1..=2).map(|i| Item { index: i, id: format!("i{i}"), meta: Default::default(), image: None });
        Dataset {
            name: "t".into(),
            key: "k".into(),
            items: items.collect(),
            user_ids: vec![],
            sequences: vec![],
            negatives: Negatives { per_user: 0, valid: vec![], test: vec![] },
            candidates: vec![],
        }
    }

    #[test]
    fn text_and_image_sit_side_by_side_per_item() {
        let text = ItemMatrix { kind: FeatureKind::Text, dim: 2, values: vec![0., 0., 1., 2., 3., 4.] };
        let image = ItemMatrix { kind: FeatureKind::Image, dim: 1, values: vec![0., 5., 6.] };
        let t = concat(&[text, image]).unwrap();
        assert_eq!(t.dims(), &[3, 3]);
        assert_eq!(t.to_vec2::<f32>().unwrap(), vec![vec![0., 0., 0.], vec![1., 2., 5.], vec![3., 4., 6.]]);
    }

    #[test]
    fn a_gap_or_a_nan_names_the_item() {
        let m = ItemMatrix { kind: FeatureKind::Image, dim: 2, values: vec![0.; 6] };
        let err = check(&m, &[false, true, false], &ds(), "morec:image").unwrap_err().to_string();
        assert!(err.contains("image features are missing for 1 item(s): i2"), "{err}");
        let nan = ItemMatrix { kind: FeatureKind::Text, dim: 2, values: vec![0., 0., 1., 1., 1., f32::NAN] };
        let err = check(&nan, &[false, true, true], &ds(), "freedom").unwrap_err().to_string();
        assert!(err.contains("freedom: the text feature of item `i2` holds NaN (value 1 of 2)"), "{err}");
    }
}
