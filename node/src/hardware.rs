//! What a machine is made of (`exo-router profile`): CPU topology, caches and NUMA memory from
//! hwloc, total memory from the OS, and NVIDIA GPUs from the CUDA driver when one is installed
//! (loaded at run time, so the binary runs on machines without CUDA).

use std::path::Path;

use exo_engine::{ContextConfig, Offload};
use serde::Serialize;

use crate::measure::Measured;

/// One cache level.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CacheLevel {
    /// `L1d`, `L2`, `L3`, ...
    pub level: String,
    /// Caches of this level in the machine.
    pub count: usize,
    /// Size of one, in bytes.
    pub bytes_each: u64,
}

/// One NUMA node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NumaNode {
    /// OS index.
    pub index: u32,
    /// Local memory in bytes, as hwloc reports it.
    pub memory_bytes: u64,
}

/// One NVIDIA GPU.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Gpu {
    /// Device ordinal.
    pub index: u32,
    /// Marketing name.
    pub name: String,
    /// Total memory in bytes.
    pub memory_bytes: u64,
    /// Streaming multiprocessors.
    pub sm_count: u32,
    /// Compute capability, `major.minor`.
    pub compute_capability: String,
    /// Peak SM clock, MHz (0 when the driver does not report it).
    pub clock_mhz: u32,
    /// Peak memory clock, MHz (0 when the driver does not report it).
    pub memory_clock_mhz: u32,
    /// Memory bus width, bits.
    pub memory_bus_bits: u32,
    /// Derived peak memory bandwidth: 2 x memory clock x bus width / 8, GB/s.
    pub memory_bandwidth_gb_s: f64,
}

/// Hardware facts of one machine, each with where it came from.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HardwareReport {
    /// Operating system.
    pub os: String,
    /// CPU architecture.
    pub arch: String,
    /// Processor packages (sockets), from hwloc.
    pub packages: usize,
    /// Physical cores, from hwloc.
    pub cores: usize,
    /// Hardware threads, from hwloc.
    pub threads: usize,
    /// Threads this process may use (`available_parallelism`, respects CPU limits).
    pub threads_available: usize,
    /// Total memory in bytes, from the OS (`/proc/meminfo`).
    pub memory_bytes: u64,
    /// NUMA nodes and their local memory, from hwloc (may differ from the OS total in containers).
    pub numa: Vec<NumaNode>,
    /// Cache levels, from hwloc.
    pub caches: Vec<CacheLevel>,
    /// NVIDIA GPUs, from the CUDA driver; empty when there is none or no driver.
    pub gpus: Vec<Gpu>,
    /// What could not be read, and why (never fatal).
    pub notes: Vec<String>,
}

impl HardwareReport {
    /// Human-readable lines for progress output.
    pub fn summary(&self) -> Vec<String> {
        let mut lines = vec![
            format!(
                "{} {}: {} package(s), {} cores, {} threads ({} available), {:.1} GiB",
                self.os,
                self.arch,
                self.packages,
                self.cores,
                self.threads,
                self.threads_available,
                self.memory_bytes as f64 / f64::from(1u32 << 30)
            ),
            format!(
                "NUMA: {}; caches: {}",
                self.numa
                    .iter()
                    .map(|n| format!(
                        "node {} {:.1} GiB",
                        n.index,
                        n.memory_bytes as f64 / f64::from(1u32 << 30)
                    ))
                    .collect::<Vec<_>>()
                    .join(", "),
                self.caches
                    .iter()
                    .map(|c| format!("{} {}x{} KiB", c.level, c.count, c.bytes_each / 1024))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ];
        if self.gpus.is_empty() {
            lines.push("GPU: none".into());
        }
        for g in &self.gpus {
            lines.push(format!(
                "GPU {}: {}, {:.1} GiB, {} SMs, cc {}, {:.0} GB/s",
                g.index,
                g.name,
                g.memory_bytes as f64 / f64::from(1u32 << 30),
                g.sm_count,
                g.compute_capability,
                g.memory_bandwidth_gb_s
            ));
        }
        for n in &self.notes {
            lines.push(format!("note: {n}"));
        }
        lines
    }
}

/// Total memory from `/proc/meminfo`, in bytes.
pub fn os_memory() -> Option<u64> {
    meminfo("MemTotal:")
}

/// Memory available to a new process from `/proc/meminfo` (free memory and the caches the kernel
/// can reclaim), in bytes.
pub fn os_available_memory() -> Option<u64> {
    meminfo("MemAvailable:")
}

fn meminfo(field: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with(field))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Probes the machine. Never fails: what cannot be read is left empty and said in `notes`.
pub fn probe() -> HardwareReport {
    let mut report = HardwareReport {
        os: std::env::consts::OS.to_string(),
        arch: std::env::consts::ARCH.to_string(),
        packages: 0,
        cores: 0,
        threads: 0,
        threads_available: std::thread::available_parallelism().map_or(0, |n| n.get()),
        memory_bytes: 0,
        numa: Vec::new(),
        caches: Vec::new(),
        gpus: Vec::new(),
        notes: Vec::new(),
    };
    match os_memory() {
        Some(m) => report.memory_bytes = m,
        None => report
            .notes
            .push("total memory: /proc/meminfo unreadable".into()),
    }
    topology::probe(&mut report);
    gpu::probe(&mut report);
    report
}

mod topology {
    //! CPU topology from hwloc.

    use hwlocality::Topology;
    use hwlocality::object::attributes::ObjectAttributes;
    use hwlocality::object::types::ObjectType;

    use super::{CacheLevel, HardwareReport, NumaNode};

    pub(super) fn probe(report: &mut HardwareReport) {
        let topo = match Topology::new() {
            Ok(t) => t,
            Err(e) => {
                report.notes.push(format!("hwloc: {e}"));
                return;
            }
        };
        report.packages = topo.objects_with_type(ObjectType::Package).count();
        report.cores = topo.objects_with_type(ObjectType::Core).count();
        report.threads = topo.objects_with_type(ObjectType::PU).count();
        for obj in topo.objects_with_type(ObjectType::NUMANode) {
            let memory = match obj.attributes() {
                Some(ObjectAttributes::NUMANode(n)) => n.local_memory().map_or(0, |m| m.get()),
                _ => 0,
            };
            report.numa.push(NumaNode {
                index: obj.os_index().map_or(0, |i| i as u32),
                memory_bytes: memory,
            });
        }
        for (level, ty) in [
            ("L1d", ObjectType::L1Cache),
            ("L2", ObjectType::L2Cache),
            ("L3", ObjectType::L3Cache),
        ] {
            let sizes: Vec<u64> = topo
                .objects_with_type(ty)
                .filter_map(|o| match o.attributes() {
                    Some(ObjectAttributes::Cache(c)) => c.size().map(|s| s.get()),
                    _ => None,
                })
                .collect();
            if let Some(&first) = sizes.first() {
                report.caches.push(CacheLevel {
                    level: level.to_string(),
                    count: sizes.len(),
                    bytes_each: first,
                });
            }
        }
    }
}

mod gpu {
    //! NVIDIA GPUs through the CUDA driver API, loaded at run time.

    use cudarc::driver::result::{self, DriverError, device};
    use cudarc::driver::sys::{CUdevice, CUdevice_attribute as Attr};

    use super::{Gpu, HardwareReport};

    /// Adds every visible GPU to `report`; a missing driver or any driver error becomes a note.
    pub(super) fn probe(report: &mut HardwareReport) {
        if !driver_present() {
            report
                .notes
                .push("no NVIDIA driver (libcuda not found): no GPU probed".into());
            return;
        }
        // cudarc panics when a driver symbol it needs is missing (a very old driver); such a
        // machine reports no GPU rather than aborting the profile.
        match std::panic::catch_unwind(gpus) {
            Ok(Ok(found)) => report.gpus = found,
            Ok(Err(e)) => report.notes.push(format!("CUDA driver error: {e}")),
            Err(_) => report
                .notes
                .push("CUDA driver is missing a required entry point: no GPU probed".into()),
        }
    }

    #[allow(unsafe_code)]
    fn driver_present() -> bool {
        // SAFETY: only tries to dlopen libcuda by its usual names and drops the handle; loading
        // the driver library runs no code of ours.
        unsafe { cudarc::driver::sys::is_culib_present() }
    }

    fn gpus() -> Result<Vec<Gpu>, DriverError> {
        result::init()?;
        let count = device::get_count()?;
        let mut out = Vec::new();
        for ordinal in 0..count {
            let dev = device::get(ordinal)?;
            out.push(describe(ordinal, dev)?);
        }
        Ok(out)
    }

    #[allow(unsafe_code)]
    fn attribute(dev: CUdevice, attr: Attr) -> Result<u32, DriverError> {
        // SAFETY: `dev` was returned by `cuDeviceGet` after a successful `cuInit`.
        let v = unsafe { device::get_attribute(dev, attr) }?;
        Ok(u32::try_from(v).unwrap_or(0))
    }

    #[allow(unsafe_code)]
    fn describe(ordinal: i32, dev: CUdevice) -> Result<Gpu, DriverError> {
        // SAFETY: as in `attribute`.
        let memory_bytes = unsafe { device::total_mem(dev) }? as u64;
        let major = attribute(dev, Attr::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
        let minor = attribute(dev, Attr::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
        // The driver reports clocks in kHz.
        let clock_khz = attribute(dev, Attr::CU_DEVICE_ATTRIBUTE_CLOCK_RATE)?;
        let mem_clock_khz = attribute(dev, Attr::CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE)?;
        let bus_bits = attribute(dev, Attr::CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH)?;
        Ok(Gpu {
            index: u32::try_from(ordinal).unwrap_or(0),
            name: device::get_name(dev)?,
            memory_bytes,
            sm_count: attribute(dev, Attr::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?,
            compute_capability: format!("{major}.{minor}"),
            clock_mhz: clock_khz / 1000,
            memory_clock_mhz: mem_clock_khz / 1000,
            memory_bus_bits: bus_bits,
            memory_bandwidth_gb_s: peak_bandwidth_gb_s(mem_clock_khz, bus_bits),
        })
    }

    /// Double data rate: two transfers per memory clock, `bus_bits / 8` bytes each.
    pub(super) fn peak_bandwidth_gb_s(mem_clock_khz: u32, bus_bits: u32) -> f64 {
        2.0 * f64::from(mem_clock_khz) * 1e3 * f64::from(bus_bits) / 8.0 / 1e9
    }
}

#[derive(Serialize)]
struct ProfileFile<'a> {
    model: String,
    placement: &'static str,
    policy: PolicyOut,
    layout: LayoutOut,
    nodes: Vec<NodeOut<'a>>,
}

#[derive(Serialize)]
struct PolicyOut {
    kv_bytes_per_token: f64,
}

#[derive(Serialize)]
struct LayoutOut {
    type_k: &'static str,
    type_v: &'static str,
    flash_attn: bool,
    kv_unified: bool,
    n_ctx_seq: u32,
}

#[derive(Serialize)]
struct NodeOut<'a> {
    name: &'a str,
    address: &'static str,
    role: &'static str,
    slots: u32,
    /// The thread budget measured with, when one was given (`--threads`).
    #[serde(skip_serializing_if = "Option::is_none")]
    threads: Option<u32>,
    hardware: HardwareOut<'a>,
    perf: &'a exo_protocol::NodePerf,
}

/// `[nodes.hardware]`: the probe's report and where the measured model ran.
#[derive(Serialize)]
struct HardwareOut<'a> {
    #[serde(flatten)]
    report: &'a HardwareReport,
    offload: OffloadOut,
}

/// Layers on a GPU during the measurement, and the GPUs llama.cpp used.
#[derive(Serialize)]
struct OffloadOut {
    gpu_layers: u32,
    n_layer: u32,
    devices: Vec<DeviceOut>,
}

#[derive(Serialize)]
struct DeviceOut {
    index: usize,
    name: String,
    description: String,
    memory_bytes: u64,
}

impl From<&Offload> for OffloadOut {
    fn from(o: &Offload) -> Self {
        OffloadOut {
            gpu_layers: o.gpu_layers,
            n_layer: o.n_layer,
            devices: o
                .devices
                .iter()
                .map(|d| DeviceOut {
                    index: d.index,
                    name: d.name.clone(),
                    description: d.description.clone(),
                    memory_bytes: d.memory_bytes,
                })
                .collect(),
        }
    }
}

/// Why a profile could not be written.
#[derive(Debug, thiserror::Error)]
#[error("cannot write the profile as TOML: {0}")]
pub struct WriteError(#[from] toml::ser::Error);

/// The profile `exo-router profile` writes: a complete single-node cluster profile (one embedded
/// `both` node) that `serve`, `plan` and `simulate` accept as is; its `[[nodes]]` table can be
/// copied into a multi-node profile. `config` is the context the measurement ran with: its layout,
/// and its thread budget when one was given.
pub fn node_profile_toml(
    model: &Path,
    name: &str,
    config: &ContextConfig,
    hardware: &HardwareReport,
    offload: &Offload,
    measured: &Measured,
) -> Result<String, WriteError> {
    let layout = config.layout;
    let file = ProfileFile {
        model: model.display().to_string(),
        placement: "colocated",
        policy: PolicyOut {
            kv_bytes_per_token: measured.kv_bytes_per_token.round(),
        },
        layout: LayoutOut {
            type_k: layout.type_k.name(),
            type_v: layout.type_v.name(),
            flash_attn: layout.flash_attn,
            kv_unified: layout.kv_unified,
            n_ctx_seq: layout.n_ctx_seq,
        },
        nodes: vec![NodeOut {
            name,
            address: "embedded",
            role: "both",
            slots: layout.n_seq_max,
            threads: (config.n_threads > 0).then_some(config.n_threads),
            hardware: HardwareOut {
                report: hardware,
                offload: offload.into(),
            },
            perf: &measured.perf,
        }],
    };
    let body = toml::to_string(&file)?;
    Ok(format!(
        "# Written by `exo-router profile`: {}.\n\
         # A single-node cluster profile of this machine: `serve`, `plan` and `simulate` accept it\n\
         # as is. Copy its [[nodes]] table into a multi-node profile, change `address` to the\n\
         # machine's host:port and `role` as needed (a remote node takes `threads` as --threads on\n\
         # its own command line instead). docs/profiles.md explains every field.\n\n{body}",
        measured.perf.source
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peak_bandwidth_is_double_data_rate_times_bus_width() {
        // H100 SXM5: 2619 MHz HBM3 clock, 5120-bit bus -> 3.35 TB/s (NVIDIA's datasheet figure).
        let gb_s = gpu::peak_bandwidth_gb_s(2_619_000, 5120);
        assert!((gb_s - 3352.3).abs() < 1.0, "{gb_s}");
        assert!(gpu::peak_bandwidth_gb_s(0, 5120).abs() < f64::EPSILON);
    }

    #[test]
    fn probe_reports_this_machine_without_panicking() {
        let report = probe();
        assert!(report.threads >= report.cores, "{report:?}");
        assert!(report.cores >= 1, "{report:?}");
        assert!(report.memory_bytes > 0, "{report:?}");
        // Either a GPU was found or the report says why not.
        assert!(
            !report.gpus.is_empty() || report.notes.iter().any(|n| n.contains("GPU")),
            "{report:?}"
        );
    }
}
