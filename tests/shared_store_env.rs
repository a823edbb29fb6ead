//! The shared host store named by the environment (`DEVMEM_SHARED_STORE`) and an explicit
//! close: after `devmem_shared_store_close` the environment's region is not opened again by
//! this process, so later sleeps use private memory (neither the process's own rank "in use"
//! nor a second region file while the first is still mapped). Each test runs in its own
//! process (cargo nextest), with its own region directory.

mod common;

use std::ffi::CString;
use std::path::{Path, PathBuf};

use common::*;
use devmem::devmem_status;
use devmem::ffi::{self, devmem_shared_store_options};

/// Bytes per rank of the test regions: far more than the private store holds in these tests,
/// so `host_store_bytes` tells a region from private memory.
const REGION_BYTES: usize = 128 * MIB;

/// A directory of this test's own for its region files.
fn region_dir(label: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("devmem-shared-env-{}-{label}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("region directory");
    dir
}

/// Region files of the instance `name` anywhere under `dir`.
fn region_files(dir: &Path, name: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else if entry.file_name().to_string_lossy().contains(name) {
                found.push(path);
            }
        }
    }
    found
}

/// Points `DEVMEM_SHARED_STORE` at the instance `name` in `dir`; returns the name.
fn env_store(label: &str, dir: &Path, keep: bool) -> String {
    let name = format!("test-{}-{label}", std::process::id());
    let bytes = REGION_BYTES.to_string();
    let dir_text = dir.to_str().expect("a UTF-8 temp dir");
    let mut env = vec![
        ("DEVMEM_SHARED_STORE", name.as_str()),
        ("DEVMEM_SHARED_BYTES", bytes.as_str()),
        ("DEVMEM_SHARED_DIR", dir_text),
    ];
    if keep {
        env.push(("DEVMEM_SHARED_KEEP", "1"));
    }
    setup(&env);
    name
}

/// Frees `ptrs`, checks that nothing leaked and removes the test's region directory.
fn finish(ptrs: &[u64], dir: &Path) {
    free_all(ptrs);
    assert_no_violations();
    release_store_and_assert_clean();
    let _ = std::fs::remove_dir_all(dir);
}

/// Puts only the allocations of `list` to sleep (a sleep would discard the others).
fn offload(list: &[&str]) -> devmem_status {
    let (_owned, ptrs) = tags(list);
    ffi::devmem_offload(ptrs.as_ptr(), ptrs.len())
}

/// Sleeps `ptr`'s tag, checks where the backup went (the region or private memory), wakes and
/// checks the bytes.
#[track_caller]
fn cycle(ptr: u64, len: usize, seed: u64, tag: &str, in_region: bool) {
    ok(sleep(&[tag]));
    let held = stats(None).host_store_bytes;
    if in_region {
        assert!(
            held >= REGION_BYTES as u64,
            "not in the region: {held} bytes"
        );
    } else {
        assert!(
            held < REGION_BYTES as u64,
            "not in private memory: {held} bytes"
        );
    }
    ok(wake(None));
    assert_eq!(mismatches(ptr, len, seed), 0);
}

/// A kept region, closed while a backup is still in it: the next sleep used to reopen it and
/// fail "rank in use by another process" naming this very process; after a wake it silently
/// went back into the region.
#[test]
fn a_closed_kept_env_store_is_not_reopened_by_the_next_sleep() {
    let dir = region_dir("keep");
    let name = env_store("keep", &dir, true);
    let w = alloc(4 * MIB, "weights");
    let k = alloc(4 * MIB, "kv");
    fill(w, 4 * MIB, 1);
    fill(k, 4 * MIB, 5);
    ok(offload(&["weights"]));
    ok(ffi::devmem_shared_store_close());
    assert_eq!(region_files(&dir, &name).len(), 1, "the kept region stays");
    ok(offload(&["kv"]));
    ok(wake(None));
    assert_eq!(mismatches(w, 4 * MIB, 1), 0);
    assert_eq!(mismatches(k, 4 * MIB, 5), 0);
    cycle(w, 4 * MIB, 1, "weights", false);
    assert_eq!(region_files(&dir, &name).len(), 1);
    expect_err(
        ffi::devmem_shared_store_close(),
        devmem_status::InvalidState,
        "no shared store is open",
    );
    finish(&[w, k], &dir);
}

/// A region that is not kept, closed while a backup is still in it: the next sleep used to
/// create a second region file while the first was still mapped.
#[test]
fn a_closed_env_store_is_not_recreated_while_still_mapped() {
    let dir = region_dir("nokeep");
    let name = env_store("nokeep", &dir, false);
    let w = alloc(4 * MIB, "weights");
    let k = alloc(4 * MIB, "kv");
    fill(w, 4 * MIB, 2);
    fill(k, 4 * MIB, 3);
    ok(offload(&["weights"]));
    ok(ffi::devmem_shared_store_close());
    // The weights' backup keeps this process's mapping of the first region.
    ok(offload(&["kv"]));
    assert!(
        region_files(&dir, &name).is_empty(),
        "a region file after the close: {:?}",
        region_files(&dir, &name)
    );
    ok(wake(None));
    assert_eq!(mismatches(w, 4 * MIB, 2), 0);
    assert_eq!(mismatches(k, 4 * MIB, 3), 0);
    cycle(k, 4 * MIB, 3, "kv", false);
    assert!(region_files(&dir, &name).is_empty());
    finish(&[w, k], &dir);
}

/// After the close, an explicit open still opens a region (the environment's name or another).
#[test]
fn an_explicit_open_after_the_close_still_works() {
    let dir = region_dir("explicit");
    let name = env_store("explicit", &dir, false);
    let w = alloc(4 * MIB, "weights");
    fill(w, 4 * MIB, 4);
    cycle(w, 4 * MIB, 4, "weights", true);
    ok(ffi::devmem_shared_store_close());
    cycle(w, 4 * MIB, 4, "weights", false);
    let c_name = CString::new(name.as_str()).expect("name");
    let c_dir = CString::new(dir.to_str().expect("a UTF-8 temp dir")).expect("dir");
    let options = devmem_shared_store_options {
        name: c_name.as_ptr(),
        dir: c_dir.as_ptr(),
        bytes_per_rank: REGION_BYTES as u64,
        rank: 0,
        world: 1,
        flags: 0,
        timeout_ms: 2000,
    };
    ok(ffi::devmem_shared_store_open(&options));
    cycle(w, 4 * MIB, 4, "weights", true);
    ok(ffi::devmem_shared_store_close());
    assert!(region_files(&dir, &name).is_empty());
    finish(&[w], &dir);
}
