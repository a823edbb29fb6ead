//! The bad-input matrix at the C boundary: one test per row of the "Bad input" table in docs/abi.md.
//! Each row calls one export with one bad argument and checks the status and the message.

mod common;

use std::ffi::{c_char, c_ulonglong, c_void, CString};
use std::ptr;

use common::*;
use devmem::{devmem_status as S, ffi};

/// A live 2 MiB allocation for rows that need one.
fn live() -> u64 {
    alloc(2 * MIB, "row")
}

macro_rules! row {
    ($name:ident, $status:expr, $needle:expr, $call:expr) => {
        #[test]
        fn $name() {
            setup(&[]);
            let status: S = $call;
            assert_eq!(status, $status, "message: {}", message());
            let needle = tr($needle);
            assert!(
                message().contains(&needle),
                "message {:?} lacks {:?}",
                message(),
                needle
            );
        }
    };
}

fn my_malloc_status(size: isize, device: i32) -> S {
    let p = ffi::my_malloc(size, device, ptr::null_mut());
    assert!(p.is_null());
    ffi::devmem_last_error_status()
}

fn my_free_status(p: u64) -> S {
    ffi::my_free(p as *mut c_void, 0, 0, ptr::null_mut());
    ffi::devmem_last_error_status()
}

fn status_of(raw: i32) -> S {
    S::from_raw(raw).expect("a devmem status")
}

fn low_level(
    f: extern "C" fn(c_ulonglong, isize, c_ulonglong, *mut c_ulonglong) -> i32,
    device: u64,
    size: isize,
    va: u64,
    with_handle: bool,
) -> S {
    let _ = live(); // loads the driver and makes a context current
    let mut handle: c_ulonglong = 0;
    let h = if with_handle {
        &mut handle as *mut c_ulonglong
    } else {
        ptr::null_mut()
    };
    status_of(f(device, size, va, h))
}

// my_malloc / my_free
row!(
    my_malloc_size_zero,
    S::InvalidArgument,
    "size 0",
    my_malloc_status(0, 0)
);
row!(
    my_malloc_size_negative,
    S::InvalidArgument,
    "negative",
    my_malloc_status(-1, 0)
);
row!(
    my_malloc_size_overflows,
    S::InvalidArgument,
    "overflows",
    my_malloc_status(isize::MAX, 0)
);
row!(
    my_malloc_device_negative,
    S::InvalidDevice,
    "negative",
    my_malloc_status(4096, -1)
);
row!(
    my_malloc_device_out_of_range,
    S::InvalidDevice,
    "out of range",
    my_malloc_status(4096, 99)
);
row!(
    my_free_null,
    S::NullPointer,
    "ptr is NULL",
    my_free_status(0)
);
row!(
    my_free_unknown,
    S::UnknownPointer,
    "not a live devmem allocation",
    my_free_status(0x1000_0000)
);
row!(
    my_free_interior,
    S::UnknownPointer,
    "inside the allocation",
    my_free_status(live() + 4096)
);
row!(my_free_double, S::UnknownPointer, "already freed", {
    let p = live();
    assert_eq!(my_free_status(p), S::Success);
    my_free_status(p)
});

// create_and_map / unmap_and_release
row!(
    create_and_map_handle_null,
    S::NullPointer,
    "handle is NULL",
    low_level(ffi::create_and_map, 0, 2 << 20, 0x2000_0000, false)
);
row!(
    create_and_map_d_mem_zero,
    S::NullPointer,
    "d_mem is 0",
    low_level(ffi::create_and_map, 0, 2 << 20, 0, true)
);
row!(
    create_and_map_size_zero,
    S::InvalidArgument,
    "size 0",
    low_level(ffi::create_and_map, 0, 0, 0x2000_0000, true)
);
row!(
    create_and_map_size_negative,
    S::InvalidArgument,
    "negative",
    low_level(ffi::create_and_map, 0, -4, 0x2000_0000, true)
);
row!(
    create_and_map_misaligned,
    S::InvalidArgument,
    "granularity",
    low_level(ffi::create_and_map, 0, 3 << 20, 0x2000_0000, true)
);
row!(
    create_and_map_device_out_of_range,
    S::InvalidDevice,
    "out of range",
    low_level(ffi::create_and_map, 5, 2 << 20, 0x2000_0000, true)
);
row!(
    create_and_map_device_overflows_int,
    S::InvalidDevice,
    "out of range",
    low_level(ffi::create_and_map, u64::MAX, 2 << 20, 0x2000_0000, true)
);
row!(
    create_and_map_outside_a_reservation,
    S::Driver,
    "cuMemMap",
    low_level(ffi::create_and_map, 0, 2 << 20, 0x2000_0000, true)
);
row!(
    unmap_and_release_handle_null,
    S::NullPointer,
    "handle is NULL",
    low_level(ffi::unmap_and_release, 0, 2 << 20, 0x2000_0000, false)
);
row!(
    unmap_and_release_unmapped_range,
    S::Driver,
    "cuMemUnmap",
    low_level(ffi::unmap_and_release, 0, 2 << 20, 0x2000_0000, true)
);

// devmem_malloc / devmem_free
row!(
    malloc_out_null,
    S::NullPointer,
    "out is NULL",
    ffi::devmem_malloc(MIB, 0, ptr::null_mut())
);
row!(
    malloc_size_zero,
    S::InvalidArgument,
    "size 0",
    ffi::devmem_malloc(0, 0, &mut ptr::null_mut())
);
row!(
    malloc_size_max,
    S::InvalidArgument,
    "overflows",
    ffi::devmem_malloc(usize::MAX, 0, &mut ptr::null_mut())
);
row!(
    malloc_device_negative,
    S::InvalidDevice,
    "negative",
    ffi::devmem_malloc(MIB, -3, &mut ptr::null_mut())
);
row!(
    malloc_device_out_of_range,
    S::InvalidDevice,
    "out of range",
    ffi::devmem_malloc(MIB, 1, &mut ptr::null_mut())
);
row!(
    malloc_out_of_memory,
    S::OutOfMemory,
    "CUDA_ERROR_OUT_OF_MEMORY",
    ffi::devmem_malloc(4 << 30, 0, &mut ptr::null_mut())
);
row!(
    free_null,
    S::NullPointer,
    "ptr is NULL",
    ffi::devmem_free(ptr::null_mut())
);
row!(
    free_unknown,
    S::UnknownPointer,
    "never allocated",
    ffi::devmem_free(0x1000_0000 as *mut c_void)
);

// tags
fn set_tag_bytes(bytes: &[u8]) -> S {
    let mut owned = bytes.to_vec();
    owned.push(0);
    ffi::devmem_set_current_tag(owned.as_ptr().cast())
}
row!(
    set_tag_null,
    S::InvalidTag,
    "tag is NULL",
    ffi::devmem_set_current_tag(ptr::null())
);
row!(
    set_tag_empty,
    S::InvalidTag,
    "tag is empty",
    set_tag_bytes(b"")
);
row!(
    set_tag_not_utf8,
    S::InvalidTag,
    "not UTF-8",
    set_tag_bytes(&[0xc3, 0x28])
);
row!(
    set_tag_too_long,
    S::InvalidTag,
    "longer than 255",
    set_tag_bytes(&[b'x'; 256])
);
row!(
    set_tag_longest_is_fine,
    S::Success,
    "",
    set_tag_bytes(&[b'x'; 255])
);
row!(
    get_tag_buf_null,
    S::NullPointer,
    "buf is NULL",
    ffi::devmem_get_current_tag(ptr::null_mut(), 64)
);
row!(
    get_tag_buf_small,
    S::BufferTooSmall,
    "needs 8 bytes",
    ffi::devmem_get_current_tag([0 as c_char; 7].as_mut_ptr(), 7)
);

// sleep / offload / discard / wake tag arrays
fn with_tags(f: extern "C" fn(*const *const c_char, usize) -> S, list: &[Option<&[u8]>]) -> S {
    let owned: Vec<Option<CString>> = list
        .iter()
        .map(|t| t.map(|b| CString::new(b).expect("tag")))
        .collect();
    let ptrs: Vec<*const c_char> = owned
        .iter()
        .map(|t| t.as_ref().map_or(ptr::null(), |c| c.as_ptr()))
        .collect();
    f(ptrs.as_ptr(), ptrs.len())
}
row!(
    sleep_tags_null_with_n,
    S::NullPointer,
    "tags is NULL but n is 2",
    ffi::devmem_sleep(ptr::null(), 2)
);
row!(
    sleep_tag_entry_null,
    S::InvalidTag,
    "tags[1] is NULL",
    with_tags(ffi::devmem_sleep, &[Some(b"a"), None])
);
row!(
    sleep_tag_empty,
    S::InvalidTag,
    "tags[0]",
    with_tags(ffi::devmem_sleep, &[Some(b"")])
);
row!(
    offload_tags_null_with_n,
    S::NullPointer,
    "tags is NULL",
    ffi::devmem_offload(ptr::null(), 1)
);
row!(
    offload_tag_too_long,
    S::InvalidTag,
    "longer than 255",
    with_tags(ffi::devmem_offload, &[Some(&[b'y'; 300])])
);
row!(
    discard_tags_null_with_n,
    S::NullPointer,
    "tags is NULL",
    ffi::devmem_discard(ptr::null(), 1)
);
row!(
    discard_tag_not_utf8,
    S::InvalidTag,
    "not UTF-8",
    with_tags(ffi::devmem_discard, &[Some(&[0xff])])
);
row!(
    wake_tag_entry_null,
    S::InvalidTag,
    "tags[0] is NULL",
    with_tags(ffi::devmem_wake_up, &[None])
);
row!(
    wake_null_means_all,
    S::Success,
    "",
    ffi::devmem_wake_up(ptr::null(), 7)
);
row!(
    unknown_tag_is_a_no_op,
    S::Success,
    "",
    with_tags(ffi::devmem_offload, &[Some(b"nobody")])
);
row!(sleep_while_asleep_is_a_no_op, S::Success, "", {
    let _ = live();
    assert_eq!(with_tags(ffi::devmem_sleep, &[Some(b"row")]), S::Success);
    with_tags(ffi::devmem_sleep, &[Some(b"row")])
});
row!(wake_while_awake_is_a_no_op, S::Success, "", {
    let _ = live();
    ffi::devmem_wake_up(ptr::null(), 0)
});

// queries
row!(
    stats_out_null,
    S::NullPointer,
    "out is NULL",
    ffi::devmem_get_stats(ptr::null(), ptr::null_mut())
);
row!(
    stats_bad_tag,
    S::InvalidTag,
    "empty",
    ffi::devmem_get_stats(c"".as_ptr(), &mut devmem::devmem_stats::default())
);
row!(
    last_transfer_out_null,
    S::NullPointer,
    "out is NULL",
    ffi::devmem_get_last_transfer(ptr::null_mut())
);
row!(
    mem_get_info_null,
    S::NullPointer,
    "must not be NULL",
    ffi::devmem_mem_get_info(0, ptr::null_mut(), &mut 0)
);
row!(
    mem_get_info_device_negative,
    S::InvalidDevice,
    "negative",
    ffi::devmem_mem_get_info(-1, &mut 0, &mut 0)
);
row!(
    mem_get_info_device_out_of_range,
    S::InvalidDevice,
    "out of range",
    ffi::devmem_mem_get_info(2, &mut 0, &mut 0)
);
row!(
    granularity_out_null,
    S::NullPointer,
    "out is NULL",
    ffi::devmem_granularity(0, ptr::null_mut())
);
row!(
    granularity_device_out_of_range,
    S::InvalidDevice,
    "out of range",
    ffi::devmem_granularity(9, &mut 0)
);
row!(
    device_count_out_null,
    S::NullPointer,
    "out is NULL",
    ffi::devmem_device_count(ptr::null_mut())
);
row!(
    allocation_info_ptr_null,
    S::NullPointer,
    "must not be NULL",
    ffi::devmem_get_allocation_info(ptr::null(), &mut unsafe_zeroed())
);
row!(
    allocation_info_unknown,
    S::UnknownPointer,
    "not inside",
    ffi::devmem_get_allocation_info(0x1000 as *const c_void, &mut unsafe_zeroed())
);
row!(
    name_range_name_null,
    S::NullPointer,
    "name is NULL",
    ffi::devmem_name_range(live(), 8, ptr::null())
);
row!(
    name_range_not_utf8,
    S::InvalidArgument,
    "not UTF-8",
    ffi::devmem_name_range(live(), 8, c"\xff".as_ptr())
);
row!(
    name_range_unknown_pointer,
    S::UnknownPointer,
    "not inside",
    ffi::devmem_name_range(0x1000, 8, c"w".as_ptr())
);
row!(
    name_range_overflowing_length,
    S::InvalidArgument,
    "runs past",
    ffi::devmem_name_range(live(), usize::MAX, c"w".as_ptr())
);
row!(
    clear_names_bad_tag,
    S::InvalidTag,
    "empty",
    ffi::devmem_clear_names(c"".as_ptr(), ptr::null_mut())
);
row!(
    shared_store_info_out_null,
    S::NullPointer,
    "out",
    ffi::devmem_get_shared_store_info(ptr::null_mut())
);
row!(
    restore_by_order_without_a_store,
    S::InvalidState,
    "no shared store is open",
    with_tags(ffi::devmem_restore_from_store_by_order, &[Some(b"w")])
);
row!(
    allocation_chunks_ptr_null,
    S::NullPointer,
    "must not be NULL",
    ffi::devmem_get_allocation_chunks(ptr::null(), ptr::null_mut(), ptr::null_mut(), 0, &mut 0)
);
row!(
    allocation_chunks_count_null,
    S::NullPointer,
    "must not be NULL",
    ffi::devmem_get_allocation_chunks(
        0x1000 as *const c_void,
        ptr::null_mut(),
        ptr::null_mut(),
        0,
        ptr::null_mut()
    )
);
row!(
    allocation_chunks_arrays_null_with_capacity,
    S::NullPointer,
    "when capacity is 2",
    ffi::devmem_get_allocation_chunks(
        0x1000 as *const c_void,
        ptr::null_mut(),
        ptr::null_mut(),
        2,
        &mut 0
    )
);
row!(
    allocation_chunks_unknown,
    S::UnknownPointer,
    "not inside",
    ffi::devmem_get_allocation_chunks(
        0x1000 as *const c_void,
        ptr::null_mut(),
        ptr::null_mut(),
        0,
        &mut 0
    )
);
row!(
    for_each_callback_null,
    S::NullPointer,
    "callback is NULL",
    ffi::devmem_for_each_allocation(None, ptr::null_mut(), ptr::null_mut())
);
row!(
    set_callbacks_both_null_removes,
    S::Success,
    "",
    ffi::devmem_set_callbacks(None, None, ptr::null_mut())
);

// host store
row!(
    host_policy_invalid,
    S::InvalidArgument,
    "host policy 9",
    ffi::devmem_set_host_policy(9)
);
row!(
    host_policy_out_null,
    S::NullPointer,
    "out is NULL",
    ffi::devmem_get_host_policy(ptr::null_mut())
);
row!(
    host_limit_out_null,
    S::NullPointer,
    "out is NULL",
    ffi::devmem_get_host_limit(ptr::null_mut())
);
row!(
    reserve_more_than_the_machine_has,
    S::HostOutOfMemory,
    "host memory",
    ffi::devmem_reserve_host_store(usize::MAX, 1)
);
row!(
    reserve_zero_is_a_no_op,
    S::Success,
    "",
    ffi::devmem_reserve_host_store(0, 1)
);
row!(
    release_store_freed_may_be_null,
    S::Success,
    "",
    ffi::devmem_release_host_store(ptr::null_mut())
);

// the driver
#[test]
fn driver_missing() {
    setup(&[("DEVMEM_CUDA_LIBRARY", "/nonexistent/libcuda.so.1")]);
    assert_eq!(
        ffi::devmem_malloc(MIB, 0, &mut ptr::null_mut()),
        S::DriverNotFound
    );
    assert!(message().contains("/nonexistent/libcuda.so.1"));
    // dlerror()'s own text, not only libloading's "dlopen failed".
    assert!(
        message().contains("No such file or directory"),
        "{}",
        message()
    );
}

#[test]
fn driver_not_a_library_says_why() {
    setup(&[("DEVMEM_CUDA_LIBRARY", "/etc/passwd")]);
    assert_eq!(ffi::devmem_device_count(&mut 0), S::DriverNotFound);
    let msg = message();
    assert!(msg.contains("/etc/passwd"), "{msg}");
    assert!(
        msg.contains("invalid ELF header") || msg.contains("file too short"),
        "{msg}"
    );
}

#[test]
fn driver_without_symbols() {
    setup(&[("DEVMEM_CUDA_LIBRARY", "libm.so.6")]);
    assert_eq!(ffi::devmem_device_count(&mut 0), S::Driver);
    assert!(message().contains("lacks symbol"));
    assert!(message().contains("undefined symbol"), "{}", message());
}

#[test]
fn messages_and_status_strings() {
    setup(&[]);
    let _ = ffi::devmem_free(ptr::null_mut());
    let n = ffi::devmem_last_error_message(ptr::null_mut(), 0);
    assert!(n > 0);
    let mut one = [1 as c_char; 1];
    assert_eq!(ffi::devmem_last_error_message(one.as_mut_ptr(), 1), n);
    assert_eq!(one[0], 0, "a 1-byte buffer gets the NUL only");
    // SAFETY: static NUL-terminated strings.
    let name = |s: i32| {
        unsafe { std::ffi::CStr::from_ptr(ffi::devmem_status_string(s)) }
            .to_str()
            .map(String::from)
    };
    assert_eq!(name(-7).as_deref(), Ok("DEVMEM_STATUS_UNKNOWN"));
    assert_eq!(name(12).as_deref(), Ok("DEVMEM_STATUS_BUFFER_TOO_SMALL"));
}

fn unsafe_zeroed() -> devmem::devmem_allocation_info {
    // SAFETY: zero is a valid value of the C struct.
    unsafe { std::mem::zeroed() }
}

/// Each message names the argument once ("tag is empty", not "tag: tag is empty").
#[test]
fn tag_messages_name_the_argument_once() {
    setup(&[]);
    assert_eq!(set_tag_bytes(b""), S::InvalidTag);
    assert_eq!(message(), "tag is empty");
    assert_eq!(
        with_tags(ffi::devmem_sleep, &[Some(b"a"), Some(b"")]),
        S::InvalidTag
    );
    assert_eq!(message(), "tags[1] is empty");
    assert_eq!(set_tag_bytes(&[b'x'; 300]), S::InvalidTag);
    assert_eq!(message(), "tag is longer than 255 bytes");
}
