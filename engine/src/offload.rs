//! GPU offload: which of llama.cpp's devices a model runs on, and how many of its layers go there.
//!
//! A CPU-only build registers no GPU device, so the default ([`GpuLayers::Auto`]) puts every layer
//! on a GPU when the build has a GPU backend (`--features cuda` / `metal`) and a device is present,
//! and none otherwise: one default that is right on both kinds of machine.

use std::fmt;
use std::str::FromStr;

use llama_cpp_2::LlamaBackendDeviceType;
use llama_cpp_2::model::params::LlamaModelParams;

use crate::error::EngineError;

/// How many of the model's layers run on a GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GpuLayers {
    /// All of them when a GPU device is present, none otherwise.
    #[default]
    Auto,
    /// All of them (llama.cpp keeps the model on the CPU when there is no GPU).
    All,
    /// This many (0: CPU only).
    Count(u32),
}

impl FromStr for GpuLayers {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(GpuLayers::Auto),
            "all" => Ok(GpuLayers::All),
            n => n
                .parse()
                .map(GpuLayers::Count)
                .map_err(|_| format!("{n:?}: expected auto, all or a number of layers")),
        }
    }
}

impl fmt::Display for GpuLayers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GpuLayers::Auto => f.write_str("auto"),
            GpuLayers::All => f.write_str("all"),
            GpuLayers::Count(n) => write!(f, "{n}"),
        }
    }
}

/// A GPU llama.cpp can run layers on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuDevice {
    /// llama.cpp's device index (`--main-gpu` names it).
    pub index: usize,
    /// Backend device name, e.g. `CUDA0`.
    pub name: String,
    /// What the driver calls it, e.g. `NVIDIA H100 80GB HBM3`.
    pub description: String,
    /// Total memory, bytes.
    pub memory_bytes: u64,
}

/// Where a loaded model runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offload {
    /// Layers on the GPU (0: the model runs on the CPU).
    pub gpu_layers: u32,
    /// The model's layers.
    pub n_layer: u32,
    /// The GPUs it may use (empty on a CPU-only build or machine).
    pub devices: Vec<GpuDevice>,
}

impl Offload {
    /// What the first GPU holding layers calls itself, e.g. `NVIDIA H100 80GB HBM3` (`None`: the
    /// model runs on the CPU).
    pub fn gpu(&self) -> Option<&str> {
        let first = self.devices.first().filter(|_| self.gpu_layers > 0)?;
        Some(&first.description)
    }
}

/// Where the model went, as the node prints it at start-up: `30 of 30 layers on CUDA0 (NVIDIA ...)`
/// or `on the CPU (...)`.
impl fmt::Display for Offload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.devices.first() {
            Some(gpu) if self.gpu_layers == 0 => write!(
                f,
                "on the CPU (--n-gpu-layers 0; {} ({}) is not used for layers)",
                gpu.name, gpu.description
            ),
            Some(gpu) => {
                write!(
                    f,
                    "{} of {} layers on {} ({})",
                    self.gpu_layers, self.n_layer, gpu.name, gpu.description
                )?;
                match self.devices.len() {
                    1 => Ok(()),
                    n => write!(f, " and {} more GPUs", n - 1),
                }
            }
            None => f.write_str("on the CPU (no GPU in this build or machine)"),
        }
    }
}

/// The GPUs llama.cpp has registered (none in a build without a GPU backend).
pub fn gpu_devices() -> Vec<GpuDevice> {
    llama_cpp_2::list_llama_ggml_backend_devices()
        .into_iter()
        .filter(|d| {
            matches!(
                d.device_type,
                LlamaBackendDeviceType::Gpu | LlamaBackendDeviceType::IntegratedGpu
            )
        })
        .map(|d| GpuDevice {
            index: d.index,
            name: d.name,
            description: d.description,
            memory_bytes: d.memory_total as u64,
        })
        .collect()
}

/// Resolves `layers` and `main_gpu` against the devices present: llama.cpp's model parameters, the
/// GPUs the model may use, and the layers asked for on them.
pub(crate) fn params(
    layers: GpuLayers,
    main_gpu: Option<usize>,
) -> Result<(LlamaModelParams, Vec<GpuDevice>, u32), EngineError> {
    let mut devices = gpu_devices();
    if let Some(main) = main_gpu {
        devices.retain(|d| d.index == main);
        if devices.is_empty() {
            let known: Vec<String> = gpu_devices()
                .iter()
                .map(|d| format!("{} ({})", d.index, d.name))
                .collect();
            return Err(EngineError::InvalidRequest(format!(
                "--main-gpu {main}: no such GPU (present: {})",
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            )));
        }
    }
    let requested = match layers {
        GpuLayers::Auto if devices.is_empty() => 0,
        GpuLayers::Auto | GpuLayers::All => u32::MAX,
        GpuLayers::Count(n) => n,
    };
    let mut params = LlamaModelParams::default().with_n_gpu_layers(requested);
    if main_gpu.is_some() {
        let indices: Vec<usize> = devices.iter().map(|d| d.index).collect();
        params = params
            .with_devices(&indices)
            .map_err(|e| EngineError::InvalidRequest(format!("--main-gpu: {e}")))?;
    }
    Ok((params, devices, requested))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_counts_parse() {
        assert_eq!("auto".parse(), Ok(GpuLayers::Auto));
        assert_eq!("all".parse(), Ok(GpuLayers::All));
        assert_eq!("12".parse(), Ok(GpuLayers::Count(12)));
        assert!("many".parse::<GpuLayers>().is_err());
        assert_eq!(GpuLayers::Count(3).to_string(), "3");
    }
}
