//! The keeper server: a single-threaded poll loop over a listening SOCK_SEQPACKET socket and
//! its connections. It holds fds only (no driver, no mapping). A client's behaviour never
//! takes it down: malformed messages close that connection, stray fds are closed, sends use
//! MSG_NOSIGNAL with a timeout. Memory is released only by `release`, `shutdown`, SIGTERM or
//! SIGINT.

use crate::client::{peer_cred, seqpacket, set_timeouts, sockaddr};
use crate::protocol::{self, Received, Reply, Request, MAX_FDS_PER_MSG};
use crate::{paths, Entry, KeeperError, Key, KeyStatus, Mode, Status};
use std::collections::{BTreeSet, HashMap};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Default byte cap: 1 TiB.
pub const DEFAULT_MAX_BYTES: u64 = 1 << 40;
/// Descriptors kept back from the cap for connections, logs and in-flight messages.
const FD_RESERVE: u64 = 256;
/// Most simultaneous connections.
const MAX_CONNS: usize = 128;
/// Most entry bytes (JSON as received) one open transaction may buffer.
const MAX_TXN_BYTES: usize = 64 << 20;

/// How a keeper is configured.
#[derive(Debug, Clone)]
pub struct Config {
    pub socket: PathBuf,
    pub max_bytes: u64,
    /// Upper bound on held descriptors; the RLIMIT_NOFILE-derived cap applies as well.
    pub max_fds: Option<u64>,
    /// The uid peers must have (defaults to ours; `DEVMEM_KEEPER_EXPECT_UID` overrides, for
    /// tests that provoke a refusal).
    pub expected_uid: u32,
}

impl Config {
    /// Defaults from the environment: socket from [`paths::socket_path`], bytes from
    /// `DEVMEM_KEEPER_MAX_BYTES` or 1 TiB, fds from `DEVMEM_KEEPER_MAX_FDS`.
    pub fn from_env() -> Result<Config, KeeperError> {
        let num = |name: &str| -> Result<Option<u64>, KeeperError> {
            match std::env::var(name) {
                Ok(v) => v
                    .trim()
                    .parse::<u64>()
                    .map(Some)
                    .map_err(|_| KeeperError::Invalid(format!("{name}={v:?} is not a number"))),
                Err(_) => Ok(None),
            }
        };
        let expected_uid = match num("DEVMEM_KEEPER_EXPECT_UID")? {
            Some(u) => u32::try_from(u)
                .map_err(|_| KeeperError::Invalid("DEVMEM_KEEPER_EXPECT_UID too large".into()))?,
            None => paths::uid(),
        };
        Ok(Config {
            socket: paths::socket_path()?,
            max_bytes: num("DEVMEM_KEEPER_MAX_BYTES")?.unwrap_or(DEFAULT_MAX_BYTES),
            max_fds: num("DEVMEM_KEEPER_MAX_FDS")?,
            expected_uid,
        })
    }
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn install_signals() {
    // SAFETY: ignoring SIGPIPE and installing an async-signal-safe handler (one atomic store)
    // without SA_RESTART, so poll returns EINTR.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as *const () as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGTERM, &sa, std::ptr::null_mut());
        libc::sigaction(libc::SIGINT, &sa, std::ptr::null_mut());
    }
}

/// Raises RLIMIT_NOFILE's soft limit to its hard limit; returns the new soft limit.
fn raise_nofile() -> u64 {
    // SAFETY: rlimit is plain data; get/setrlimit take valid pointers.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return 1024;
        }
        if r.rlim_cur < r.rlim_max {
            let want = libc::rlimit {
                rlim_cur: r.rlim_max,
                rlim_max: r.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                r = want;
            }
        }
        r.rlim_cur
    }
}

struct Held {
    entries: Vec<(Entry, Vec<OwnedFd>)>,
    bytes: u64,
    writer: Option<u64>,
    readers: BTreeSet<u64>,
}

impl Held {
    fn fd_count(&self) -> u64 {
        self.entries.iter().map(|(_, f)| f.len() as u64).sum()
    }
}

struct Txn {
    key: Key,
    want_entries: u64,
    want_fds: u64,
    entries: Vec<Entry>,
    fds: Vec<OwnedFd>,
    entry_bytes: usize,
    failed: Option<KeeperError>,
}

struct Conn {
    sock: OwnedFd,
    pid: u32,
    txn: Option<Txn>,
}

/// A running keeper's state.
pub struct Server {
    cfg: Config,
    listener: OwnedFd,
    _lock: OwnedFd,
    conns: HashMap<u64, Conn>,
    next_id: u64,
    keys: HashMap<Key, Held>,
    fds_cap: u64,
    stop: bool,
}

/// What `Server::bind` found.
pub enum Bound {
    Ready(Box<Server>),
    /// Another keeper holds the lock or answers at the socket.
    AlreadyRunning,
}

fn log(msg: &str) {
    eprintln!("devmem-keeper[{}]: {msg}", std::process::id());
}

fn pid_of(conns: &HashMap<u64, Conn>, id: u64) -> u32 {
    conns.get(&id).map(|c| c.pid).unwrap_or(0)
}

impl Server {
    /// Checks/creates the socket directory, takes the lock file, replaces a stale socket
    /// file and listens.
    pub fn bind(cfg: Config) -> Result<Bound, KeeperError> {
        let dir = paths::ensure_dir(&cfg.socket)?;
        let lock_path = dir.join(format!(
            "{}.lock",
            cfg.socket
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        ));
        let lock_c = std::ffi::CString::new(lock_path.as_os_str().as_encoded_bytes())
            .map_err(|_| KeeperError::Invalid("lock path has NUL".into()))?;
        // SAFETY: lock_c is NUL-terminated.
        let lfd = unsafe {
            libc::open(
                lock_c.as_ptr(),
                libc::O_RDWR | libc::O_CREAT | libc::O_CLOEXEC | libc::O_NOFOLLOW,
                0o600,
            )
        };
        if lfd < 0 {
            return Err(KeeperError::last_os(&format!(
                "open({})",
                lock_path.display()
            )));
        }
        // SAFETY: lfd is a fresh descriptor we own.
        let lock = unsafe { OwnedFd::from_raw_fd(lfd) };
        // SAFETY: flock on our own descriptor.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Ok(Bound::AlreadyRunning);
        }
        if std::fs::symlink_metadata(&cfg.socket).is_ok() {
            match crate::Client::connect_at(&cfg.socket) {
                Ok(_) | Err(KeeperError::Refused(_)) => return Ok(Bound::AlreadyRunning),
                Err(_) => {
                    log(&format!("replacing stale socket {}", cfg.socket.display()));
                    std::fs::remove_file(&cfg.socket).map_err(|e| {
                        KeeperError::Io(format!("unlink({}): {e}", cfg.socket.display()))
                    })?;
                }
            }
        }
        let (addr, len) = sockaddr(&cfg.socket)?;
        let listener = seqpacket()?;
        // SAFETY: addr is a valid sockaddr_un of `len` bytes; the socket is ours.
        unsafe {
            if libc::bind(
                listener.as_raw_fd(),
                &addr as *const libc::sockaddr_un as *const libc::sockaddr,
                len,
            ) != 0
            {
                return Err(KeeperError::last_os(&format!(
                    "bind({})",
                    cfg.socket.display()
                )));
            }
            // Test hook: widens the bind-to-listen window so a test can show that two
            // starting keepers never both serve (the lock file is what prevents it).
            if let Some(ms) = std::env::var("DEVMEM_KEEPER_TEST_LISTEN_DELAY_MS")
                .ok()
                .and_then(|v| v.parse::<u64>().ok())
            {
                std::thread::sleep(Duration::from_millis(ms.min(10_000)));
            }
            if libc::listen(listener.as_raw_fd(), 64) != 0 {
                return Err(KeeperError::last_os("listen"));
            }
        }
        let nofile = raise_nofile();
        let derived = nofile.saturating_sub(FD_RESERVE).max(1);
        let fds_cap = cfg.max_fds.map_or(derived, |m| m.min(derived));
        log(&format!(
            "listening on {} (uid {}, max {} bytes, max {} fds)",
            cfg.socket.display(),
            paths::uid(),
            cfg.max_bytes,
            fds_cap
        ));
        Ok(Bound::Ready(Box::new(Server {
            cfg,
            listener,
            _lock: lock,
            conns: HashMap::new(),
            next_id: 1,
            keys: HashMap::new(),
            fds_cap,
            stop: false,
        })))
    }

    fn bytes_held(&self) -> u64 {
        self.keys.values().map(|h| h.bytes).sum()
    }

    fn fds_held(&self) -> u64 {
        let held: u64 = self.keys.values().map(Held::fd_count).sum();
        let inflight: u64 = self
            .conns
            .values()
            .filter_map(|c| c.txn.as_ref())
            .map(|t| t.fds.len() as u64)
            .sum();
        held + inflight
    }

    /// Serves until shutdown, SIGTERM or SIGINT; then closes every held fd and the socket.
    pub fn run(mut self) -> Result<(), KeeperError> {
        install_signals();
        while !self.stop && !STOP.load(Ordering::SeqCst) {
            let ids: Vec<u64> = self.conns.keys().copied().collect();
            let mut pfds = Vec::with_capacity(ids.len() + 1);
            pfds.push(libc::pollfd {
                fd: self.listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
            for id in &ids {
                if let Some(c) = self.conns.get(id) {
                    pfds.push(libc::pollfd {
                        fd: c.sock.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    });
                }
            }
            // SAFETY: pfds is a valid array of its length.
            let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, 1000) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                return Err(KeeperError::Io(format!("poll: {e}")));
            }
            if pfds[0].revents & libc::POLLIN != 0 {
                self.accept();
            }
            for (i, id) in ids.iter().enumerate() {
                let re = pfds[i + 1].revents;
                if re == 0 {
                    continue;
                }
                if re & libc::POLLIN != 0 {
                    self.serve_one(*id);
                } else if re & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0 {
                    self.drop_conn(*id, "hung up");
                }
            }
        }
        let (b, f) = (self.bytes_held(), self.fds_held());
        self.keys.clear();
        self.conns.clear();
        let _ = std::fs::remove_file(&self.cfg.socket);
        log(&format!("exiting; closed {f} fds holding {b} bytes"));
        Ok(())
    }

    fn accept(&mut self) {
        // SAFETY: accept4 on our listening socket; null address out-pointers are allowed.
        let fd = unsafe {
            libc::accept4(
                self.listener.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if fd < 0 {
            log(&format!("accept4: {}", std::io::Error::last_os_error()));
            return;
        }
        // SAFETY: fd is a fresh descriptor we own.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        let refuse = |sock: &OwnedFd, msg: String| {
            log(&msg);
            let _ = protocol::send(
                sock.as_fd(),
                &Reply::Err {
                    error: KeeperError::Refused(msg),
                },
                &[],
            );
        };
        let (pid, uid) = match peer_cred(sock.as_fd()) {
            Ok(c) => c,
            Err(e) => return refuse(&sock, format!("refused a connection: {e}")),
        };
        if uid != self.cfg.expected_uid {
            return refuse(
                &sock,
                format!(
                    "refused pid {pid}: uid {uid} is not the keeper's uid {}",
                    self.cfg.expected_uid
                ),
            );
        }
        if self.conns.len() >= MAX_CONNS {
            return refuse(
                &sock,
                format!("refused pid {pid}: {MAX_CONNS} connections open"),
            );
        }
        // Sends to a client that stops reading give up after 10 s instead of stalling everyone.
        if let Err(e) = set_timeouts(sock.as_fd(), Duration::from_secs(10)) {
            return refuse(&sock, format!("refused pid {pid}: {e}"));
        }
        let id = self.next_id;
        self.next_id += 1;
        self.conns.insert(
            id,
            Conn {
                sock,
                pid,
                txn: None,
            },
        );
        self.reply(
            id,
            &Reply::Hello {
                pid: std::process::id(),
            },
            &[],
        );
    }

    fn drop_conn(&mut self, id: u64, why: &str) {
        if let Some(c) = self.conns.remove(&id) {
            if let Some(t) = &c.txn {
                log(&format!(
                    "pid {} {why} mid-keep of {}: dropped {} uncommitted fds",
                    c.pid,
                    t.key,
                    t.fds.len()
                ));
            }
        }
        for h in self.keys.values_mut() {
            if h.writer == Some(id) {
                h.writer = None;
            }
            h.readers.remove(&id);
        }
    }

    fn reply(&mut self, id: u64, r: &Reply, fds: &[RawFd]) -> bool {
        let Some(c) = self.conns.get(&id) else {
            return false;
        };
        match protocol::send(c.sock.as_fd(), r, fds) {
            Ok(()) => true,
            Err(e) => {
                log(&format!("pid {}: {e}; closing the connection", c.pid));
                self.drop_conn(id, "broke");
                false
            }
        }
    }

    fn serve_one(&mut self, id: u64) {
        let Some(c) = self.conns.get(&id) else { return };
        let (bytes, fds) = match protocol::recv_raw(c.sock.as_fd(), libc::MSG_DONTWAIT) {
            Ok(Received::Msg { bytes, fds }) => (bytes, fds),
            Ok(Received::WouldBlock) => return,
            Ok(Received::Closed) => return self.drop_conn(id, "hung up"),
            Err(e) => {
                let _ = self.reply(id, &Reply::Err { error: e.clone() }, &[]);
                return self.drop_conn(id, &format!("sent a bad message ({e})"));
            }
        };
        let req: Request = match protocol::decode(&bytes) {
            Ok(r) => r,
            Err(e) => {
                let _ = self.reply(id, &Reply::Err { error: e.clone() }, &[]);
                return self.drop_conn(id, &format!("sent a bad message ({e})"));
            }
        };
        if !matches!(req, Request::KeepFds) && !fds.is_empty() {
            drop(fds);
            let e = KeeperError::Invalid("fds attached to a message that takes none".into());
            let _ = self.reply(id, &Reply::Err { error: e }, &[]);
            return self.drop_conn(id, "sent stray fds");
        }
        match req {
            Request::KeepBegin {
                key,
                entries,
                fds: nfds,
            } => self.keep_begin(id, key, entries, nfds),
            Request::KeepEntry { entry } => self.keep_entry(id, entry, bytes.len()),
            Request::KeepFds => self.keep_fds(id, fds),
            Request::KeepCommit => self.keep_commit(id),
            Request::Attach { key, mode } => self.attach(id, key, mode),
            Request::Detach { key } => {
                let r = match self.keys.get_mut(&key) {
                    Some(h) => {
                        if h.writer == Some(id) {
                            h.writer = None;
                        }
                        h.readers.remove(&id);
                        Reply::Ok
                    }
                    None => Reply::Err {
                        error: KeeperError::NotHeld(key.to_string()),
                    },
                };
                self.reply(id, &r, &[]);
            }
            Request::List { instance } => {
                let mut items: Vec<(Key, Vec<Entry>)> = self
                    .keys
                    .iter()
                    .filter(|(k, _)| instance.as_deref().is_none_or(|i| k.instance == i))
                    .map(|(k, h)| {
                        (
                            k.clone(),
                            h.entries.iter().map(|(e, _)| e.clone()).collect(),
                        )
                    })
                    .collect();
                items.sort_by(|a, b| {
                    (&a.0.instance, a.0.rank, &a.0.tag).cmp(&(&b.0.instance, b.0.rank, &b.0.tag))
                });
                for (key, entries) in items {
                    if !self.reply(id, &Reply::Listed { key, entries }, &[]) {
                        return;
                    }
                }
                self.reply(id, &Reply::End, &[]);
            }
            Request::Release { key } => self.release(id, key),
            Request::Status => self.status(id),
            Request::Shutdown => {
                log(&format!(
                    "shutdown asked by pid {}",
                    pid_of(&self.conns, id)
                ));
                self.reply(id, &Reply::Ok, &[]);
                self.stop = true;
            }
        }
    }

    /// Another live connection's lease on `key`, as (pid, mode), if any.
    fn other_lease(&self, key: &Key, id: u64, readers_count: bool) -> Option<String> {
        let h = self.keys.get(key)?;
        if let Some(w) = h.writer.filter(|&w| w != id) {
            return Some(format!(
                "{key} is leased ReadWrite by pid {}",
                pid_of(&self.conns, w)
            ));
        }
        if readers_count {
            if let Some(r) = h.readers.iter().find(|&&r| r != id) {
                return Some(format!(
                    "{key} is leased ReadOnly by pid {}",
                    pid_of(&self.conns, *r)
                ));
            }
        }
        None
    }

    fn keep_begin(&mut self, id: u64, key: Key, entries: u64, nfds: u64) {
        let check = || -> Result<(), KeeperError> {
            key.validate()?;
            if self.conns.get(&id).is_some_and(|c| c.txn.is_some()) {
                return Err(KeeperError::Invalid(
                    "a keep is already open on this connection".into(),
                ));
            }
            if entries == 0 || entries > nfds {
                return Err(KeeperError::Invalid(format!(
                    "keep of {entries} entries with {nfds} fds (each entry has at least one piece)"
                )));
            }
            if let Some(m) = self.other_lease(&key, id, true) {
                return Err(KeeperError::Busy(m));
            }
            let replaced = self.keys.get(&key).map_or(0, Held::fd_count);
            // nfds is the client's word: checked, so u64::MAX is Full, not an overflow.
            let after = (self.fds_held() - replaced).checked_add(nfds);
            if after.is_none_or(|a| a > self.fds_cap) {
                return Err(KeeperError::Full(format!(
                    "keeping {nfds} fds would pass the cap of {} ({} held)",
                    self.fds_cap,
                    self.fds_held()
                )));
            }
            Ok(())
        };
        let r = match check() {
            Ok(()) => {
                if let Some(c) = self.conns.get_mut(&id) {
                    c.txn = Some(Txn {
                        key,
                        want_entries: entries,
                        want_fds: nfds,
                        entries: Vec::new(),
                        fds: Vec::new(),
                        entry_bytes: 0,
                        failed: None,
                    });
                }
                Reply::Ok
            }
            Err(error) => Reply::Err { error },
        };
        self.reply(id, &r, &[]);
    }

    fn keep_entry(&mut self, id: u64, entry: Entry, wire_bytes: usize) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        let Some(t) = c.txn.as_mut() else {
            let e = KeeperError::Invalid("keep entry outside a keep".into());
            let _ = self.reply(id, &Reply::Err { error: e }, &[]);
            return self.drop_conn(id, "sent an entry outside a keep");
        };
        if t.failed.is_some() {
            return;
        }
        t.entry_bytes += wire_bytes;
        if let Err(e) = entry.validate() {
            t.failed = Some(e);
        } else if t.entry_bytes > MAX_TXN_BYTES {
            t.failed = Some(KeeperError::Full(format!(
                "a keep's entries pass {MAX_TXN_BYTES} bytes of description"
            )));
            t.entries.clear();
        } else if t.entries.len() as u64 >= t.want_entries {
            t.failed = Some(KeeperError::Invalid("more entries than announced".into()));
        } else {
            t.entries.push(entry);
        }
    }

    fn keep_fds(&mut self, id: u64, fds: Vec<OwnedFd>) {
        let held = self.fds_held();
        let cap = self.fds_cap;
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        let Some(t) = c.txn.as_mut() else {
            drop(fds);
            let e = KeeperError::Invalid("fds outside a keep".into());
            let _ = self.reply(id, &Reply::Err { error: e }, &[]);
            return self.drop_conn(id, "sent fds outside a keep");
        };
        if t.failed.is_some() {
            return; // fds dropped (closed) here
        }
        if fds.is_empty() || fds.len() > MAX_FDS_PER_MSG {
            t.failed = Some(KeeperError::Invalid(format!(
                "fd message with {} fds",
                fds.len()
            )));
        } else if t.fds.len() as u64 + fds.len() as u64 > t.want_fds {
            t.failed = Some(KeeperError::Invalid(format!(
                "more fds than the {} announced",
                t.want_fds
            )));
        } else if held + fds.len() as u64 > cap {
            t.failed = Some(KeeperError::Full(format!(
                "fd cap of {cap} reached mid-keep"
            )));
        } else if let Some(kind) = fds.iter().find_map(|f| refused_fd_kind(f.as_fd())) {
            // A socket (or pipe) held here would keep a connection's peer alive inside the
            // keeper, so a client could make its own lease outlive it; memory is never one.
            t.failed = Some(KeeperError::Invalid(format!(
                "a kept descriptor is a {kind}, not memory"
            )));
        } else {
            t.fds.extend(fds);
            return;
        }
        t.fds.clear();
        t.entries.clear();
    }

    fn keep_commit(&mut self, id: u64) {
        let Some(t) = self.conns.get_mut(&id).and_then(|c| c.txn.take()) else {
            let e = KeeperError::Invalid("commit outside a keep".into());
            self.reply(id, &Reply::Err { error: e }, &[]);
            return;
        };
        let r = self.commit(id, t);
        let reply = match r {
            Ok(()) => Reply::Ok,
            Err(error) => Reply::Err { error },
        };
        self.reply(id, &reply, &[]);
    }

    fn commit(&mut self, id: u64, t: Txn) -> Result<(), KeeperError> {
        if let Some(e) = t.failed {
            return Err(e);
        }
        if t.entries.len() as u64 != t.want_entries {
            return Err(KeeperError::Invalid(format!(
                "{} entries sent, {} announced",
                t.entries.len(),
                t.want_entries
            )));
        }
        let pieces: u64 = t.entries.iter().map(|e| e.pieces.len() as u64).sum();
        if pieces != t.fds.len() as u64 || pieces != t.want_fds {
            return Err(KeeperError::Invalid(format!(
                "{pieces} pieces but {} fds received ({} announced)",
                t.fds.len(),
                t.want_fds
            )));
        }
        if let Some(m) = self.other_lease(&t.key, id, true) {
            return Err(KeeperError::Busy(m));
        }
        let mut bytes: u64 = 0;
        for e in &t.entries {
            bytes = bytes
                .checked_add(e.size)
                .ok_or_else(|| KeeperError::Invalid("entry sizes overflow".into()))?;
        }
        let replaced = self.keys.get(&t.key).map_or(0, |h| h.bytes);
        let after = (self.bytes_held() - replaced).checked_add(bytes);
        if after.is_none_or(|a| a > self.cfg.max_bytes) {
            return Err(KeeperError::Full(format!(
                "keeping {bytes} bytes would pass the cap of {} ({} held)",
                self.cfg.max_bytes,
                self.bytes_held()
            )));
        }
        let mut fds = t.fds.into_iter();
        let entries: Vec<(Entry, Vec<OwnedFd>)> = t
            .entries
            .into_iter()
            .map(|e| {
                let f = fds.by_ref().take(e.pieces.len()).collect();
                (e, f)
            })
            .collect();
        log(&format!(
            "kept {} for pid {}: {} entries, {bytes} bytes",
            t.key,
            pid_of(&self.conns, id),
            entries.len()
        ));
        self.keys.insert(
            t.key,
            Held {
                entries,
                bytes,
                writer: Some(id),
                readers: BTreeSet::new(),
            },
        );
        Ok(())
    }

    fn attach(&mut self, id: u64, key: Key, mode: Mode) {
        let busy = match mode {
            Mode::ReadWrite => self.other_lease(&key, id, false),
            Mode::ReadOnly => None,
        };
        let Some(h) = self.keys.get_mut(&key) else {
            let e = KeeperError::NotHeld(key.to_string());
            self.reply(id, &Reply::Err { error: e }, &[]);
            return;
        };
        if let Some(m) = busy {
            self.reply(
                id,
                &Reply::Err {
                    error: KeeperError::Busy(m),
                },
                &[],
            );
            return;
        }
        match mode {
            Mode::ReadWrite => {
                h.writer = Some(id);
                h.readers.remove(&id);
            }
            Mode::ReadOnly => {
                if h.writer != Some(id) {
                    h.readers.insert(id);
                }
            }
        }
        let entries: Vec<Entry> = h.entries.iter().map(|(e, _)| e.clone()).collect();
        let raw: Vec<RawFd> = h
            .entries
            .iter()
            .flat_map(|(_, f)| f.iter().map(|f| f.as_raw_fd()))
            .collect();
        let head = Reply::Attached {
            entries: entries.len() as u64,
            fds: raw.len() as u64,
        };
        if !self.reply(id, &head, &[]) {
            return;
        }
        for entry in entries {
            if !self.reply(id, &Reply::Entry { entry }, &[]) {
                return;
            }
        }
        for chunk in raw.chunks(MAX_FDS_PER_MSG) {
            if !self.reply(id, &Reply::Fds, chunk) {
                return;
            }
        }
    }

    fn release(&mut self, id: u64, key: Key) {
        let r = if let Some(m) = self.other_lease(&key, id, true) {
            Reply::Err {
                error: KeeperError::Busy(m),
            }
        } else if let Some(h) = self.keys.remove(&key) {
            log(&format!("released {key}: {} bytes", h.bytes));
            Reply::Released { bytes: h.bytes }
        } else {
            Reply::Err {
                error: KeeperError::NotHeld(key.to_string()),
            }
        };
        self.reply(id, &r, &[]);
    }

    fn status(&mut self, id: u64) {
        let mut keys: Vec<KeyStatus> = self
            .keys
            .iter()
            .map(|(k, h)| KeyStatus {
                key: k.clone(),
                entries: h.entries.len() as u64,
                bytes: h.bytes,
                writer_pid: h.writer.map(|w| pid_of(&self.conns, w)),
                reader_pids: h.readers.iter().map(|r| pid_of(&self.conns, *r)).collect(),
            })
            .collect();
        keys.sort_by(|a, b| {
            (&a.key.instance, a.key.rank, &a.key.tag).cmp(&(
                &b.key.instance,
                b.key.rank,
                &b.key.tag,
            ))
        });
        let status = Status {
            pid: std::process::id(),
            uid: paths::uid(),
            socket: self.cfg.socket.display().to_string(),
            bytes_held: self.bytes_held(),
            bytes_cap: self.cfg.max_bytes,
            fds_held: self.fds_held(),
            fds_cap: self.fds_cap,
            keys: Vec::new(),
        };
        if !self.reply(id, &Reply::Status { status }, &[]) {
            return;
        }
        for key in keys {
            if !self.reply(id, &Reply::KeyStatus { key }, &[]) {
                return;
            }
        }
        self.reply(id, &Reply::End, &[]);
    }
}

/// The socket path's directory (for the daemon's log file).
pub fn socket_dir(socket: &Path) -> PathBuf {
    socket
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf()
}

/// `Some(kind)` when `fd` is a kind of descriptor that is never exported device memory (a
/// socket or a pipe), `None` otherwise (or when it cannot be inspected: the client's import
/// checks the memory itself).
fn refused_fd_kind(fd: std::os::fd::BorrowedFd<'_>) -> Option<&'static str> {
    // SAFETY: a zeroed stat is a valid out-buffer for fstat.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is an open descriptor borrowed for the call; `st` is a valid out-buffer.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return None;
    }
    match st.st_mode & libc::S_IFMT {
        libc::S_IFSOCK => Some("socket"),
        libc::S_IFIFO => Some("pipe"),
        _ => None,
    }
}
