//! Thread creation that can fail without harm.
//!
//! `std::thread::scope` and `std::thread::spawn` panic when the OS refuses a thread (a container
//! pid limit, `RLIMIT_NPROC`); devmem only creates threads through [`spawn`] and
//! [`spawn_scoped`], which return the error instead, so every caller has a way out: run the
//! work on the calling thread, or fail the operation with a message.
//!
//! Tests inject refusals with [`fail_spawns`].

use parking_lot::Mutex;

/// (creations still to allow, refusals after them).
static INJECTED: Mutex<(usize, usize)> = Mutex::new((0, 0));

/// After `allow` more thread creations succeed, makes the next `refuse` fail as if the OS had
/// refused them (for tests; `usize::MAX` refuses every one).
#[doc(hidden)]
pub fn fail_spawns(allow: usize, refuse: usize) {
    *INJECTED.lock() = (allow, refuse);
}

fn injected() -> std::io::Result<()> {
    let mut state = INJECTED.lock();
    match *state {
        (_, 0) => Ok(()),
        (0, refuse) => {
            state.1 = refuse - 1;
            Err(std::io::Error::new(
                std::io::ErrorKind::WouldBlock,
                "Resource temporarily unavailable (injected)",
            ))
        }
        (allow, _) => {
            state.0 = allow - 1;
            Ok(())
        }
    }
}

/// Starts a named detached thread, or says why the OS refused.
pub fn spawn<F>(name: &str, f: F) -> std::io::Result<std::thread::JoinHandle<()>>
where
    F: FnOnce() + Send + 'static,
{
    injected()?;
    std::thread::Builder::new().name(name.to_string()).spawn(f)
}

/// Starts a named thread inside `scope`, or says why the OS refused.
pub fn spawn_scoped<'scope, 'env, F>(
    scope: &'scope std::thread::Scope<'scope, 'env>,
    name: &str,
    f: F,
) -> std::io::Result<std::thread::ScopedJoinHandle<'scope, ()>>
where
    F: FnOnce() + Send + 'scope,
{
    injected()?;
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn_scoped(scope, f)
}
