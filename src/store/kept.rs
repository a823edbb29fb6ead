//! kept: physical device memory held by the keeper (no copy: re-mapped).
//!
//! devmem hands the keeper (`devmem-keeper`, crate `devmem_keeper`) one POSIX file
//! descriptor per physical piece of each kept allocation, filed under a key (instance, rank,
//! world, tag) and described by an [`Entry`]: size, pieces, named ranges, device and a device
//! label. A later process attaches: it gets the descriptors back and maps them at its own
//! allocations' addresses (`core::adopt_allocation`). Entries are matched to allocations by
//! identity ([`match_entries`]), never by order.
//!
//! The keeper ties leases to the connection, so this module holds one process-wide
//! connection (opened on first use, close-on-exec, behind a mutex) for as long as the process
//! runs; a connection that breaks is dropped and the next call opens a new one.

use std::path::PathBuf;
use std::time::Duration;

use devmem_keeper::{Client, Entry, KeeperError, Key};
use parking_lot::Mutex;

use crate::error::{devmem_status, Error, Result};

/// Who is keeping or attaching: the identity the keeper files entries under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The instance name (as the shared store's region name).
    pub instance: String,
    /// This process's rank, below `world`.
    pub rank: u32,
    /// The number of ranks.
    pub world: u32,
}

/// How to reach the keeper.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// The keeper's socket (`None`: the keeper's default path).
    pub socket: Option<PathBuf>,
    /// The keeper binary to start when none runs (`None`: never start one).
    pub binary: Option<PathBuf>,
}

/// How long a started keeper gets to answer.
const SPAWN_TIMEOUT: Duration = Duration::from_secs(10);

/// The process-wide keeper connection and the keys it holds a lease on (taken by a keep or
/// an attach of this process; they end with the connection).
pub struct Connection {
    pub client: Client,
    pub leased: std::collections::HashSet<Key>,
}

static CONNECTION: Mutex<Option<Connection>> = Mutex::new(None);

impl Identity {
    /// Checks the identity: a non-empty instance, `rank < world`.
    pub fn validate(&self) -> Result<()> {
        if self.instance.is_empty() {
            return Err(Error::new(
                devmem_status::InvalidArgument,
                "the instance name is empty".to_string(),
            ));
        }
        if self.world == 0 || self.rank >= self.world {
            return Err(Error::new(
                devmem_status::InvalidArgument,
                format!(
                    "rank {} is not below world {}: ranks count from 0",
                    self.rank, self.world
                ),
            ));
        }
        Ok(())
    }

    /// The key of `tag` for this identity, checked by the keeper's own rules.
    pub fn key(&self, tag: &str) -> Result<Key> {
        self.validate()?;
        if tag.is_empty() {
            return Err(Error::new(
                devmem_status::InvalidTag,
                "an empty tag cannot be kept".to_string(),
            ));
        }
        let key = Key {
            instance: self.instance.clone(),
            rank: self.rank,
            world: self.world,
            tag: tag.to_string(),
        };
        key.validate()
            .map_err(|e| keeper_error(e, &format!("tag {tag:?}")))?;
        Ok(key)
    }
}

/// A keeper failure as a devmem error: `Unsupported` when no keeper runs, `InvalidState` when
/// it does not hold the key or another process holds its lease, `OutOfMemory` when it is full.
pub fn keeper_error(error: KeeperError, doing: &str) -> Error {
    let status = match &error {
        KeeperError::NotRunning(_) | KeeperError::Refused(_) => devmem_status::Unsupported,
        KeeperError::NotHeld(_) | KeeperError::Busy(_) => devmem_status::InvalidState,
        KeeperError::Full(_) => devmem_status::OutOfMemory,
        KeeperError::Invalid(_) => devmem_status::InvalidArgument,
        KeeperError::Io(_) => devmem_status::Driver,
    };
    Error::new(status, format!("{doing}: {error}"))
}

/// Runs `f` on the process-wide keeper connection (with the keys it holds leases on),
/// opening it first when there is none. A connection whose call fails with an I/O error is
/// dropped (its leases end).
pub fn with_connection<T>(
    options: &Options,
    doing: &str,
    f: impl FnOnce(&mut Connection) -> std::result::Result<T, KeeperError>,
) -> Result<T> {
    let mut slot = CONNECTION.lock();
    if slot.is_none() {
        let client = match (&options.socket, &options.binary) {
            (Some(socket), _) => Client::connect_at(socket),
            (None, Some(binary)) => Client::connect_or_spawn(binary, SPAWN_TIMEOUT),
            (None, None) => Client::connect(),
        };
        *slot = Some(Connection {
            client: client.map_err(|e| keeper_error(e, doing))?,
            leased: Default::default(),
        });
    }
    let Some(conn) = slot.as_mut() else {
        return Err(Error::new(
            devmem_status::InvalidState,
            format!("{doing}: no keeper connection"),
        ));
    };
    let out = f(conn);
    if let Err(KeeperError::Io(_)) = &out {
        *slot = None;
    }
    out.map_err(|e| keeper_error(e, doing))
}

/// Drops the process-wide connection (its leases end).
#[allow(dead_code)] // for the FFI to come (devmem_keeper_disconnect)
pub fn disconnect() {
    CONNECTION.lock().take();
}

/// One allocation of this process, as matching sees it.
#[derive(Debug, Clone)]
pub struct Local {
    pub va: u64,
    pub size: u64,
    pub device: i32,
    pub names: Vec<(String, u64, u64)>,
}

fn sorted(names: &[(String, u64, u64)]) -> Vec<(String, u64, u64)> {
    let mut v = names.to_vec();
    v.sort();
    v
}

/// Pairs each kept entry of `tag` with the one local allocation that has exactly its named
/// ranges (a name may be in one allocation only), its size and its device (and device label,
/// `label(device)`). Every kept entry and every named local allocation must be paired;
/// otherwise nothing is paired and the error (`REGION`) lists what is missing, extra or
/// mismatched. Returns (entry index, local index) pairs.
pub fn match_entries(
    tag: &str,
    kept: &[Entry],
    local: &[Local],
    label: impl Fn(i32) -> String,
) -> Result<Vec<(usize, usize)>> {
    let (mut missing, mut mismatched) = (Vec::new(), Vec::new());
    let mut used = vec![false; local.len()];
    let mut pairs = Vec::new();
    for (i, entry) in kept.iter().enumerate() {
        let names = sorted(&entry.names);
        let found = local
            .iter()
            .enumerate()
            .find(|(j, l)| !used[*j] && sorted(&l.names) == names);
        let Some((j, l)) = found else {
            missing.push(format!(
                "{} byte(s) named {:?}",
                entry.size,
                names.iter().map(|n| &n.0).collect::<Vec<_>>()
            ));
            continue;
        };
        used[j] = true;
        if l.size != entry.size {
            mismatched.push(format!(
                "{:?}: kept {} bytes, here {} bytes",
                names.first().map(|n| &n.0),
                entry.size,
                l.size
            ));
        } else if l.device != entry.device || label(l.device) != entry.device_label {
            mismatched.push(format!(
                "{:?}: kept on {} (device {}), here on {} (device {})",
                names.first().map(|n| &n.0),
                entry.device_label,
                entry.device,
                label(l.device),
                l.device
            ));
        } else {
            pairs.push((i, j));
        }
    }
    let extra: Vec<String> = local
        .iter()
        .zip(&used)
        .filter(|(l, used)| !**used && !l.names.is_empty())
        .map(|(l, _)| format!("{:#x} ({} bytes, {} name(s))", l.va, l.size, l.names.len()))
        .collect();
    if missing.is_empty() && mismatched.is_empty() && extra.is_empty() {
        return Ok(pairs);
    }
    let mut parts = Vec::new();
    if !missing.is_empty() {
        parts.push(format!(
            "kept but not allocated here: {}",
            missing.join(", ")
        ));
    }
    if !mismatched.is_empty() {
        parts.push(format!("mismatched: {}", mismatched.join(", ")));
    }
    if !extra.is_empty() {
        parts.push(format!("named here but not kept: {}", extra.join(", ")));
    }
    Err(Error::new(
        devmem_status::Region,
        format!(
            "the keeper's tag {tag:?} does not match this process's allocations; nothing was \
             mapped: {}",
            parts.join("; ")
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(size: u64, names: &[(&str, u64, u64)]) -> Entry {
        Entry {
            size,
            pieces: vec![size],
            names: names
                .iter()
                .map(|(n, o, l)| (n.to_string(), *o, *l))
                .collect(),
            device: 0,
            device_label: "cuda:0".into(),
            meta: String::new(),
        }
    }

    fn local(va: u64, size: u64, names: &[(&str, u64, u64)]) -> Local {
        Local {
            va,
            size,
            device: 0,
            names: names
                .iter()
                .map(|(n, o, l)| (n.to_string(), *o, *l))
                .collect(),
        }
    }

    fn label(d: i32) -> String {
        format!("cuda:{d}")
    }

    #[test]
    fn matches_by_names_not_order() {
        let kept = [entry(2, &[("b", 0, 2)]), entry(4, &[("a", 0, 4)])];
        let here = [local(10, 4, &[("a", 0, 4)]), local(20, 2, &[("b", 0, 2)])];
        let pairs = match_entries("w", &kept, &here, label).expect("match");
        assert_eq!(pairs, vec![(0, 1), (1, 0)]);
    }

    #[test]
    fn refuses_swapped_sizes_missing_and_extra_names() {
        let kept = [entry(2, &[("a", 0, 2)]), entry(4, &[("b", 0, 4)])];
        let swapped = [local(10, 4, &[("a", 0, 2)]), local(20, 2, &[("b", 0, 4)])];
        let err = match_entries("w", &kept, &swapped, label).expect_err("sizes");
        assert_eq!(err.status, devmem_status::Region);
        assert!(err.message.contains("mismatched"), "{err}");
        let missing = [local(10, 2, &[("a", 0, 2)])];
        let err = match_entries("w", &kept, &missing, label).expect_err("missing");
        assert!(err.message.contains("not allocated here"), "{err}");
        let extra = [
            local(10, 2, &[("a", 0, 2)]),
            local(20, 4, &[("b", 0, 4)]),
            local(30, 4, &[("c", 0, 4)]),
        ];
        let err = match_entries("w", &kept, &extra, label).expect_err("extra");
        assert!(err.message.contains("not kept"), "{err}");
        let moved = [local(10, 2, &[("a", 0, 2)]), local(20, 4, &[("b", 2, 2)])];
        assert!(match_entries("w", &kept, &moved, label).is_err());
    }

    #[test]
    fn refuses_another_device() {
        let kept = [entry(2, &[("a", 0, 2)])];
        let mut here = [local(10, 2, &[("a", 0, 2)])];
        here[0].device = 1;
        let err = match_entries("w", &kept, &here, label).expect_err("device");
        assert!(err.message.contains("device 1"), "{err}");
    }

    #[test]
    fn identity_is_checked() {
        let id = |instance: &str, rank, world| Identity {
            instance: instance.into(),
            rank,
            world,
        };
        assert!(id("", 0, 1).validate().is_err());
        assert!(id("x", 1, 1).validate().is_err());
        assert!(id("x", 0, 0).validate().is_err());
        assert!(id("x", 0, 1).key("").is_err());
        assert!(id("x", 1, 2).key("weights").is_ok());
    }
}
