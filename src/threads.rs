//! Thread creation that can fail without harm.
//!
//! `std::thread::scope` and `std::thread::spawn` panic when the OS refuses a thread (a container
//! pid limit, `RLIMIT_NPROC`); devmem only creates threads through [`spawn`] and
//! [`spawn_scoped`], which return the error instead, so every caller has a way out: run the
//! work on the calling thread, or fail the operation with a message.
//!
//! Tests inject refusals with [`fail_next_spawns`].

use std::sync::atomic::{AtomicUsize, Ordering};

static INJECTED: AtomicUsize = AtomicUsize::new(0);

/// Makes the next `n` thread creations fail as if the OS had refused them (for tests).
#[doc(hidden)]
pub fn fail_next_spawns(n: usize) {
    INJECTED.store(n, Ordering::SeqCst);
}

fn injected() -> std::io::Result<()> {
    let taken = INJECTED.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
    match taken {
        Ok(_) => Err(std::io::Error::new(
            std::io::ErrorKind::WouldBlock,
            "Resource temporarily unavailable (injected)",
        )),
        Err(_) => Ok(()),
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
