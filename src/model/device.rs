//! Where the LLM recommenders compute (`model.device`): the frozen LLM, the item features and the
//! trainable parts of I-LLMRec live on one device. `cpu` (the default), `cuda` (GPU number = the
//! rank's index on its machine, so each of N ranks on a node takes its own GPU) or `cuda:N`.
//!
//! Every build parses every value; opening a GPU needs the `cuda` feature. On a GPU the decoder's
//! fused CPU ops give way to their primitive versions (`llm::ops`), and the bf16 panels do not apply.

use candle_core::Device;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub enum ComputeDevice {
    #[default]
    Cpu,
    /// A GPU: this index, or the rank's local index when `None`.
    Cuda(Option<usize>),
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("model.device is `{0}`, but this build has no CUDA: build with `--features cuda`")]
    NotCompiled(ComputeDevice),
    #[error("model.device: cannot open GPU {ordinal}: {source}")]
    Open { ordinal: usize, source: candle_core::Error },
}

impl std::fmt::Display for ComputeDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ComputeDevice::Cpu => f.write_str("cpu"),
            ComputeDevice::Cuda(None) => f.write_str("cuda"),
            ComputeDevice::Cuda(Some(n)) => write!(f, "cuda:{n}"),
        }
    }
}

impl std::str::FromStr for ComputeDevice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "cpu" => Ok(ComputeDevice::Cpu),
            "cuda" => Ok(ComputeDevice::Cuda(None)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(|n| ComputeDevice::Cuda(Some(n)))
                .ok_or_else(|| format!("`{s}` is not cpu, cuda or cuda:N")),
        }
    }
}

impl TryFrom<String> for ComputeDevice {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<ComputeDevice> for String {
    fn from(d: ComputeDevice) -> String {
        d.to_string()
    }
}

impl ComputeDevice {
    /// The candle device; `local_rank` picks the GPU for a plain `cuda`.
    pub fn open(self, local_rank: usize) -> Result<Device, DeviceError> {
        match self {
            ComputeDevice::Cpu => Ok(Device::Cpu),
            ComputeDevice::Cuda(_) if !candle_core::utils::cuda_is_available() => Err(DeviceError::NotCompiled(self)),
            ComputeDevice::Cuda(n) => {
                let ordinal = n.unwrap_or(local_rank);
                Device::new_cuda(ordinal).map_err(|source| DeviceError::Open { ordinal, source })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_every_form_and_names_a_bad_one() {
        for (s, d) in
            [("cpu", ComputeDevice::Cpu), ("cuda", ComputeDevice::Cuda(None)), ("cuda:3", ComputeDevice::Cuda(Some(3)))]
        {
            assert_eq!(s.parse::<ComputeDevice>().unwrap(), d);
            assert_eq!(d.to_string(), s);
        }
        for bad in ["gpu", "cuda:", "cuda:x", "CPU"] {
            let e = bad.parse::<ComputeDevice>().unwrap_err();
            assert!(e.contains(bad), "{e}");
        }
    }

    #[test]
    fn the_cpu_opens_everywhere_and_a_gpu_only_in_a_cuda_build() {
        assert!(ComputeDevice::Cpu.open(1).unwrap().is_cpu());
        if !candle_core::utils::cuda_is_available() {
            let e = ComputeDevice::Cuda(None).open(0).unwrap_err().to_string();
            assert!(e.contains("model.device is `cuda`") && e.contains("--features cuda"), "{e}");
        }
    }
}
