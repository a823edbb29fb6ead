//! A host-memory region shared by the processes of one instance and kept across restarts
//! (seed 004's SharedOffloadRegion, made safe to share and durable).
//!
//! One file per instance, `<dir>/devmem-<name>.region` (`dir` defaults to `/dev/shm`), mapped
//! `MAP_SHARED` by every process (rank) of the instance:
//!
//! ```text
//! | header | rank 0 table | rank 1 table | ... | pad to 2 MiB | rank 0 area | rank 1 area | ...
//! ```
//!
//! * Each rank owns one contiguous area (`bytes_per_rank`, rounded up to 2 MiB) and one table
//!   of [`SLOTS`] slots, each recording which allocation it holds (tag, index among the tag's
//!   allocations, size, device checksum) and its state (free, being written, valid). A rank
//!   reserves (`fallocate`), populates (`MADV_POPULATE_WRITE`) and pins only its own area, and
//!   writes only its own table.
//! * **Create**: `O_CREAT|O_EXCL|O_NOFOLLOW`, mode 0600, `ftruncate`, header written, then
//!   `ready` set last. **Open**: `O_NOFOLLOW`, the owner must be this uid and the mode 0600;
//!   waits (up to the timeout) for `ready`, then checks the header before touching anything.
//! * **Liveness** by open-file-description locks: every user holds a read lock on byte 0, the
//!   owner of rank `r` a write lock on byte `1 + r`. They vanish with the process, however it
//!   ends. A user that finds no other holder of byte 0 is the first of a new instance: a region
//!   whose last user left with `keep` is reused (durable restart); one left without it (a crash)
//!   is reported as stale and reclaimed, keeping its valid slots. A different layout is never
//!   reused: it is an error, or with `reclaim` the old file is removed and a new one created.
//! * **Cleanup**: on close, the last user (the one that can turn its byte-0 lock into a write
//!   lock) unlinks the file unless the region is kept. A process keeps its mapping (and its
//!   rank) until its last backup in the region is gone.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::blocks::BLOCK;
use super::manifest;
use crate::backend::{Backend, HostMemory};
use crate::error::{bail, devmem_status, Error, Result};

/// Slots per rank: the most allocations one rank can hold in the region at once.
pub(crate) const SLOTS: usize = 1024;
/// Longest instance name, in bytes.
pub(crate) const MAX_NAME_LEN: usize = 128;
/// Most ranks one region can have.
pub(crate) const MAX_WORLD: u32 = 4096;
/// Where regions live unless the caller names a directory.
pub const DEFAULT_DIR: &str = "/dev/shm";

const MAGIC: [u8; 8] = *b"DEVMEMSR";
/// 2: the header records the instance name; slots record the requested size, a serial and
/// their kind; a rank's names live in a manifest slot.
const VERSION: u32 = 2;
/// The only layout so far: one contiguous area per rank.
const LAYOUT_CONTIGUOUS: u32 = 1;
/// `ready` once the creator has written the header.
const READY: u32 = 0x5245_4459;

const FREE: u32 = 0;
const WRITING: u32 = 1;
const VALID: u32 = 2;

/// Bytes of each rank's area kept for its manifest: backups never use them, so a sleep into an
/// area sized exactly for its allocations still records their names.
const MANIFEST_RESERVE: usize = BLOCK;
/// The largest manifest a rank may have (about 400,000 names): a larger one in the file is
/// corrupt, never read into memory.
const MAX_MANIFEST: u64 = 64 << 20;
/// Serials beyond this are corrupt (a file cannot have used them up).
const MAX_SERIAL: u64 = 1 << 62;

/// A slot holding one allocation's bytes.
const KIND_ALLOCATION: u32 = 0;
/// A slot holding the rank's manifest (the names of its saved byte ranges).
const KIND_MANIFEST: u32 = 1;

#[repr(C)]
struct Header {
    magic: [u8; 8],
    version: u32,
    layout: u32,
    ready: AtomicU32,
    /// Set by any user that opened with `keep`: the last user leaves the file in place.
    kept: AtomicU32,
    header_bytes: u64,
    total_bytes: u64,
    rank_bytes: u64,
    world: u32,
    slots_per_rank: u32,
    creator_pid: AtomicU32,
    /// The pid of the first user of the current instance.
    instance_pid: AtomicU32,
    /// Incremented each time a new instance starts using the region.
    generation: AtomicU64,
    /// The instance name the region was created for: a copy or link of another instance's
    /// file under this name is refused.
    name_len: u32,
    name: [u8; MAX_NAME_LEN],
}

#[repr(C)]
struct Slot {
    state: AtomicU32,
    index: u32,
    offset: u64,
    size: u64,
    checksum: u64,
    has_checksum: u32,
    tag_len: u32,
    tag: [u8; 256],
    /// The size the allocation asked for (its rounded size is `size`).
    requested: u64,
    /// Unique among the rank's slots over the region's life: a manifest entry names the
    /// serial it was written for, so a slot reused since never matches it.
    serial: u64,
    /// [`KIND_ALLOCATION`] or [`KIND_MANIFEST`].
    kind: u32,
    _pad: u32,
}

#[repr(C)]
struct RankTable {
    owner_pid: AtomicU32,
    _pad: u32,
    slots: [Slot; SLOTS],
}

/// What a caller asks for.
#[derive(Debug, Clone)]
pub struct Options {
    /// The instance's name (no `/`, no `..`, at most [`MAX_NAME_LEN`] bytes).
    pub name: String,
    /// Directory holding the region ([`DEFAULT_DIR`] when `None`).
    pub dir: Option<PathBuf>,
    /// Bytes of backups each rank can hold.
    pub bytes_per_rank: u64,
    /// This process's rank.
    pub rank: u32,
    /// Ranks sharing the region.
    pub world: u32,
    /// Leave the region in place when the last user closes it (durable sleep).
    pub keep: bool,
    /// Replace a left-over region whose layout differs, when no process uses it.
    pub reclaim: bool,
    /// How long to wait for another process that is creating the region.
    pub timeout: Duration,
}

/// The sizes a region with these options has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Layout {
    header_bytes: u64,
    rank_bytes: u64,
    world: u32,
    total_bytes: u64,
}

impl Layout {
    /// The layout `options` ask for, after checking the rank against the world size.
    fn of(options: &Options) -> Result<Self> {
        Self::check_world(options.world)?;
        if options.rank >= options.world {
            bail!(
                InvalidArgument,
                "shared store: rank {} is not below the world size {}",
                options.rank,
                options.world
            );
        }
        // Each area holds its manifest's reserve on top of what the caller asked for.
        match options.bytes_per_rank.checked_add(MANIFEST_RESERVE as u64) {
            _ if options.bytes_per_rank == 0 => Self::new(0, options.world),
            Some(bytes) => Self::new(bytes, options.world),
            None => bail!(
                InvalidArgument,
                "shared store: {} bytes per rank overflow",
                options.bytes_per_rank
            ),
        }
    }

    fn check_world(world: u32) -> Result<()> {
        if world == 0 || world > MAX_WORLD {
            bail!(
                InvalidArgument,
                "shared store: world size {world} is not between 1 and {MAX_WORLD}"
            );
        }
        Ok(())
    }

    /// The sizes of a region of `world` ranks holding `bytes_per_rank` each.
    fn new(bytes_per_rank: u64, world: u32) -> Result<Self> {
        Self::check_world(world)?;
        let overflow = || {
            Error::new(
                devmem_status::InvalidArgument,
                format!("shared store: {bytes_per_rank} bytes per rank for {world} ranks overflow"),
            )
        };
        if bytes_per_rank == 0 {
            bail!(InvalidArgument, "shared store: bytes per rank is 0");
        }
        let rank_bytes = bytes_per_rank
            .checked_next_multiple_of(BLOCK as u64)
            .ok_or_else(overflow)?;
        let tables =
            std::mem::size_of::<Header>() + world as usize * std::mem::size_of::<RankTable>();
        let header_bytes = (tables as u64).next_multiple_of(BLOCK as u64);
        let total_bytes = rank_bytes
            .checked_mul(u64::from(world))
            .and_then(|b| b.checked_add(header_bytes))
            .filter(|b| *b <= i64::MAX as u64)
            .ok_or_else(overflow)?;
        Ok(Self {
            header_bytes,
            rank_bytes,
            world,
            total_bytes,
        })
    }

    fn describe(&self) -> String {
        format!(
            "{} rank(s) of {} bytes, {} header bytes",
            self.world, self.rank_bytes, self.header_bytes
        )
    }
}

/// Checks an instance name: non-empty, at most [`MAX_NAME_LEN`] bytes of printable ASCII, no
/// `/`, no `..`.
pub fn check_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        bail!(
            InvalidArgument,
            "shared store: the name must be 1 to {MAX_NAME_LEN} bytes; got {}",
            name.len()
        );
    }
    if let Some(c) = name.chars().find(|c| !c.is_ascii_graphic()) {
        bail!(
            InvalidArgument,
            "shared store: name {name:?} contains {c:?}; use printable ASCII without spaces"
        );
    }
    if name.contains('/') || name.contains("..") {
        bail!(
            InvalidArgument,
            "shared store: name {name:?} contains '/' or '..'"
        );
    }
    Ok(())
}

/// The file a region with `name` lives in: `<dir>/devmem-<name>.region`, where `dir` defaults
/// to [`private_dir`]. Creates nothing.
pub fn path_for(name: &str, dir: Option<&Path>) -> Result<PathBuf> {
    check_name(name)?;
    let dir = match dir {
        Some(dir) => dir.to_path_buf(),
        None => private_dir(),
    };
    Ok(dir.join(format!("devmem-{name}.region")))
}

/// This user's own directory for regions: `/dev/shm/devmem-<uid>`, mode 0700. Only its owner
/// can create a file in it, so no other user can claim an instance's name first.
pub fn private_dir() -> PathBuf {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    Path::new(DEFAULT_DIR).join(format!("devmem-{uid}"))
}

/// Creates [`private_dir`] when missing, and refuses one that is not this user's own
/// directory with mode 0700 (another user made it first, or it is a link).
fn ensure_private_dir(dir: &Path) -> Result<()> {
    let c = c_path(dir)?;
    // SAFETY: a NUL-terminated path.
    if unsafe { libc::mkdir(c.as_ptr(), 0o700) } != 0 && errno() != libc::EEXIST {
        let status = match errno() {
            libc::ENOSPC | libc::ENOMEM => devmem_status::HostOutOfMemory,
            _ => devmem_status::Region,
        };
        return Err(os_error(format!("creating {}", dir.display()), status));
    }
    // SAFETY: plain C struct; all-zero is valid.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a valid out-pointer; lstat does not follow links.
    if unsafe { libc::lstat(c.as_ptr(), &mut st) } != 0 {
        return Err(os_error(
            format!("lstat {}", dir.display()),
            devmem_status::Region,
        ));
    }
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if st.st_mode & libc::S_IFMT != libc::S_IFDIR || st.st_uid != me || st.st_mode & 0o077 != 0 {
        bail!(
            Region,
            "shared store: {} is not this user's private directory (uid {}, mode {:o}, want \
             uid {me}, a directory with mode 700); another user may have created it: choose \
             another directory (DEVMEM_SHARED_DIR or the dir option)",
            dir.display(),
            st.st_uid,
            st.st_mode & 0o7777
        );
    }
    Ok(())
}

fn os_error(what: impl std::fmt::Display, status: devmem_status) -> Error {
    Error::new(
        status,
        format!("shared store: {what}: {}", std::io::Error::last_os_error()),
    )
}

fn c_path(path: &Path) -> Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| {
        Error::new(
            devmem_status::InvalidArgument,
            format!("shared store: path {} contains a NUL byte", path.display()),
        )
    })
}

/// An open-file-description lock on one byte: `Ok(true)` taken, `Ok(false)` held elsewhere.
fn lock_byte(fd: &OwnedFd, byte: u64, kind: libc::c_int) -> Result<bool> {
    // SAFETY: plain C struct; all-zero is valid.
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = kind as libc::c_short;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    lock.l_start = byte as libc::off_t;
    lock.l_len = 1;
    // SAFETY: a valid descriptor and a valid flock struct.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_OFD_SETLK, &lock) } == 0 {
        return Ok(true);
    }
    match std::io::Error::last_os_error().raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EACCES) => Ok(false),
        _ => Err(os_error("fcntl(F_OFD_SETLK)", devmem_status::Region)),
    }
}

fn pid_alive(pid: u32) -> bool {
    // SAFETY: kill with signal 0 only checks whether the process exists.
    pid != 0 && (unsafe { libc::kill(pid as libc::pid_t, 0) } == 0 || errno() == libc::EPERM)
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// A slot's key: which allocation it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotKey {
    /// The allocation's tag.
    pub tag: Arc<str>,
    /// Its index among the live allocations of that tag, in allocation order.
    pub index: u32,
    /// The size the allocation asked for.
    pub requested: u64,
}

/// A valid slot found for a key.
#[derive(Debug, Clone, Copy)]
pub struct Stored {
    /// Slot number in this rank's table.
    pub slot: usize,
    /// Host address of the bytes.
    pub ptr: usize,
    /// Bytes stored.
    pub size: usize,
    /// The size the saved allocation asked for.
    pub requested: u64,
    /// Device checksum recorded when the bytes were saved.
    pub checksum: Option<u64>,
}

/// A named byte range of a saved allocation, as the manifest records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedRange {
    /// The caller's name for the bytes (a tensor's name, a key).
    pub name: Arc<str>,
    /// The tag of the allocation holding them.
    pub tag: Arc<str>,
    /// The slot holding that allocation's bytes, and its serial when the entry was written.
    pub slot: usize,
    /// See [`Slot::serial`].
    pub serial: u64,
    /// Offset of the range in the allocation.
    pub offset: u64,
    /// Bytes in the range.
    pub len: u64,
    /// Checksum ([`crate::checksum`]) of the range's whole 8-byte words, from its start.
    pub checksum: Option<u64>,
    /// The range's last `len % 8` bytes (which no word covers), little-endian, zero-padded.
    pub tail: u64,
}

/// A named range found in the region, with the host address of its bytes.
#[derive(Debug, Clone)]
pub struct StoredRange {
    /// As recorded.
    pub range: NamedRange,
    /// Host address of the range's first byte.
    pub ptr: usize,
}

/// One slot as this process knows it: the private copy of the rank's table, validated once at
/// open. The table in the file is written (for the next process) but never read again.
#[derive(Debug, Clone)]
struct Entry {
    state: u32,
    kind: u32,
    offset: u64,
    size: u64,
    requested: u64,
    checksum: Option<u64>,
    tag: Arc<str>,
    index: u32,
    serial: u64,
    /// Taken or adopted by this process (the other valid slots are snapshots left by an
    /// earlier process, which may be evicted when space runs out).
    claimed: bool,
}

impl Entry {
    fn free() -> Self {
        Self {
            state: FREE,
            kind: KIND_ALLOCATION,
            offset: 0,
            size: 0,
            requested: 0,
            checksum: None,
            tag: Arc::from(""),
            index: 0,
            serial: 0,
            claimed: false,
        }
    }

    fn is(&self, state: u32, kind: u32) -> bool {
        self.state == state && self.kind == kind
    }
}

/// This process's private state of its rank.
struct Slots {
    entries: Vec<Entry>,
    next_serial: u64,
    /// The manifest's slot and its parsed entries.
    manifest: Option<(usize, Vec<NamedRange>)>,
}

/// One process's view of an open region.
pub struct Region {
    path: PathBuf,
    /// The instance name.
    name: String,
    fd: OwnedFd,
    base: usize,
    layout: Layout,
    rank: u32,
    /// This rank's area, pinned piece by piece in the background (see [`Pinning`]).
    pinning: Arc<Pinning>,
    pinner: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// The rank's slots, validated once at open; nothing read from the file after that
    /// decides where devmem reads or writes.
    slots: Mutex<Slots>,
    /// Still a user of the instance (holds its byte-0 lock); false once closed.
    member: Mutex<bool>,
    generation: u64,
}

// SAFETY: the raw mapping is only reached through methods that synchronise on `slots` (this
// rank's table) or use atomics (the header); the backend is Send + Sync.
unsafe impl Send for Region {}
// SAFETY: as above.
unsafe impl Sync for Region {}

impl std::fmt::Debug for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Region({}, rank {})", self.path.display(), self.rank)
    }
}

/// How a file at the region's path was opened.
enum Opened {
    Created(OwnedFd),
    Existing(OwnedFd),
}

fn open_file(path: &Path) -> Result<Opened> {
    let c = c_path(path)?;
    let flags = libc::O_RDWR | libc::O_CLOEXEC | libc::O_NOFOLLOW;
    // SAFETY: a NUL-terminated path; the mode is passed for O_CREAT.
    let fd = unsafe { libc::open(c.as_ptr(), flags | libc::O_CREAT | libc::O_EXCL, 0o600) };
    if fd >= 0 {
        // SAFETY: a descriptor just returned by open and owned by nothing else.
        return Ok(Opened::Created(unsafe { OwnedFd::from_raw_fd(fd) }));
    }
    match errno() {
        libc::EEXIST => {}
        libc::ENOSPC | libc::ENOMEM => {
            return Err(os_error(
                format!("creating {}", path.display()),
                devmem_status::HostOutOfMemory,
            ))
        }
        _ => {
            return Err(os_error(
                format!("creating {}", path.display()),
                devmem_status::Region,
            ))
        }
    }
    // SAFETY: as above, without O_CREAT.
    let fd = unsafe { libc::open(c.as_ptr(), flags) };
    if fd < 0 {
        let e = errno();
        if e == libc::ELOOP {
            bail!(
                Region,
                "shared store: {} is a symbolic link; refused",
                path.display()
            );
        }
        return Err(os_error(
            format!("opening {}", path.display()),
            devmem_status::Region,
        ));
    }
    // SAFETY: a descriptor just returned by open and owned by nothing else.
    Ok(Opened::Existing(unsafe { OwnedFd::from_raw_fd(fd) }))
}

fn fstat(fd: &OwnedFd) -> Result<libc::stat> {
    // SAFETY: plain C struct; all-zero is valid.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a valid descriptor and out-pointer.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(os_error("fstat", devmem_status::Region));
    }
    Ok(st)
}

/// Refuses a file that is not a regular file of this user with mode 0600.
fn check_owner(path: &Path, st: &libc::stat) -> Result<()> {
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        bail!(
            Region,
            "shared store: {} is not a regular file",
            path.display()
        );
    }
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if st.st_uid != me {
        bail!(
            Region,
            "shared store: {} belongs to uid {}, not to this process's uid {me}; refused",
            path.display(),
            st.st_uid
        );
    }
    if st.st_nlink != 1 {
        bail!(
            Region,
            "shared store: {} has {} links, not 1 (a hard link to another instance's region \
             would restore that instance's bytes); refused",
            path.display(),
            st.st_nlink
        );
    }
    let mode = st.st_mode & 0o7777;
    if mode != 0o600 {
        bail!(
            Region,
            "shared store: {} has mode {mode:o}, not 600; refused",
            path.display()
        );
    }
    Ok(())
}

/// Whether `path` still names the file open at `fd` (a last user may have unlinked it).
fn still_linked(path: &Path, st: &libc::stat) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| {
        use std::os::unix::fs::MetadataExt;
        m.dev() == st.st_dev && m.ino() == st.st_ino
    })
}

fn map_file(fd: &OwnedFd, len: u64) -> Result<usize> {
    // SAFETY: a shared mapping of a file this process opened read-write; nothing else is
    // placed at the returned address.
    let raw = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            0,
        )
    };
    if raw == libc::MAP_FAILED {
        return Err(os_error(
            format!("mmap of {len} bytes"),
            devmem_status::HostOutOfMemory,
        ));
    }
    Ok(raw as usize)
}

fn unmap_file(base: usize, len: u64) {
    // SAFETY: a mapping made by `map_file` that nothing uses any more.
    if unsafe { libc::munmap(base as *mut libc::c_void, len as usize) } != 0 {
        log::error!(
            "devmem: shared store: munmap: {}",
            std::io::Error::last_os_error()
        );
    }
}

impl Region {
    fn header(&self) -> &Header {
        // SAFETY: the mapping starts with a header checked by `check_header`, and stays mapped
        // for the life of `self`.
        unsafe { &*(self.base as *const Header) }
    }

    fn table(&self) -> &RankTable {
        let at = self.base
            + std::mem::size_of::<Header>()
            + self.rank as usize * std::mem::size_of::<RankTable>();
        // SAFETY: the layout check put every rank's table inside the header area.
        unsafe { &*(at as *const RankTable) }
    }

    /// The file offset of this rank's slot `i`.
    fn slot_offset(&self, i: usize) -> u64 {
        (std::mem::size_of::<Header>()
            + self.rank as usize * std::mem::size_of::<RankTable>()
            + std::mem::offset_of!(RankTable, slots)
            + i * std::mem::size_of::<Slot>()) as u64
    }

    /// Writes the private entry `i` to the file's table, its state last. Through `pwrite`, not
    /// the mapping: a file another process truncated gives an error here, never SIGBUS.
    /// Only this process writes the rank's table (it holds the rank's lock).
    fn write_slot(&self, slots: &Slots, i: usize) -> Result<()> {
        let e = &slots.entries[i];
        let tag = e.tag.as_bytes();
        let tag_len = tag.len().min(256);
        let mut raw = Slot {
            state: AtomicU32::new(e.state),
            index: e.index,
            offset: e.offset,
            size: e.size,
            checksum: e.checksum.unwrap_or(0),
            has_checksum: u32::from(e.checksum.is_some()),
            tag_len: tag_len as u32,
            tag: [0; 256],
            requested: e.requested,
            serial: e.serial,
            kind: e.kind,
            _pad: 0,
        };
        raw.tag[..tag_len].copy_from_slice(&tag[..tag_len]);
        // SAFETY: `Slot` is repr(C) with no padding (every field is naturally aligned and the
        // size is a multiple of 8), so all its bytes are initialised.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                &raw as *const Slot as *const u8,
                std::mem::size_of::<Slot>(),
            )
        };
        let at = self.slot_offset(i);
        let state = std::mem::offset_of!(Slot, state);
        let (head, rest) = bytes.split_at(state + 4);
        // Entering VALID: the fields first, the state last. Leaving it (free, being written):
        // the state first. A process killed between the two writes leaves a slot that is
        // either not valid or valid with its complete fields.
        let write_state = || pwrite_all(&self.fd, &head[state..], at + state as u64);
        if e.state != VALID {
            write_state()?;
        }
        pwrite_all(&self.fd, rest, at + head.len() as u64)?;
        if e.state == VALID {
            write_state()?;
        }
        Ok(())
    }

    /// Updates entry `i` privately and in the file; a failed write is logged (the private
    /// state, which decides everything this process does, is already right).
    fn store_slot(&self, slots: &mut Slots, i: usize, e: Entry) {
        slots.entries[i] = e;
        if let Err(err) = self.write_slot(slots, i) {
            log::error!("devmem: shared store: writing slot {i}: {err}");
        }
    }

    fn area(&self) -> usize {
        self.base
            + self.layout.header_bytes as usize
            + self.rank as usize * self.layout.rank_bytes as usize
    }

    /// The file this region lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The generation of the instance using the region (1 for a new file).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The instance name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// This process's rank.
    pub fn rank(&self) -> u32 {
        self.rank
    }

    /// The number of ranks.
    pub fn world(&self) -> u32 {
        self.layout.world
    }

    /// Whether the region stays when its last user leaves (durable sleep).
    pub fn kept(&self) -> bool {
        self.check_intact().is_ok() && self.header().kept.load(Ordering::Relaxed) != 0
    }

    fn write_owner(&self, pid: u32) -> Result<()> {
        let at =
            std::mem::size_of::<Header>() + self.rank as usize * std::mem::size_of::<RankTable>();
        pwrite_all(&self.fd, &pid.to_le_bytes(), at as u64)
    }

    /// Bytes of this rank's area.
    pub fn rank_bytes(&self) -> usize {
        self.layout.rank_bytes as usize
    }

    /// Opens (or creates) the region and claims `options.rank` in it; the area is reserved,
    /// populated and pinned (with `backend` for `device`) before this returns.
    pub fn open(options: &Options, backend: &Arc<dyn Backend>, device: i32) -> Result<Arc<Self>> {
        let layout = Layout::of(options)?;
        let path = path_for(&options.name, options.dir.as_deref())?;
        if options.dir.is_none() {
            ensure_private_dir(&private_dir())?;
        }
        let deadline = Instant::now() + options.timeout;
        let (fd, created) = loop {
            match Self::join(&path, &layout, options, deadline)? {
                Some(joined) => break joined,
                None => std::thread::sleep(Duration::from_millis(5)),
            }
        };
        let base = match map_file(&fd, layout.total_bytes) {
            Ok(base) => base,
            Err(err) => {
                Self::abandon(&path, &fd, created);
                return Err(err);
            }
        };
        let mut region = Self {
            path,
            name: options.name.clone(),
            fd,
            base,
            layout,
            rank: options.rank,
            pinning: Arc::new(Pinning::default()),
            pinner: Mutex::new(None),
            slots: Mutex::new(Slots {
                entries: vec![Entry::free(); SLOTS],
                next_serial: 1,
                manifest: None,
            }),
            member: Mutex::new(true),
            generation: 0,
        };
        if let Err(err) = region.start(options, created, backend, device) {
            // A file this call created holds nothing of anyone's: it goes, kept or not.
            region.leave_removing(created);
            return Err(err);
        }
        Ok(Arc::new(region))
    }

    /// One attempt at joining the instance: `Ok(None)` to try again shortly.
    fn join(
        path: &Path,
        layout: &Layout,
        options: &Options,
        deadline: Instant,
    ) -> Result<Option<(OwnedFd, bool)>> {
        let timed_out = Instant::now() >= deadline;
        match open_file(path)? {
            Opened::Created(fd) => {
                // Locked, then still at the path: a process that took this file for one whose
                // creator died (it was not locked yet) removed it meanwhile otherwise. Once
                // locked here, nobody can remove it.
                if !lock_byte(&fd, 0, libc::F_RDLCK)? || !still_linked(path, &fstat(&fd)?) {
                    return Ok(None);
                }
                if let Err(err) = Self::create(&fd, layout, &options.name, options.keep) {
                    Self::abandon(path, &fd, true);
                    return Err(err.context(format!("shared store: creating {}", path.display())));
                }
                Ok(Some((fd, true)))
            }
            Opened::Existing(fd) => {
                let st = fstat(&fd)?;
                check_owner(path, &st)?;
                if !lock_byte(&fd, 0, libc::F_RDLCK)? || !still_linked(path, &st) {
                    // A last user is removing it, or a new file took its place: start again.
                    return if timed_out {
                        Err(Error::new(
                            devmem_status::Region,
                            format!(
                                "shared store: {} kept changing for {:?}",
                                path.display(),
                                options.timeout
                            ),
                        ))
                    } else {
                        Ok(None)
                    };
                }
                match Self::check_existing(path, &fd, &st, layout, &options.name)? {
                    Check::Ready => Ok(Some((fd, false))),
                    Check::NotReady => {
                        // The creator holds byte 0 from just after creating the file until it
                        // leaves: alone with a file not ready, for longer than a creator needs
                        // to lock it, means the creator died. Its file holds nothing: removed.
                        let age = file_age(&st);
                        if age >= ABANDONED_AFTER && lock_byte(&fd, 0, libc::F_WRLCK)? {
                            log::warn!(
                                "devmem: shared store: removing {}, which its creator left \
                                 uninitialised ({:.1} s old, no process uses it)",
                                path.display(),
                                age.as_secs_f64()
                            );
                            Self::abandon(path, &fd, true);
                            return Ok(None);
                        }
                        if !timed_out {
                            return Ok(None);
                        }
                        bail!(
                            Region,
                            "shared store: {} was not initialised within {:?} by the process \
                             creating it, which still holds it",
                            path.display(),
                            options.timeout
                        )
                    }
                    Check::Different(found) => {
                        if options.reclaim && lock_byte(&fd, 0, libc::F_WRLCK)? {
                            log::warn!(
                                "devmem: shared store: replacing {} ({found}); asked for {}",
                                path.display(),
                                layout.describe()
                            );
                            Self::abandon(path, &fd, true);
                            return Ok(None);
                        }
                        bail!(
                            Region,
                            "shared store: {} has a different layout ({found}) than asked for \
                             ({}); it is never reused with another layout: remove it, or open \
                             with reclaim when no process uses it",
                            path.display(),
                            layout.describe()
                        )
                    }
                }
            }
        }
    }

    /// Sizes a new file and writes its header; `ready` is set last.
    fn create(fd: &OwnedFd, layout: &Layout, name: &str, keep: bool) -> Result<()> {
        // SAFETY: a valid descriptor; the mode is exactly 0600 whatever the umask.
        if unsafe { libc::fchmod(fd.as_raw_fd(), 0o600) } != 0 {
            return Err(os_error("fchmod", devmem_status::Region));
        }
        // SAFETY: a valid descriptor; the length was checked to fit off_t.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), layout.total_bytes as libc::off_t) } != 0 {
            let status = match errno() {
                libc::ENOSPC | libc::ENOMEM | libc::EFBIG => devmem_status::HostOutOfMemory,
                _ => devmem_status::Region,
            };
            return Err(os_error(
                format!("ftruncate to {} bytes", layout.total_bytes),
                status,
            ));
        }
        // Every page of the header and the slot tables is reserved before any is written
        // through a mapping: on a full tmpfs this is ENOSPC, not SIGBUS.
        // SAFETY: a valid descriptor; the range lies inside the file.
        let rc =
            unsafe { libc::fallocate(fd.as_raw_fd(), 0, 0, layout.header_bytes as libc::off_t) };
        if rc != 0 && errno() != libc::EOPNOTSUPP {
            let status = match errno() {
                libc::ENOSPC | libc::ENOMEM | libc::EFBIG => devmem_status::HostOutOfMemory,
                _ => devmem_status::Region,
            };
            return Err(os_error(
                format!("reserving the {} header bytes", layout.header_bytes),
                status,
            ));
        }
        let header_len = std::mem::size_of::<Header>() as u64;
        let base = map_file(fd, header_len)?;
        // SAFETY: the first bytes of the new, zero-filled file, mapped just above and reserved;
        // no other process reads them before `ready` is set.
        let header = unsafe { &mut *(base as *mut Header) };
        header.magic = MAGIC;
        header.version = VERSION;
        header.layout = LAYOUT_CONTIGUOUS;
        header.header_bytes = layout.header_bytes;
        header.total_bytes = layout.total_bytes;
        header.rank_bytes = layout.rank_bytes;
        header.world = layout.world;
        header.slots_per_rank = SLOTS as u32;
        header.kept.store(u32::from(keep), Ordering::Relaxed);
        header
            .creator_pid
            .store(std::process::id(), Ordering::Relaxed);
        header
            .instance_pid
            .store(std::process::id(), Ordering::Relaxed);
        header.generation.store(1, Ordering::Relaxed);
        header.name_len = name.len() as u32;
        header.name[..name.len()].copy_from_slice(name.as_bytes());
        header.ready.store(READY, Ordering::Release);
        unmap_file(base, header_len);
        Ok(())
    }

    /// Checks an existing file's header against the layout asked for, touching nothing else.
    fn check_existing(
        path: &Path,
        fd: &OwnedFd,
        st: &libc::stat,
        want: &Layout,
        name: &str,
    ) -> Result<Check> {
        let header_len = std::mem::size_of::<Header>() as u64;
        if (st.st_size as u64) < header_len {
            // A creator between ftruncate and its header, or a truncated file.
            return Ok(Check::NotReady);
        }
        let base = map_file(fd, header_len)?;
        // SAFETY: the first `header_len` bytes of the file, just mapped.
        let header = unsafe { &*(base as *const Header) };
        let out = Self::read_header(path, header, st.st_size as u64, want, name);
        unmap_file(base, header_len);
        out
    }

    fn read_header(
        path: &Path,
        h: &Header,
        file_len: u64,
        want: &Layout,
        name: &str,
    ) -> Result<Check> {
        if h.ready.load(Ordering::Acquire) != READY {
            if h.magic != [0; 8] && h.magic != MAGIC {
                bail!(
                    Region,
                    "shared store: {} is not a devmem region (bad magic)",
                    path.display()
                );
            }
            return Ok(Check::NotReady);
        }
        if h.magic != MAGIC {
            bail!(
                Region,
                "shared store: {} is not a devmem region (bad magic)",
                path.display()
            );
        }
        if h.version != VERSION || h.layout != LAYOUT_CONTIGUOUS {
            bail!(
                Region,
                "shared store: {} has version {} layout {}; this devmem reads version {VERSION} \
                 layout {LAYOUT_CONTIGUOUS}",
                path.display(),
                h.version,
                h.layout
            );
        }
        let found = Layout {
            header_bytes: h.header_bytes,
            rank_bytes: h.rank_bytes,
            world: h.world,
            total_bytes: h.total_bytes,
        };
        let consistent = h.slots_per_rank as usize == SLOTS
            && h.rank_bytes % BLOCK as u64 == 0
            && Layout::new(h.rank_bytes, h.world).is_ok_and(|l| l == found);
        if !consistent {
            bail!(
                Region,
                "shared store: {} has a corrupt header ({} slots per rank, {})",
                path.display(),
                h.slots_per_rank,
                found.describe()
            );
        }
        if file_len != h.total_bytes {
            bail!(
                Region,
                "shared store: {} is {file_len} bytes but its header says {} (truncated or \
                 corrupt)",
                path.display(),
                h.total_bytes
            );
        }
        let recorded = &h.name[..(h.name_len as usize).min(MAX_NAME_LEN)];
        if recorded != name.as_bytes() {
            bail!(
                Region,
                "shared store: {} was made for instance {:?}, not {name:?} (a copy or rename of \
                 another instance's region); refused",
                path.display(),
                String::from_utf8_lossy(recorded)
            );
        }
        if found != *want {
            return Ok(Check::Different(found.describe()));
        }
        Ok(Check::Ready)
    }

    /// Everything after the file is open, mapped and checked: instance, rank, slots, memory.
    fn start(
        &mut self,
        options: &Options,
        created: bool,
        backend: &Arc<dyn Backend>,
        device: i32,
    ) -> Result<()> {
        let me = std::process::id();
        // The first user of an instance holds byte 0 alone for a moment.
        if !created && lock_byte(&self.fd, 0, libc::F_WRLCK)? {
            let h = self.header();
            let previous = h.instance_pid.load(Ordering::Relaxed);
            let generation = h.generation.fetch_add(1, Ordering::AcqRel) + 1;
            if h.kept.load(Ordering::Relaxed) == 0 {
                log::warn!(
                    "devmem: shared store: {} was left by an instance (pid {previous}) that \
                     ended without closing it; reclaiming it as generation {generation}, \
                     keeping its valid slots",
                    self.path.display()
                );
            } else {
                log::info!(
                    "devmem: shared store: reopening kept region {} as generation {generation}",
                    self.path.display()
                );
            }
            h.kept.store(u32::from(options.keep), Ordering::Relaxed);
            h.instance_pid.store(me, Ordering::Relaxed);
            if !lock_byte(&self.fd, 0, libc::F_RDLCK)? {
                bail!(
                    Region,
                    "shared store: could not downgrade the instance lock"
                );
            }
        } else if options.keep {
            self.header().kept.store(1, Ordering::Relaxed);
        }
        self.generation = self.header().generation.load(Ordering::Acquire);
        if !lock_byte(&self.fd, 1 + u64::from(self.rank), libc::F_WRLCK)? {
            let owner = self.table().owner_pid.load(Ordering::Relaxed);
            bail!(
                Region,
                "shared store: rank {} of {} is in use by another process (pid {owner}{})",
                self.rank,
                self.path.display(),
                if pid_alive(owner) {
                    ""
                } else {
                    ", or a process that reopened it"
                }
            );
        }
        self.write_owner(me)?;
        self.check_slots()?;
        self.prepare(backend, device)
    }

    /// Validates this rank's slots into the private table, frees those a killed process left
    /// half-written, and loads the manifest. The last time the file's table is read.
    fn check_slots(&self) -> Result<()> {
        self.check_intact()?;
        let mut slots = self.slots.lock();
        let mut dropped = Vec::new();
        let table = self.table();
        for (i, slot) in table.slots.iter().enumerate() {
            // One read of each field, into private memory, then checks on the copy.
            let state = slot.state.load(Ordering::Acquire);
            let e = Entry {
                state,
                kind: slot.kind,
                offset: slot.offset,
                size: slot.size,
                requested: slot.requested,
                checksum: (slot.has_checksum != 0).then_some(slot.checksum),
                tag: Arc::from(String::from_utf8_lossy(
                    &slot.tag[..(slot.tag_len as usize).min(slot.tag.len())],
                )),
                index: slot.index,
                serial: slot.serial,
                claimed: false,
            };
            let tag_len = slot.tag_len;
            match state {
                FREE => continue,
                WRITING => {
                    dropped.push(i);
                    continue;
                }
                VALID => {}
                other => {
                    log::warn!(
                        "devmem: shared store: {} rank {} slot {i} has an unknown state {other}; \
                         dropping it",
                        self.path.display(),
                        self.rank
                    );
                    dropped.push(i);
                    continue;
                }
            }
            let fits = e
                .offset
                .checked_add(e.size)
                .is_some_and(|end| end <= self.layout.rank_bytes)
                && e.offset % BLOCK as u64 == 0
                && e.size > 0
                && (e.kind == KIND_MANIFEST || e.requested <= e.size)
                && (e.kind == KIND_ALLOCATION || e.kind == KIND_MANIFEST)
                && tag_len as usize <= 256
                && tag_len > 0
                && (1..MAX_SERIAL).contains(&e.serial)
                && (e.kind == KIND_ALLOCATION || e.size <= MAX_MANIFEST);
            if !fits {
                // Never trusted, never fatal: its bytes are nobody's backup any more.
                log::warn!(
                    "devmem: shared store: {} rank {} slot {i} is inconsistent (kind {}, offset \
                     {}, size {}, tag length {tag_len}, serial {}); dropping it",
                    self.path.display(),
                    self.rank,
                    e.kind,
                    e.offset,
                    e.size,
                    e.serial
                );
                dropped.push(i);
                continue;
            }
            slots.entries[i] = e;
        }
        // Two valid slots over the same bytes: something else wrote the table; both go.
        let mut used: Vec<(u64, u64, usize)> = slots
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.state == VALID)
            .map(|(i, e)| (e.offset, e.size.next_multiple_of(BLOCK as u64), i))
            .collect();
        used.sort_unstable();
        for w in used.windows(2).filter(|w| w[0].0 + w[0].1 > w[1].0) {
            log::warn!(
                "devmem: shared store: {} rank {} slots {} and {} overlap; dropping both",
                self.path.display(),
                self.rank,
                w[0].2,
                w[1].2
            );
            dropped.extend([w[0].2, w[1].2]);
        }
        dropped.sort_unstable();
        dropped.dedup();
        for i in &dropped {
            slots.entries[*i] = Entry::free();
        }
        slots.next_serial = slots.entries.iter().map(|e| e.serial).max().unwrap_or(0) + 1;
        for i in &dropped {
            self.store_slot(&mut slots, *i, Entry::free());
        }
        if !dropped.is_empty() {
            log::warn!(
                "devmem: shared store: rank {} dropped {} slot(s) a previous process left \
                 half-written or inconsistent",
                self.rank,
                dropped.len()
            );
        }
        self.load_manifest(&mut slots);
        Ok(())
    }

    /// Reserves this rank's area (after checking the bound on host memory), then populates and
    /// pins it in the background, piece by piece ([`Pinning`]): copies into or out of a piece
    /// wait only for that piece, so a restore's first copies start while later pieces are
    /// still being pinned.
    fn prepare(&mut self, backend: &Arc<dyn Backend>, device: i32) -> Result<()> {
        let (area, len) = (self.area(), self.rank_bytes());
        let missing = len - resident_bytes(area, len);
        if missing > 0 {
            super::bound::check(
                missing as u64,
                super::held_bytes() as u64,
                &super::bound::Room::read(),
            )
            .map_err(|e| e.context("shared store: reserving this rank's area"))?;
        }
        let offset = area - self.base;
        // A restarted process finds every page there already.
        let rc = if missing == 0 {
            0
        } else {
            // SAFETY: a valid descriptor; the range lies inside the file.
            unsafe {
                libc::fallocate(
                    self.fd.as_raw_fd(),
                    0,
                    offset as libc::off_t,
                    len as libc::off_t,
                )
            }
        };
        if rc != 0 && errno() != libc::EOPNOTSUPP {
            return Err(os_error(
                format!(
                    "reserving {len} bytes of {} for rank {}",
                    self.path.display(),
                    self.rank
                ),
                devmem_status::HostOutOfMemory,
            ));
        }
        // SAFETY: advice on this rank's part of the mapping; where shared memory may use
        // transparent huge pages (`shmem_enabled` advise or always) pinning is far cheaper,
        // elsewhere the advice fails or does nothing.
        unsafe { libc::madvise(area as *mut libc::c_void, len, libc::MADV_HUGEPAGE) };
        let asked = super::durable_read::Mode::from_env()?;
        let (huge, why_huge) = super::durable_read::huge_pages(self.fd.as_raw_fd());
        let (mode, why) = super::durable_read::resolve(asked, huge, &why_huge);
        let piece = mode.piece();
        let pins = backend.host_memory() == HostMemory::Register && piece.is_some();
        if backend.host_memory() == HostMemory::Register {
            log::info!(
                "devmem: shared store {}: durable reads {} ({why})",
                self.path.display(),
                mode.name()
            );
        }
        let pinning = Arc::new(Pinning::new(
            area,
            len,
            piece.unwrap_or(super::durable_read::PIECE),
            pins.then(|| (Arc::clone(backend), device)),
        ));
        self.pinning = Arc::clone(&pinning);
        if !pins {
            return Ok(()); // Level Zero copies from pageable memory: nothing to pin
        }
        let worker = Arc::clone(&pinning);
        match crate::threads::spawn("devmem-region-pin", move || worker.run()) {
            Ok(handle) => *self.pinner.lock() = Some(handle),
            Err(err) => {
                log::debug!("devmem: shared store: pinning on the calling thread: {err}");
                pinning.run();
            }
        }
        Ok(())
    }

    /// Waits until `[ptr, ptr+len)` of this rank's area is pinned.
    pub fn wait_pinned(&self, ptr: usize, len: usize) -> Result<()> {
        self.pinning.wait(ptr + len - self.area())
    }

    /// Splits `[ptr, ptr+len)` of this rank's area at the pinned pieces' boundaries, as
    /// (offset into the range, address, bytes): a copy may not cross two registrations.
    pub fn split(&self, ptr: usize, len: usize) -> Vec<(usize, usize, usize)> {
        let area = self.area();
        let mut out = Vec::new();
        let mut at = ptr;
        while at < ptr + len {
            let piece = self.pinning.piece();
            let piece_end = area + ((at - area) / piece + 1) * piece;
            let n = piece_end.min(ptr + len) - at;
            out.push((at - ptr, at, n));
            at += n;
        }
        out
    }

    /// Removes a file this process created (or found abandoned) and could not use.
    fn abandon(path: &Path, fd: &OwnedFd, remove: bool) {
        if remove {
            if let Ok(c) = c_path(path) {
                let st = fstat(fd).ok();
                // Only the file this descriptor is: never one created meanwhile by another.
                if st.is_some_and(|st| still_linked(path, &st)) {
                    // SAFETY: a NUL-terminated path.
                    unsafe { libc::unlink(c.as_ptr()) };
                }
            }
        }
    }

    /// Leaves the instance: the last user unlinks the file unless it is kept. The mapping and
    /// the rank stay this process's until the region is dropped.
    pub fn leave(&self) {
        self.leave_removing(false);
    }

    /// [`leave`](Self::leave); `remove` removes the file even when kept, if this is its last
    /// user.
    fn leave_removing(&self, remove: bool) {
        let mut member = self.member.lock();
        if !*member {
            return;
        }
        *member = false;
        let last = lock_byte(&self.fd, 0, libc::F_WRLCK).unwrap_or(false);
        // A file changed under the mapping is never read through it again.
        let kept = || match self.check_intact() {
            Ok(()) => self.header().kept.load(Ordering::Relaxed) != 0,
            Err(_) => true,
        };
        if last && (remove || !kept()) {
            Self::abandon(&self.path, &self.fd, true);
            log::info!("devmem: shared store: removed {}", self.path.display());
        }
        if let Err(err) = lock_byte(&self.fd, 0, libc::F_UNLCK) {
            log::warn!("devmem: shared store: {err}");
        }
    }

    /// Refuses a file that another process truncated, resized or linked since it was opened:
    /// every sleep, restore and manifest write checks this before touching the mapping.
    pub fn check_intact(&self) -> Result<()> {
        let st = fstat(&self.fd)?;
        if st.st_size as u64 != self.layout.total_bytes {
            bail!(
                Region,
                "shared store: {} is now {} bytes, not {} (truncated or resized by another \
                 process); it is not touched again",
                self.path.display(),
                st.st_size,
                self.layout.total_bytes
            );
        }
        if st.st_nlink > 1 {
            bail!(
                Region,
                "shared store: {} has {} links (another name for the same file could reuse \
                 its bytes as another instance's); refused",
                self.path.display(),
                st.st_nlink
            );
        }
        Ok(())
    }

    fn stored(&self, i: usize, e: &Entry) -> Stored {
        Stored {
            slot: i,
            ptr: self.area() + e.offset as usize,
            size: e.size as usize,
            requested: e.requested,
            checksum: e.checksum,
        }
    }

    /// Takes a slot for `key` with room for `len` bytes, marked as being written. Reuses the
    /// slot of an earlier snapshot of the same allocation when it has the same size; evicts
    /// snapshots no allocation of this process holds when space runs out.
    pub fn take(&self, key: &SlotKey, len: usize) -> Result<Stored> {
        self.check_intact()?;
        let mut slots = self.slots.lock();
        let same = Self::find_locked(&slots, key)
            .filter(|&i| !slots.entries[i].claimed && slots.entries[i].size == len as u64);
        let (slot, offset) = match same {
            Some(i) => (i, slots.entries[i].offset),
            None => self.allocate(&mut slots, len, KIND_ALLOCATION)?,
        };
        let serial = slots.next_serial;
        slots.next_serial += 1;
        let e = Entry {
            state: WRITING,
            kind: KIND_ALLOCATION,
            offset,
            size: len as u64,
            requested: key.requested,
            checksum: None,
            tag: Arc::clone(&key.tag),
            index: key.index,
            serial,
            claimed: true,
        };
        let stored = self.stored(slot, &e);
        slots.entries[slot] = e;
        if let Err(err) = self.write_slot(&slots, slot) {
            slots.entries[slot] = Entry::free();
            return Err(err.context("shared store: recording a slot"));
        }
        drop(slots);
        if let Err(err) = self.wait_pinned(stored.ptr, len) {
            self.release(slot);
            return Err(err);
        }
        Ok(stored)
    }

    /// A free slot and `len` bytes of the area for it, evicting unclaimed snapshots as needed.
    fn allocate(&self, slots: &mut Slots, len: usize, kind: u32) -> Result<(usize, u64)> {
        let Some(free) = slots.entries.iter().position(|e| e.state == FREE) else {
            bail!(
                HostOutOfMemory,
                "shared store: rank {} of {} has all its {SLOTS} slots in use",
                self.rank,
                self.path.display()
            );
        };
        let len_blocks = len.next_multiple_of(BLOCK);
        loop {
            if let Some(offset) = self.fit(slots, len_blocks, kind) {
                return Ok((free, offset as u64));
            }
            let victim = slots
                .entries
                .iter()
                .position(|e| !e.claimed && e.is(VALID, KIND_ALLOCATION));
            let Some(victim) = victim else {
                bail!(
                    HostOutOfMemory,
                    "shared store: rank {} of {} has no room for {len} more bytes ({} bytes \
                     for backups, plus {MANIFEST_RESERVE} for names)",
                    self.rank,
                    self.path.display(),
                    self.rank_bytes() - MANIFEST_RESERVE
                );
            };
            log::warn!(
                "devmem: shared store: evicting an unclaimed snapshot (slot {victim}, tag {:?}) \
                 to make room",
                slots.entries[victim].tag
            );
            self.store_slot(slots, victim, Entry::free());
        }
    }

    /// The first offset of a free run of `len` bytes in this rank's area.
    /// An offset for `len` more bytes of this rank's area: backups take the first free run
    /// below the manifest's reserve; a manifest takes the last free run in the whole area, so
    /// it stays in (or next to) the reserve and never splits the backups' room.
    fn fit(&self, slots: &Slots, len: usize, kind: u32) -> Option<usize> {
        let mut used: Vec<(usize, usize)> = slots
            .entries
            .iter()
            .filter(|e| e.state != FREE)
            .map(|e| (e.offset as usize, (e.size as usize).next_multiple_of(BLOCK)))
            .collect();
        used.sort_unstable();
        let limit = if kind == KIND_MANIFEST {
            self.rank_bytes()
        } else {
            self.rank_bytes() - MANIFEST_RESERVE
        };
        let mut gaps = Vec::new();
        let mut at = 0usize;
        for (start, n) in used {
            if start > at {
                gaps.push((at, start.min(limit)));
            }
            at = at.max(start + n);
        }
        gaps.push((at, limit));
        let fits = |(start, end): &(usize, usize)| end.saturating_sub(*start) >= len;
        if kind == KIND_MANIFEST {
            gaps.iter()
                .rev()
                .find(|g| fits(g))
                .map(|(_, end)| end - len)
        } else {
            gaps.iter().find(|g| fits(g)).map(|(start, _)| *start)
        }
    }

    /// Marks a slot's bytes complete, with their device checksum when one was computed.
    pub fn seal(&self, slot: usize, checksum: Option<u64>) {
        let mut slots = self.slots.lock();
        let mut e = slots.entries[slot].clone();
        e.checksum = checksum;
        e.state = VALID;
        self.store_slot(&mut slots, slot, e);
    }

    /// Frees a slot: its bytes are no longer anyone's backup.
    pub fn release(&self, slot: usize) {
        let mut slots = self.slots.lock();
        self.store_slot(&mut slots, slot, Entry::free());
    }

    /// Adopts a valid slot left by an earlier process as this process's backup.
    pub fn adopt(&self, slot: usize) -> Result<()> {
        let mut slots = self.slots.lock();
        if slots.entries[slot].claimed {
            bail!(
                InvalidState,
                "shared store: slot {slot} already holds one of this process's backups"
            );
        }
        slots.entries[slot].claimed = true;
        Ok(())
    }

    /// Records that the allocation saved in `slot` now has `key` (an earlier allocation of
    /// its tag was freed, so its index changed).
    pub fn rekey(&self, slot: usize, key: &SlotKey) {
        let mut slots = self.slots.lock();
        let e = &slots.entries[slot];
        if e.state == FREE || (e.index == key.index && e.tag == key.tag) {
            return;
        }
        let mut e = e.clone();
        e.index = key.index;
        e.tag = Arc::clone(&key.tag);
        self.store_slot(&mut slots, slot, e);
    }

    /// The valid slot holding `key`, if any.
    pub fn find(&self, key: &SlotKey) -> Option<Stored> {
        let slots = self.slots.lock();
        Self::find_locked(&slots, key).map(|i| self.stored(i, &slots.entries[i]))
    }

    fn find_locked(slots: &Slots, key: &SlotKey) -> Option<usize> {
        slots
            .entries
            .iter()
            .position(|e| e.is(VALID, KIND_ALLOCATION) && e.index == key.index && e.tag == key.tag)
    }

    /// Valid allocation slots of this rank whose tag is `tag`.
    pub fn count_tag(&self, tag: &str) -> usize {
        let slots = self.slots.lock();
        slots
            .entries
            .iter()
            .filter(|e| e.is(VALID, KIND_ALLOCATION) && &*e.tag == tag)
            .count()
    }

    /// Valid allocation slots of this rank (claimed or not).
    pub fn valid_slots(&self) -> usize {
        let slots = self.slots.lock();
        slots
            .entries
            .iter()
            .filter(|e| e.is(VALID, KIND_ALLOCATION))
            .count()
    }

    /// The named ranges the manifest holds whose slot still holds the bytes they were
    /// recorded for (same serial, still valid).
    pub fn named_ranges(&self) -> Vec<StoredRange> {
        let slots = self.slots.lock();
        let Some((_, ranges)) = &slots.manifest else {
            return Vec::new();
        };
        ranges
            .iter()
            .filter_map(|r| {
                let e = slots.entries.get(r.slot)?;
                let holds = e.is(VALID, KIND_ALLOCATION)
                    && e.serial == r.serial
                    && e.tag == r.tag
                    && r.offset.checked_add(r.len).is_some_and(|end| end <= e.size);
                holds.then(|| StoredRange {
                    range: r.clone(),
                    ptr: self.area() + (e.offset + r.offset) as usize,
                })
            })
            .collect()
    }

    /// The serial of the valid slot `slot`, if it is one.
    pub fn serial(&self, slot: usize) -> Option<u64> {
        let slots = self.slots.lock();
        slots
            .entries
            .get(slot)
            .filter(|e| e.is(VALID, KIND_ALLOCATION))
            .map(|e| e.serial)
    }

    /// Replaces the rank's manifest with `ranges` (an empty list removes it). Written with
    /// `pwrite` into a new slot, sealed, and only then is the old one freed: a process killed
    /// meanwhile leaves the old manifest or the new one, never half of one.
    pub fn write_manifest(&self, ranges: Vec<NamedRange>) -> Result<()> {
        self.check_intact()?;
        let mut slots = self.slots.lock();
        let old = slots.manifest.as_ref().map(|(slot, _)| *slot);
        if ranges.is_empty() {
            if let Some(old) = old {
                slots.manifest = None;
                self.store_slot(&mut slots, old, Entry::free());
            }
            return Ok(());
        }
        let bytes = manifest::encode(&self.identity(), &ranges);
        if bytes.len() as u64 > MAX_MANIFEST {
            bail!(
                Region,
                "shared store: the names of rank {} take {} bytes, more than {MAX_MANIFEST}; \
                 the previous manifest is kept",
                self.rank,
                bytes.len()
            );
        }
        let (slot, offset) = match self.allocate(&mut slots, bytes.len(), KIND_MANIFEST) {
            Ok(found) => found,
            // No room for two: the old one goes first (a process killed before the new one is
            // written then leaves no names, never wrong ones).
            Err(_) if old.is_some() => {
                if let Some(old) = old {
                    slots.manifest = None;
                    self.store_slot(&mut slots, old, Entry::free());
                }
                self.allocate(&mut slots, bytes.len(), KIND_MANIFEST)
                    .map_err(|e| e.context("shared store: no room for the rank's manifest"))?
            }
            Err(e) => return Err(e.context("shared store: no room for the rank's manifest")),
        };
        let serial = slots.next_serial;
        slots.next_serial += 1;
        let file_offset = (self.area() - self.base) as u64 + offset;
        slots.entries[slot] = Entry {
            state: VALID,
            kind: KIND_MANIFEST,
            offset,
            size: bytes.len() as u64,
            requested: 0,
            checksum: None,
            tag: Arc::from("devmem manifest"),
            index: 0,
            serial,
            claimed: true,
        };
        let written =
            pwrite_all(&self.fd, &bytes, file_offset).and_then(|()| self.write_slot(&slots, slot));
        if let Err(err) = written {
            self.store_slot(&mut slots, slot, Entry::free());
            return Err(err.context("shared store: writing the rank's manifest"));
        }
        // The old manifest goes only once the new one is in place.
        if let Some(old) = old.filter(|o| slots.entries[*o].is(VALID, KIND_MANIFEST) && *o != slot)
        {
            self.store_slot(&mut slots, old, Entry::free());
        }
        slots.manifest = Some((slot, ranges));
        Ok(())
    }

    fn identity(&self) -> manifest::Identity {
        manifest::Identity {
            name: self.name.clone(),
            rank: self.rank,
            world: self.layout.world,
        }
    }

    /// Reads and checks the manifest a previous process left (at open). A manifest that does
    /// not parse, fails its checksum or names another instance, rank or world is dropped
    /// with a warning: restoring by name then refuses every name, never guesses.
    fn load_manifest(&self, slots: &mut Slots) {
        let mut found: Vec<usize> = (0..SLOTS)
            .filter(|&i| slots.entries[i].is(VALID, KIND_MANIFEST))
            .collect();
        found.sort_by_key(|&i| slots.entries[i].serial);
        let Some(newest) = found.pop() else {
            return;
        };
        for stale in found {
            self.store_slot(slots, stale, Entry::free());
        }
        let e = &slots.entries[newest];
        let mut bytes = vec![0u8; e.size as usize];
        let file_offset = (self.area() - self.base) as u64 + e.offset;
        let parsed = pread_exact(&self.fd, &mut bytes, file_offset)
            .and_then(|()| manifest::decode(&bytes, &self.identity()));
        match parsed {
            Ok(ranges) => slots.manifest = Some((newest, ranges)),
            Err(err) => {
                log::warn!(
                    "devmem: shared store: {} rank {}: dropping its manifest: {err}",
                    self.path.display(),
                    self.rank
                );
                self.store_slot(slots, newest, Entry::free());
            }
        }
    }
}

/// Runs `step(done)` (one `pread` or `pwrite` of the bytes from `done` on, at `offset + done`)
/// until `len` bytes are done; EINTR is retried, no progress is an error.
fn positioned_io(
    len: usize,
    offset: u64,
    what: &str,
    mut step: impl FnMut(usize) -> isize,
) -> Result<()> {
    let mut done = 0;
    while done < len {
        let n = step(done);
        if n < 0 && errno() == libc::EINTR {
            continue;
        }
        if n < 0 {
            return Err(os_error(
                format!(
                    "{what} {} bytes at offset {}",
                    len - done,
                    offset + done as u64
                ),
                devmem_status::Region,
            ));
        }
        if n == 0 {
            bail!(
                Region,
                "shared store: {what} at offset {}: the file ends there",
                offset + done as u64
            );
        }
        done += n as usize;
    }
    Ok(())
}

fn pwrite_all(fd: &OwnedFd, bytes: &[u8], offset: u64) -> Result<()> {
    positioned_io(bytes.len(), offset, "writing", |done| {
        // SAFETY: a valid descriptor and `bytes.len() - done` readable bytes from `done`.
        unsafe {
            libc::pwrite(
                fd.as_raw_fd(),
                bytes[done..].as_ptr().cast(),
                bytes.len() - done,
                (offset + done as u64) as libc::off_t,
            )
        }
    })
}

fn pread_exact(fd: &OwnedFd, bytes: &mut [u8], offset: u64) -> Result<()> {
    let len = bytes.len();
    positioned_io(len, offset, "reading", |done| {
        // SAFETY: a valid descriptor and `len - done` writable bytes from `done`.
        unsafe {
            libc::pread(
                fd.as_raw_fd(),
                bytes[done..].as_mut_ptr().cast(),
                len - done,
                (offset + done as u64) as libc::off_t,
            )
        }
    })
}

/// Pieces the area is pinned in by default (each its own registration with the driver);
/// `DEVMEM_DURABLE_READ` chooses ([`super::durable_read`]).
const PIN_PIECE: usize = super::durable_read::PIECE;
/// Threads populating pieces ahead of the one registering them.
const POPULATE_THREADS: usize = 4;

/// Pins a rank's area in [`PIN_PIECE`]s, in order: helper threads fault pieces in
/// (`MADV_POPULATE_WRITE`, which keeps the bytes a durable region holds) ahead of one thread
/// that registers them with the driver (the driver registers one range at a time, measured on
/// the H100: more registering threads are slower). Waiters block until their piece is pinned.
#[derive(Default)]
pub struct Pinning {
    area: usize,
    len: usize,
    /// Bytes per registration (0: [`PIN_PIECE`]).
    piece: usize,
    driver: Option<(Arc<dyn Backend>, i32)>,
    state: parking_lot::Mutex<PinState>,
    changed: parking_lot::Condvar,
}

#[derive(Default)]
struct PinState {
    /// Pieces pinned so far (always a prefix of the area).
    pinned: usize,
    /// Per piece: 0 to populate, 1 being populated, 2 populated.
    populated: Vec<u8>,
    error: Option<Error>,
    stop: bool,
    done: bool,
}

impl Pinning {
    fn new(area: usize, len: usize, piece: usize, driver: Option<(Arc<dyn Backend>, i32)>) -> Self {
        let piece = piece.max(BLOCK);
        let pieces = len.div_ceil(piece);
        let done = driver.is_none();
        Self {
            area,
            len,
            piece,
            driver,
            state: parking_lot::Mutex::new(PinState {
                pinned: if done { pieces } else { 0 },
                populated: vec![0; pieces],
                error: None,
                stop: false,
                done,
            }),
            changed: parking_lot::Condvar::new(),
        }
    }

    /// Bytes per registration.
    fn piece(&self) -> usize {
        if self.piece == 0 {
            PIN_PIECE
        } else {
            self.piece
        }
    }

    fn piece_at(&self, i: usize) -> (usize, usize) {
        let start = i * self.piece();
        (self.area + start, self.piece().min(self.len - start))
    }

    /// Claims the next piece to populate, if any.
    fn claim(&self) -> Option<usize> {
        let mut st = self.state.lock();
        if st.stop || st.error.is_some() {
            return None;
        }
        let i = st.populated.iter().position(|p| *p == 0)?;
        st.populated[i] = 1;
        Some(i)
    }

    fn populate(&self, i: usize) {
        let (ptr, len) = self.piece_at(i);
        // SAFETY: advice on a piece of this rank's shared mapping, which stays mapped until the
        // pinning has stopped. MADV_POPULATE_WRITE faults pages in without changing them.
        let rc = unsafe { libc::madvise(ptr as *mut libc::c_void, len, libc::MADV_POPULATE_WRITE) };
        if rc != 0 && errno() != libc::EINVAL {
            // EINVAL: a kernel before 5.14; the registration faults the pages in instead.
            let err = os_error(
                format!("populating {len} bytes of the region"),
                devmem_status::HostOutOfMemory,
            );
            self.state.lock().error.get_or_insert(err);
        }
        self.state.lock().populated[i] = 2;
        self.changed.notify_all();
    }

    /// The pinning thread: registers every piece in order, with helpers populating ahead.
    fn run(&self) {
        let Some((backend, device)) = &self.driver else {
            return;
        };
        let pieces = self.len.div_ceil(self.piece());
        let started = Instant::now();
        std::thread::scope(|scope| {
            for _ in 1..POPULATE_THREADS.min(pieces) {
                let spawned = crate::threads::spawn_scoped(scope, "devmem-region-populate", || {
                    while let Some(i) = self.claim() {
                        self.populate(i);
                    }
                });
                if spawned.is_err() {
                    break; // fewer helpers: only slower
                }
            }
            for i in 0..pieces {
                let mut st = self.state.lock();
                if st.populated[i] == 0 {
                    st.populated[i] = 1;
                    drop(st);
                    self.populate(i);
                    st = self.state.lock();
                }
                while st.populated[i] != 2 && !st.stop {
                    self.changed.wait(&mut st);
                }
                if st.stop || st.error.is_some() {
                    break;
                }
                drop(st);
                let (ptr, len) = self.piece_at(i);
                let pinned = backend
                    .host_register(*device, ptr as *mut u8, len)
                    .map_err(|e| e.context("shared store: pinning this rank's area"));
                let mut st = self.state.lock();
                match pinned {
                    Ok(()) => st.pinned = i + 1,
                    Err(err) => {
                        st.error.get_or_insert(err);
                    }
                }
                drop(st);
                self.changed.notify_all();
            }
            let mut st = self.state.lock();
            st.stop = true; // the helpers stop claiming
            st.done = true;
        });
        log::info!(
            "devmem: shared store: pinned {} bytes in {:.3} s",
            (self.state.lock().pinned * self.piece()).min(self.len),
            started.elapsed().as_secs_f64()
        );
        self.changed.notify_all();
    }

    /// Waits until the first `end` bytes of the area are pinned; the pinning's error if any.
    fn wait(&self, end: usize) -> Result<()> {
        let need = end.div_ceil(self.piece());
        let mut st = self.state.lock();
        loop {
            if st.pinned >= need {
                return Ok(());
            }
            if let Some(err) = &st.error {
                return Err(err.clone());
            }
            if st.done {
                bail!(
                    HostOutOfMemory,
                    "shared store: the area was not pinned (the pinning stopped)"
                );
            }
            self.changed.wait(&mut st);
        }
    }

    fn stop(&self) {
        self.state.lock().stop = true;
        self.changed.notify_all();
    }

    fn unpin_all(&self) {
        let Some((backend, device)) = &self.driver else {
            return;
        };
        let pinned = self.state.lock().pinned;
        for i in 0..pinned {
            let (ptr, _) = self.piece_at(i);
            if let Err(err) = backend.host_unregister(*device, ptr as *mut u8) {
                log::error!("devmem: shared store: unpinning: {err}");
            }
        }
    }
}

/// A creator locks its new file within microseconds; one not ready after this long, with no
/// process holding it, was left by a creator that died.
const ABANDONED_AFTER: Duration = Duration::from_millis(500);

/// How long ago the file's status last changed (its creation, for a file not yet ready).
fn file_age(st: &libc::stat) -> Duration {
    let changed = std::time::UNIX_EPOCH
        + Duration::new(
            st.st_ctime.max(0) as u64,
            st.st_ctime_nsec.clamp(0, 999_999_999) as u32,
        );
    std::time::SystemTime::now()
        .duration_since(changed)
        .unwrap_or_default()
}

enum Check {
    Ready,
    NotReady,
    Different(String),
}

/// Bytes of `[base, base+len)` already in memory (a region's pages survive its processes).
fn resident_bytes(base: usize, len: usize) -> usize {
    let page = 4096;
    let mut vec = vec![0u8; len.div_ceil(page)];
    // SAFETY: `base..base+len` is a mapping of this process; `vec` has one byte per page.
    if unsafe { libc::mincore(base as *mut libc::c_void, len, vec.as_mut_ptr()) } != 0 {
        return 0;
    }
    vec.iter().filter(|b| **b & 1 != 0).count() * page
}

impl Drop for Region {
    fn drop(&mut self) {
        self.leave();
        self.pinning.stop();
        if let Some(handle) = self.pinner.lock().take() {
            if handle.join().is_err() {
                log::error!("devmem: shared store: the pinning thread panicked");
            }
        }
        self.pinning.unpin_all();
        if let Err(err) = self.write_owner(0) {
            log::warn!("devmem: shared store: {err}");
        }
        unmap_file(self.base, self.layout.total_bytes);
    }
}

/// Default wait for a creator that is still initialising the region.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

fn env_value<T>(
    name: &str,
    accepted: &str,
    parse: impl Fn(&str) -> Option<T>,
) -> Result<Option<T>> {
    match std::env::var(name) {
        Err(std::env::VarError::NotPresent) => Ok(None),
        Ok(v) => parse(v.trim()).map(Some).ok_or_else(|| {
            Error::new(
                devmem_status::InvalidArgument,
                format!("{name}={v:?} is not valid: expected {accepted}"),
            )
        }),
        Err(std::env::VarError::NotUnicode(v)) => bail!(
            InvalidArgument,
            "{name}={v:?} is not valid: expected {accepted}"
        ),
    }
}

fn flag(v: &str) -> Option<bool> {
    match v {
        "1" | "true" | "yes" => Some(true),
        "0" | "false" | "no" => Some(false),
        _ => None,
    }
}

/// The region `DEVMEM_SHARED_STORE` names, with `DEVMEM_SHARED_BYTES` (required),
/// `DEVMEM_SHARED_RANK`, `DEVMEM_SHARED_WORLD`, `DEVMEM_SHARED_DIR`, `DEVMEM_SHARED_KEEP`,
/// `DEVMEM_SHARED_RECLAIM` and `DEVMEM_SHARED_TIMEOUT_S`. Any invalid value is an error.
pub fn options_from_env() -> Result<Option<Options>> {
    let Some(name) = env_value("DEVMEM_SHARED_STORE", "an instance name", |v| {
        check_name(v).ok().map(|()| v.to_string())
    })?
    else {
        return Ok(None);
    };
    let sizes = "a size in bytes, with an optional K, M, G or T suffix";
    let Some(bytes_per_rank) = env_value("DEVMEM_SHARED_BYTES", sizes, |v| {
        super::bound::parse_size(v).filter(|b| *b > 0)
    })?
    else {
        bail!(
            InvalidArgument,
            "DEVMEM_SHARED_STORE={name:?} needs DEVMEM_SHARED_BYTES (bytes each rank can hold)"
        );
    };
    let count = |v: &str| v.parse::<u32>().ok();
    let world = env_value("DEVMEM_SHARED_WORLD", "a whole number from 1", count)?.unwrap_or(1);
    let rank = env_value(
        "DEVMEM_SHARED_RANK",
        "a whole number below the world size",
        count,
    )?
    .unwrap_or(0);
    let dir = env_value("DEVMEM_SHARED_DIR", "a directory", |v| {
        (!v.is_empty()).then(|| PathBuf::from(v))
    })?;
    let yes_no = "1 or 0";
    let keep = env_value("DEVMEM_SHARED_KEEP", yes_no, flag)?.unwrap_or(false);
    let reclaim = env_value("DEVMEM_SHARED_RECLAIM", yes_no, flag)?.unwrap_or(false);
    let timeout = env_value(
        "DEVMEM_SHARED_TIMEOUT_S",
        "a number of seconds from 0 to 86400",
        |v| {
            v.parse::<f64>()
                .ok()
                .filter(|s| (0.0..=86400.0).contains(s))
                .map(Duration::from_secs_f64)
        },
    )?
    .unwrap_or(DEFAULT_TIMEOUT);
    Ok(Some(Options {
        name,
        dir,
        bytes_per_rank,
        rank,
        world,
        keep,
        reclaim,
        timeout,
    }))
}
