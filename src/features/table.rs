//! A feature table: an [N, d] f32 matrix with the item ids of its rows, as one safetensors file
//! (tensor `features`, metadata `item_ids` as a JSON list). This is also the import format for
//! precomputed features.

use std::collections::HashMap;

use crate::tensorfile::{to_bytes, Array, TensorFile, TensorFileError};

#[derive(Debug, thiserror::Error)]
pub enum FeatureTableError {
    #[error(transparent)]
    File(#[from] TensorFileError),
    #[error("{what}: {reason}")]
    Invalid { what: String, reason: String },
}

#[derive(Debug, Clone, PartialEq)]
pub struct FeatureTable {
    pub item_ids: Vec<String>,
    pub dim: usize,
    /// Row-major, `item_ids.len() * dim` values.
    pub values: Vec<f32>,
}

impl FeatureTable {
    pub fn new(item_ids: Vec<String>, dim: usize, values: Vec<f32>) -> Result<Self, FeatureTableError> {
        let t = Self { item_ids, dim, values };
        t.check("feature table")?;
        Ok(t)
    }

    fn check(&self, what: &str) -> Result<(), FeatureTableError> {
        let invalid = |reason: String| FeatureTableError::Invalid { what: what.into(), reason };
        if self.values.len() != self.item_ids.len() * self.dim {
            return Err(invalid(format!(
                "{} values for {} items of dimension {}",
                self.values.len(),
                self.item_ids.len(),
                self.dim
            )));
        }
        if let Some(pos) = self.values.iter().position(|v| !v.is_finite()) {
            return Err(invalid(format!("non-finite value for item `{}`", self.item_ids[pos / self.dim.max(1)])));
        }
        Ok(())
    }

    pub fn row(&self, i: usize) -> &[f32] {
        &self.values[i * self.dim..(i + 1) * self.dim]
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let ids = serde_json::to_string(&self.item_ids).unwrap_or_default();
        to_bytes(
            vec![("features".into(), Array::F32(&self.values, vec![self.item_ids.len(), self.dim]))],
            Some(HashMap::from([("item_ids".to_string(), ids)])),
        )
    }

    pub fn from_bytes(bytes: &[u8], what: &str) -> Result<Self, FeatureTableError> {
        let invalid = |reason: String| FeatureTableError::Invalid { what: what.into(), reason };
        let tf = TensorFile::parse(bytes, what)?;
        let (shape, values) = tf.f32("features")?;
        let ids = tf.metadata("item_ids").ok_or_else(|| invalid("no `item_ids` metadata".into()))?;
        let item_ids: Vec<String> =
            serde_json::from_str(ids).map_err(|e| invalid(format!("`item_ids` metadata: {e}")))?;
        if shape.len() != 2 || shape[0] != item_ids.len() {
            return Err(invalid(format!("`features` has shape {shape:?} for {} item ids", item_ids.len())));
        }
        let t = Self { item_ids, dim: shape[1], values };
        t.check(what)?;
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rejects_nan_naming_the_item() {
        let t = FeatureTable::new(vec!["a".into(), "b".into()], 2, vec![1.0, 2.0, 3.0, 4.0]).unwrap();
        assert_eq!(FeatureTable::from_bytes(&t.to_bytes(), "x").unwrap(), t);
        assert_eq!(t.row(1), &[3.0, 4.0]);
        let err =
            FeatureTable::new(vec!["a".into(), "b".into()], 2, vec![1.0, 2.0, f32::NAN, 4.0]).unwrap_err().to_string();
        assert!(err.contains("`b`"), "{err}");
    }
}
