//! Random weights for tiny encoders, drawn from a seed: a `VarBuilder` backend that answers every
//! weight a candle-transformers model asks for with a seeded tensor, and remembers what it gave so the
//! model can be written out as a Hugging Face directory (the layout real checkpoints have).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};

use crate::model::layers::normal_tensor;
use crate::seed::stream;

/// Layer-norm weights are 1, biases 0, everything else N(0, 0.02²) from a stream named by the
/// weight's name, so values do not depend on the order a model asks for them.
pub struct SeededWeights {
    seed: u64,
    given: Mutex<HashMap<String, Tensor>>,
}

impl SeededWeights {
    pub fn new(seed: u64) -> Self {
        Self { seed, given: Mutex::new(HashMap::new()) }
    }

    fn make(&self, shape: Shape, name: &str, init: Init) -> candle_core::Result<Tensor> {
        let mut rng = stream(self.seed, &format!("seeded-weights/{name}"), 0);
        match init {
            Init::Const(v) if v != 0.0 => Tensor::ones(shape, DType::F32, &Device::Cpu)?.affine(v, 0.0),
            _ if name.ends_with("bias") => Tensor::zeros(shape, DType::F32, &Device::Cpu),
            _ => normal_tensor(shape, 0.02, &mut rng, &Device::Cpu),
        }
    }
}

/// Shares one `SeededWeights` between the VarBuilder and the caller.
struct Shared(std::sync::Arc<SeededWeights>);

impl SimpleBackend for Shared {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let mut given = self.0.given.lock().map_err(|_| candle_core::Error::Msg("poisoned".into()))?;
        let t = match given.get(name) {
            Some(t) => t.clone(),
            None => {
                let t = self.0.make(s, name, h)?;
                given.insert(name.to_string(), t.clone());
                t
            }
        };
        t.to_dtype(dtype)?.to_device(dev)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("seeded weights need a shape for `{name}`")
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        // Answer "no" to probes such as BERT's `contains_tensor("bert")`, so the model uses plain names.
        false
    }
}

/// A VarBuilder over seeded weights, and a handle to read back what it handed out.
pub fn var_builder(seed: u64, device: &Device) -> (VarBuilder<'static>, std::sync::Arc<SeededWeights>) {
    let weights = std::sync::Arc::new(SeededWeights::new(seed));
    (VarBuilder::from_backend(Box::new(Shared(weights.clone())), DType::F32, device.clone()), weights)
}

impl SeededWeights {
    /// Writes every weight handed out so far as `model.safetensors` in `dir`.
    pub fn save(&self, dir: &Path) -> candle_core::Result<()> {
        let given = self.given.lock().map_err(|_| candle_core::Error::Msg("poisoned".into()))?;
        candle_core::safetensors::save(&given, dir.join("model.safetensors"))
    }
}
