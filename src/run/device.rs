//! The compute device a run asks for by name.

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device};

/// Opens `spec`: auto, cpu, cuda, cuda:N or metal. `auto` takes a GPU when this build has
/// one and it opens, else the CPU, with a warning when a GPU build found no usable GPU.
pub fn pick(spec: &str) -> Result<(Device, Option<String>)> {
    let spec = spec.trim().to_ascii_lowercase();
    Ok(match spec.as_str() {
        "cpu" => (Device::Cpu, None),
        "auto" => {
            // A GPU build says it has CUDA/Metal whether or not this machine has the device:
            // try it, and fall back to the CPU out loud.
            let gpu = if candle_core::utils::cuda_is_available() {
                Some(Device::new_cuda(0).context("no usable CUDA device"))
            } else if candle_core::utils::metal_is_available() {
                Some(Device::new_metal(0).context("no usable Metal device"))
            } else {
                None
            };
            match gpu {
                Some(Ok(d)) => (d, None),
                Some(Err(e)) => {
                    let cause = format!("{e:#}");
                    let cause = cause.lines().next().unwrap_or_default();
                    (
                        Device::Cpu,
                        Some(format!(
                            "{cause}; running on the CPU (--device cpu to say so)"
                        )),
                    )
                }
                None => (Device::Cpu, None),
            }
        }
        "metal" => (
            Device::new_metal(0).context("cannot open the Metal device")?,
            None,
        ),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let n: usize = match s.strip_prefix("cuda:") {
                Some(n) => n.parse().with_context(|| format!("bad device '{s}'"))?,
                None => 0,
            };
            if !candle_core::utils::cuda_is_available() {
                bail!("--device {s}: this tkg was built without CUDA (build with --features cuda)");
            }
            (
                Device::new_cuda(n).with_context(|| format!("cannot open CUDA device {n}"))?,
                None,
            )
        }
        other => bail!("unknown --device '{other}': use auto, cpu, cuda, cuda:N or metal"),
    })
}

/// f32 on the CPU, f16 on GPUs.
pub fn default_dtype(device: &Device) -> DType {
    if device.is_cpu() {
        DType::F32
    } else {
        DType::F16
    }
}

/// Free host memory for this process, for [`super::RunConfig::memory_available`]: the kernel's MemAvailable, lowered to what the cgroup
/// (a container, a Slurm job) still allows. `None` where neither can be read.
pub fn free_host_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok().and_then(|t| {
        let line = t.lines().find(|l| l.starts_with("MemAvailable:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    });
    let read = |p: &str| -> Option<u64> { std::fs::read_to_string(p).ok()?.trim().parse().ok() };
    let cgroup = read("/sys/fs/cgroup/memory.max")
        .zip(read("/sys/fs/cgroup/memory.current"))
        .map(|(max, used)| max.saturating_sub(used));
    match (meminfo, cgroup) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}
