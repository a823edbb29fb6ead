//! The shared host store (one region per instance under /dev/shm, shared by its ranks and
//! kept across restarts), durable restore, and read-only tags whose sleep skips the copy.
//! Run against both emulator faces; tests named `cuda_only_` need the device checksum, those
//! named `needs_setpriv_` act as another user.

mod common;

use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use common::*;
use devmem::ffi::{self, devmem_shared_store_options, DEVMEM_SHARED_KEEP, DEVMEM_SHARED_RECLAIM};
use devmem::{devmem_read_only, devmem_state, devmem_status, devmem_transfer};

/// A region name no other test (or test run) uses.
fn unique(label: &str) -> String {
    format!("test-{}-{label}", std::process::id())
}

fn region_path(name: &str, dir: Option<&Path>) -> PathBuf {
    dir.unwrap_or(Path::new("/dev/shm"))
        .join(format!("devmem-{name}.region"))
}

struct Open<'a> {
    name: &'a str,
    dir: Option<&'a Path>,
    bytes: u64,
    rank: u32,
    world: u32,
    flags: u32,
    timeout_ms: u32,
}

impl<'a> Open<'a> {
    fn new(name: &'a str) -> Self {
        Self {
            name,
            dir: None,
            bytes: 64 * MIB as u64,
            rank: 0,
            world: 1,
            flags: 0,
            timeout_ms: 2000,
        }
    }

    fn call(&self) -> devmem_status {
        let name = CString::new(self.name).expect("name");
        let dir = self
            .dir
            .map(|d| CString::new(d.to_str().expect("utf-8 dir")).expect("dir"));
        let options = devmem_shared_store_options {
            name: name.as_ptr(),
            dir: dir.as_ref().map_or(std::ptr::null(), |d| d.as_ptr()),
            bytes_per_rank: self.bytes,
            rank: self.rank,
            world: self.world,
            flags: self.flags,
            timeout_ms: self.timeout_ms,
        };
        ffi::devmem_shared_store_open(&options)
    }
}

fn restore(list: &[&str]) -> devmem_status {
    let (_owned, ptrs) = tags(list);
    ffi::devmem_restore_from_store(ptrs.as_ptr(), ptrs.len())
}

fn read_only(tag: &str, mode: devmem_read_only) -> devmem_status {
    let tag = CString::new(tag).expect("tag");
    ffi::devmem_set_read_only(tag.as_ptr(), mode as i32)
}

fn last_transfer() -> devmem_transfer {
    let mut t = devmem_transfer::default();
    ok(ffi::devmem_get_last_transfer(&mut t));
    t
}

fn fill_byte(ptr: u64, len: usize, byte: u8) {
    // SAFETY: emulated device memory is host memory, mapped read-write while awake.
    unsafe { std::ptr::write_bytes(ptr as *mut u8, byte, len) };
}

/// Starts the ignored test `name` of this binary in a child process with `env`.
fn spawn_child(name: &str, env: &[(&str, &str)]) -> Child {
    child_test_command(&[], name, env)
        .spawn()
        .expect("child process")
}

fn wait_child(child: Child, what: &str) {
    let status = wait_for_child(child, Duration::from_secs(120), what);
    assert!(status.success(), "{what} failed: {status}");
}

fn wait_for_file(path: &Path) {
    let start = Instant::now();
    while !path.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set"))
}

// --- One process ----------------------------------------------------------------------------

/// Backups go to the region while it is open; the last user's close removes the file.
#[test]
fn sleep_and_wake_through_the_region_then_close_removes_it() {
    setup(&[]);
    let name = unique("roundtrip");
    let path = region_path(&name, None);
    ok(Open::new(&name).call());
    assert!(path.exists());
    let w = alloc(8 * MIB, "weights");
    let k = alloc(4 * MIB, "kv");
    fill(w, 8 * MIB, 1);
    fill(k, 4 * MIB, 2);
    ok(sleep(&["weights", "kv"]));
    assert!(stats(None).host_store_bytes >= 64 * MIB as u64);
    assert_eq!(state(w), devmem_state::Offloaded);
    ok(wake(None));
    assert_eq!(mismatches(w, 8 * MIB, 1), 0);
    assert_eq!(mismatches(k, 4 * MIB, 2), 0);
    ok(ffi::devmem_shared_store_close());
    assert!(!path.exists(), "the last user's close removes the region");
    expect_err(
        ffi::devmem_shared_store_close(),
        devmem_status::InvalidState,
        "no shared store is open",
    );
    // Private memory again after the close.
    ok(sleep(&["weights"]));
    ok(wake(None));
    assert_eq!(mismatches(w, 8 * MIB, 1), 0);
    free_all(&[w, k]);
    assert_no_violations();
    release_store_and_assert_clean();
}

/// Backups still in the region when it is closed stay valid for this process.
#[test]
fn backups_outlive_the_close_in_this_process() {
    setup(&[]);
    let name = unique("outlive");
    ok(Open::new(&name).call());
    let w = alloc(8 * MIB, "weights");
    fill(w, 8 * MIB, 3);
    ok(sleep(&["weights"]));
    ok(ffi::devmem_shared_store_close());
    assert!(!region_path(&name, None).exists());
    ok(wake(None));
    assert_eq!(mismatches(w, 8 * MIB, 3), 0);
    free_all(&[w]);
    assert_no_violations();
}

/// Names, sizes, ranks and flags are checked before anything is created.
#[test]
fn bad_options_are_clear_errors() {
    setup(&[]);
    for (bad, needle) in [
        ("", "1 to 128 bytes"),
        ("a/b", "'/' or '..'"),
        ("..", "'/' or '..'"),
        ("a..b", "'/' or '..'"),
        ("with space", "printable ASCII"),
    ] {
        expect_err(
            Open::new(bad).call(),
            devmem_status::InvalidArgument,
            needle,
        );
    }
    let long = "x".repeat(129);
    expect_err(
        Open::new(&long).call(),
        devmem_status::InvalidArgument,
        "1 to 128 bytes",
    );
    let name = unique("bad");
    let mut o = Open::new(&name);
    o.rank = 2;
    o.world = 2;
    expect_err(
        o.call(),
        devmem_status::InvalidArgument,
        "rank 2 is not below",
    );
    let mut o = Open::new(&name);
    o.bytes = 0;
    expect_err(
        o.call(),
        devmem_status::InvalidArgument,
        "bytes per rank is 0",
    );
    let mut o = Open::new(&name);
    o.bytes = u64::MAX;
    expect_err(o.call(), devmem_status::InvalidArgument, "overflow");
    let mut o = Open::new(&name);
    o.flags = 8;
    expect_err(o.call(), devmem_status::InvalidArgument, "unknown bits");
    expect_err(
        ffi::devmem_shared_store_open(std::ptr::null()),
        devmem_status::NullPointer,
        "options is NULL",
    );
    assert!(!region_path(&name, None).exists());
    ok(Open::new(&name).call());
    expect_err(
        Open::new(&name).call(),
        devmem_status::InvalidState,
        "already open",
    );
    ok(ffi::devmem_shared_store_close());
    expect_err(
        restore(&["weights"]),
        devmem_status::InvalidState,
        "no shared store is open",
    );
}

/// A symbolic link planted at the region's path is refused, never followed.
#[test]
fn a_symlink_at_the_path_is_refused() {
    setup(&[]);
    let name = unique("symlink");
    let path = region_path(&name, None);
    let target = std::env::temp_dir().join(format!("{name}-target"));
    std::fs::write(&target, b"not a region").expect("target");
    std::os::unix::fs::symlink(&target, &path).expect("symlink");
    expect_err(
        Open::new(&name).call(),
        devmem_status::Region,
        "is a symbolic link; refused",
    );
    assert_eq!(std::fs::read(&target).expect("target"), b"not a region");
    std::fs::remove_file(&path).expect("remove link");
    std::fs::remove_file(&target).expect("remove target");
}

/// A region file with another mode than 0600 is refused.
#[test]
fn a_region_with_another_mode_is_refused() {
    setup(&[]);
    let name = unique("mode");
    let path = region_path(&name, None);
    ok(Open::new(&name).with_flags(DEVMEM_SHARED_KEEP).call());
    ok(ffi::devmem_shared_store_close());
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    expect_err(
        Open::new(&name).call(),
        devmem_status::Region,
        "has mode 644, not 600",
    );
    std::fs::remove_file(&path).expect("remove");
}

impl Open<'_> {
    fn with_flags(mut self, flags: u32) -> Self {
        self.flags = flags;
        self
    }
}

/// A kept region whose header was damaged is refused with what is wrong, and never touched.
#[test]
fn a_corrupt_or_truncated_header_is_refused() {
    setup(&[]);
    let name = unique("corrupt");
    let path = region_path(&name, None);
    let make = || {
        let _ = std::fs::remove_file(&path);
        ok(Open::new(&name).with_flags(DEVMEM_SHARED_KEEP).call());
        ok(ffi::devmem_shared_store_close());
        assert!(path.exists(), "a kept region stays");
    };
    let patch = |offset: u64, bytes: &[u8]| {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open");
        f.write_all_at(bytes, offset).expect("patch");
    };
    make();
    patch(0, b"NOTDEVMM");
    expect_err(Open::new(&name).call(), devmem_status::Region, "bad magic");
    make();
    patch(8, &7u32.to_le_bytes()); // version
    expect_err(
        Open::new(&name).call(),
        devmem_status::Region,
        "has version 7",
    );
    make();
    patch(48, &3u32.to_le_bytes()); // world: inconsistent with the sizes
    expect_err(
        Open::new(&name).call(),
        devmem_status::Region,
        "corrupt header",
    );
    make();
    let len = std::fs::metadata(&path).expect("meta").len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open")
        .set_len(len - 2 * MIB as u64)
        .expect("truncate");
    expect_err(
        Open::new(&name).call(),
        devmem_status::Region,
        "truncated or corrupt",
    );
    // A file too short for a header: its creator never finished.
    std::fs::write(&path, b"short").expect("short");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let mut o = Open::new(&name);
    o.timeout_ms = 200;
    expect_err(
        o.call(),
        devmem_status::Region,
        "was not initialised within",
    );
    std::fs::remove_file(&path).expect("remove");
}

/// A left-over region with another layout is never reused: an error, or with RECLAIM (and no
/// process using it) replaced by a new one.
#[test]
fn another_layout_is_refused_or_replaced_with_reclaim() {
    setup(&[]);
    let name = unique("layout");
    let path = region_path(&name, None);
    ok(Open::new(&name).with_flags(DEVMEM_SHARED_KEEP).call());
    ok(ffi::devmem_shared_store_close());
    let mut bigger = Open::new(&name);
    bigger.bytes = 128 * MIB as u64;
    expect_err(
        bigger.call(),
        devmem_status::Region,
        "has a different layout",
    );
    bigger.flags = DEVMEM_SHARED_RECLAIM;
    ok(bigger.call());
    let len = std::fs::metadata(&path).expect("meta").len();
    assert_eq!(len, 2 * MIB as u64 + 128 * MIB as u64);
    ok(ffi::devmem_shared_store_close());
    assert!(!path.exists());
}

/// Two instances with different names use different files and never see each other's bytes.
#[test]
fn instances_with_different_names_never_collide() {
    setup(&[]);
    let (a, b) = (unique("one"), unique("two"));
    let w = alloc(4 * MIB, "weights");
    fill(w, 4 * MIB, 5);
    ok(Open::new(&a).with_flags(DEVMEM_SHARED_KEEP).call());
    ok(sleep(&["weights"]));
    ok(wake(None));
    ok(ffi::devmem_shared_store_close());
    ok(Open::new(&b).call());
    assert!(region_path(&a, None).exists() && region_path(&b, None).exists());
    expect_err(
        restore(&["weights"]),
        devmem_status::Region,
        "holds no copy of tag \"weights\" #0",
    );
    ok(ffi::devmem_shared_store_close());
    assert!(!region_path(&b, None).exists());
    std::fs::remove_file(region_path(&a, None)).expect("remove a");
    free_all(&[w]);
}

/// Host memory that does not allow the rank's area fails the open with HOST_OUT_OF_MEMORY
/// before a page is touched, and leaves no file behind.
#[test]
fn host_out_of_memory_while_creating_the_region() {
    setup(&[("DEVMEM_HOST_LIMIT", "16M")]);
    let name = unique("oom");
    expect_err(
        Open::new(&name).call(),
        devmem_status::HostOutOfMemory,
        "shared store: reserving this rank's area",
    );
    assert!(!region_path(&name, None).exists());
    let mut small = Open::new(&name);
    small.bytes = 8 * MIB as u64;
    ok(small.call());
    ok(ffi::devmem_shared_store_close());
}

/// The environment form opens the region at the first sleep; invalid values are errors.
#[test]
fn the_environment_opens_the_region_and_checks_its_values() {
    let name = unique("env");
    setup(&[("DEVMEM_SHARED_STORE", &name)]);
    let w = alloc(4 * MIB, "weights");
    fill(w, 4 * MIB, 6);
    expect_err(
        sleep(&["weights"]),
        devmem_status::InvalidArgument,
        "needs DEVMEM_SHARED_BYTES",
    );
    assert_eq!(state(w), devmem_state::Mapped);
    std::env::set_var("DEVMEM_SHARED_BYTES", "lots");
    expect_err(
        sleep(&["weights"]),
        devmem_status::InvalidArgument,
        "DEVMEM_SHARED_BYTES=\"lots\" is not valid",
    );
    std::env::set_var("DEVMEM_SHARED_BYTES", "32M");
    ok(sleep(&["weights"]));
    assert!(region_path(&name, None).exists());
    ok(wake(None));
    assert_eq!(mismatches(w, 4 * MIB, 6), 0);
    ok(ffi::devmem_shared_store_close());
    assert!(!region_path(&name, None).exists());
    free_all(&[w]);
}

/// 1,000 open / sleep / wake / close cycles leave nothing in /dev/shm and leak nothing.
#[test]
fn soak_of_1000_cycles_leaves_nothing_behind() {
    setup(&[]);
    let name = unique("soak");
    let w = alloc(2 * MIB, "weights");
    for cycle in 0..1000u64 {
        let mut o = Open::new(&name);
        o.bytes = 4 * MIB as u64;
        ok(o.call());
        fill(w, 2 * MIB, cycle);
        ok(sleep(&["weights"]));
        ok(wake(None));
        assert_eq!(mismatches(w, 2 * MIB, cycle), 0, "cycle {cycle}");
        ok(ffi::devmem_shared_store_close());
    }
    let prefix = format!("devmem-{name}");
    let left: Vec<_> = std::fs::read_dir("/dev/shm")
        .expect("/dev/shm")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .collect();
    assert!(left.is_empty(), "left in /dev/shm: {left:?}");
    free_all(&[w]);
    assert_no_violations();
    release_store_and_assert_clean();
}

// --- Read-only tags -------------------------------------------------------------------------

/// A read-only tag is copied once; later sleeps only unmap, and wake restores the same bytes.
/// Bytes written after the declaration are not saved (documented): the wake brings back the
/// earlier copy. Turning it off makes the next sleep copy again.
#[test]
fn read_only_tags_sleep_without_a_copy() {
    setup(&[]);
    let w = alloc(8 * MIB, "weights");
    let k = alloc(4 * MIB, "kv");
    fill(w, 8 * MIB, 7);
    ok(read_only("weights", devmem_read_only::On));
    ok(ffi::devmem_sleep_tags(
        tags(&["weights"]).1.as_ptr(),
        1,
        tags(&["kv"]).1.as_ptr(),
        1,
    ));
    assert_eq!(last_transfer().bytes_saved, 8 * MIB as u64);
    ok(wake(None));
    assert_eq!(mismatches(w, 8 * MIB, 7), 0);
    for _ in 0..3 {
        ok(sleep(&["weights"]));
        let t = last_transfer();
        assert_eq!(t.bytes_saved, 0, "no copy for an unchanged read-only tag");
        assert_eq!(t.bytes_skipped, 8 * MIB as u64);
        assert_eq!(t.bytes_freed, 12 * MIB as u64);
        assert_eq!(state(w), devmem_state::Offloaded);
        ok(wake(None));
        assert_eq!(mismatches(w, 8 * MIB, 7), 0);
    }
    // Written anyway: the next sleep does not see it.
    fill_byte(w, 8 * MIB, 0xee);
    ok(sleep(&["weights"]));
    ok(wake(None));
    assert_eq!(mismatches(w, 8 * MIB, 7), 0, "the earlier copy comes back");
    // Off: the kept copy is dropped and the next sleep copies.
    ok(read_only("weights", devmem_read_only::Off));
    fill(w, 8 * MIB, 8);
    ok(sleep(&["weights"]));
    assert_eq!(last_transfer().bytes_saved, 8 * MIB as u64);
    ok(wake(None));
    assert_eq!(mismatches(w, 8 * MIB, 8), 0);
    let mut mode = devmem_read_only::On;
    let tag = CString::new("weights").expect("tag");
    ok(ffi::devmem_get_read_only(tag.as_ptr(), &mut mode));
    assert_eq!(mode, devmem_read_only::Off);
    expect_err(
        ffi::devmem_set_read_only(tag.as_ptr(), 9),
        devmem_status::InvalidArgument,
        "not a devmem_read_only value",
    );
    expect_err(
        ffi::devmem_set_read_only(std::ptr::null(), 1),
        devmem_status::InvalidTag,
        "tag is NULL",
    );
    expect_err(
        ffi::devmem_get_read_only(tag.as_ptr(), std::ptr::null_mut()),
        devmem_status::NullPointer,
        "out is NULL",
    );
    expect_err(
        ffi::devmem_restore_from_store(std::ptr::null(), 1),
        devmem_status::NullPointer,
        "tags is NULL but n is 1",
    );
    expect_err(
        ffi::devmem_restore_from_store(std::ptr::null(), 0),
        devmem_status::InvalidArgument,
        "no tags given",
    );
    free_all(&[w, k]);
    assert_no_violations();
    release_store_and_assert_clean();
}

/// With verification each sleep compares a device checksum with the kept copy's: unchanged
/// bytes skip the copy, changed ones are copied again and counted. Level Zero has no device
/// checksum: asking for verification there is UNSUPPORTED.
#[test]
fn read_only_with_verification_copies_changed_bytes_again() {
    setup(&[]);
    let w = alloc(8 * MIB, "weights");
    fill(w, 8 * MIB, 9);
    if !has_checksum() {
        expect_err(
            read_only("weights", devmem_read_only::Verify),
            devmem_status::Unsupported,
            "has no device checksum",
        );
        free_all(&[w]);
        return;
    }
    ok(read_only("weights", devmem_read_only::Verify));
    ok(sleep(&["weights"]));
    assert_eq!(last_transfer().bytes_saved, 8 * MIB as u64);
    ok(wake(None));
    ok(sleep(&["weights"]));
    let t = last_transfer();
    assert_eq!(
        (t.bytes_saved, t.bytes_skipped, t.verify_mismatches),
        (0, 8 * MIB as u64, 0)
    );
    ok(wake(None));
    // One byte changes: the checksum sees it.
    fill_byte(w + 4096, 1, 0x5c);
    ok(sleep(&["weights"]));
    let t = last_transfer();
    assert_eq!(
        (t.bytes_saved, t.bytes_skipped, t.verify_mismatches),
        (8 * MIB as u64, 0, 1)
    );
    ok(wake(None));
    // SAFETY: emulated device memory is host memory.
    assert_eq!(
        unsafe { *((w + 4096) as *const u8) },
        0x5c,
        "the new byte was saved"
    );
    assert!(emu().calls("cuLaunchKernel") >= 3);
    free_all(&[w]);
    assert_no_violations();
    release_store_and_assert_clean();
}

// --- Several processes ----------------------------------------------------------------------

/// The writer half of the durable-restart test: sleeps into a kept region and exits without
/// closing it.
#[test]
#[ignore = "run by durable_sleep_survives_a_restart"]
fn durable_writer() {
    setup(&[]);
    let name = env("DEVMEM_TEST_REGION");
    ok(Open::new(&name).with_flags(DEVMEM_SHARED_KEEP).call());
    let sizes = [8 * MIB, 4 * MIB, 2 * MIB];
    let ptrs: Vec<u64> = sizes.iter().map(|s| alloc(*s, "weights")).collect();
    for (i, (p, s)) in ptrs.iter().zip(sizes).enumerate() {
        fill(*p, s, 100 + i as u64);
    }
    let kv = alloc(4 * MIB, "kv");
    fill(kv, 4 * MIB, 200);
    ok(sleep(&["weights", "kv"]));
    // Exits asleep, without closing: the kept region holds the bytes.
}

/// The reader half: a new process allocates the same tags and sizes and restores them.
#[test]
#[ignore = "run by durable_sleep_survives_a_restart"]
fn durable_reader() {
    setup(&[]);
    let name = env("DEVMEM_TEST_REGION");
    ok(Open::new(&name).call());
    let sizes = [8 * MIB, 4 * MIB, 2 * MIB];
    let ptrs: Vec<u64> = sizes.iter().map(|s| alloc(*s, "weights")).collect();
    let kv = alloc(6 * MIB, "kv"); // stored with 4 MiB
    expect_err(
        restore(&["kv"]),
        devmem_status::Region,
        "has 4194304 bytes; the allocation has 6291456",
    );
    expect_err(
        restore(&["missing"]),
        devmem_status::InvalidArgument,
        "no live allocation has the tag",
    );
    let extra = alloc(2 * MIB, "weights"); // index 3: never stored
    fill(ptrs[0], 8 * MIB, 1);
    expect_err(
        restore(&["weights"]),
        devmem_status::Region,
        "holds no copy of tag \"weights\" #3",
    );
    assert_eq!(
        mismatches(ptrs[0], 8 * MIB, 1),
        0,
        "nothing copied on a mismatch"
    );
    free_all(&[extra]);
    ok(read_only("weights", devmem_read_only::On));
    ok(restore(&["weights"]));
    assert_eq!(last_transfer().bytes_restored, 14 * MIB as u64);
    for (i, (p, s)) in ptrs.iter().zip(sizes).enumerate() {
        assert_eq!(mismatches(*p, s, 100 + i as u64), 0, "weights #{i}");
    }
    // Read-only: the stored copy is now the kept host copy; the next sleep skips the copy.
    ok(sleep(&["weights"]));
    assert_eq!(last_transfer().bytes_skipped, 14 * MIB as u64);
    ok(wake(None));
    assert_eq!(mismatches(ptrs[2], 2 * MIB, 102), 0);
    free_all(&ptrs);
    free_all(&[kv]);
    ok(ffi::devmem_shared_store_close());
    assert_no_violations();
}

/// Durable sleep: a process sleeps into a kept region and exits; a new process allocates the
/// same tags and sizes, restores them and gets identical bytes. Mismatches are clear errors
/// and copy nothing. The reader did not keep the region, so its close removes it.
#[test]
fn durable_sleep_survives_a_restart() {
    setup(&[]);
    let name = unique("durable");
    let path = region_path(&name, None);
    let e = [("DEVMEM_TEST_REGION", name.as_str())];
    run_child_test(&[], "durable_writer", &e, Duration::from_secs(120));
    assert!(path.exists(), "a kept region outlives its process");
    run_child_test(&[], "durable_reader", &e, Duration::from_secs(120));
    assert!(!path.exists(), "the reader's close removed it");
}

/// The reader of a region whose stored bytes were changed on disk.
#[test]
#[ignore = "run by cuda_only_a_corrupted_stored_copy_is_caught_by_its_checksum"]
fn corrupted_reader() {
    setup(&[]);
    let name = env("DEVMEM_TEST_REGION");
    ok(Open::new(&name).call());
    let sizes = [8 * MIB, 4 * MIB, 2 * MIB];
    let ptrs: Vec<u64> = sizes.iter().map(|s| alloc(*s, "weights")).collect();
    expect_err(
        restore(&["weights"]),
        devmem_status::Region,
        "fail their checksum",
    );
    let text = message();
    for i in 0..3 {
        assert!(text.contains(&format!("tag \"weights\" #{i}")), "{text}");
    }
    // The bad copies were dropped: they are never restored again.
    expect_err(
        restore(&["weights"]),
        devmem_status::Region,
        "holds no copy",
    );
    free_all(&ptrs);
    ok(ffi::devmem_shared_store_close());
}

/// A stored copy changed after the sleep (here: one byte of the file) fails the device
/// checksum on restore, by name, instead of handing back wrong bytes silently.
#[test]
fn cuda_only_a_corrupted_stored_copy_is_caught_by_its_checksum() {
    setup(&[]);
    assert!(has_checksum(), "only CUDA has a device checksum");
    let name = unique("checksum");
    let path = region_path(&name, None);
    let e = [("DEVMEM_TEST_REGION", name.as_str())];
    run_child_test(&[], "durable_writer", &e, Duration::from_secs(120));
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .expect("region");
        // Rank 0's area starts after the 2 MiB header and holds the 18 MiB saved: one changed
        // byte in each 2 MiB of it.
        for block in 0..9u64 {
            let at = (2 + 2 * block) * MIB as u64 + 12345;
            let mut b = [0u8; 1];
            f.read_exact_at(&mut b, at).expect("read");
            f.write_all_at(&[b[0] ^ 0x40], at).expect("write");
        }
    }
    run_child_test(&[], "corrupted_reader", &e, Duration::from_secs(120));
    assert!(!path.exists());
}

/// Rank 0 of the SIGKILL test: sleeps, waits while rank 1 is killed and replaced, then wakes
/// and checks its bytes.
#[test]
#[ignore = "run by a_rank_killed_mid_sleep_leaves_the_others_intact"]
fn rank0_survivor() {
    setup(&[]);
    let name = env("DEVMEM_TEST_REGION");
    let dir = PathBuf::from(env("DEVMEM_TEST_MARKS"));
    let mut o = Open::new(&name);
    o.world = 2;
    ok(o.call());
    let w = alloc(16 * MIB, "weights");
    fill(w, 16 * MIB, 300);
    ok(sleep(&["weights"]));
    std::fs::write(dir.join("rank0-asleep"), b"").expect("mark");
    wait_for_file(&dir.join("go"));
    ok(wake(None));
    assert_eq!(mismatches(w, 16 * MIB, 300), 0, "rank 0's bytes survived");
    ok(ffi::devmem_shared_store_close());
    free_all(&[w]);
}

/// Rank 1, killed with SIGKILL while its sleep's copies are in flight.
#[test]
#[ignore = "run by a_rank_killed_mid_sleep_leaves_the_others_intact"]
fn rank1_victim() {
    setup(&[]);
    let name = env("DEVMEM_TEST_REGION");
    let dir = PathBuf::from(env("DEVMEM_TEST_MARKS"));
    let mut o = Open::new(&name);
    o.world = 2;
    o.rank = 1;
    ok(o.call());
    let w = alloc(16 * MIB, "weights");
    fill(w, 16 * MIB, 400);
    // Held after its slot is taken and marked half-written: on CUDA the wait for the copies
    // (earlier event waits would come before it on Level Zero, whose device wait is one),
    // on Level Zero the first copy (it has no checksum pass that copies first).
    let held = if level_zero() {
        "zeCommandListAppendMemoryCopy".to_string()
    } else {
        tr("cuEventSynchronize")
    };
    emu().hold(&held);
    let _sleeper = std::thread::spawn(|| sleep(&["weights"]));
    assert!(
        emu().wait_held(30_000),
        "the sleep never reached its copy wait"
    );
    std::fs::write(dir.join("rank1-mid-sleep"), b"").expect("mark");
    std::thread::sleep(Duration::from_secs(120)); // killed before this ends
    panic!("rank 1 was not killed");
}

/// A new rank 1 after the kill: claims the rank (the killed process's half-written slot is
/// dropped) and works.
#[test]
#[ignore = "run by a_rank_killed_mid_sleep_leaves_the_others_intact"]
fn rank1_replacement() {
    setup(&[]);
    let name = env("DEVMEM_TEST_REGION");
    let mut o = Open::new(&name);
    o.world = 2;
    o.rank = 1;
    ok(o.call());
    // 56 of the rank's 64 MiB: fits only because the killed process's half-written 16 MiB
    // slot was dropped when this process claimed the rank.
    let w = alloc(56 * MIB, "weights");
    fill(w, 56 * MIB, 500);
    ok(sleep(&["weights"]));
    ok(wake(None));
    assert_eq!(mismatches(w, 56 * MIB, 500), 0);
    ok(ffi::devmem_shared_store_close());
    free_all(&[w]);
}

/// Two ranks share one region; rank 1 is killed with SIGKILL in the middle of a sleep. Rank
/// 0's bytes are intact, a new rank 1 reclaims the killed one's place, and after the last
/// user closes nothing is left in /dev/shm.
#[test]
fn a_rank_killed_mid_sleep_leaves_the_others_intact() {
    setup(&[]);
    let name = unique("sigkill");
    let path = region_path(&name, None);
    let marks = std::env::temp_dir().join(format!("{name}-marks"));
    std::fs::create_dir_all(&marks).expect("marks");
    let m = marks.to_str().expect("utf-8");
    let e = [
        ("DEVMEM_TEST_REGION", name.as_str()),
        ("DEVMEM_TEST_MARKS", m),
    ];
    let rank0 = spawn_child("rank0_survivor", &e);
    wait_for_file(&marks.join("rank0-asleep"));
    let mut rank1 = spawn_child("rank1_victim", &e);
    wait_for_file(&marks.join("rank1-mid-sleep"));
    rank1.kill().expect("SIGKILL");
    let _ = rank1.wait();
    run_child_test(&[], "rank1_replacement", &e, Duration::from_secs(120));
    std::fs::write(marks.join("go"), b"").expect("go");
    wait_child(rank0, "rank 0");
    assert!(!path.exists(), "the last user removed the region");
    std::fs::remove_dir_all(&marks).expect("marks");
}

/// The other-user half: as uid 65534, opening root's region is refused.
#[test]
#[ignore = "run by needs_setpriv_another_user_cannot_open_the_region"]
fn other_user_opener() {
    setup(&[]);
    let name = env("DEVMEM_TEST_REGION");
    let status = Open::new(&name).call();
    assert_eq!(status, devmem_status::Region, "{}", message());
    assert!(message().contains("Permission denied"), "{}", message());
}

/// A region created by root (mode 0600) cannot be opened by another user, and a region of
/// another user is refused by root although root could read it.
#[test]
fn needs_setpriv_another_user_cannot_open_the_region() {
    setup(&[]);
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "acting as another user needs root"
    );
    let name = unique("uid");
    let path = region_path(&name, None);
    ok(Open::new(&name).call());
    let e = [("DEVMEM_TEST_REGION", name.as_str())];
    run_child_test(
        &[
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
        ],
        "other_user_opener",
        &e,
        Duration::from_secs(120),
    );
    ok(ffi::devmem_shared_store_close());
    assert!(!path.exists());
    // The other direction: a file of uid 65534 at the path.
    std::fs::write(&path, b"").expect("file");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    std::os::unix::fs::chown(&path, Some(65534), Some(65534)).expect("chown");
    expect_err(
        Open::new(&name).call(),
        devmem_status::Region,
        "belongs to uid 65534, not to this process's uid 0; refused",
    );
    std::fs::remove_file(&path).expect("remove");
}

/// Writer of the pinned-pieces test: allocations that straddle the 256 MiB pieces the region
/// is pinned in.
#[test]
#[ignore = "run by backups_across_pinned_pieces_are_copied_piece_by_piece"]
fn crossing_writer() {
    setup(&[]);
    let name = env("DEVMEM_TEST_REGION");
    let mut o = Open::new(&name).with_flags(DEVMEM_SHARED_KEEP);
    o.bytes = 512 * MIB as u64;
    ok(o.call());
    let a = alloc(200 * MIB, "a");
    let b = alloc(100 * MIB, "b"); // stored at 200..300 MiB: across the first boundary
    fill(a, 200 * MIB, 11);
    fill(b, 100 * MIB, 12);
    ok(sleep(&["a", "b"]));
    ok(wake(None));
    assert_eq!(mismatches(b, 100 * MIB, 12), 0);
    ok(sleep(&["a", "b"]));
    assert_no_violations();
}

/// Reader of the pinned-pieces test.
#[test]
#[ignore = "run by backups_across_pinned_pieces_are_copied_piece_by_piece"]
fn crossing_reader() {
    setup(&[]);
    let name = env("DEVMEM_TEST_REGION");
    let mut o = Open::new(&name);
    o.bytes = 512 * MIB as u64;
    ok(o.call());
    let a = alloc(200 * MIB, "a");
    let b = alloc(100 * MIB, "b");
    ok(restore(&["a", "b"]));
    assert_eq!(mismatches(a, 200 * MIB, 11), 0);
    assert_eq!(mismatches(b, 100 * MIB, 12), 0);
    free_all(&[a, b]);
    ok(ffi::devmem_shared_store_close());
    assert_no_violations();
}

/// The region is pinned in 256 MiB pieces, each its own registration, and the driver refuses
/// a copy that crosses two registrations (the emulator models that): saves, wakes and durable
/// restores of a backup across a boundary go piece by piece.
#[test]
fn backups_across_pinned_pieces_are_copied_piece_by_piece() {
    setup(&[]);
    let name = unique("pieces");
    let e = [("DEVMEM_TEST_REGION", name.as_str())];
    run_child_test(&[], "crossing_writer", &e, Duration::from_secs(300));
    run_child_test(&[], "crossing_reader", &e, Duration::from_secs(300));
    assert!(!region_path(&name, None).exists());
}

/// A full device is when sleeping matters most: with no room for the checksum's 2 MiB of
/// scratch memory, a sleep into the region saves without a checksum, and a verified read-only
/// sleep copies instead of skipping (neither fails).
#[test]
fn a_full_device_still_sleeps_without_checksums() {
    setup(&[("DEVMEM_EMU_CAPACITY", "34M")]);
    let name = unique("full");
    ok(Open::new(&name).call());
    let w = alloc(32 * MIB, "weights");
    fill(w, 32 * MIB, 21);
    if has_checksum() {
        ok(read_only("weights", devmem_read_only::Verify));
    }
    ok(sleep(&["weights"])); // room for the scratch: a checksum is recorded
    ok(wake(None));
    let pad = alloc(2 * MIB, "pad"); // the device is full now
    ok(sleep(&["weights"]));
    let t = last_transfer();
    if !has_checksum() {
        assert_eq!(t.bytes_saved, 32 * MIB as u64);
    } else {
        assert_eq!(
            (t.bytes_saved, t.bytes_skipped, t.verify_mismatches),
            (32 * MIB as u64, 0, 0),
            "unverifiable: copied, not counted as changed"
        );
    }
    ok(wake(None));
    assert_eq!(mismatches(w, 32 * MIB, 21), 0);
    ok(read_only("weights", devmem_read_only::Off));
    // Not read-only, device full: the region's checksum is skipped, the sleep works.
    ok(sleep(&["weights"]));
    assert_eq!(last_transfer().bytes_saved, 32 * MIB as u64);
    ok(wake(None));
    assert_eq!(mismatches(w, 32 * MIB, 21), 0);
    free_all(&[w, pad]);
    ok(ffi::devmem_shared_store_close());
    assert_no_violations();
}
