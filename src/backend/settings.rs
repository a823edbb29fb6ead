//! Driver workarounds as explicit switches, read once when the backend loads. Each has a
//! per-backend default (`auto`) and can be forced on or off; an unparsable value fails the
//! load with `INVALID_ARGUMENT` naming the variable.
//!
//! | variable | values | `auto` means |
//! | --- | --- | --- |
//! | `DEVMEM_CHUNK_SIZE` | a size (`256M`, bytes or K/M/G), `0` = one piece | HIP: 256 MiB (or vLLM's `VLLM_ROCM_SLEEP_MEM_CHUNK_SIZE` / `VLLM_SLEEP_MEM_CHUNK_SIZE`, in MiB); others: one piece |
//! | `DEVMEM_RERESERVE` | `0`, `1`, `auto` | HIP: on (ROCm returns memory only when the reservation is freed); others: off, and `1` is refused (`UNSUPPORTED`) |
//! | `DEVMEM_ZERO_ON_WAKE` | `0`, `1`, `auto` | HIP on a Linux kernel older than 6.14 (stale VRAM, as vLLM): on; others: off |
//! | `DEVMEM_WAKE_CHUNK_MB` | a whole number of MiB from 0 to 1048576, `0` = off | CUDA and HIP: 512 (allocations of at least 1 GiB get 512 MiB chunks); Level Zero: off |
//!
//! `DEVMEM_WAKE_CHUNK_MB` chunks only large allocations (at least two chunks' worth), so a
//! wake maps chunk k+1 while chunk k's bytes copy and one huge tensor wakes at link speed;
//! smaller allocations stay one driver handle, so `my_malloc` / `my_free` pay nothing for it.
//! `DEVMEM_CHUNK_SIZE`, when set (or HIP's default), chunks every allocation and takes
//! precedence.

use super::devmem_backend;
use crate::error::{bail, Result};

/// Chunk size on HIP when nothing is set (vLLM's default).
pub(crate) const HIP_CHUNK_BYTES: usize = 256 << 20;

/// Wake chunk on CUDA and HIP when nothing is set. On an H100 (bench/results/h100-vmm-costs.log)
/// a chunk costs about 55 us to create and map and 60 us to unmap and release, whatever its
/// size, while 512 MiB copy in about 9.7 ms: the per-chunk cost is hidden under the copies on
/// a wake and is about 0.6% of an 8 GiB sleep (16 chunks); the first chunk's mapping, the part
/// a wake cannot overlap, is 1/16 of an 8 GiB tensor's (the whole mapping cost 0.12 of the
/// wake when unchunked, so about 1%). Only allocations of two chunks or more are chunked, so
/// a 1 GiB allocation pays two fixed costs (~0.1 ms) over a ~2.5 ms create and map.
pub(crate) const WAKE_CHUNK_MB: usize = 512;

/// The largest `DEVMEM_WAKE_CHUNK_MB` accepted (1 TiB).
const WAKE_CHUNK_MB_MAX: usize = 1 << 20;

/// The switches in force for the loaded backend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Settings {
    /// Bytes per physical chunk (0: one piece per allocation).
    pub chunk_size: usize,
    /// Free and re-reserve an allocation's range after its memory is released.
    pub rereserve: bool,
    /// Write zeros over discarded allocations when they are woken.
    pub zero_on_wake: bool,
    /// Bytes per chunk of allocations of at least two chunks (0: off); `chunk_size`, when not
    /// 0, takes precedence.
    pub wake_chunk: usize,
}

/// `DEVMEM_WAKE_CHUNK_MB`, strictly: unset, empty or `auto` is the backend's default.
fn wake_chunk(kind: devmem_backend) -> Result<usize> {
    const NAME: &str = "DEVMEM_WAKE_CHUNK_MB";
    let default = match kind {
        devmem_backend::Cuda | devmem_backend::Hip => WAKE_CHUNK_MB << 20,
        _ => 0,
    };
    let Some(text) = crate::env::text(NAME)? else {
        return Ok(default);
    };
    let trimmed = text.trim();
    if trimmed.is_empty() || trimmed.eq_ignore_ascii_case("auto") {
        return Ok(default);
    }
    match trimmed.parse::<usize>() {
        Ok(mb) if mb <= WAKE_CHUNK_MB_MAX && trimmed.bytes().all(|b| b.is_ascii_digit()) => {
            Ok(mb << 20)
        }
        _ => bail!(
            InvalidArgument,
            "{NAME}={text} is not a whole number of MiB from 0 (off) to {WAKE_CHUNK_MB_MAX}, or \
             auto"
        ),
    }
}

fn switch(name: &str) -> Result<Option<bool>> {
    let Some(text) = crate::env::text(name)? else {
        return Ok(None);
    };
    match text.trim().to_ascii_lowercase().as_str() {
        "" | "auto" => Ok(None),
        "1" | "true" | "on" | "yes" => Ok(Some(true)),
        "0" | "false" | "off" | "no" => Ok(Some(false)),
        _ => bail!(
            InvalidArgument,
            "{name}={text} is not one of 0, 1, auto (the default)"
        ),
    }
}

fn chunk_size(kind: devmem_backend) -> Result<usize> {
    if let Some(text) = crate::env::text("DEVMEM_CHUNK_SIZE")? {
        if !text.trim().is_empty() && !text.trim().eq_ignore_ascii_case("auto") {
            return crate::store::bound::parse_size(&text)
                .and_then(|n| usize::try_from(n).ok())
                .ok_or_else(|| {
                    crate::error::Error::new(
                        crate::error::devmem_status::InvalidArgument,
                        format!(
                            "DEVMEM_CHUNK_SIZE={text} is not a size (bytes, or with K, M or G; \
                             0 for one piece per allocation; auto)"
                        ),
                    )
                });
        }
    }
    if kind != devmem_backend::Hip {
        return Ok(0);
    }
    // vLLM's own variables (MiB), so a ROCm deployment tuned for vLLM keeps its setting.
    for name in [
        "VLLM_ROCM_SLEEP_MEM_CHUNK_SIZE",
        "VLLM_SLEEP_MEM_CHUNK_SIZE",
    ] {
        match crate::env::text(name) {
            Ok(None) => {}
            Ok(Some(text)) => match text.trim().parse::<usize>().ok().filter(|mb| *mb > 0) {
                Some(mb) => return Ok(mb.saturating_mul(1 << 20)),
                None => log::warn!("devmem: ignoring {name}={text}: not a whole number of MiB"),
            },
            Err(err) => log::warn!("devmem: ignoring {}", err.message),
        }
    }
    Ok(HIP_CHUNK_BYTES)
}

/// Whether the running Linux kernel is older than `major.minor` (false when unknown).
fn kernel_older_than(major: u32, minor: u32) -> bool {
    let Ok(release) = std::fs::read_to_string("/proc/sys/kernel/osrelease") else {
        return false;
    };
    let mut parts = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().ok());
    match (parts.next().flatten(), parts.next().flatten()) {
        (Some(a), Some(b)) => (a, b) < (major, minor),
        _ => false,
    }
}

impl Settings {
    /// The switches for a backend of `kind`, from the environment.
    pub fn from_env(kind: devmem_backend) -> Result<Self> {
        let hip = kind == devmem_backend::Hip;
        let rereserve = switch("DEVMEM_RERESERVE")?;
        let zero_on_wake = switch("DEVMEM_ZERO_ON_WAKE")?;
        if !hip && rereserve == Some(true) {
            // CUDA and Level Zero return memory on release. On an H100 (driver 580) the CUDA
            // driver placed a freed range elsewhere when asked for it again in PyTorch
            // workloads (bench/results/h100-issue14-rereserve-on-cuda-python.log), so a wake
            // would have had nowhere to map: refused rather than offered.
            bail!(
                Unsupported,
                "DEVMEM_RERESERVE=1: only the hip backend re-reserves address ranges; the {} \
                 backend returns memory on release without it",
                kind.label()
            );
        }
        if kind == devmem_backend::LevelZero && zero_on_wake == Some(true) {
            bail!(
                Unsupported,
                "DEVMEM_ZERO_ON_WAKE=1: the level_zero backend cannot fill device memory (cuda \
                 and hip can)"
            );
        }
        Ok(Self {
            chunk_size: chunk_size(kind)?,
            rereserve: rereserve.unwrap_or(hip),
            zero_on_wake: zero_on_wake.unwrap_or_else(|| hip && kernel_older_than(6, 14)),
            wake_chunk: wake_chunk(kind)?,
        })
    }

    /// The layer's chunking: (bytes per chunk, smallest allocation chunked); (0, _) is off.
    pub fn chunking(&self) -> (usize, usize) {
        if self.chunk_size > 0 {
            (self.chunk_size, 0)
        } else {
            (self.wake_chunk, self.wake_chunk.saturating_mul(2))
        }
    }
}
