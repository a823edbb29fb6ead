//! The exports engines need beyond sleep and wake: trimming a caching allocator's free
//! segments for good (`devmem_trim`), waking everything except deferred tags
//! (`devmem_wake_up_except`, vLLM's wake rule) and reading host backups in place or by copy
//! (`devmem_backup_pointer`, `devmem_copy_backup`, torch_memory_saver's `get_cpu_backup`).

mod common;

use std::ffi::{c_int, c_void};
use std::ptr;

use common::*;
use devmem::{devmem_state, devmem_status, ffi};

#[test]
fn trim_releases_device_memory_but_keeps_the_reservation_until_free() {
    setup(&[]);
    let kept = alloc(4 * MIB, "weights");
    let p = alloc(6 * MIB, "weights");
    let used = emu().counters().used_bytes;
    let mut freed = 0usize;
    ok(ffi::devmem_trim(p as *mut c_void, &mut freed));
    assert_eq!(freed, 6 * MIB);
    let c = emu().counters();
    assert_eq!(
        c.used_bytes,
        used - 6 * MIB as u64,
        "device memory released"
    );
    assert_eq!(c.reservations, 2, "the trimmed range stays reserved");
    assert_eq!(emu().mapping(p), 0, "nothing mapped at the trimmed address");
    // Gone from lookups, statistics, sleep and wake.
    // SAFETY: zero is a valid value of the C struct.
    let mut info: devmem::devmem_allocation_info = unsafe { std::mem::zeroed() };
    expect_err(
        ffi::devmem_get_allocation_info(p as *const c_void, &mut info),
        devmem_status::UnknownPointer,
        "not inside any live",
    );
    let s = stats(Some("weights"));
    assert_eq!(
        (s.allocations.current, s.bytes.current),
        (1, 4 * MIB as u64)
    );
    ok(sleep(&["weights"]));
    ok(wake(None));
    assert_eq!(
        emu().mapping(p),
        0,
        "wake does not map a trimmed allocation"
    );
    // A second trim is an error that names the state; free then releases the range once.
    expect_err(
        ffi::devmem_trim(p as *mut c_void, ptr::null_mut()),
        devmem_status::InvalidState,
        "already trimmed",
    );
    ok(ffi::devmem_free(p as *mut c_void));
    assert_eq!(emu().counters().reservations, 1);
    expect_err(
        ffi::devmem_free(p as *mut c_void),
        devmem_status::UnknownPointer,
        "not a live devmem allocation",
    );
    free_all(&[kept]);
    assert_no_device_leaks();
}

#[test]
fn trim_of_an_offloaded_allocation_gives_its_backup_back() {
    setup(&[]);
    let p = alloc(4 * MIB, "w");
    fill(p, 4 * MIB, 3);
    ok(sleep(&["w"]));
    assert_eq!(stats(Some("w")).offloaded_bytes.current, 4 * MIB as u64);
    let mut freed = 1usize;
    ok(ffi::devmem_trim(p as *mut c_void, &mut freed));
    assert_eq!(freed, 0, "no device memory was held");
    assert_eq!(stats(Some("w")).offloaded_bytes.current, 0);
    ok(ffi::devmem_free(p as *mut c_void));
    release_store_and_assert_clean();
}

#[test]
fn trim_rejects_bad_pointers() {
    setup(&[]);
    expect_err(
        ffi::devmem_trim(ptr::null_mut(), ptr::null_mut()),
        devmem_status::NullPointer,
        "ptr is NULL",
    );
    let p = alloc(4 * MIB, "w");
    expect_err(
        ffi::devmem_trim((p + 4096) as *mut c_void, ptr::null_mut()),
        devmem_status::UnknownPointer,
        "not the start",
    );
    expect_err(
        ffi::devmem_trim(0x1000 as *mut c_void, ptr::null_mut()),
        devmem_status::UnknownPointer,
        "not the start",
    );
    free_all(&[p]);
    assert_no_device_leaks();
}

#[test]
fn trim_failure_leaves_the_allocation_mapped_with_its_bytes() {
    setup(&[]);
    let p = alloc(4 * MIB, "w");
    fill(p, 4 * MIB, 5);
    emu().inject("cuMemUnmap", 1, 1);
    let status = ffi::devmem_trim(p as *mut c_void, ptr::null_mut());
    assert_eq!(status, devmem_status::Driver, "{}", message());
    assert!(message().contains("trimming"), "{}", message());
    emu().clear_faults();
    assert_eq!(state(p), devmem_state::Mapped);
    assert_eq!(mismatches(p, 4 * MIB, 5), 0);
    ok(ffi::devmem_trim(p as *mut c_void, ptr::null_mut()));
    ok(ffi::devmem_free(p as *mut c_void));
    assert_no_device_leaks();
}

#[test]
fn wake_up_except_leaves_only_the_deferred_tags_asleep() {
    setup(&[]);
    let w = alloc(2 * MIB, "weights");
    let kv = alloc(2 * MIB, "kv_cache");
    let rt = alloc(2 * MIB, "runtime");
    let g = alloc(2 * MIB, "cudagraph");
    fill(w, 2 * MIB, 1);
    fill(rt, 2 * MIB, 2);
    fill(g, 2 * MIB, 3);
    ok(sleep(&["weights", "runtime", "cudagraph"]));
    // vLLM: wake_up(["weights"]) defers only kv_cache.
    let (_keep, list) = tags(&["kv_cache"]);
    ok(ffi::devmem_wake_up_except(list.as_ptr(), list.len()));
    assert_eq!(state(w), devmem_state::Mapped);
    assert_eq!(state(rt), devmem_state::Mapped);
    assert_eq!(state(g), devmem_state::Mapped);
    assert_eq!(state(kv), devmem_state::Discarded);
    assert_eq!(mismatches(w, 2 * MIB, 1), 0);
    assert_eq!(mismatches(rt, 2 * MIB, 2), 0);
    assert_eq!(mismatches(g, 2 * MIB, 3), 0);
    // No deferred tags: everything wakes.
    ok(ffi::devmem_wake_up_except(ptr::null(), 0));
    assert_eq!(state(kv), devmem_state::Mapped);
    expect_err(
        ffi::devmem_wake_up_except(ptr::null(), 2),
        devmem_status::NullPointer,
        "tags is NULL",
    );
    free_all(&[w, kv, rt, g]);
    assert_no_device_leaks();
}

#[test]
fn backups_are_readable_in_place_and_by_copy_while_offloaded() {
    setup(&[]);
    let p = alloc(6 * MIB, "w");
    fill(p, 6 * MIB, 7);
    let expected: Vec<u8> = (0..6 * MIB).map(|i| pattern(7, i)).collect();
    let mut host: *mut c_void = ptr::null_mut();
    // Mapped: no backup.
    ok(ffi::devmem_backup_pointer(
        p as *const c_void,
        4096,
        &mut host,
    ));
    assert!(host.is_null());
    let mut copied: c_int = 1;
    let mut buf = vec![0u8; 6 * MIB];
    ok(ffi::devmem_copy_backup(
        p as *const c_void,
        buf.len(),
        buf.as_mut_ptr().cast(),
        &mut copied,
    ));
    assert_eq!(copied, 0);
    ok(sleep(&["w"]));
    // The whole allocation by copy, across however many host pieces hold it.
    ok(ffi::devmem_copy_backup(
        p as *const c_void,
        buf.len(),
        buf.as_mut_ptr().cast(),
        &mut copied,
    ));
    assert_eq!(copied, 1);
    assert!(buf == expected, "copied backup differs");
    // A small range in place.
    let offset = 3 * MIB + 100;
    ok(ffi::devmem_backup_pointer(
        (p + offset as u64) as *const c_void,
        4096,
        &mut host,
    ));
    assert!(!host.is_null());
    // SAFETY: devmem returned a host address valid for 4096 bytes while offloaded.
    let view = unsafe { std::slice::from_raw_parts(host.cast::<u8>(), 4096) };
    assert_eq!(view, &expected[offset..offset + 4096]);
    expect_err(
        ffi::devmem_backup_pointer(p as *const c_void, 6 * MIB + 1, &mut host),
        devmem_status::InvalidArgument,
        "runs past",
    );
    expect_err(
        ffi::devmem_copy_backup(p as *const c_void, 0, buf.as_mut_ptr().cast(), &mut copied),
        devmem_status::InvalidArgument,
        "empty",
    );
    expect_err(
        ffi::devmem_copy_backup(
            0x1000 as *const c_void,
            1,
            buf.as_mut_ptr().cast(),
            &mut copied,
        ),
        devmem_status::UnknownPointer,
        "not inside",
    );
    expect_err(
        ffi::devmem_backup_pointer(p as *const c_void, 1, ptr::null_mut()),
        devmem_status::NullPointer,
        "must not be NULL",
    );
    ok(wake(None));
    ok(ffi::devmem_backup_pointer(
        p as *const c_void,
        4096,
        &mut host,
    ));
    assert!(host.is_null(), "no backup once awake");
    free_all(&[p]);
    assert_no_device_leaks();
}

#[test]
fn sleep_tags_offloads_discards_and_leaves_the_rest_mapped_in_one_pass() {
    setup(&[]);
    let w = alloc(4 * MIB, "weights");
    let kv = alloc(4 * MIB, "kv_cache");
    let other = alloc(4 * MIB, "other");
    fill(w, 4 * MIB, 11);
    fill(other, 4 * MIB, 12);
    let syncs = emu().calls("cuCtxSynchronize");
    let (_k, keep) = tags(&["weights"]);
    let (_d, drop) = tags(&["kv_cache"]);
    ok(ffi::devmem_sleep_tags(
        keep.as_ptr(),
        keep.len(),
        drop.as_ptr(),
        drop.len(),
    ));
    if !level_zero() {
        // Level Zero has no device-wide synchronise to count.
        assert_eq!(
            emu().calls("cuCtxSynchronize") - syncs,
            1,
            "one device synchronisation"
        );
    }
    assert_eq!(state(w), devmem_state::Offloaded);
    assert_eq!(state(kv), devmem_state::Discarded);
    assert_eq!(state(other), devmem_state::Mapped);
    assert_eq!(mismatches(other, 4 * MIB, 12), 0);
    // SAFETY: zero is a valid value of the C struct.
    let mut t: devmem::devmem_transfer = unsafe { std::mem::zeroed() };
    ok(ffi::devmem_get_last_transfer(&mut t));
    assert_eq!(
        (t.allocations, t.bytes_saved, t.bytes_discarded),
        (2, 4 * MIB as u64, 4 * MIB as u64)
    );
    ok(wake(None));
    assert_eq!(mismatches(w, 4 * MIB, 11), 0);
    let (_b, both) = tags(&["weights"]);
    expect_err(
        ffi::devmem_sleep_tags(both.as_ptr(), 1, both.as_ptr(), 1),
        devmem_status::InvalidArgument,
        "both to offload and to discard",
    );
    expect_err(
        ffi::devmem_sleep_tags(ptr::null(), 1, ptr::null(), 0),
        devmem_status::NullPointer,
        "NULL",
    );
    free_all(&[w, kv, other]);
    assert_no_device_leaks();
}
