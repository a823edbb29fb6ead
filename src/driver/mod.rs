//! Run-time loaded driver symbol tables. Only this layer and `backend` touch driver symbols;
//! nothing here keeps state beyond the open library.
//!
//! Every driver is one [`symbol_table!`] invocation (the entry points and their C prototypes)
//! plus thin wrappers that turn the driver's result codes into [`Error`]s naming the call; one
//! loader ([`open`]) finds the library for all of them.

use libloading::Library;

use crate::error::{devmem_status, Error, Result};

pub mod cuda;
pub mod hip;
pub mod ze;

/// Opens a driver library: the path in the environment variable `env` when set (as the bytes
/// the environment holds: a path need not be UTF-8), else `default`. `what` names the library
/// in the error ("the CUDA driver library"). Returns the library and its path as text, for
/// messages.
pub(crate) fn open(env: &str, default: &str, what: &str) -> Result<(Library, String)> {
    let path = crate::env::path(env).unwrap_or_else(|| default.into());
    let shown = path.to_string_lossy().into_owned();
    // SAFETY: opening a shared library runs its initialisers; driver libraries (and the
    // emulator) are made to be loaded this way.
    match unsafe { Library::new(&path) } {
        Ok(lib) => Ok((lib, shown)),
        Err(e) => Err(Error::new(
            devmem_status::DriverNotFound,
            format!(
                "could not open {what} {shown} (set {env} to override): {}",
                with_sources(&e)
            ),
        )),
    }
}

/// An error and its sources, "outer: inner: ...": libloading's own text is only "dlopen
/// failed"; `dlerror()`'s text (e.g. "invalid ELF header") is its source.
pub(crate) fn with_sources(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

/// Declares a driver's symbol table: a struct with one function pointer per required entry
/// point (all returning the driver's result type), one `Option` per optional entry point, and
/// `resolve`, which looks every symbol up once. A missing required symbol fails with `DRIVER`;
/// a missing optional one is `None`.
macro_rules! symbol_table {
    (
        $(#[$meta:meta])*
        $vis:vis struct $name:ident returns $ret:ty, named $what:literal {
            $( $field:ident = $sym:literal : fn($($arg:ty),* $(,)?); )*
        }
        optional {
            $( $ofield:ident = $osym:literal : fn($($oarg:ty),* $(,)?) -> $oret:ty; )*
        }
    ) => {
        $(#[$meta])*
        #[allow(non_snake_case)]
        $vis struct $name {
            $( pub(crate) $field: unsafe extern "C" fn($($arg),*) -> $ret, )*
            $( pub(crate) $ofield: Option<unsafe extern "C" fn($($oarg),*) -> $oret>, )*
            path: String,
            // Declared last so the function pointers above never outlive the library.
            _lib: libloading::Library,
        }

        impl $name {
            fn resolve(lib: libloading::Library, path: String) -> $crate::error::Result<Self> {
                $(
                    // SAFETY: the type matches the driver's documented prototype for this
                    // symbol, and the pointer is only used while `_lib` keeps the library open.
                    let $field = unsafe {
                        lib.get::<unsafe extern "C" fn($($arg),*) -> $ret>(
                            concat!($sym, "\0").as_bytes(),
                        )
                    }
                    .map(|s| *s)
                    .map_err(|e| $crate::error::Error::new(
                        $crate::error::devmem_status::Driver,
                        format!(
                            "{} {path} lacks symbol {}: {}",
                            $what,
                            $sym,
                            $crate::driver::with_sources(&e)
                        ),
                    ))?;
                )*
                $(
                    // SAFETY: as above, for an optional entry point.
                    let $ofield = unsafe {
                        lib.get::<unsafe extern "C" fn($($oarg),*) -> $oret>(
                            concat!($osym, "\0").as_bytes(),
                        )
                    }
                    .ok()
                    .map(|s| *s);
                )*
                Ok(Self { $($field,)* $($ofield,)* path, _lib: lib })
            }

            /// The path the library was opened from.
            pub(crate) fn path(&self) -> &str {
                &self.path
            }
        }
    };
}
pub(crate) use symbol_table;
