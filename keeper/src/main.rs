//! `devmem-keeper`: serve, status, release, stop. Exit codes: 0 success, 1 failure,
//! 2 usage error, 3 no keeper running.

use devmem_keeper::server::{self, Bound, Config, Server};
use devmem_keeper::{Client, KeeperError, Status};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

const USAGE: &str = "usage:
  devmem-keeper serve [--daemon] [--socket PATH] [--max-bytes N] [--max-fds N]
  devmem-keeper status [--json] [--socket PATH]
  devmem-keeper release --instance I [--rank R] [--tag T] [--socket PATH]
  devmem-keeper stop [--socket PATH]

The socket defaults to DEVMEM_KEEPER_SOCKET, else $XDG_RUNTIME_DIR/devmem/keeper.sock,
else /dev/shm/devmem-<uid>/keeper.sock. See docs/keeper.md.";

fn usage(msg: &str) -> ExitCode {
    eprintln!("devmem-keeper: {msg}\n{USAGE}");
    ExitCode::from(2)
}

fn fail(e: &KeeperError) -> ExitCode {
    eprintln!("devmem-keeper: {e}");
    match e {
        KeeperError::NotRunning(_) => ExitCode::from(3),
        _ => ExitCode::from(1),
    }
}

#[derive(Default)]
struct Args {
    daemon: bool,
    json: bool,
    socket: Option<PathBuf>,
    max_bytes: Option<u64>,
    max_fds: Option<u64>,
    instance: Option<String>,
    rank: Option<u32>,
    tag: Option<String>,
}

fn parse(cmd: &str, rest: &[String]) -> Result<Args, String> {
    let mut a = Args::default();
    let mut it = rest.iter();
    while let Some(flag) = it.next() {
        let allowed: &[&str] = match cmd {
            "serve" => &["--daemon", "--socket", "--max-bytes", "--max-fds"],
            "status" => &["--json", "--socket"],
            "release" => &["--instance", "--rank", "--tag", "--socket"],
            _ => &["--socket"],
        };
        if !allowed.contains(&flag.as_str()) {
            return Err(format!("{cmd}: unknown argument {flag:?}"));
        }
        let mut value = || it.next().cloned().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--daemon" => a.daemon = true,
            "--json" => a.json = true,
            "--socket" => a.socket = Some(PathBuf::from(value()?)),
            "--max-bytes" => {
                let v = value()?;
                a.max_bytes = Some(
                    v.parse()
                        .map_err(|_| format!("--max-bytes {v:?} is not a number"))?,
                )
            }
            "--max-fds" => {
                let v = value()?;
                a.max_fds = Some(
                    v.parse()
                        .map_err(|_| format!("--max-fds {v:?} is not a number"))?,
                )
            }
            "--instance" => a.instance = Some(value()?),
            "--rank" => {
                let v = value()?;
                a.rank = Some(
                    v.parse()
                        .map_err(|_| format!("--rank {v:?} is not a number"))?,
                )
            }
            "--tag" => a.tag = Some(value()?),
            _ => return Err(format!("unknown argument {flag:?}")),
        }
    }
    Ok(a)
}

fn connect(a: &Args) -> Result<Client, KeeperError> {
    match &a.socket {
        Some(s) => Client::connect_at(s),
        None => Client::connect(),
    }
}

fn print_status(s: &Status) {
    println!("keeper pid {} uid {} socket {}", s.pid, s.uid, s.socket);
    println!(
        "bytes {} / {}  fds {} / {}",
        s.bytes_held, s.bytes_cap, s.fds_held, s.fds_cap
    );
    if s.keys.is_empty() {
        println!("holds nothing");
    }
    for k in &s.keys {
        let w = k.writer_pid.map_or("-".to_string(), |p| p.to_string());
        println!(
            "  {}  entries {}  bytes {}  writer {}  readers {:?}",
            k.key, k.entries, k.bytes, w, k.reader_pids
        );
    }
}

fn serve(a: Args) -> ExitCode {
    let mut cfg = match Config::from_env() {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    if let Some(s) = a.socket {
        cfg.socket = s;
    }
    if let Some(b) = a.max_bytes {
        cfg.max_bytes = b;
    }
    if a.max_fds.is_some() {
        cfg.max_fds = a.max_fds;
    }
    if a.daemon {
        return daemonize(&cfg);
    }
    match Server::bind(cfg) {
        Ok(Bound::Ready(s)) => match s.run() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&e),
        },
        Ok(Bound::AlreadyRunning) => {
            eprintln!("devmem-keeper: a keeper already runs at this socket");
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e),
    }
}

/// Whether a keeper answers at `socket` (a refusal is an answer: one runs there).
fn answers(socket: &std::path::Path) -> bool {
    matches!(
        Client::connect_at(socket),
        Ok(_) | Err(KeeperError::Refused(_))
    )
}

/// Starts the keeper detached (new session, stdio away from the caller, stderr to
/// `keeper.log` in the socket directory) and waits until it answers.
fn daemonize(cfg: &Config) -> ExitCode {
    if let Err(e) = devmem_keeper::paths::ensure_dir(&cfg.socket) {
        return fail(&e);
    }
    if answers(&cfg.socket) {
        return ExitCode::SUCCESS;
    }
    let log_path = server::socket_dir(&cfg.socket).join("keeper.log");
    let log = match std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
    {
        Ok(f) => f,
        Err(e) => {
            return fail(&KeeperError::Io(format!(
                "open({}): {e}",
                log_path.display()
            )))
        }
    };
    let exe = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => return fail(&KeeperError::Io(format!("current_exe: {e}"))),
    };
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("serve")
        .arg("--socket")
        .arg(&cfg.socket)
        .arg("--max-bytes")
        .arg(cfg.max_bytes.to_string())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log);
    if let Some(f) = cfg.max_fds {
        cmd.arg("--max-fds").arg(f.to_string());
    }
    use std::os::unix::process::CommandExt;
    // SAFETY: setsid is async-signal-safe, as pre_exec requires.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return fail(&KeeperError::Io(format!("spawn keeper: {e}"))),
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // Another launcher's keeper may answer first. Ours, still starting, would then exit
        // (the lock is taken), or, if it got past the lock check later, serve once that one
        // stops: so success is ours answering, or ours gone.
        match Client::connect_at(&cfg.socket).and_then(|mut c| c.status()) {
            Ok(status) if status.pid == child.id() => return ExitCode::SUCCESS,
            _ => {}
        }
        if let Ok(Some(st)) = child.try_wait() {
            // Exit 0: it lost a start race to a keeper that holds the lock (running or
            // starting); callers such as connect_or_spawn wait for that one to answer.
            if st.success() {
                return ExitCode::SUCCESS;
            }
            eprintln!(
                "devmem-keeper: the keeper exited ({st}); see {}",
                log_path.display()
            );
            return ExitCode::from(1);
        }
        if Instant::now() >= deadline {
            eprintln!(
                "devmem-keeper: the keeper did not answer in 30 s; see {}",
                log_path.display()
            );
            return ExitCode::from(1);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = argv.first() else {
        return usage("no command");
    };
    if cmd == "-h" || cmd == "--help" || cmd == "help" {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    if !["serve", "status", "release", "stop"].contains(&cmd.as_str()) {
        return usage(&format!("unknown command {cmd:?}"));
    }
    let a = match parse(cmd, &argv[1..]) {
        Ok(a) => a,
        Err(m) => return usage(&m),
    };
    match cmd.as_str() {
        "serve" => serve(a),
        "status" => match connect(&a).and_then(|mut c| c.status()) {
            Ok(s) if a.json => match serde_json::to_string_pretty(&s) {
                Ok(j) => {
                    println!("{j}");
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&KeeperError::Io(format!("json: {e}"))),
            },
            Ok(s) => {
                print_status(&s);
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        },
        "release" => {
            let Some(inst) = a.instance.clone() else {
                return usage("release needs --instance");
            };
            let run = || -> Result<(usize, u64), KeeperError> {
                let mut c = connect(&a)?;
                let mut n = 0;
                let mut bytes = 0;
                for (key, _) in c.list(Some(&inst))? {
                    if a.rank.is_some_and(|r| r != key.rank)
                        || a.tag.as_ref().is_some_and(|t| *t != key.tag)
                    {
                        continue;
                    }
                    bytes += c.release(&key)?;
                    n += 1;
                }
                Ok((n, bytes))
            };
            match run() {
                Ok((n, bytes)) => {
                    println!("released {n} keys, {bytes} bytes");
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e),
            }
        }
        _ => match connect(&a).and_then(|mut c| c.shutdown()) {
            Ok(()) => {
                println!("keeper stopped");
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        },
    }
}
