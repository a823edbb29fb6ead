"""Build hook: never bundle a libdevmem.so or emulator that was not built from these sources.

Everything else is configured in pyproject.toml (setuptools-rust builds ``libdevmem.so`` and the
emulator with cargo into ``build/lib*/devmem/``). Both extensions are optional, so without cargo
(or when cargo fails) the build goes on, and setuptools would then ship whatever an earlier
build left in ``build/``: a library built from other sources, without a word. The ``build``
command here records, next to ``build/``, a hash of the Rust sources each library was built
from; after the build, a library that was not rebuilt now and whose recorded hash differs from
the current sources' (or that has none) stops the build with a message saying what to do.

It also chooses, in one place, how every bundled library is built: with setuptools-rust's
defaults (``$CARGO`` or ``cargo``, against this machine's glibc), or, when ``DEVMEM_ZIG_GLIBC``
names a glibc version (``scripts/wheel.sh`` sets ``2.28``), with ``cargo-zigbuild`` against
that glibc, so the wheel installs wherever vLLM's and PyTorch's ``manylinux_2_28`` wheels do.
Every ``[[tool.setuptools-rust.ext-modules]]`` entry is built the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
from typing import Dict, List, Optional, Tuple

from setuptools import setup
from setuptools.command.build import build

HERE = os.path.dirname(os.path.abspath(__file__))
#: The repository root (pyproject.toml's ``path = "../../Cargo.toml"``).
ROOT = os.path.dirname(os.path.dirname(HERE))
#: What the bundled libraries are built from, relative to ROOT: files, and folders walked.
SOURCE_FILES = ("Cargo.toml", "Cargo.lock", "build.rs", "emulator/Cargo.toml", "emulator/build.rs", "preload/Cargo.toml",
                "keeper/Cargo.toml")
SOURCE_DIRS = ("src", "emulator/src", "preload/src", "keeper/src")
#: The libraries setuptools-rust puts into the package (pyproject.toml's targets).
LIBRARY_PATTERNS = ("libdevmem", "_emulator", "torch_memory_saver_hook_mode_preload")
#: The keeper executable setuptools-rust puts into the package (binding "Exec").
KEEPER_BINARY = "devmem-keeper"
#: The preload library ships under the one name torch_memory_saver's users and slime look for.
PRELOAD_STEM = "torch_memory_saver_hook_mode_preload"
#: Where the hash each library was built from is recorded, in the build base (``build/``).
STAMP = "devmem-rust-sources.json"
#: Names a glibc version ("2.28") to build every bundled library against with cargo-zigbuild.
ZIG_GLIBC = "DEVMEM_ZIG_GLIBC"
#: The first setuptools-rust that passes a glibc-suffixed target (``x86_64-unknown-linux-gnu.2.28``)
#: to cargo-zigbuild yet strips the suffix when it asks rustc about the target.
ZIG_SETUPTOOLS_RUST = (1, 13)


class StaleLibraryError(RuntimeError):
    """A library in the build folder was built from other sources and could not be rebuilt."""


def rust_sources_hash(root: str = ROOT) -> Optional[str]:
    """SHA-256 over the path and bytes of every Rust source file the libraries are built from,
    or None when there are none (a tree without the Rust sources)."""
    files: List[str] = [f for f in SOURCE_FILES if os.path.isfile(os.path.join(root, f))]
    for folder in SOURCE_DIRS:
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, folder)):
            dirnames.sort()
            files.extend(os.path.relpath(os.path.join(dirpath, name), root) for name in filenames)
    if not any(f.startswith("src" + os.sep) or f == "Cargo.toml" for f in files):
        return None
    digest = hashlib.sha256()
    for rel in sorted(files):
        digest.update(rel.replace(os.sep, "/").encode() + b"\0")
        with open(os.path.join(root, rel), "rb") as f:
            digest.update(hashlib.sha256(f.read()).digest())
    return digest.hexdigest()


def bundled_libraries(build_lib: str) -> List[str]:
    """The native libraries under ``build_lib/devmem`` that a wheel would ship."""
    package = os.path.join(build_lib, "devmem")
    if not os.path.isdir(package):
        return []
    return sorted(
        os.path.join(package, name) for name in os.listdir(package)
        if (name.startswith(LIBRARY_PATTERNS) and ".so" in name) or name == KEEPER_BINARY
    )


def _fingerprint(path: str) -> Tuple[int, int, int]:
    st = os.stat(path)
    return st.st_mtime_ns, st.st_size, st.st_ino


def snapshot(build_lib: str) -> Dict[str, Tuple[int, int, int]]:
    """The libraries in the build folder before a build, to tell rebuilt ones afterwards."""
    return {path: _fingerprint(path) for path in bundled_libraries(build_lib)}


def cargo_available() -> bool:
    """Whether the cargo setuptools-rust would run (``$CARGO``, else ``cargo``) is on PATH."""
    return shutil.which(os.environ.get("CARGO", "cargo")) is not None


def check_bundled_libraries(
    build_base: str, build_lib: str, before: Dict[str, Tuple[int, int, int]], root: str = ROOT,
) -> None:
    """After a build: records the current sources' hash for each library rebuilt now (changed
    since ``before``), and raises :class:`StaleLibraryError` for any library left from an earlier
    build whose recorded hash is not the current one, naming it and saying what to do."""
    current = rust_sources_hash(root)
    stamp_path = os.path.join(build_base, STAMP)
    try:
        with open(stamp_path) as f:
            recorded: Dict[str, Optional[str]] = json.load(f)
    except (OSError, ValueError):
        recorded = {}
    stale = []
    for path in bundled_libraries(build_lib):
        key = os.path.relpath(path, build_base)
        if before.get(path) != _fingerprint(path):
            recorded[key] = current  # built by this run
        elif current is None or recorded.get(key) != current:
            stale.append(path)
    os.makedirs(build_base, exist_ok=True)
    with open(stamp_path, "w") as f:
        json.dump(recorded, f, indent=1, sort_keys=True)
    if not stale:
        return
    why = (
        "cargo is not on PATH, so it could not be rebuilt" if not cargo_available()
        else "this build did not produce it (the cargo build failed, see the output above, or the file is "
        "left over under another name, e.g. from another Python version)"
    )
    raise StaleLibraryError(
        "refusing to bundle a native library that was not built from these sources: "
        + ", ".join(os.path.abspath(p) for p in stale)
        + f" is left from an earlier build (no record says it was built from the current Rust sources) and {why}. "
        f"Install Rust's cargo (https://rustup.rs) and build again, or delete {os.path.abspath(build_base)} to "
        "build the package without a bundled library (then set DEVMEM_LIBRARY to a libdevmem.so)."
    )


def name_preload_library(build_lib: str) -> None:
    """setuptools-rust names the preload library like an extension of this Python
    (``<stem>.cpython-311-x86_64-linux-gnu.so``); torch_memory_saver's users and slime look for
    ``<stem>.abi3.so`` beside the package's ``torch_memory_saver`` folder. The one built now
    replaces any older copy under that name."""
    package = os.path.join(build_lib, "devmem")
    wanted = os.path.join(package, PRELOAD_STEM + ".abi3.so")
    if not os.path.isdir(package):
        return
    for name in sorted(os.listdir(package)):
        path = os.path.join(package, name)
        if name.startswith(PRELOAD_STEM + ".") and name.endswith(".so") and path != wanted:
            os.replace(path, wanted)


class ZigBuildError(RuntimeError):
    """``DEVMEM_ZIG_GLIBC`` asks for a build this machine cannot do (the message says why)."""


def cargo_for_bundled_libraries(environ: Optional[Dict[str, str]] = None) -> Tuple[Optional[str], Optional[str]]:
    """The cargo command and ``--target`` every bundled library is built with: ``(None, None)``
    for setuptools-rust's defaults, or, when ``DEVMEM_ZIG_GLIBC`` is set, the path of
    ``cargo-zigbuild`` (``$CARGO_ZIGBUILD``, else found on PATH) and
    ``<arch>-unknown-linux-gnu.<glibc>``. Raises :class:`ZigBuildError` for a version not like
    ``2.28``, a machine that is not Linux, or a missing cargo-zigbuild."""
    environ = os.environ if environ is None else environ
    glibc = environ.get(ZIG_GLIBC, "")
    if not glibc:
        return None, None
    if not re.fullmatch(r"2\.[0-9]+", glibc):
        raise ZigBuildError(f"{ZIG_GLIBC}={glibc!r} is not a glibc version like 2.28")
    if platform.system() != "Linux":
        raise ZigBuildError(f"{ZIG_GLIBC} builds against Linux's glibc; this machine runs {platform.system()}")
    name = environ.get("CARGO_ZIGBUILD", "cargo-zigbuild")
    cargo = shutil.which(name, path=environ.get("PATH"))
    if cargo is None:
        raise ZigBuildError(
            f"{ZIG_GLIBC}={glibc} builds the bundled libraries with cargo-zigbuild, and {name} is not on PATH: "
            "`pip install cargo-zigbuild ziglang` (scripts/wheel.sh does, into build/wheel-tools), or unset "
            f"{ZIG_GLIBC} to build against this machine's glibc with cargo"
        )
    return cargo, f"{platform.machine()}-unknown-linux-gnu.{glibc}"


def build_rust_command() -> type:
    """setuptools-rust's ``build_rust``, building every bundled library with the command and
    target :func:`cargo_for_bundled_libraries` gives. Under ``DEVMEM_ZIG_GLIBC`` no library is
    optional: a wheel for an older glibc that lacks one is no use."""
    import setuptools_rust
    from setuptools_rust import build_rust

    class BuildRustBundled(build_rust):  # type: ignore[misc,valid-type]
        def run(self) -> None:
            cargo, target = cargo_for_bundled_libraries()
            if cargo is not None:
                have = tuple(int(n) for n in re.findall(r"[0-9]+", setuptools_rust.__version__)[:2])
                if have < ZIG_SETUPTOOLS_RUST:
                    raise ZigBuildError(
                        f"{ZIG_GLIBC} needs setuptools-rust {'.'.join(map(str, ZIG_SETUPTOOLS_RUST))} or later, "
                        f"this build has {setuptools_rust.__version__} (build with pip's default build isolation)"
                    )
                # build_ext sets self.target from $CARGO_BUILD_TARGET just before this: override it here.
                self.cargo, self.target = cargo, target
                for ext in self.extensions:
                    ext.optional = False
            super().run()

    return BuildRustBundled


class BuildCheckingLibraries(build):
    """``build`` that refuses to ship a stale bundled library (see the module docstring)."""

    def run(self) -> None:
        before = snapshot(self.build_lib)
        super().run()
        name_preload_library(self.build_lib)
        check_bundled_libraries(self.build_base, self.build_lib, before)


if __name__ == "__main__":
    setup(cmdclass={"build": BuildCheckingLibraries, "build_rust": build_rust_command()})
