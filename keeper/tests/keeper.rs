//! Keeper tests: memfds stand in for exported GPU memory, so everything runs without a driver.
//! Each test starts its own keeper on a socket in its own 0700 temporary directory.

use devmem_keeper::protocol::{self, Received, Reply, Request};
use devmem_keeper::{Client, Entry, KeeperError, Key, Mode};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_devmem-keeper");

struct Keeper {
    child: Child,
    dir: PathBuf,
    socket: PathBuf,
}

impl Drop for Keeper {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Child processes killed and reaped on drop, so a failing test leaves no keeper behind.
struct Kids(Vec<Child>);

impl Drop for Kids {
    fn drop(&mut self) {
        for k in &mut self.0 {
            let _ = k.kill();
            let _ = k.wait();
        }
    }
}

fn tempdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("keeper-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir(&d).unwrap();
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).unwrap();
    d
}

fn wait_up(socket: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while let Err(e) = Client::connect_at(socket) {
        if matches!(e, KeeperError::Refused(_)) {
            break; // it answers, refusing us (the foreign-uid test)
        }
        assert!(
            Instant::now() < deadline,
            "keeper at {} never answered",
            socket.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn start_with(name: &str, args: &[&str], env: &[(&str, &str)]) -> Keeper {
    let dir = tempdir(name);
    let socket = dir.join("k").join("keeper.sock");
    let mut cmd = Command::new(BIN);
    cmd.arg("serve")
        .arg("--socket")
        .arg(&socket)
        .args(args)
        .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let k = Keeper {
        child: cmd.spawn().unwrap(),
        dir,
        socket,
    };
    wait_up(&k.socket);
    k
}

fn start(name: &str) -> Keeper {
    start_with(name, &[], &[])
}

impl Keeper {
    fn client(&self) -> Client {
        Client::connect_at(&self.socket).unwrap()
    }
    fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .unwrap()
            .count()
    }
}

fn memfd(bytes: &[u8]) -> OwnedFd {
    // SAFETY: name is NUL-terminated.
    let fd = unsafe { libc::memfd_create(c"keeper-test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: fresh descriptor.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: bytes is valid for its length.
    let n = unsafe { libc::pwrite(fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), 0) };
    assert_eq!(n as usize, bytes.len());
    fd
}

fn read_fd(fd: &OwnedFd, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    // SAFETY: buf is valid for len bytes.
    let n = unsafe { libc::pread(fd.as_raw_fd(), buf.as_mut_ptr().cast(), len, 0) };
    assert_eq!(n as usize, len);
    buf
}

fn key(tag: &str) -> Key {
    Key {
        instance: "inst".into(),
        rank: 0,
        world: 1,
        tag: tag.into(),
    }
}

fn entry(pieces: &[u64]) -> Entry {
    Entry {
        size: pieces.iter().sum(),
        pieces: pieces.to_vec(),
        names: vec![("w".into(), 0, pieces[0])],
        device: 0,
        device_label: "cuda:0 test".into(),
        meta: "{\"sum\":1}".into(),
    }
}

fn keep_one(c: &mut Client, k: &Key, bytes: &[u8]) -> OwnedFd {
    let fd = memfd(bytes);
    c.keep(k, &[(entry(&[bytes.len() as u64]), vec![fd.as_fd()])])
        .unwrap();
    fd
}

/// Runs `helper` (a test of this binary) in a child process with `KEEPER_HELPER` set.
fn helper(name: &str, socket: &Path) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env("KEEPER_HELPER", "1")
        .env("KEEPER_SOCKET", socket)
        .stdin(Stdio::null())
        .spawn()
        .unwrap()
}

fn helper_socket() -> Option<PathBuf> {
    std::env::var_os("KEEPER_HELPER")?;
    Some(PathBuf::from(std::env::var_os("KEEPER_SOCKET")?))
}

#[test]
fn helper_keep_and_exit() {
    let Some(socket) = helper_socket() else {
        return;
    };
    let mut c = Client::connect_at(&socket).unwrap();
    let fd = keep_one(&mut c, &key("weights"), b"survives the client");
    drop(fd);
    std::process::exit(0);
}

#[test]
fn keep_survives_client_exit_and_reattach_reads_same_bytes() {
    let k = start("survive");
    let st = helper("helper_keep_and_exit", &k.socket).wait().unwrap();
    assert!(st.success());
    let mut c = k.client();
    let got = c.attach(&key("weights"), Mode::ReadWrite).unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0, entry(&[19]));
    assert_eq!(got[0].1.len(), 1);
    assert_eq!(read_fd(&got[0].1[0], 19), b"survives the client");
    let listed = c.list(Some("inst")).unwrap();
    assert_eq!(listed.len(), 1);
    assert!(c.list(Some("other")).unwrap().is_empty());
}

#[test]
fn helper_keep_then_hang() {
    let Some(socket) = helper_socket() else {
        return;
    };
    let c = Client::connect_at(&socket).unwrap();
    let s = c.as_fd();
    let k = key("half");
    protocol::send(
        s,
        &Request::KeepBegin {
            key: k,
            entries: 2,
            fds: 2,
        },
        &[],
    )
    .unwrap();
    match protocol::recv_raw(s, 0).unwrap() {
        Received::Msg { bytes, .. } => {
            assert!(matches!(
                protocol::decode::<Reply>(&bytes).unwrap(),
                Reply::Ok
            ))
        }
        _ => panic!("no answer to KeepBegin"),
    }
    protocol::send(
        s,
        &Request::KeepEntry {
            entry: entry(&[4096]),
        },
        &[],
    )
    .unwrap();
    let fd = memfd(&[7u8; 4096]);
    protocol::send(s, &Request::KeepFds, &[fd.as_raw_fd()]).unwrap();
    eprintln!("HELPER-SENT");
    std::thread::sleep(Duration::from_secs(300));
}

#[test]
fn keep_killed_mid_transaction_stores_nothing_and_leaks_no_fd() {
    let k = start("midkill");
    let mut c = k.client();
    c.status().unwrap(); // the keeper has settled earlier connections' hang-ups
    let base = k.fd_count();
    let mut child = Kids(vec![helper("helper_keep_then_hang", &k.socket)]);
    // Wait until the keeper holds the helper's one in-flight fd.
    let deadline = Instant::now() + Duration::from_secs(20);
    while c.status().unwrap().fds_held < 1 {
        assert!(
            Instant::now() < deadline,
            "keeper never received the helper's fd"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        k.fd_count() >= base + 2,
        "the helper's connection and fd are open"
    );
    // SAFETY: plain kill of our child.
    unsafe { libc::kill(child.0[0].id() as i32, libc::SIGKILL) };
    child.0[0].wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = c.status().unwrap();
        if s.fds_held == 0 && k.fd_count() == base {
            assert!(s.keys.is_empty());
            break;
        }
        assert!(
            Instant::now() < deadline,
            "keeper kept {} fds ({} open, {base} before) after the client died",
            s.fds_held,
            k.fd_count()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(matches!(
        c.attach(&key("half"), Mode::ReadOnly),
        Err(KeeperError::NotHeld(_))
    ));
}

/// A fake keeper that answers `replies` to the first request, then keeps or closes the
/// connection.
fn fake_keeper(
    name: &str,
    replies: Vec<Reply>,
    hold: bool,
) -> (PathBuf, std::thread::JoinHandle<()>) {
    let dir = tempdir(name);
    let socket = dir.join("fake.sock");
    let b = socket.as_os_str().as_encoded_bytes().to_vec();
    // SAFETY: plain socket calls on our own descriptors with a valid sockaddr_un.
    let listener = unsafe {
        let fd = libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0);
        let mut addr: libc::sockaddr_un = std::mem::zeroed();
        addr.sun_family = libc::AF_UNIX as _;
        for (d, s) in addr.sun_path.iter_mut().zip(&b) {
            *d = *s as _;
        }
        assert_eq!(
            libc::bind(
                fd,
                &addr as *const _ as *const libc::sockaddr,
                std::mem::size_of_val(&addr) as _
            ),
            0
        );
        assert_eq!(libc::listen(fd, 4), 0);
        OwnedFd::from_raw_fd(fd)
    };
    let h = std::thread::spawn(move || {
        // SAFETY: accept on our listener.
        let c = unsafe {
            OwnedFd::from_raw_fd(libc::accept(
                listener.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            ))
        };
        protocol::send(c.as_fd(), &Reply::Hello { pid: 1 }, &[]).unwrap();
        let _ = protocol::recv_raw(c.as_fd(), 0);
        for r in &replies {
            protocol::send(c.as_fd(), r, &[]).unwrap();
        }
        if hold {
            std::thread::sleep(Duration::from_secs(3));
        }
    });
    (socket, h)
}

#[test]
fn keeper_dying_mid_handover_is_an_io_error() {
    let (socket, h) = fake_keeper(
        "diehandover",
        vec![Reply::Attached { entries: 1, fds: 1 }],
        false,
    );
    let mut c = Client::connect_at(&socket).unwrap();
    let t = Instant::now();
    let r = c.attach(&key("x"), Mode::ReadWrite);
    assert!(matches!(r, Err(KeeperError::Io(_))), "{r:?}");
    assert!(t.elapsed() < Duration::from_secs(5));
    h.join().unwrap();
}

#[test]
fn silent_keeper_times_out_with_io_error() {
    let (socket, h) = fake_keeper("silent", vec![Reply::Attached { entries: 1, fds: 1 }], true);
    let mut c = Client::connect_at(&socket).unwrap();
    c.set_timeout(Duration::from_millis(300)).unwrap();
    let t = Instant::now();
    let r = c.attach(&key("x"), Mode::ReadWrite);
    assert!(
        matches!(&r, Err(KeeperError::Io(m)) if m.contains("timed out")),
        "{r:?}"
    );
    assert!(t.elapsed() < Duration::from_secs(2));
    h.join().unwrap();
}

#[test]
fn foreign_uid_is_refused() {
    let k = start_with("foreign", &[], &[("DEVMEM_KEEPER_EXPECT_UID", "4242")]);
    // The refusal comes at connect, before the client sends anything, so it is never lost
    // (the keeper closing a connection with unread requests would reset it).
    for _ in 0..50 {
        let r = Client::connect_at(&k.socket).map(|_| ());
        assert!(
            matches!(&r, Err(KeeperError::Refused(m)) if m.contains("4242")),
            "{r:?}"
        );
    }
}

#[test]
fn full_by_bytes_is_refused_and_state_unchanged() {
    let k = start_with("fullbytes", &["--max-bytes", "8192"], &[]);
    let mut c = k.client();
    let _a = keep_one(&mut c, &key("a"), &[1u8; 4096]);
    let fd = memfd(&[2u8; 8192]);
    let r = c.keep(&key("b"), &[(entry(&[8192]), vec![fd.as_fd()])]);
    assert!(matches!(r, Err(KeeperError::Full(_))), "{r:?}");
    let s = c.status().unwrap();
    assert_eq!((s.bytes_held, s.fds_held, s.keys.len()), (4096, 1, 1));
    // Replacing "a" by a key of the cap's size fits: the old bytes go.
    c.keep(&key("a"), &[(entry(&[8192]), vec![fd.as_fd()])])
        .unwrap();
    assert_eq!(c.status().unwrap().bytes_held, 8192);
}

#[test]
fn full_by_fds_is_refused_and_state_unchanged() {
    let k = start_with("fullfds", &["--max-fds", "2"], &[]);
    let mut c = k.client();
    let fd = memfd(&[1u8; 4096]);
    let r = c.keep(
        &key("a"),
        &[(entry(&[4096, 4096, 4096]), vec![fd.as_fd(); 3])],
    );
    assert!(matches!(r, Err(KeeperError::Full(_))), "{r:?}");
    let s = c.status().unwrap();
    assert_eq!((s.bytes_held, s.fds_held, s.keys.len()), (0, 0, 0));
    c.keep(&key("a"), &[(entry(&[4096, 4096]), vec![fd.as_fd(); 2])])
        .unwrap();
    assert_eq!(c.status().unwrap().fds_held, 2);
}

#[test]
fn many_pieces_travel_in_chunks() {
    let k = start("chunks");
    let mut c = k.client();
    let fd = memfd(b"piece");
    let pieces = vec![5u64; 600];
    c.keep(&key("big"), &[(entry(&pieces), vec![fd.as_fd(); 600])])
        .unwrap();
    drop(c);
    let mut c = k.client();
    let got = c.attach(&key("big"), Mode::ReadOnly).unwrap();
    assert_eq!(got[0].1.len(), 600);
    assert_eq!(read_fd(&got[0].1[599], 5), b"piece");
    assert_eq!(c.status().unwrap().fds_held, 600);
}

#[test]
fn stale_socket_file_is_replaced() {
    let dir = tempdir("stale");
    let sockdir = dir.join("k");
    std::fs::create_dir(&sockdir).unwrap();
    std::fs::set_permissions(&sockdir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let socket = sockdir.join("keeper.sock");
    // A socket file nobody listens on: bound, then closed without unlink.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    assert!(matches!(
        Client::connect_at(&socket),
        Err(KeeperError::NotRunning(_))
    ));
    let child = Command::new(BIN)
        .arg("serve")
        .arg("--socket")
        .arg(&socket)
        .spawn()
        .unwrap();
    let k = Keeper { child, dir, socket };
    wait_up(&k.socket);
    k.client().status().unwrap();
}

#[test]
fn racing_keepers_end_with_one() {
    let dir = tempdir("race");
    let socket = dir.join("k").join("keeper.sock");
    let mut kids = Kids(
        (0..4)
            .map(|_| {
                Command::new(BIN)
                    .arg("serve")
                    .arg("--socket")
                    .arg(&socket)
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap()
            })
            .collect(),
    );
    wait_up(&socket);
    std::thread::sleep(Duration::from_millis(500));
    let mut running = Vec::new();
    for (i, kid) in kids.0.iter_mut().enumerate() {
        match kid.try_wait().unwrap() {
            None => running.push(i),
            Some(st) => assert!(st.success(), "a losing keeper failed: {st}"),
        }
    }
    assert_eq!(running.len(), 1, "keepers left running: {running:?}");
    let winner = kids.0.remove(running[0]);
    let k = Keeper {
        child: winner,
        dir,
        socket,
    };
    assert_eq!(k.client().status().unwrap().pid, k.child.id());
}

#[test]
fn racing_daemon_starts_end_with_one() {
    let dir = tempdir("racedaemon");
    let socket = dir.join("k").join("keeper.sock");
    let kids: Vec<Child> = (0..3)
        .map(|_| {
            Command::new(BIN)
                .args(["serve", "--daemon", "--socket"])
                .arg(&socket)
                .spawn()
                .unwrap()
        })
        .collect();
    for mut kid in kids {
        assert!(kid.wait().unwrap().success());
    }
    let mut c = Client::connect_at(&socket).unwrap();
    let pid = c.status().unwrap().pid;
    c.shutdown().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{pid}")).exists() {
        // A zombie counts as gone: the daemon is not our child.
        let st = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if st.contains(") Z") {
            break;
        }
        assert!(Instant::now() < deadline, "the keeper did not exit");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(matches!(
        Client::connect_at(&socket),
        Err(KeeperError::NotRunning(_))
    ));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn connect_or_spawn_starts_one_keeper() {
    let dir = tempdir("spawn");
    let socket = dir.join("k").join("keeper.sock");
    // SAFETY: this test's process sets the variable before any thread reads it.
    unsafe { std::env::set_var("DEVMEM_KEEPER_SOCKET", &socket) };
    let threads: Vec<_> = (0..2)
        .map(|_| {
            std::thread::spawn(|| {
                let mut c =
                    Client::connect_or_spawn(Path::new(BIN), Duration::from_secs(20)).unwrap();
                c.status().unwrap().pid
            })
        })
        .collect();
    let pids: Vec<u32> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(pids[0], pids[1]);
    Client::connect_at(&socket).unwrap().shutdown().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn racing_read_write_attach_one_wins_until_it_dies() {
    let k = start("rwrace");
    let mut keeper_conn = k.client();
    let _fd = keep_one(&mut keeper_conn, &key("kv"), b"abc");
    drop(keeper_conn);
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(2));
    let threads: Vec<_> = (0..2)
        .map(|_| {
            let b = barrier.clone();
            let mut c = k.client();
            std::thread::spawn(move || {
                b.wait();
                let r = c.attach(&key("kv"), Mode::ReadWrite).map(|_| ());
                (c, r)
            })
        })
        .collect();
    let results: Vec<(Client, Result<(), KeeperError>)> =
        threads.into_iter().map(|t| t.join().unwrap()).collect();
    let winners = results.iter().filter(|(_, r)| r.is_ok()).count();
    assert_eq!(winners, 1);
    let mut loser = None;
    for (c, r) in results {
        match r {
            Ok(()) => drop(c), // the winner's connection closes: its lease ends
            Err(KeeperError::Busy(m)) => {
                assert!(m.contains(&format!("pid {}", std::process::id())), "{m}");
                loser = Some(c)
            }
            Err(e) => panic!("{e}"),
        }
    }
    let mut c = loser.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match c.attach(&key("kv"), Mode::ReadWrite) {
            Ok(_) => break,
            Err(KeeperError::Busy(_)) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) => panic!("{e}"),
        }
    }
}

#[test]
fn read_only_attach_is_shared_with_the_writer() {
    let k = start("ro");
    let mut w = k.client();
    let _fd = keep_one(&mut w, &key("kv"), b"shared");
    let mut r1 = k.client();
    let mut r2 = k.client();
    let a = r1.attach(&key("kv"), Mode::ReadOnly).unwrap();
    let b = r2.attach(&key("kv"), Mode::ReadOnly).unwrap();
    assert_eq!(read_fd(&a[0].1[0], 6), b"shared");
    assert_eq!(read_fd(&b[0].1[0], 6), b"shared");
    let s = w.status().unwrap();
    assert_eq!(s.keys[0].writer_pid, Some(std::process::id()));
    assert_eq!(s.keys[0].reader_pids.len(), 2);
    assert!(matches!(
        r1.attach(&key("kv"), Mode::ReadWrite),
        Err(KeeperError::Busy(_))
    ));
    w.detach(&key("kv")).unwrap();
    r1.attach(&key("kv"), Mode::ReadWrite).unwrap();
}

#[test]
fn release_is_refused_while_leased_and_works_after() {
    let k = start("release");
    let mut w = k.client();
    let _fd = keep_one(&mut w, &key("kv"), &[3u8; 4096]);
    let mut other = k.client();
    assert!(matches!(
        other.release(&key("kv")),
        Err(KeeperError::Busy(_))
    ));
    assert!(matches!(
        other.keep(&key("kv"), &[]),
        Err(KeeperError::Invalid(_))
    ));
    let fd = memfd(b"x");
    assert!(matches!(
        other.keep(&key("kv"), &[(entry(&[1]), vec![fd.as_fd()])]),
        Err(KeeperError::Busy(_))
    ));
    drop(w);
    let deadline = Instant::now() + Duration::from_secs(10);
    let bytes = loop {
        match other.release(&key("kv")) {
            Ok(b) => break b,
            Err(KeeperError::Busy(_)) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(bytes, 4096);
    assert!(matches!(
        other.release(&key("kv")),
        Err(KeeperError::NotHeld(_))
    ));
    assert_eq!(other.status().unwrap().fds_held, 0);
}

#[test]
fn cli_status_release_stop() {
    let k = start("cli");
    let mut c = k.client();
    let _fd = keep_one(&mut c, &key("kv"), &[3u8; 100]);
    c.detach(&key("kv")).unwrap();
    let out = Command::new(BIN)
        .args(["status", "--json", "--socket"])
        .arg(&k.socket)
        .output()
        .unwrap();
    assert!(out.status.success());
    let s: devmem_keeper::Status = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s.bytes_held, 100);
    let out = Command::new(BIN)
        .args(["release", "--instance", "inst", "--tag", "kv", "--socket"])
        .arg(&k.socket)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("released 1 keys, 100 bytes"));
    assert_eq!(
        Command::new(BIN).args(["release"]).status().unwrap().code(),
        Some(2)
    );
    assert_eq!(
        Command::new(BIN)
            .args(["serve", "--bogus"])
            .status()
            .unwrap()
            .code(),
        Some(2)
    );
    assert_eq!(
        Command::new(BIN)
            .args(["frobnicate"])
            .status()
            .unwrap()
            .code(),
        Some(2)
    );
    let out = Command::new(BIN)
        .args(["stop", "--socket"])
        .arg(&k.socket)
        .output()
        .unwrap();
    assert!(out.status.success());
    let st = Command::new(BIN)
        .args(["status", "--socket"])
        .arg(&k.socket)
        .status()
        .unwrap();
    assert_eq!(st.code(), Some(3));
}

#[test]
fn sigterm_closes_everything_and_exits() {
    let mut k = start("sigterm");
    let mut c = k.client();
    let _fd = keep_one(&mut c, &key("kv"), b"bye");
    // SAFETY: plain kill of our child.
    unsafe { libc::kill(k.child.id() as i32, libc::SIGTERM) };
    let st = k.child.wait().unwrap();
    assert!(st.success(), "{st}");
    assert!(!k.socket.exists());
}

#[test]
fn directory_checks_refuse_wide_mode_symlink_and_other_owner() {
    let dir = tempdir("dirs");
    let wide = dir.join("wide");
    std::fs::create_dir(&wide).unwrap();
    std::fs::set_permissions(&wide, std::fs::Permissions::from_mode(0o755)).unwrap();
    let r = Client::connect_at(&wide.join("keeper.sock"));
    assert!(
        matches!(&r, Err(KeeperError::Refused(m)) if m.contains("mode")),
        "{:?}",
        r.err()
    );
    let out = Command::new(BIN)
        .arg("serve")
        .arg("--socket")
        .arg(wide.join("keeper.sock"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("0700"));

    let real = dir.join("real");
    std::fs::create_dir(&real).unwrap();
    std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o700)).unwrap();
    let link = dir.join("link");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let r = Client::connect_at(&link.join("keeper.sock"));
    assert!(
        matches!(&r, Err(KeeperError::Refused(m)) if m.contains("symlink")),
        "{:?}",
        r.err()
    );
    let out = Command::new(BIN)
        .arg("serve")
        .arg("--socket")
        .arg(link.join("keeper.sock"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));

    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } == 0 {
        let foreign = dir.join("foreign");
        std::fs::create_dir(&foreign).unwrap();
        std::fs::set_permissions(&foreign, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::os::unix::fs::chown(&foreign, Some(4242), None).unwrap();
        let r = Client::connect_at(&foreign.join("keeper.sock"));
        assert!(
            matches!(&r, Err(KeeperError::Refused(m)) if m.contains("4242")),
            "{:?}",
            r.err()
        );
    }
    // Absent: serve creates it 0700.
    let fresh = dir.join("fresh").join("keeper.sock");
    let child = Command::new(BIN)
        .arg("serve")
        .arg("--socket")
        .arg(&fresh)
        .spawn()
        .unwrap();
    let k = Keeper {
        child,
        dir,
        socket: fresh,
    };
    wait_up(&k.socket);
    let mode = std::fs::metadata(k.socket.parent().unwrap())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700);
}

fn raw_exchange(c: &Client, bytes: &[u8], fds: &[i32]) -> Option<Reply> {
    protocol::send_raw(c.as_fd(), bytes, fds).ok()?;
    match protocol::recv_raw(c.as_fd(), 0) {
        Ok(Received::Msg { bytes, .. }) => protocol::decode(&bytes).ok(),
        _ => None,
    }
}

#[test]
fn malformed_messages_close_only_that_connection() {
    let k = start("malformed");
    let mut good = k.client();
    let _fd = keep_one(&mut good, &key("kv"), b"kept");
    let base = k.fd_count();

    // Garbage bytes: an Invalid answer, then the connection is closed.
    let bad = k.client();
    let r = raw_exchange(&bad, b"\xff\x00garbage{{", &[]);
    assert!(
        matches!(
            r,
            Some(Reply::Err {
                error: KeeperError::Invalid(_)
            })
        ),
        "{r:?}"
    );
    assert!(matches!(
        protocol::recv_raw(bad.as_fd(), 0),
        Ok(Received::Closed)
    ));

    // Stray fds on a message that takes none are closed with the connection.
    let bad = k.client();
    let m = memfd(b"stray");
    let r = raw_exchange(
        &bad,
        &serde_json::to_vec(&Request::Status).unwrap(),
        &[m.as_raw_fd(); 3],
    );
    assert!(
        matches!(
            r,
            Some(Reply::Err {
                error: KeeperError::Invalid(_)
            })
        ),
        "{r:?}"
    );

    // Wrong fd count in a keep: Invalid at commit, nothing stored.
    let bad = k.client();
    let s = bad.as_fd();
    protocol::send(
        s,
        &Request::KeepBegin {
            key: key("bad"),
            entries: 1,
            fds: 2,
        },
        &[],
    )
    .unwrap();
    assert!(matches!(protocol::recv_raw(s, 0), Ok(Received::Msg { .. })));
    protocol::send(
        s,
        &Request::KeepEntry {
            entry: entry(&[5, 5]),
        },
        &[],
    )
    .unwrap();
    protocol::send(s, &Request::KeepFds, &[m.as_raw_fd()]).unwrap();
    protocol::send(s, &Request::KeepCommit, &[]).unwrap();
    match protocol::recv_raw(s, 0).unwrap() {
        Received::Msg { bytes, .. } => {
            let r: Reply = protocol::decode(&bytes).unwrap();
            assert!(
                matches!(
                    r,
                    Reply::Err {
                        error: KeeperError::Invalid(_)
                    }
                ),
                "{r:?}"
            );
        }
        _ => panic!("no answer to the commit"),
    }
    // Entries that lie about their sizes are refused too.
    protocol::send(
        s,
        &Request::KeepBegin {
            key: key("bad"),
            entries: 1,
            fds: 1,
        },
        &[],
    )
    .unwrap();
    assert!(matches!(protocol::recv_raw(s, 0), Ok(Received::Msg { .. })));
    let mut lying = entry(&[5]);
    lying.size = u64::MAX;
    protocol::send(s, &Request::KeepEntry { entry: lying }, &[]).unwrap();
    protocol::send(s, &Request::KeepFds, &[m.as_raw_fd()]).unwrap();
    protocol::send(s, &Request::KeepCommit, &[]).unwrap();
    let r = match protocol::recv_raw(s, 0).unwrap() {
        Received::Msg { bytes, .. } => protocol::decode::<Reply>(&bytes).unwrap(),
        _ => panic!("no answer"),
    };
    assert!(
        matches!(
            r,
            Reply::Err {
                error: KeeperError::Invalid(_)
            }
        ),
        "{r:?}"
    );
    drop(bad);

    // Bad keys from the library are refused before sending.
    let bad_key = Key {
        instance: String::new(),
        rank: 0,
        world: 1,
        tag: "t".into(),
    };
    assert!(matches!(
        good.attach(&bad_key, Mode::ReadOnly),
        Err(KeeperError::Invalid(_))
    ));

    // The keeper still serves, holds only what it held, and leaked no descriptor.
    let deadline = Instant::now() + Duration::from_secs(10);
    while k.fd_count() != base {
        assert!(Instant::now() < deadline, "fds {} != {base}", k.fd_count());
        std::thread::sleep(Duration::from_millis(10));
    }
    let s = good.status().unwrap();
    assert_eq!((s.keys.len(), s.fds_held), (1, 1));
    let mut again = k.client();
    assert!(again.attach(&key("kv"), Mode::ReadOnly).is_ok());
}

#[test]
fn socket_path_follows_the_environment() {
    // SAFETY: set before any other thread of this test process reads the environment.
    unsafe {
        std::env::set_var("DEVMEM_KEEPER_SOCKET", "/x/y.sock");
    }
    assert_eq!(
        devmem_keeper::paths::socket_path().unwrap(),
        PathBuf::from("/x/y.sock")
    );
    // SAFETY: as above.
    unsafe {
        std::env::remove_var("DEVMEM_KEEPER_SOCKET");
        std::env::set_var("XDG_RUNTIME_DIR", "/nonexistent-xdg");
    }
    let uid = devmem_keeper::paths::uid();
    assert_eq!(
        devmem_keeper::paths::socket_path().unwrap(),
        PathBuf::from(format!("/dev/shm/devmem-{uid}/keeper.sock"))
    );
}

#[test]
fn racing_keepers_with_a_slow_listen_end_with_one() {
    // Each keeper sleeps between bind and listen: without the lock file, a second keeper
    // would find the first's socket refusing connections, take it for stale, unlink it and
    // serve too.
    let dir = tempdir("raceslow");
    let socket = dir.join("k").join("keeper.sock");
    let mut kids = Kids(
        (0..3)
            .map(|i| {
                std::thread::sleep(Duration::from_millis(if i == 0 { 0 } else { 50 }));
                Command::new(BIN)
                    .arg("serve")
                    .arg("--socket")
                    .arg(&socket)
                    .env("DEVMEM_KEEPER_TEST_LISTEN_DELAY_MS", "400")
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap()
            })
            .collect(),
    );
    wait_up(&socket);
    std::thread::sleep(Duration::from_millis(1000));
    let running: Vec<usize> = (0..kids.0.len())
        .filter(|&i| kids.0[i].try_wait().unwrap().is_none())
        .collect();
    assert_eq!(running.len(), 1, "keepers left running: {running:?}");
    let winner = kids.0.remove(running[0]);
    drop(kids);
    let k = Keeper {
        child: winner,
        dir,
        socket,
    };
    assert_eq!(k.client().status().unwrap().pid, k.child.id());
}

/// Counts announced on the wire are a client's word: one at u64::MAX must be refused, not
/// overflow the keeper's cap arithmetic (a panic in a debug build took the keeper, and every
/// byte it held, down; a release build wrapped past the cap check).
#[test]
fn huge_announced_counts_do_not_take_the_keeper_down() {
    let k = start("hugecounts");
    let mut good = k.client();
    let fd = keep_one(&mut good, &key("kv"), b"kept");
    drop(fd);
    let bad = k.client();
    let s = bad.as_fd();
    protocol::send(
        s,
        &Request::KeepBegin {
            key: key("huge"),
            entries: 1,
            fds: u64::MAX,
        },
        &[],
    )
    .unwrap();
    let r = match protocol::recv_raw(s, 0) {
        Ok(Received::Msg { bytes, .. }) => protocol::decode::<Reply>(&bytes).ok(),
        _ => None,
    };
    assert!(
        matches!(
            r,
            Some(Reply::Err {
                error: KeeperError::Full(_)
            })
        ),
        "{r:?}"
    );
    // The keeper still serves and still holds what it held.
    let s = good.status().unwrap();
    assert_eq!((s.keys.len(), s.fds_held), (1, 1));
    let mut again = k.client();
    let got = again.attach(&key("kv"), Mode::ReadOnly).unwrap();
    assert_eq!(read_fd(&got[0].1[0], 4), b"kept");
}

/// A socket or a pipe is never device memory: a client handing the keeper one (its own
/// connection's other end, say, so that its lease would never end) is refused, nothing stored.
#[test]
fn sockets_and_pipes_are_not_kept() {
    let k = start("notmem");
    let mut c = k.client();
    let mut pair = [0i32; 2];
    // SAFETY: `pair` is a valid out-array of two descriptors.
    assert_eq!(
        unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, pair.as_mut_ptr()) },
        0
    );
    let mut pipe = [0i32; 2];
    // SAFETY: as above.
    assert_eq!(unsafe { libc::pipe(pipe.as_mut_ptr()) }, 0);
    // SAFETY: fresh descriptors, owned from here on.
    let owned: Vec<OwnedFd> = pair
        .iter()
        .chain(pipe.iter())
        .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    for (fd, kind) in [(&owned[0], "socket"), (&owned[2], "pipe")] {
        let r = c.keep(&key("s"), &[(entry(&[4096]), vec![fd.as_fd()])]);
        match r {
            Err(KeeperError::Invalid(m)) => assert!(m.contains(kind), "{m}"),
            other => panic!("a {kind} was kept: {other:?}"),
        }
    }
    let s = c.status().unwrap();
    assert_eq!((s.bytes_held, s.fds_held, s.keys.len()), (0, 0, 0));
    // The connection still works for memory.
    let _m = keep_one(&mut c, &key("m"), &[7u8; 4096]);
    assert_eq!(c.status().unwrap().keys.len(), 1);
}

/// The library does not trust the keeper either: an entry whose size is not the sum of its
/// pieces is an error before any descriptor is waited for.
#[test]
fn an_invalid_entry_from_the_keeper_is_refused() {
    let mut bad = entry(&[4096]);
    bad.size = 1 << 40;
    let (socket, h) = fake_keeper(
        "badentry",
        vec![
            Reply::Attached { entries: 1, fds: 1 },
            Reply::Entry { entry: bad },
        ],
        false,
    );
    let mut c = Client::connect_at(&socket).unwrap();
    let r = c.attach(&key("x"), Mode::ReadWrite);
    match r {
        Err(KeeperError::Io(m)) => assert!(m.contains("invalid entry"), "{m}"),
        other => panic!("an invalid entry was accepted: {other:?}"),
    }
    h.join().unwrap();
}
