//! How a process reads a shared region's bytes back to the device (`DEVMEM_DURABLE_READ`).
//!
//! A new process restoring from a durable region must make the region's pages usable by the
//! copy engines. Pinning (registering) 4 KiB shmem pages is the slow part (0.65-0.75 s for
//! 8 GiB on an H100, against a 0.157 s copy), so the choice is selectable and measured by
//! `bench/bench_cold.py` (phase `durable_read`, one record per option):
//!
//! * `pin`: the area is populated by 4 threads and registered in 256 MiB pieces, in order, by
//!   one thread; each copy waits only for its own piece (the behaviour before this option).
//! * `pin-fine`: the same in 32 MiB pieces, so the copies follow the registration more
//!   closely (the registration is still the critical path; the GPU run says by how much the
//!   finer grain helps).
//! * `pageable`: nothing is pinned; the copies read the region as ordinary (pageable) memory,
//!   staged by the driver through its own pinned bounce buffers. No registration cost at all;
//!   each copy runs at the driver's pageable-copy bandwidth and returns once its source is
//!   consumed. Sleeps into the region are pageable copies too.
//! * `auto` (default): `pin` where the region's pages can be huge (a hugetlbfs directory, or
//!   shmem transparent huge pages `always`/`within_size`/`advise`, devmem advising the
//!   mapping), since registering 2 MiB pages is cheap; and `pin` without huge pages too, as
//!   measured on an H100 (8 GiB of 4 KiB pages: `pin` 1.01 s, `pageable` 1.48 s).
//!
//! One info line at open says which was used and why.

use crate::error::{bail, Result};

/// The environment variable choosing how durable regions are read.
pub(crate) const ENV: &str = "DEVMEM_DURABLE_READ";
/// Piece pinned as one registration under `pin`.
pub(crate) const PIECE: usize = 256 << 20;
/// Piece pinned as one registration under `pin-fine`.
pub(crate) const FINE_PIECE: usize = 32 << 20;
/// `statfs` magic of hugetlbfs.
const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;

/// A way of reading the region (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Decide from the system's huge-page support.
    Auto,
    /// Pin in 256 MiB pieces.
    Pin,
    /// Pin in 32 MiB pieces.
    PinFine,
    /// Pin nothing: pageable copies.
    Pageable,
}

impl Mode {
    /// The option's name, as `DEVMEM_DURABLE_READ` spells it.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Auto => "auto",
            Mode::Pin => "pin",
            Mode::PinFine => "pin-fine",
            Mode::Pageable => "pageable",
        }
    }

    /// Parses an option name; anything else is an error naming the accepted values.
    pub fn parse(text: &str) -> Result<Self> {
        Ok(match text.trim() {
            "auto" => Mode::Auto,
            "pin" => Mode::Pin,
            "pin-fine" => Mode::PinFine,
            "pageable" => Mode::Pageable,
            other => bail!(
                InvalidArgument,
                "{ENV}={other:?} is not valid: one of auto, pin, pin-fine, pageable"
            ),
        })
    }

    /// The mode from the environment (`auto` when unset or empty).
    pub fn from_env() -> Result<Self> {
        match crate::env::text(ENV)? {
            None => Ok(Mode::Auto),
            Some(v) if v.trim().is_empty() => Ok(Mode::Auto),
            Some(v) => Self::parse(&v),
        }
    }

    /// The registration piece (`None`: nothing is pinned).
    pub fn piece(self) -> Option<usize> {
        match self {
            Mode::Pin | Mode::Auto => Some(PIECE),
            Mode::PinFine => Some(FINE_PIECE),
            Mode::Pageable => None,
        }
    }
}

/// Whether the region's pages can be huge, and why (for the log line).
pub fn huge_pages(fd: i32) -> (bool, String) {
    // SAFETY: a zeroed statfs is a valid out-buffer; `fd` is the region's open descriptor.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::fstatfs(fd, &mut st) } == 0 && st.f_type as i64 == HUGETLBFS_MAGIC {
        return (true, "the region is on hugetlbfs".to_string());
    }
    let path = "/sys/kernel/mm/transparent_hugepage/shmem_enabled";
    match std::fs::read_to_string(path) {
        Ok(text) => shmem_thp(&text),
        Err(err) => (
            false,
            format!("{path} unreadable ({err}): 4 KiB shmem pages"),
        ),
    }
}

/// Reads `shmem_enabled` (the selected value is in brackets).
pub fn shmem_thp(text: &str) -> (bool, String) {
    let chosen = text
        .split_whitespace()
        .find(|w| w.starts_with('[') && w.ends_with(']'))
        .map(|w| w.trim_matches(|c| c == '[' || c == ']'))
        .unwrap_or("unknown");
    match chosen {
        "always" | "within_size" | "advise" | "force" => (
            true,
            format!("shmem transparent huge pages are '{chosen}' (devmem advises the mapping)"),
        ),
        _ => (
            false,
            format!(
                "shmem transparent huge pages are '{chosen}': 4 KiB pages (set \
                 /sys/kernel/mm/transparent_hugepage/shmem_enabled to advise, or put the \
                 region on hugetlbfs, for huge pages)"
            ),
        ),
    }
}

/// The mode to use: `mode` unless it is `auto`, which picks `pin` (with huge pages because
/// registering them is cheap, without because it still measured fastest). Returns the mode and
/// the reason.
pub fn resolve(mode: Mode, huge: bool, why_huge: &str) -> (Mode, String) {
    match mode {
        Mode::Auto if huge => (Mode::Pin, format!("auto: {why_huge}, pinning is cheap")),
        // Measured on an H100 (bench/results/h100-cold.json, 8 GiB of 4 KiB shmem pages):
        // pinning in 256 MiB pieces 1.01 s, pageable copies 1.48 s, 32 MiB pieces 1.53 s.
        Mode::Auto => (
            Mode::Pin,
            format!(
                "auto: {why_huge}; pinning 4 KiB pages is slow but still beat pageable copies \
                 (1.01 s vs 1.48 s for 8 GiB on an H100)"
            ),
        ),
        m => (m, format!("{ENV}={}; {why_huge}", m.name())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_strictly() {
        assert_eq!(Mode::parse("pin").ok(), Some(Mode::Pin));
        assert_eq!(Mode::parse(" pin-fine ").ok(), Some(Mode::PinFine));
        assert_eq!(Mode::parse("pageable").ok(), Some(Mode::Pageable));
        assert_eq!(Mode::parse("auto").ok(), Some(Mode::Auto));
        let err = Mode::parse("bounce")
            .err()
            .map(|e| e.message)
            .unwrap_or_default();
        assert!(
            err.contains("one of auto, pin, pin-fine, pageable"),
            "{err}"
        );
        assert!(Mode::parse("PIN").is_err());
    }

    #[test]
    fn reads_shmem_enabled() {
        assert!(shmem_thp("always within_size [advise] never deny force").0);
        assert!(!shmem_thp("always within_size advise [never] deny force").0);
        assert!(!shmem_thp("garbage").0);
    }

    #[test]
    fn auto_pins_as_measured() {
        assert_eq!(resolve(Mode::Auto, true, "x").0, Mode::Pin);
        assert_eq!(resolve(Mode::Auto, false, "x").0, Mode::Pin);
        assert_eq!(resolve(Mode::PinFine, false, "x").0, Mode::PinFine);
    }
}
