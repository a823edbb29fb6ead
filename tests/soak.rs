//! Soak on the emulator: `DEVMEM_SOAK_CYCLES` (default 1000) sleep/wake cycles with host RSS
//! growth under 16 MiB and no leaked handle, mapping, reservation, registered host range or
//! file descriptor.

mod common;

use std::ffi::c_void;

use common::*;
use devmem::ffi;

fn rss() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
        .expect("VmRSS")
        * 1024
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .count()
}

#[test]
fn a_thousand_cycles_leak_nothing() {
    setup(&[("DEVMEM_HOST_CHUNK_MB", "8")]);
    let cycles: usize = std::env::var("DEVMEM_SOAK_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let weights: Vec<u64> = (0..4).map(|_| alloc(2 * MIB, "w")).collect();
    let kv: Vec<u64> = (0..4).map(|_| alloc(2 * MIB, "kv")).collect();
    for (i, p) in weights.iter().enumerate() {
        fill(*p, 2 * MIB, i as u64);
    }
    // Warm up: the first cycles create the host store, streams and markers.
    for _ in 0..5 {
        ok(sleep(&["w"]));
        ok(wake(None));
    }
    let (rss0, fds0) = (rss(), open_fds());
    for cycle in 0..cycles {
        ok(sleep(&["w"]));
        ok(wake(None));
        // A transient allocation per cycle exercises malloc/free between cycles too.
        let t = alloc(2 * MIB, "transient");
        ok(ffi::devmem_free(t as *mut c_void));
        if cycle % 100 == 0 {
            for (i, p) in weights.iter().enumerate() {
                assert_eq!(mismatches(*p, 2 * MIB, i as u64), 0, "cycle {cycle}");
            }
        }
    }
    let growth = rss().saturating_sub(rss0);
    assert!(
        growth < 16 * MIB,
        "RSS grew by {growth} bytes over {cycles} cycles"
    );
    assert_eq!(open_fds(), fds0, "file descriptors leaked");
    free_all(&weights);
    free_all(&kv);
    release_store_and_assert_clean();
    eprintln!(
        "{cycles} cycles: RSS growth {growth} bytes, {} fds",
        open_fds()
    );
}
