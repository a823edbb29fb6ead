//! The client side: one SOCK_SEQPACKET connection (CLOEXEC) to the keeper of this uid.
//! Every read has a timeout (30 s by default, `DEVMEM_KEEPER_TIMEOUT_MS` or
//! [`Client::set_timeout`]), so a keeper dying mid-answer is an `Io` error, never a hang.

use crate::protocol::{self, Received, Reply, Request, MAX_FDS_PER_MSG};
use crate::{paths, Entry, KeeperError, Key, Mode, Status};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::{Duration, Instant};

/// Default read timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// One connection to the keeper.
pub struct Client {
    sock: OwnedFd,
}

fn env_timeout() -> Duration {
    std::env::var("DEVMEM_KEEPER_TIMEOUT_MS")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|&ms| ms > 0)
        .map(Duration::from_millis)
        .unwrap_or(DEFAULT_TIMEOUT)
}

/// Sets SO_RCVTIMEO and SO_SNDTIMEO on `fd`.
pub(crate) fn set_timeouts(fd: BorrowedFd<'_>, t: Duration) -> Result<(), KeeperError> {
    let tv = libc::timeval {
        tv_sec: t.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_usec: t.subsec_micros() as libc::suseconds_t,
    };
    for opt in [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO] {
        // SAFETY: tv is a valid timeval of the size passed.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                &tv as *const libc::timeval as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(KeeperError::last_os("setsockopt(SO_RCVTIMEO/SO_SNDTIMEO)"));
        }
    }
    Ok(())
}

/// The peer's (pid, uid) from SO_PEERCRED.
pub(crate) fn peer_cred(fd: BorrowedFd<'_>) -> Result<(u32, u32), KeeperError> {
    // SAFETY: ucred is plain data.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: cred/len are valid out-pointers of the size given.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            &mut cred as *mut libc::ucred as *mut libc::c_void,
            &mut len,
        )
    };
    if rc != 0 {
        return Err(KeeperError::last_os("getsockopt(SO_PEERCRED)"));
    }
    Ok((cred.pid as u32, cred.uid))
}

/// A sockaddr_un for `path`, or Invalid when it does not fit.
pub(crate) fn sockaddr(path: &Path) -> Result<(libc::sockaddr_un, libc::socklen_t), KeeperError> {
    // SAFETY: sockaddr_un is plain data.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let b = path.as_os_str().as_bytes();
    if b.is_empty() || b.len() >= addr.sun_path.len() || b.contains(&0) {
        return Err(KeeperError::Invalid(format!(
            "socket path {} is empty, has NUL or passes {} bytes",
            path.display(),
            addr.sun_path.len() - 1
        )));
    }
    for (d, s) in addr.sun_path.iter_mut().zip(b) {
        *d = *s as libc::c_char;
    }
    let len = (std::mem::size_of::<libc::sa_family_t>() + b.len() + 1) as libc::socklen_t;
    Ok((addr, len))
}

/// A new CLOEXEC SOCK_SEQPACKET Unix socket.
pub(crate) fn seqpacket() -> Result<OwnedFd, KeeperError> {
    // SAFETY: plain socket(2) call.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(KeeperError::last_os("socket(AF_UNIX, SOCK_SEQPACKET)"));
    }
    // SAFETY: fd is a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl Client {
    /// Connects to the keeper of this uid (`paths::socket_path()`), checking the directory
    /// (owned by this uid, mode 0700, not a symlink) and the peer (SO_PEERCRED uid == ours).
    pub fn connect() -> Result<Client, KeeperError> {
        Client::connect_at(&paths::socket_path()?)
    }

    /// As [`Client::connect`], at `socket`.
    pub fn connect_at(socket: &Path) -> Result<Client, KeeperError> {
        let dir = socket
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        match paths::check_dir(dir) {
            Err(KeeperError::Io(m)) => {
                return Err(KeeperError::NotRunning(format!("no socket directory: {m}")))
            }
            r => r?,
        }
        let (addr, len) = sockaddr(socket)?;
        let sock = seqpacket()?;
        // SAFETY: addr is a valid sockaddr_un of `len` bytes.
        let rc = unsafe {
            libc::connect(
                sock.as_raw_fd(),
                &addr as *const libc::sockaddr_un as *const libc::sockaddr,
                len,
            )
        };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::ENOENT) | Some(libc::ECONNREFUSED) => {
                    KeeperError::NotRunning(format!("connect({}): {e}", socket.display()))
                }
                _ => KeeperError::Io(format!("connect({}): {e}", socket.display())),
            });
        }
        let (_pid, peer_uid) = peer_cred(sock.as_fd())?;
        if peer_uid != paths::uid() {
            return Err(KeeperError::Refused(format!(
                "keeper at {} runs as uid {peer_uid}, not {}",
                socket.display(),
                paths::uid()
            )));
        }
        set_timeouts(sock.as_fd(), env_timeout())?;
        let client = Client { sock };
        match client.recv()? {
            (Reply::Hello { .. }, f) if f.is_empty() => Ok(client),
            (r, _) => Err(unexpected(&r)),
        }
    }

    /// Connects, starting `binary serve --daemon` first when no keeper answers (waits up to
    /// `timeout` for it to listen). Two processes racing to start one end with one keeper.
    pub fn connect_or_spawn(binary: &Path, timeout: Duration) -> Result<Client, KeeperError> {
        let socket = paths::socket_path()?;
        match Client::connect_at(&socket) {
            Err(KeeperError::NotRunning(_)) => {}
            r => return r,
        }
        let deadline = Instant::now() + timeout;
        let mut child = std::process::Command::new(binary)
            .arg("serve")
            .arg("--daemon")
            .arg("--socket")
            .arg(&socket)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .spawn()
            .map_err(|e| {
                KeeperError::Io(format!("spawn {} serve --daemon: {e}", binary.display()))
            })?;
        let mut reaped = false;
        loop {
            if !reaped {
                if let Ok(Some(_)) = child.try_wait() {
                    reaped = true;
                }
            }
            match Client::connect_at(&socket) {
                Err(KeeperError::NotRunning(m)) => {
                    if Instant::now() >= deadline {
                        if !reaped {
                            let _ = child.kill();
                            let _ = child.wait();
                        }
                        return Err(KeeperError::NotRunning(format!(
                            "started {} but no keeper answered within {timeout:?}: {m}",
                            binary.display()
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                r => {
                    if !reaped {
                        // The daemon's launcher exits once the keeper listens; reap it in the
                        // background rather than leave a zombie.
                        std::thread::spawn(move || {
                            let _ = child.wait();
                        });
                    }
                    return r;
                }
            }
        }
    }

    /// Sets the read/write timeout of this connection.
    pub fn set_timeout(&mut self, t: Duration) -> Result<(), KeeperError> {
        set_timeouts(self.sock.as_fd(), t)
    }

    fn send(&self, req: &Request, fds: &[RawFd]) -> Result<(), KeeperError> {
        protocol::send(self.sock.as_fd(), req, fds)
    }

    fn recv(&self) -> Result<(Reply, Vec<OwnedFd>), KeeperError> {
        match protocol::recv_raw(self.sock.as_fd(), 0)? {
            Received::Closed => Err(KeeperError::Io(
                "recvmsg: the keeper closed the connection".into(),
            )),
            Received::WouldBlock => Err(KeeperError::Io("recvmsg: nothing to read".into())),
            Received::Msg { bytes, fds } => {
                let reply: Reply = protocol::decode(&bytes)?;
                if let Reply::Err { error } = reply {
                    return Err(error);
                }
                Ok((reply, fds))
            }
        }
    }

    fn expect_ok(&self) -> Result<(), KeeperError> {
        match self.recv()? {
            (Reply::Ok, fds) if fds.is_empty() => Ok(()),
            (r, _) => Err(unexpected(&r)),
        }
    }

    /// Hands the keeper the entries of `key` with one fd per piece (borrowed: the keeper gets
    /// its own copies through SCM_RIGHTS). Transactional: all entries are stored or none.
    /// Replaces an existing key only when no other live client holds a lease on it. The
    /// keeping connection holds the ReadWrite lease on the key afterwards.
    pub fn keep(
        &mut self,
        key: &Key,
        entries: &[(Entry, Vec<BorrowedFd<'_>>)],
    ) -> Result<(), KeeperError> {
        key.validate()?;
        let mut total: u64 = 0;
        for (e, fds) in entries {
            e.validate()?;
            if e.pieces.len() != fds.len() {
                return Err(KeeperError::Invalid(format!(
                    "entry has {} pieces but {} fds",
                    e.pieces.len(),
                    fds.len()
                )));
            }
            total += fds.len() as u64;
        }
        self.send(
            &Request::KeepBegin {
                key: key.clone(),
                entries: entries.len() as u64,
                fds: total,
            },
            &[],
        )?;
        self.expect_ok()?;
        for (e, _) in entries {
            self.send(&Request::KeepEntry { entry: e.clone() }, &[])?;
        }
        let all: Vec<RawFd> = entries
            .iter()
            .flat_map(|(_, fds)| fds.iter().map(|f| f.as_raw_fd()))
            .collect();
        for chunk in all.chunks(MAX_FDS_PER_MSG) {
            self.send(&Request::KeepFds, chunk)?;
        }
        self.send(&Request::KeepCommit, &[])?;
        self.expect_ok()
    }

    /// Gets the entries of `key` back, each with freshly received fds (one per piece), and
    /// takes a lease: ReadWrite is exclusive among live connections (Busy otherwise, naming
    /// the holder's pid); ReadOnly is shared. Leases end at `detach`, at `release`, or when
    /// the connection closes.
    pub fn attach(
        &mut self,
        key: &Key,
        mode: Mode,
    ) -> Result<Vec<(Entry, Vec<OwnedFd>)>, KeeperError> {
        key.validate()?;
        self.send(
            &Request::Attach {
                key: key.clone(),
                mode,
            },
            &[],
        )?;
        let (n_entries, n_fds) = match self.recv()? {
            (Reply::Attached { entries, fds }, f) if f.is_empty() => (entries, fds),
            (r, _) => return Err(unexpected(&r)),
        };
        let mut list = Vec::new();
        let mut want: u64 = 0;
        for _ in 0..n_entries {
            match self.recv()? {
                (Reply::Entry { entry }, f) if f.is_empty() => {
                    // The keeper is another process: its entries are checked like a client's.
                    entry.validate().map_err(|e| {
                        KeeperError::Io(format!("the keeper sent an invalid entry: {e}"))
                    })?;
                    want += entry.pieces.len() as u64;
                    list.push(entry);
                }
                (r, _) => return Err(unexpected(&r)),
            }
        }
        if want != n_fds {
            return Err(KeeperError::Io(format!(
                "keeper announced {n_fds} fds for {want} pieces"
            )));
        }
        let mut fds: Vec<OwnedFd> = Vec::new();
        while (fds.len() as u64) < n_fds {
            match self.recv()? {
                (Reply::Fds, f) if !f.is_empty() => fds.extend(f),
                (r, _) => return Err(unexpected(&r)),
            }
        }
        if fds.len() as u64 != n_fds {
            return Err(KeeperError::Io(format!(
                "keeper sent {} fds, announced {n_fds}",
                fds.len()
            )));
        }
        let mut it = fds.into_iter();
        Ok(list
            .into_iter()
            .map(|e| {
                let f: Vec<OwnedFd> = it.by_ref().take(e.pieces.len()).collect();
                (e, f)
            })
            .collect())
    }

    /// Ends this connection's lease on `key`.
    pub fn detach(&mut self, key: &Key) -> Result<(), KeeperError> {
        self.send(&Request::Detach { key: key.clone() }, &[])?;
        self.expect_ok()
    }

    /// Keys held whose instance matches (all when `None`), without fds.
    pub fn list(&mut self, instance: Option<&str>) -> Result<Vec<(Key, Vec<Entry>)>, KeeperError> {
        self.send(
            &Request::List {
                instance: instance.map(str::to_owned),
            },
            &[],
        )?;
        let mut out = Vec::new();
        loop {
            match self.recv()? {
                (Reply::Listed { key, entries }, _) => out.push((key, entries)),
                (Reply::End, _) => return Ok(out),
                (r, _) => return Err(unexpected(&r)),
            }
        }
    }

    /// Drops the keeper's fds of `key`; refused (Busy) while another live connection holds a
    /// lease on it. Returns the bytes released.
    pub fn release(&mut self, key: &Key) -> Result<u64, KeeperError> {
        self.send(&Request::Release { key: key.clone() }, &[])?;
        match self.recv()? {
            (Reply::Released { bytes }, _) => Ok(bytes),
            (r, _) => Err(unexpected(&r)),
        }
    }

    /// What the keeper holds, its caps and leases.
    pub fn status(&mut self) -> Result<Status, KeeperError> {
        self.send(&Request::Status, &[])?;
        let mut status = match self.recv()? {
            (Reply::Status { status }, _) => status,
            (r, _) => return Err(unexpected(&r)),
        };
        loop {
            match self.recv()? {
                (Reply::KeyStatus { key }, _) => status.keys.push(key),
                (Reply::End, _) => return Ok(status),
                (r, _) => return Err(unexpected(&r)),
            }
        }
    }

    /// Asks the keeper to exit (it closes every fd it holds first).
    pub fn shutdown(&mut self) -> Result<(), KeeperError> {
        self.send(&Request::Shutdown, &[])?;
        self.expect_ok()
    }

    /// The connection's descriptor (for tests and poll loops).
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }
}

fn unexpected(r: &Reply) -> KeeperError {
    let s = format!("{r:?}");
    KeeperError::Io(format!(
        "unexpected reply from the keeper: {}",
        &s[..s.len().min(200)]
    ))
}
