//! IISAN (Fu et al., SIGIR 2024): the item tower of a SASRec-style recommender built from frozen text
//! and image encoders through small trained side networks, decoupled from the backbones.
//!
//! Each modality has an intra-modal side adapter network (SAN): a chain of blocks that walks up the
//! backbone's layers. Block k mixes its input from the chain so far and the backbone's state after
//! the k-th selected layer through a learned gate, then adds a bottleneck adapter:
//!
//!   x_k = σ(g_k) · s_{k-1} + (1 − σ(g_k)) · H[k]
//!   s_k = x_k + W_up · gelu(W_down · LN(x_k) + b_down) + b_up,        s_0 = H[0] (the embeddings)
//!
//! With two modalities an inter-modal SAN runs the same chain over both backbones' states side by
//! side. The chains' last states, concatenated, go through a linear layer to the model width. The
//! backbones' states are pooled per layer and cached once (`features::layers`), so training touches
//! only the side networks (IISAN's "decoupled" PEFT; pooling before the SAN is this project's
//! simplification: the paper runs its SANs over every token).

use candle_core::{Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use super::layers::{const_var, layer_norm, linear, sigmoid, xavier_var};
use super::{ModelError, Result};
use crate::invalid::Invalid;
use crate::seed::Rng;

const LN_EPS: f64 = 1e-6;

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IisanConfig {
    /// Blocks per side network; the backbone's layers are spread over them (a 12-layer encoder and
    /// 6 blocks keep every other layer, IISAN's LayerDrop).
    #[serde(default = "d_blocks")]
    pub blocks: usize,
    /// The adapters' bottleneck width.
    #[serde(default = "d_bottleneck")]
    pub bottleneck: usize,
}

fn d_blocks() -> usize {
    6
}
fn d_bottleneck() -> usize {
    64
}

impl Default for IisanConfig {
    fn default() -> Self {
        Self { blocks: d_blocks(), bottleneck: d_bottleneck() }
    }
}

impl IisanConfig {
    pub fn validate(&self) -> std::result::Result<(), Invalid> {
        if self.blocks == 0 {
            return Err(Invalid::new("blocks", "must be at least 1"));
        }
        if self.bottleneck == 0 {
            return Err(Invalid::new("bottleneck", "must be at least 1"));
        }
        Ok(())
    }
}

/// One modality's cached backbone states: `[N + 1, blocks + 1, width]`, row 0 padding.
pub struct BackboneStates {
    pub name: String,
    pub states: Tensor,
}

impl BackboneStates {
    /// From a row-major `(N + 1) x steps x width` buffer.
    pub fn new(name: &str, values: Vec<f32>, steps: usize, width: usize) -> Result<Self> {
        let rows = values.len() / (steps * width).max(1);
        if rows * steps * width != values.len() {
            return Err(ModelError::Invalid(format!(
                "{name} states: {} values are not rows of {steps} x {width}",
                values.len()
            )));
        }
        Ok(Self { name: name.to_string(), states: Tensor::from_vec(values, (rows, steps, width), &Device::Cpu)? })
    }

    fn steps(&self) -> usize {
        self.states.dims()[1]
    }

    fn width(&self) -> usize {
        self.states.dims()[2]
    }
}

/// One side-network block's tensors.
struct Block {
    gate: Var,
    ln_w: Var,
    ln_b: Var,
    down_w: Var,
    down_b: Var,
    up_w: Var,
    up_b: Var,
}

/// A chain of blocks over one stream of backbone states.
struct SideNetwork {
    blocks: Vec<Block>,
}

impl SideNetwork {
    /// A fresh chain of `blocks` blocks on states `width` wide; its tensors are appended to `vars`
    /// as `<name>.block<k>.<tensor>`.
    fn new(
        name: &str,
        width: usize,
        blocks: usize,
        cfg: &IisanConfig,
        vars: &mut Vec<(String, Var)>,
        rng: &mut Rng,
        device: &Device,
    ) -> Result<Self> {
        let mut out = Vec::with_capacity(blocks);
        for k in 1..=blocks {
            let r = cfg.bottleneck;
            let block = Block {
                // σ(0) = 0.5: the chain and the backbone start equally weighted.
                gate: const_var(1, 0.0, device)?,
                ln_w: const_var(width, 1.0, device)?,
                ln_b: const_var(width, 0.0, device)?,
                down_w: xavier_var(width, r, rng, device)?,
                down_b: const_var(r, 0.0, device)?,
                up_w: xavier_var(r, width, rng, device)?,
                up_b: const_var(width, 0.0, device)?,
            };
            let named = [
                ("gate", &block.gate),
                ("ln.w", &block.ln_w),
                ("ln.b", &block.ln_b),
                ("down.w", &block.down_w),
                ("down.b", &block.down_b),
                ("up.w", &block.up_w),
                ("up.b", &block.up_b),
            ];
            vars.extend(named.iter().map(|(t, v)| (format!("{name}.block{k}.{t}"), (*v).clone())));
            out.push(block);
        }
        Ok(Self { blocks: out })
    }

    /// The chain's last state `[n, width]` for backbone states `[n, blocks + 1, width]`.
    fn run(&self, h: &Tensor) -> candle_core::Result<Tensor> {
        let mut s = h.narrow(1, 0, 1)?.squeeze(1)?;
        for (k, b) in self.blocks.iter().enumerate() {
            let layer = h.narrow(1, k + 1, 1)?.squeeze(1)?;
            let g = sigmoid(b.gate.as_tensor())?;
            let x = (s.broadcast_mul(&g)? + layer.broadcast_mul(&(1.0 - &g)?)?)?;
            let inner = linear(&layer_norm(&x, &b.ln_w, &b.ln_b, LN_EPS)?, &b.down_w, &b.down_b)?.gelu()?;
            s = (x + linear(&inner, &b.up_w, &b.up_b)?)?;
        }
        Ok(s)
    }
}

/// IISAN's item tower: intra-modal side networks per modality, an inter-modal one when there are
/// two, and the fusion layer to the model width.
pub struct SideAdapters {
    inputs: Vec<BackboneStates>,
    intra: Vec<SideNetwork>,
    inter: Option<SideNetwork>,
    fuse_w: Var,
    fuse_b: Var,
    /// Every trainable tensor in a fixed order, named for checkpoints.
    vars: Vec<(String, Var)>,
    num_items: usize,
}

impl SideAdapters {
    /// Fresh side networks over `inputs` (one or two modalities with the same number of steps),
    /// fused to `hidden` wide item vectors.
    pub fn new(
        inputs: Vec<BackboneStates>,
        cfg: &IisanConfig,
        hidden: usize,
        rng: &mut Rng,
        device: &Device,
    ) -> Result<Self> {
        let first = inputs.first().ok_or_else(|| ModelError::Invalid("IISAN needs text or image states".into()))?;
        let (steps, rows) = (first.steps(), first.states.dims()[0]);
        if steps < 2 {
            return Err(ModelError::Invalid("IISAN needs the embeddings and at least one layer".into()));
        }
        if let Some(m) = inputs.iter().find(|m| m.steps() != steps || m.states.dims()[0] != rows) {
            return Err(ModelError::Invalid(format!(
                "{} states have {:?}, {} states {:?}: the modalities need the same items and layer count",
                m.name,
                m.states.dims(),
                first.name,
                first.states.dims()
            )));
        }
        let mut vars = Vec::new();
        let intra = inputs
            .iter()
            .map(|m| SideNetwork::new(&format!("san.{}", m.name), m.width(), steps - 1, cfg, &mut vars, rng, device))
            .collect::<Result<Vec<_>>>()?;
        let both: usize = inputs.iter().map(BackboneStates::width).sum();
        let inter = match inputs.len() {
            1 => None,
            _ => Some(SideNetwork::new("san.inter", both, steps - 1, cfg, &mut vars, rng, device)?),
        };
        let fused = if inter.is_some() { 2 * both } else { both };
        let fuse_w = xavier_var(fused, hidden, rng, device)?;
        let fuse_b = const_var(hidden, 0.0, device)?;
        vars.push(("fuse.w".into(), fuse_w.clone()));
        vars.push(("fuse.b".into(), fuse_b.clone()));
        Ok(Self { inputs, intra, inter, fuse_w, fuse_b, vars, num_items: rows - 1 })
    }

    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    pub fn num_items(&self) -> usize {
        self.num_items
    }

    /// The vectors of the items `ids` (u32 indices, flattened): `[ids, hidden]`.
    pub fn item_vectors(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let ids = ids.flatten_all()?;
        let states =
            self.inputs.iter().map(|m| m.states.index_select(&ids, 0)).collect::<candle_core::Result<Vec<_>>>()?;
        let mut last =
            self.intra.iter().zip(&states).map(|(san, h)| san.run(h)).collect::<candle_core::Result<Vec<_>>>()?;
        if let Some(inter) = &self.inter {
            last.push(inter.run(&Tensor::cat(&states, 2)?)?);
        }
        linear(&Tensor::cat(&last, 1)?, &self.fuse_w, &self.fuse_b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn states(name: &str, rows: usize, steps: usize, width: usize, scale: f32) -> BackboneStates {
        let v = (0..rows * steps * width).map(|i| ((i * 7 % 13) as f32 - 6.0) * scale).collect();
        BackboneStates::new(name, v, steps, width).unwrap()
    }

    #[test]
    fn a_block_without_its_adapter_is_the_gated_mix_of_chain_and_backbone() {
        // One item, embeddings h0 = (1, 3) and one layer h1 = (5, -1); a zeroed adapter (up = 0)
        // leaves x = σ(g)·h0 + (1 − σ(g))·h1; with g = ln 3, σ = 0.75: (2, 2). The fusion layer is
        // the identity, so the item vector is (2, 2).
        let inputs = vec![BackboneStates::new("text", vec![0., 0., 0., 0., 1., 3., 5., -1.], 2, 2).unwrap()];
        let cfg = IisanConfig { blocks: 1, bottleneck: 2 };
        let m = SideAdapters::new(inputs, &cfg, 2, &mut crate::seed::stream(1, "t", 0), &Device::Cpu).unwrap();
        let set = |name: &str, v: Tensor| m.vars().iter().find(|(n, _)| n == name).unwrap().1.set(&v).unwrap();
        set("san.text.block1.gate", Tensor::new(&[3f32.ln()], &Device::Cpu).unwrap());
        set("san.text.block1.up.w", Tensor::zeros((2, 2), candle_core::DType::F32, &Device::Cpu).unwrap());
        set("fuse.w", Tensor::eye(2, candle_core::DType::F32, &Device::Cpu).unwrap());
        let v = m.item_vectors(&Tensor::new(&[1u32], &Device::Cpu).unwrap()).unwrap();
        let v = v.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!((v[0] - 2.0).abs() < 1e-6 && (v[1] - 2.0).abs() < 1e-6, "{v:?}");
    }

    #[test]
    fn text_and_image_get_their_own_and_a_shared_side_network() {
        let inputs = vec![states("text", 5, 4, 6, 0.1), states("image", 5, 4, 4, 0.2)];
        let cfg = IisanConfig { blocks: 3, bottleneck: 3 };
        let m = SideAdapters::new(inputs, &cfg, 8, &mut crate::seed::stream(1, "t", 0), &Device::Cpu).unwrap();
        let shape = |name: &str| m.vars().iter().find(|(n, _)| n == name).unwrap().1.dims().to_vec();
        assert_eq!(shape("san.text.block3.down.w"), [6, 3]);
        assert_eq!(shape("san.image.block1.up.w"), [3, 4]);
        assert_eq!(shape("san.inter.block2.ln.w"), [10]);
        // text, image and inter chains' last states side by side: 6 + 4 + 10.
        assert_eq!(shape("fuse.w"), [20, 8]);
        assert_eq!(m.vars().len(), 3 * 3 * 7 + 2);
        let ids = Tensor::new(&[1u32, 2, 2, 4], &Device::Cpu).unwrap();
        let v = m.item_vectors(&ids).unwrap();
        assert_eq!(v.dims(), &[4, 8]);
        let rows = v.to_vec2::<f32>().unwrap();
        assert_eq!(rows[1], rows[2]);
        assert_ne!(rows[0], rows[1]);
        let loss = v.sqr().unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        for (name, var) in m.vars() {
            assert!(grads.get(var.as_tensor()).is_some(), "no gradient for {name}");
        }
    }

    #[test]
    fn modalities_with_different_layer_counts_are_refused() {
        let inputs = vec![states("text", 5, 4, 6, 0.1), states("image", 5, 3, 4, 0.2)];
        let err =
            SideAdapters::new(inputs, &IisanConfig::default(), 8, &mut crate::seed::stream(1, "t", 0), &Device::Cpu)
                .err()
                .unwrap()
                .to_string();
        assert!(err.contains("the same items and layer count"), "{err}");
    }
}
