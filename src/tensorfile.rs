//! Reading and writing named f32 / u32 arrays as safetensors bytes: the one tensor format illmrec
//! persists (negatives, model weights, optimizer state, feature tables), openable by any safetensors
//! reader.

use std::collections::HashMap;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

#[derive(Debug, thiserror::Error)]
pub enum TensorFileError {
    #[error("{what}: not a safetensors file: {source}")]
    Format {
        what: String,
        #[source]
        source: safetensors::SafeTensorError,
    },
    #[error("{what}: tensor `{name}` is missing")]
    Missing { what: String, name: String },
    #[error("{what}: tensor `{name}` is {found:?}, expected {expected}")]
    WrongType { what: String, name: String, found: Dtype, expected: &'static str },
}

/// One array to write: row-major data and its shape.
pub enum Array<'a> {
    F32(&'a [f32], Vec<usize>),
    U32(&'a [u32], Vec<usize>),
}

/// Serializes named arrays (written in name order) with optional string metadata.
pub fn to_bytes(arrays: Vec<(String, Array<'_>)>, metadata: Option<HashMap<String, String>>) -> Vec<u8> {
    let views: Vec<(String, TensorView<'_>)> = arrays
        .into_iter()
        .map(|(name, a)| {
            let (dtype, shape, bytes): (Dtype, Vec<usize>, &[u8]) = match a {
                Array::F32(d, s) => (Dtype::F32, s, bytemuck::cast_slice(d)),
                Array::U32(d, s) => (Dtype::U32, s, bytemuck::cast_slice(d)),
            };
            let view = TensorView::new(dtype, shape, bytes).expect("shape matches data length by construction");
            (name, view)
        })
        .collect();
    safetensors::tensor::serialize(views, metadata).expect("in-memory serialization cannot fail for valid views")
}

/// A parsed safetensors buffer; `what` names it in errors (a storage key or path).
pub struct TensorFile<'a> {
    what: String,
    st: SafeTensors<'a>,
    metadata: HashMap<String, String>,
}

impl<'a> TensorFile<'a> {
    pub fn parse(bytes: &'a [u8], what: &str) -> Result<Self, TensorFileError> {
        let format = |source| TensorFileError::Format { what: what.into(), source };
        let st = SafeTensors::deserialize(bytes).map_err(format)?;
        let (_, header) = SafeTensors::read_metadata(bytes).map_err(format)?;
        let metadata = header.metadata().clone().unwrap_or_default();
        Ok(Self { what: what.into(), st, metadata })
    }

    pub fn names(&self) -> Vec<String> {
        let mut n: Vec<String> = self.st.names().into_iter().map(str::to_string).collect();
        n.sort();
        n
    }

    fn view(&self, name: &str, dtype: Dtype, expected: &'static str) -> Result<TensorView<'a>, TensorFileError> {
        let v = self
            .st
            .tensor(name)
            .map_err(|_| TensorFileError::Missing { what: self.what.clone(), name: name.into() })?;
        if v.dtype() != dtype {
            return Err(TensorFileError::WrongType {
                what: self.what.clone(),
                name: name.into(),
                found: v.dtype(),
                expected,
            });
        }
        Ok(v)
    }

    /// Shape and values of an f32 tensor.
    pub fn f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>), TensorFileError> {
        let v = self.view(name, Dtype::F32, "F32")?;
        // Copy through bytes: the buffer need not be 4-byte aligned.
        let data = v.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        Ok((v.shape().to_vec(), data))
    }

    pub fn u32(&self, name: &str) -> Result<(Vec<usize>, Vec<u32>), TensorFileError> {
        let v = self.view(name, Dtype::U32, "U32")?;
        let data = v.data().chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        Ok((v.shape().to_vec(), data))
    }

    pub fn metadata(&self, key: &str) -> Option<&str> {
        self.metadata.get(key).map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_with_metadata_and_type_checks() {
        let f = [1.5f32, -2.0, 3.25, 0.0];
        let u = [7u32, 8, 9];
        let meta = HashMap::from([("k".to_string(), "v".to_string())]);
        let bytes = to_bytes(
            vec![("w".into(), Array::F32(&f, vec![2, 2])), ("ids".into(), Array::U32(&u, vec![3]))],
            Some(meta),
        );
        let t = TensorFile::parse(&bytes, "mem").unwrap();
        assert_eq!(t.f32("w").unwrap(), (vec![2, 2], f.to_vec()));
        assert_eq!(t.u32("ids").unwrap(), (vec![3], u.to_vec()));
        assert_eq!(t.metadata("k"), Some("v"));
        assert!(matches!(t.u32("w"), Err(TensorFileError::WrongType { .. })));
        assert!(t.f32("nope").unwrap_err().to_string().contains("mem: tensor `nope` is missing"));
        assert_eq!(t.names(), vec!["ids", "w"]);
    }
}
