//! The bound on host memory: before the store faults in a single new page, the request is
//! compared with what the machine and the process's memory cgroup can still give, and with an
//! optional cap. A request over the bound fails with `HOST_OUT_OF_MEMORY` and the numbers,
//! instead of the kernel's OOM killer ending the process halfway through.
//!
//! * `MemAvailable` from `/proc/meminfo`;
//! * the memory cgroup: v2 `memory.max - memory.current`, v1
//!   `memory.limit_in_bytes - memory.usage_in_bytes`, the smallest over the cgroup and its
//!   ancestors;
//! * the cap: `DEVMEM_HOST_LIMIT` (bytes, or with a K/M/G suffix) or
//!   `devmem_set_host_limit`; it bounds the bytes the store holds, not what it adds.
//!
//! A headroom of [`HEADROOM`] (or 1/16 of the smaller of the machine and cgroup figures, when
//! that is less) stays untouched for the rest of the process.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{bail, Result};

/// Bytes left to the rest of the process when the store grows up to the bound.
pub(crate) const HEADROOM: u64 = 256 << 20;
/// Environment variable with the cap on the bytes the host store holds.
pub(crate) const LIMIT_ENV: &str = "DEVMEM_HOST_LIMIT";

/// The cap set through the API: 0 unset (the environment decides), `u64::MAX` no cap.
static API_CAP: AtomicU64 = AtomicU64::new(0);

/// Sets the cap on the bytes the host store holds; 0 removes it (the environment variable is
/// then ignored too).
pub fn set_cap(bytes: u64) {
    API_CAP.store(if bytes == 0 { u64::MAX } else { bytes }, Ordering::SeqCst);
}

/// Parses "123", "64K", "512M", "2G" (binary units).
pub fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let (digits, shift) = match t.char_indices().last()? {
        (i, 'k' | 'K') => (&t[..i], 10),
        (i, 'm' | 'M') => (&t[..i], 20),
        (i, 'g' | 'G') => (&t[..i], 30),
        (i, 't' | 'T') => (&t[..i], 40),
        _ => (t, 0),
    };
    digits
        .trim()
        .parse::<u64>()
        .ok()?
        .checked_mul(1u64 << shift)
}

/// The cap in force: `None` when there is none.
pub fn cap() -> Result<Option<u64>> {
    match API_CAP.load(Ordering::SeqCst) {
        0 => {}
        u64::MAX => return Ok(None),
        bytes => return Ok(Some(bytes)),
    }
    match crate::env::text(LIMIT_ENV)? {
        None => Ok(None),
        Some(text) if text.trim().is_empty() => Ok(None),
        Some(text) => match parse_size(&text) {
            Some(0) => Ok(None),
            Some(bytes) => Ok(Some(bytes)),
            None => bail!(
                InvalidArgument,
                "{LIMIT_ENV}={text:?} is not a size (bytes, or a number with K, M, G or T)"
            ),
        },
    }
}

/// `MemAvailable` or `MemTotal` in bytes from the text of `/proc/meminfo`.
pub fn meminfo_field(text: &str, field: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(field)?.strip_prefix(':')?;
        let kib: u64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
        kib.checked_mul(1024)
    })
}

/// One cgroup level's figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CgroupRoom {
    /// The limit in force (the smallest over the levels read).
    pub limit: u64,
    /// Bytes the cgroup may still charge before its limit.
    pub room: u64,
}

fn read_number(path: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    let t = text.trim();
    if t == "max" {
        return Some(u64::MAX);
    }
    t.parse().ok()
}

/// The room left in the memory cgroup at `dir` and its ancestors up to `root`, with the file
/// names of cgroup v2 (`memory.max`, `memory.current`) or v1 (`memory.limit_in_bytes`,
/// `memory.usage_in_bytes`). `None` when no level has a limit.
pub fn cgroup_room(root: &Path, dir: &Path, v2: bool) -> Option<CgroupRoom> {
    let (max_file, current_file) = if v2 {
        ("memory.max", "memory.current")
    } else {
        ("memory.limit_in_bytes", "memory.usage_in_bytes")
    };
    let mut best: Option<CgroupRoom> = None;
    let mut level = Some(dir);
    while let Some(d) = level {
        if let (Some(max), Some(current)) = (
            read_number(&d.join(max_file)),
            read_number(&d.join(current_file)),
        ) {
            // cgroup v1 spells "no limit" as a page-rounded i64::MAX.
            if max < (1 << 62) {
                let room = max.saturating_sub(current);
                if best.is_none_or(|b| room < b.room) {
                    best = Some(CgroupRoom { limit: max, room });
                }
            }
        }
        if d == root {
            break;
        }
        level = d.parent().filter(|p| p.starts_with(root));
    }
    best
}

/// The memory cgroups of this process as (mount root, own directory, is v2), from the text of
/// `/proc/self/cgroup`, under the mount points cgroup2 and cgroup v1's memory controller use.
pub fn own_cgroups(proc_cgroup: &str, sys: &Path) -> Vec<(PathBuf, PathBuf, bool)> {
    let mut out = Vec::new();
    for line in proc_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let relative = path.trim_start_matches('/');
        let candidates: Vec<(PathBuf, bool)> = if controllers.is_empty() {
            vec![(sys.to_path_buf(), true), (sys.join("unified"), true)]
        } else if controllers.split(',').any(|c| c == "memory") {
            vec![(sys.join("memory"), false)]
        } else {
            continue;
        };
        for (root, v2) in candidates {
            let own = root.join(relative);
            // Inside a cgroup namespace the path may not exist under the mount: use its root.
            let dir = if own.is_dir() { own } else { root.clone() };
            let marker = if v2 {
                "memory.max"
            } else {
                "memory.limit_in_bytes"
            };
            if dir.join(marker).exists() || root.join(marker).exists() {
                out.push((root, dir, v2));
            }
        }
    }
    out
}

/// What the machine and the process's cgroups still allow, read now.
#[derive(Debug, Clone, Default)]
pub struct Room {
    /// `MemAvailable`.
    pub available: Option<u64>,
    /// `MemTotal`.
    pub total: Option<u64>,
    /// The tightest memory cgroup and its description.
    pub cgroup: Option<(CgroupRoom, String)>,
}

impl Room {
    /// Reads `/proc/meminfo`, `/proc/self/cgroup` and the cgroup files.
    pub fn read() -> Self {
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let proc_cgroup = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        let mut cgroup: Option<(CgroupRoom, String)> = None;
        for (root, dir, v2) in own_cgroups(&proc_cgroup, Path::new("/sys/fs/cgroup")) {
            if let Some(room) = cgroup_room(&root, &dir, v2) {
                if cgroup
                    .as_ref()
                    .is_none_or(|(best, _)| room.room < best.room)
                {
                    let what = format!(
                        "memory cgroup {} ({})",
                        dir.display(),
                        if v2 { "v2" } else { "v1" }
                    );
                    cgroup = Some((room, what));
                }
            }
        }
        Self {
            available: meminfo_field(&meminfo, "MemAvailable"),
            total: meminfo_field(&meminfo, "MemTotal"),
            cgroup,
        }
    }

    /// Bytes the store may add now: the smaller of the machine's and the cgroup's room, less
    /// the headroom. `None` when neither could be read.
    pub fn usable(&self) -> Option<u64> {
        let room = match (self.available, &self.cgroup) {
            (Some(a), Some((c, _))) => a.min(c.room),
            (Some(a), None) => a,
            (None, Some((c, _))) => c.room,
            (None, None) => return None,
        };
        let headroom = HEADROOM.min(room / 16);
        Some(room.saturating_sub(headroom))
    }

    fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(a) = self.available {
            parts.push(format!("MemAvailable is {a} bytes"));
        }
        if let Some((c, what)) = &self.cgroup {
            parts.push(format!(
                "the {what} has {} of its {} bytes left",
                c.room, c.limit
            ));
        }
        parts.join(", ")
    }
}

/// Checks that the store may fault in `adding` more bytes while it holds (or is preparing)
/// `holding` bytes. Fails with `HOST_OUT_OF_MEMORY`, with every figure in the message.
pub fn check(adding: u64, holding: u64, room: &Room) -> Result<()> {
    if let Some(total) = room.total {
        if adding > total {
            bail!(
                HostOutOfMemory,
                "{adding} bytes of host memory for backups is more than this machine has \
                 (MemTotal {total} bytes)"
            );
        }
    }
    if let Some(cap) = cap()? {
        if holding.saturating_add(adding) > cap {
            bail!(
                HostOutOfMemory,
                "the host store would hold {} bytes ({holding} now and {adding} more), over its \
                 cap of {cap} bytes ({LIMIT_ENV} or devmem_set_host_limit)",
                holding.saturating_add(adding)
            );
        }
    }
    if let Some(usable) = room.usable() {
        if adding > usable {
            bail!(
                HostOutOfMemory,
                "the host store needs {adding} more bytes of host memory, but only {usable} can \
                 be used without risking the OOM killer: {} (devmem leaves {HEADROOM} bytes \
                 or 1/16 of the room to the rest of the process)",
                room.describe()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sizes() {
        assert_eq!(parse_size("123"), Some(123));
        assert_eq!(parse_size("64K"), Some(64 << 10));
        assert_eq!(parse_size(" 512m "), Some(512 << 20));
        assert_eq!(parse_size("2G"), Some(2 << 30));
        assert_eq!(parse_size("lots"), None);
        assert_eq!(parse_size("99999999999999999999G"), None);
        assert_eq!(parse_size("17179869184G"), None, "overflows u64");
    }

    #[test]
    fn reads_meminfo() {
        let text = "MemTotal:       24576000 kB\nMemFree: 1 kB\nMemAvailable:   1048576 kB\n";
        assert_eq!(meminfo_field(text, "MemAvailable"), Some(1 << 30));
        assert_eq!(meminfo_field(text, "MemTotal"), Some(24576000 * 1024));
        assert_eq!(meminfo_field(text, "Missing"), None);
    }

    fn fake_tree(v2: bool, levels: &[(&str, &str, &str)]) -> (tempdir::Dir, PathBuf) {
        let dir = tempdir::Dir::new();
        let mut leaf = dir.path().to_path_buf();
        for (name, max, current) in levels {
            leaf = leaf.join(name);
            std::fs::create_dir_all(&leaf).expect("mkdir");
            let (m, c) = if v2 {
                ("memory.max", "memory.current")
            } else {
                ("memory.limit_in_bytes", "memory.usage_in_bytes")
            };
            std::fs::write(leaf.join(m), max).expect("write");
            std::fs::write(leaf.join(c), current).expect("write");
        }
        (dir, leaf)
    }

    /// A directory removed on drop (std has none; this is all the tests need).
    mod tempdir {
        pub struct Dir(std::path::PathBuf);
        impl Dir {
            pub fn new() -> Self {
                static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let p =
                    std::env::temp_dir().join(format!("devmem-bound-{}-{n}", std::process::id()));
                std::fs::create_dir_all(&p).expect("mkdir");
                Self(p)
            }
            pub fn path(&self) -> &std::path::Path {
                &self.0
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn cgroup_v2_takes_the_tightest_ancestor() {
        let (dir, leaf) = fake_tree(
            true,
            &[
                ("a", "max", "100"),
                ("b", "2000", "1500"),
                ("c", "max", "10"),
            ],
        );
        let room = cgroup_room(dir.path(), &leaf, true).expect("limited");
        assert_eq!(
            room,
            CgroupRoom {
                limit: 2000,
                room: 500
            }
        );
    }

    #[test]
    fn cgroup_v1_ignores_the_unlimited_value() {
        let (dir, leaf) = fake_tree(false, &[("x", "9223372036854771712", "5000")]);
        assert_eq!(cgroup_room(dir.path(), &leaf, false), None);
        let (dir, leaf) = fake_tree(false, &[("x", "1610612736", "1073741824")]);
        assert_eq!(
            cgroup_room(dir.path(), &leaf, false).map(|r| r.room),
            Some(1610612736 - 1073741824)
        );
    }

    #[test]
    fn finds_own_cgroups_of_both_versions() {
        let (dir, _leaf) = fake_tree(false, &[("memory", "1000", "10"), ("job", "1000", "10")]);
        std::fs::write(dir.path().join("memory.max"), "max").expect("v2 root");
        let found = own_cgroups("4:memory:/job\n0::/\n", dir.path());
        assert!(found
            .iter()
            .any(|(_, d, v2)| !v2 && d.ends_with("memory/job")));
        assert!(found.iter().any(|(_, _, v2)| *v2));
    }

    #[test]
    fn check_reports_every_figure() {
        let room = Room {
            available: Some(8 << 30),
            total: Some(16 << 30),
            cgroup: Some((
                CgroupRoom {
                    limit: 3 << 29,
                    room: 1 << 30,
                },
                "memory cgroup /job (v1)".into(),
            )),
        };
        check(512 << 20, 0, &room).expect("fits");
        let err = check(1 << 30, 0, &room).expect_err("over the cgroup room");
        assert_eq!(err.status, crate::devmem_status::HostOutOfMemory);
        assert!(err.message.contains("MemAvailable is 8589934592"), "{err}");
        assert!(err.message.contains("/job (v1) has 1073741824"), "{err}");
        let err = check(u64::MAX / 2, 0, &room).expect_err("absurd");
        assert!(err.message.contains("MemTotal"), "{err}");
        assert!(
            check(1, 0, &Room::default()).is_ok(),
            "nothing known: no bound"
        );
    }
}
