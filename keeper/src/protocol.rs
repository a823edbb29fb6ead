//! Wire protocol: one JSON document per SOCK_SEQPACKET message, file descriptors in
//! SCM_RIGHTS ancillary data (at most [`MAX_FDS_PER_MSG`] per message). Received fds are
//! always owned (closed on drop) whatever else goes wrong; truncated control data (MSG_CTRUNC)
//! and oversized messages are errors, never silently accepted.

use crate::{Entry, KeeperError, Key, KeyStatus, Mode, Status};
use serde::{Deserialize, Serialize};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// Largest JSON message either side sends or accepts.
pub const MAX_MSG: usize = 192 * 1024;
/// Most descriptors per message (the kernel's SCM_MAX_FD is 253).
pub const MAX_FDS_PER_MSG: usize = 250;

/// Client to keeper.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Request {
    /// Starts a keep transaction of `entries` entries holding `fds` descriptors in all.
    KeepBegin {
        key: Key,
        entries: u64,
        fds: u64,
    },
    /// One entry of the open transaction (no fds).
    KeepEntry {
        entry: Entry,
    },
    /// Descriptors of the open transaction, in piece order (carries fds).
    KeepFds,
    /// Stores the transaction's entries, all or none.
    KeepCommit,
    Attach {
        key: Key,
        mode: Mode,
    },
    Detach {
        key: Key,
    },
    List {
        instance: Option<String>,
    },
    Release {
        key: Key,
    },
    Status,
    Shutdown,
}

/// Keeper to client.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Reply {
    Ok,
    Err {
        error: KeeperError,
    },
    /// Head of an attach answer: `entries` Entry messages, then Fds messages carrying `fds`.
    Attached {
        entries: u64,
        fds: u64,
    },
    Entry {
        entry: Entry,
    },
    Fds,
    /// One key of a list answer.
    Listed {
        key: Key,
        entries: Vec<Entry>,
    },
    /// Head of a status answer (keys follow as KeyStatus messages, then End).
    Status {
        status: Status,
    },
    KeyStatus {
        key: KeyStatus,
    },
    End,
    Released {
        bytes: u64,
    },
}

/// Sends `bytes` with `fds` attached (MSG_NOSIGNAL: a vanished peer is an error, not SIGPIPE).
pub fn send_raw(sock: BorrowedFd<'_>, bytes: &[u8], fds: &[RawFd]) -> Result<(), KeeperError> {
    if fds.len() > MAX_FDS_PER_MSG {
        return Err(KeeperError::Invalid(format!(
            "{} fds in one message",
            fds.len()
        )));
    }
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    let fd_bytes = std::mem::size_of_val(fds);
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes as u32) } as usize;
    let mut cbuf = vec![0u64; space.div_ceil(8)];
    // SAFETY: msghdr is plain data; zeroed is a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = space as _;
        // SAFETY: msg_control points at `space` bytes, enough for one header with the fds;
        // CMSG_FIRSTHDR is non-null because controllen >= header size.
        unsafe {
            let cm = libc::CMSG_FIRSTHDR(&msg);
            (*cm).cmsg_level = libc::SOL_SOCKET;
            (*cm).cmsg_type = libc::SCM_RIGHTS;
            (*cm).cmsg_len = libc::CMSG_LEN(fd_bytes as u32) as _;
            std::ptr::copy_nonoverlapping(fds.as_ptr() as *const u8, libc::CMSG_DATA(cm), fd_bytes);
        }
    }
    loop {
        // SAFETY: msg and the buffers it points at live across the call.
        let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n >= 0 {
            if n as usize != bytes.len() {
                return Err(KeeperError::Io(format!(
                    "sendmsg: sent {n} of {}",
                    bytes.len()
                )));
            }
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EINTR) {
            continue;
        }
        return Err(KeeperError::Io(format!("sendmsg: {e}")));
    }
}

/// Serialises and sends one message.
pub fn send<T: Serialize>(sock: BorrowedFd<'_>, m: &T, fds: &[RawFd]) -> Result<(), KeeperError> {
    let bytes = serde_json::to_vec(m).map_err(|e| KeeperError::Invalid(format!("encode: {e}")))?;
    if bytes.len() > MAX_MSG {
        return Err(KeeperError::Invalid(format!(
            "message of {} bytes passes the {MAX_MSG} byte limit",
            bytes.len()
        )));
    }
    send_raw(sock, &bytes, fds)
}

/// What one receive got.
pub enum Received {
    /// The peer closed the connection.
    Closed,
    /// Nothing to read (non-blocking receive only).
    WouldBlock,
    Msg {
        bytes: Vec<u8>,
        fds: Vec<OwnedFd>,
    },
}

/// Receives one message; every received fd is owned (CLOEXEC) before any check can fail.
/// Oversized data (MSG_TRUNC) or truncated control data (MSG_CTRUNC) is `Invalid`.
pub fn recv_raw(sock: BorrowedFd<'_>, flags: i32) -> Result<Received, KeeperError> {
    let mut buf = vec![0u8; MAX_MSG + 1];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE((253 * std::mem::size_of::<RawFd>()) as u32) as usize };
    let mut cbuf = vec![0u64; space.div_ceil(8)];
    // SAFETY: msghdr is plain data; zeroed is a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = space as _;
    let n = loop {
        // SAFETY: msg and its buffers live across the call.
        let n =
            unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, flags | libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EAGAIN) if flags & libc::MSG_DONTWAIT != 0 => {
                return Ok(Received::WouldBlock)
            }
            Some(libc::EAGAIN) => {
                return Err(KeeperError::Io(
                    "recvmsg: timed out waiting for the keeper".into(),
                ))
            }
            Some(libc::ECONNRESET) => return Ok(Received::Closed),
            _ => return Err(KeeperError::Io(format!("recvmsg: {e}"))),
        }
    };
    let mut fds = Vec::new();
    // SAFETY: the kernel filled msg_control up to msg_controllen; the CMSG_* macros walk
    // headers inside it; each SCM_RIGHTS payload is an array of fds now owned by us.
    unsafe {
        let mut cm = libc::CMSG_FIRSTHDR(&msg);
        while !cm.is_null() {
            if (*cm).cmsg_level == libc::SOL_SOCKET && (*cm).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cm);
                let len = (*cm).cmsg_len as usize - (data as usize - cm as usize);
                let count = len / std::mem::size_of::<RawFd>();
                for i in 0..count {
                    let fd = std::ptr::read_unaligned((data as *const RawFd).add(i));
                    if fd >= 0 {
                        fds.push(OwnedFd::from_raw_fd(fd));
                    }
                }
            }
            cm = libc::CMSG_NXTHDR(&msg, cm);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(KeeperError::Invalid(
            "ancillary data truncated (MSG_CTRUNC): too many fds in one message".into(),
        ));
    }
    if msg.msg_flags & libc::MSG_TRUNC != 0 || n > MAX_MSG {
        return Err(KeeperError::Invalid(format!(
            "message over {MAX_MSG} bytes"
        )));
    }
    if n == 0 && fds.is_empty() {
        return Ok(Received::Closed);
    }
    buf.truncate(n);
    Ok(Received::Msg { bytes: buf, fds })
}

/// Decodes a message's JSON.
pub fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, KeeperError> {
    serde_json::from_slice(bytes)
        .map_err(|e| KeeperError::Invalid(format!("malformed message: {e}")))
}
