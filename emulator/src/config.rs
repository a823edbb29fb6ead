//! The emulator's configuration, read once from the environment.

pub(crate) struct Config {
    pub(crate) devices: i32,
    pub(crate) capacity: usize,
    pub(crate) granularity: usize,
    pub(crate) fabric: bool,
    pub(crate) rdma: bool,
    pub(crate) vmm: bool,
    /// Level Zero drivers the loader reports (`DEVMEM_EMU_ZE_DRIVERS`, default 1).
    pub(crate) ze_drivers: u32,
    /// Fresh physical memory holds 0xA5 bytes instead of zeros (`DEVMEM_EMU_STALE_VRAM=1`), as
    /// stale VRAM does on older amdgpu kernels.
    pub(crate) stale: bool,
    /// The largest `hipMemCreate` the HIP face accepts (`DEVMEM_EMU_HIP_MAX_CREATE`, 0: any).
    pub(crate) hip_max_create: usize,
    /// Whether zeDriverGetDefaultContext answers (`DEVMEM_EMU_ZE_NO_DEFAULT_CONTEXT=1`: no).
    pub(crate) ze_default_context: bool,
}

/// Reads `name`; a value `parse` rejects is reported on standard error (naming what would have
/// been accepted) and counts as unset.
fn checked<T>(name: &str, accepted: &str, parse: impl Fn(&str) -> Option<T>) -> Option<T> {
    let value = std::env::var(name).ok()?;
    let parsed = parse(value.trim());
    if parsed.is_none() {
        eprintln!("cuemu: ignoring {name}={value:?}: not {accepted}; using the default");
    }
    parsed
}

pub(crate) fn env_flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"))
}

/// Parses "123", "64K", "256M", "2G".
pub(crate) fn parse_size(text: &str) -> Option<usize> {
    let text = text.trim();
    let (digits, mult) = match text.chars().last()?.to_ascii_uppercase() {
        'K' => (&text[..text.len() - 1], 1usize << 10),
        'M' => (&text[..text.len() - 1], 1 << 20),
        'G' => (&text[..text.len() - 1], 1 << 30),
        _ => (text, 1),
    };
    digits.trim().parse::<usize>().ok()?.checked_mul(mult)
}

impl Config {
    pub(crate) fn from_env() -> Self {
        let size = |name: &str, default: usize| {
            checked(name, "a size (bytes, or with K, M or G)", parse_size).unwrap_or(default)
        };
        Self {
            devices: checked("DEVMEM_EMU_DEVICES", "a whole number", |v| v.parse().ok())
                .unwrap_or(1),
            capacity: size("DEVMEM_EMU_CAPACITY", 1 << 30),
            granularity: size("DEVMEM_EMU_GRANULARITY", 2 << 20),
            fabric: env_flag("DEVMEM_EMU_FABRIC"),
            rdma: env_flag("DEVMEM_EMU_RDMA"),
            vmm: !env_flag("DEVMEM_EMU_NO_VMM"),
            ze_drivers: checked("DEVMEM_EMU_ZE_DRIVERS", "a whole number", |v| {
                v.parse().ok()
            })
            .unwrap_or(1),
            stale: env_flag("DEVMEM_EMU_STALE_VRAM"),
            hip_max_create: size("DEVMEM_EMU_HIP_MAX_CREATE", 0),
            ze_default_context: !env_flag("DEVMEM_EMU_ZE_NO_DEFAULT_CONTEXT"),
        }
    }
}
