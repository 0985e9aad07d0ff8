//! IISAN's item tower for a job: the per-layer states of the job's text and/or image encoders
//! (computed once and cached by `features::layers`), checked like every multimodal baseline's
//! features, under fresh side networks.

use candle_core::Device;

use super::modality::{check, ItemMatrix, Modalities};
use super::{Result, TrainJob};
use crate::data::Dataset;
use crate::model::iisan::{BackboneStates, IisanConfig, SideAdapters};
use crate::seed::Rng;
use crate::store::Store;

/// Side networks with `cfg`'s blocks over the states of `modalities`, fused to `hidden` wide item
/// vectors; items not cached yet are encoded first.
pub fn side_adapters(
    job: &TrainJob<'_>,
    store: &Store,
    ds: &Dataset,
    modalities: Modalities,
    cfg: &IisanConfig,
    hidden: usize,
    rng: &mut Rng,
) -> Result<SideAdapters> {
    let model = format!("iisan:{modalities}");
    let mut inputs = Vec::new();
    for &kind in modalities.kinds() {
        let (layered, report) =
            crate::features::layers::layered(job.features, kind, cfg.blocks, ds, store, job.telemetry, &Device::Cpu)?;
        if report.computed > 0 {
            tracing::info!(
                "{model}: {kind} states of layers {:?} computed for {} items ({} cached)",
                layered.layers,
                report.computed,
                report.reused
            );
        }
        let f = layered.features;
        check(&ItemMatrix { kind, dim: f.dim, values: f.values.clone() }, &f.present, ds, &model)?;
        inputs.push(BackboneStates::new(&kind.to_string(), f.values, layered.layers.len(), layered.width)?);
    }
    Ok(SideAdapters::new(inputs, cfg, hidden, rng, &Device::Cpu)?)
}
