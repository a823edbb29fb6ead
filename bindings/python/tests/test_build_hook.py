"""The package build never bundles a stale native library (issue 20, deliverable 6): without
cargo, a ``build/`` left by an earlier install used to end up in the wheel without a word.
``setup.py``'s build hook records which Rust sources each library was built from and refuses
a library that was not built from the current ones."""

import importlib.util
import os
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def hook():
    pytest.importorskip("setuptools.command.build", reason="needs setuptools 62.4 or later, as the build does")
    spec = importlib.util.spec_from_file_location("devmem_build_hook", PACKAGE / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # setup() runs only as __main__
    return module


@pytest.fixture
def no_cargo(monkeypatch, tmp_path):
    """PATH without cargo (and no $CARGO), as on a machine without Rust."""
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.delenv("CARGO", raising=False)


def sources(root):
    (root / "src").mkdir(parents=True)
    (root / "Cargo.toml").write_text('[package]\nname = "devmem"\n')
    (root / "src" / "lib.rs").write_text("pub fn v() -> u32 { 1 }\n")
    return root


def stale_library(build_lib, name="libdevmem.cpython-311-x86_64-linux-gnu.so"):
    package = build_lib / "devmem"
    package.mkdir(parents=True, exist_ok=True)
    lib = package / name
    lib.write_bytes(b"\x7fELF from an earlier install")
    os.utime(lib, (1_500_000_000, 1_500_000_000))
    return lib


def test_without_cargo_a_stale_build_folder_is_refused(hook, no_cargo, tmp_path):
    root = sources(tmp_path / "repo")
    build_base = tmp_path / "build"
    build_lib = build_base / "lib.linux-x86_64-cpython-311"
    lib = stale_library(build_lib)
    assert not hook.cargo_available()
    before = hook.snapshot(str(build_lib))  # the build runs; without cargo it builds no library
    with pytest.raises(hook.StaleLibraryError) as info:
        hook.check_bundled_libraries(str(build_base), str(build_lib), before, root=str(root))
    message = str(info.value)
    assert str(lib) in message and "cargo is not on PATH" in message
    assert f"delete {build_base}" in message and "DEVMEM_LIBRARY" in message


def test_a_library_built_from_the_current_sources_is_kept_and_a_change_makes_it_stale(hook, no_cargo, tmp_path):
    root = sources(tmp_path / "repo")
    build_base = tmp_path / "build"
    build_lib = build_base / "lib"
    before = hook.snapshot(str(build_lib))
    lib = stale_library(build_lib, "_emulator.cpython-311-x86_64-linux-gnu.so")  # "built" by this run
    hook.check_bundled_libraries(str(build_base), str(build_lib), before, root=str(root))
    # A later build without cargo, the sources unchanged: the library is the right one.
    hook.check_bundled_libraries(str(build_base), str(build_lib), hook.snapshot(str(build_lib)), root=str(root))
    (root / "src" / "lib.rs").write_text("pub fn v() -> u32 { 2 }\n")
    with pytest.raises(hook.StaleLibraryError, match=str(lib)):
        hook.check_bundled_libraries(str(build_base), str(build_lib), hook.snapshot(str(build_lib)), root=str(root))
    # Rebuilt (the file changes): recorded again, accepted.
    before = hook.snapshot(str(build_lib))
    lib.write_bytes(b"\x7fELF rebuilt")
    hook.check_bundled_libraries(str(build_base), str(build_lib), before, root=str(root))


def test_the_build_command_runs_the_check(hook, no_cargo, tmp_path, monkeypatch):
    """The ``build`` command setup.py installs: a build that produces no library (setuptools-rust
    skips its optional extensions without cargo) and finds a stale one refuses to go on."""
    from setuptools.command.build import build
    from setuptools.dist import Distribution

    monkeypatch.chdir(tmp_path)
    dist = Distribution({"name": "devmem", "packages": [], "cmdclass": {"build": hook.BuildCheckingLibraries}})
    cmd = dist.get_command_obj("build")
    cmd.build_base = str(tmp_path / "build")
    cmd.ensure_finalized()
    lib = stale_library(pathlib.Path(cmd.build_lib))
    monkeypatch.setattr(build, "run", lambda self: None)
    with pytest.raises(hook.StaleLibraryError, match=str(lib)):
        dist.run_command("build")
    os.unlink(lib)
    dist.have_run["build"] = 0
    dist.run_command("build")  # nothing bundled: nothing to refuse


def test_the_source_hash_covers_both_crates(hook):
    root = PACKAGE.parents[1]
    assert hook.ROOT == str(root)
    assert hook.rust_sources_hash(str(root)) is not None
    assert hook.rust_sources_hash(str(PACKAGE / "devmem")) is None  # no Rust sources there


# DEVMEM_ZIG_GLIBC (issue 21): scripts/wheel.sh builds every bundled library with cargo-zigbuild
# against glibc 2.28; a plain `pip install` keeps setuptools-rust's defaults.


def fake_cargo_zigbuild(tmp_path):
    bin_dir = tmp_path / "zig-bin"
    bin_dir.mkdir()
    tool = bin_dir / "cargo-zigbuild"
    tool.write_text("#!/bin/sh\nexit 0\n")
    tool.chmod(0o755)
    return bin_dir, tool


def test_without_devmem_zig_glibc_the_libraries_are_built_with_plain_cargo(hook, tmp_path):
    bin_dir, _ = fake_cargo_zigbuild(tmp_path)
    assert hook.cargo_for_bundled_libraries({"PATH": str(bin_dir)}) == (None, None)
    assert hook.cargo_for_bundled_libraries({"PATH": str(bin_dir), hook.ZIG_GLIBC: ""}) == (None, None)


@pytest.mark.skipif(not os.uname().sysname == "Linux", reason="builds against Linux's glibc")
def test_devmem_zig_glibc_builds_with_cargo_zigbuild_for_that_glibc(hook, tmp_path):
    bin_dir, tool = fake_cargo_zigbuild(tmp_path)
    cargo, target = hook.cargo_for_bundled_libraries({"PATH": str(bin_dir), hook.ZIG_GLIBC: "2.28"})
    assert cargo == str(tool)
    assert target == f"{os.uname().machine}-unknown-linux-gnu.2.28"
    # $CARGO_ZIGBUILD names another one.
    other = tmp_path / "my-zigbuild"
    other.write_text("#!/bin/sh\n")
    other.chmod(0o755)
    environ = {"PATH": "", hook.ZIG_GLIBC: "2.31", "CARGO_ZIGBUILD": str(other)}
    assert hook.cargo_for_bundled_libraries(environ) == (str(other), f"{os.uname().machine}-unknown-linux-gnu.2.31")


@pytest.mark.skipif(not os.uname().sysname == "Linux", reason="builds against Linux's glibc")
def test_devmem_zig_glibc_without_cargo_zigbuild_says_what_to_install(hook, tmp_path):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    with pytest.raises(hook.ZigBuildError) as info:
        hook.cargo_for_bundled_libraries({"PATH": str(empty), hook.ZIG_GLIBC: "2.28"})
    message = str(info.value)
    assert "cargo-zigbuild is not on PATH" in message and "pip install cargo-zigbuild ziglang" in message
    assert f"unset {hook.ZIG_GLIBC}" in message


@pytest.mark.parametrize("bad", ["2.28.1", "228", "2.x", "3.0", " 2.28"])
def test_devmem_zig_glibc_refuses_what_is_not_a_glibc_version(hook, tmp_path, bad):
    bin_dir, _ = fake_cargo_zigbuild(tmp_path)
    with pytest.raises(hook.ZigBuildError, match="is not a glibc version like 2.28"):
        hook.cargo_for_bundled_libraries({"PATH": str(bin_dir), hook.ZIG_GLIBC: bad})


@pytest.mark.filterwarnings("ignore:`--build-temp` argument does nothing:DeprecationWarning")
def test_the_build_rust_command_uses_that_command_and_target_for_every_library(hook, tmp_path, monkeypatch):
    """setup.py's ``build_rust``: under DEVMEM_ZIG_GLIBC every extension, whatever pyproject.toml
    lists, is built with cargo-zigbuild for that glibc and is no longer optional; without it,
    setuptools-rust's own choices stand."""
    setuptools_rust = pytest.importorskip("setuptools_rust", reason="the build's setuptools-rust (pip installs it per build)")
    from setuptools.dist import Distribution

    bin_dir, tool = fake_cargo_zigbuild(tmp_path)
    monkeypatch.chdir(tmp_path)
    seen = []
    monkeypatch.setattr(setuptools_rust.build_rust, "run", lambda self: seen.append(
        (self.cargo, self.target, [ext.optional for ext in self.extensions])))
    extensions = [
        setuptools_rust.RustExtension(name, path=str(tmp_path / "Cargo.toml"), optional=True)
        for name in ("devmem.libdevmem", "devmem._emulator", "devmem.another")
    ]

    def run(environ):
        for name, value in environ.items():
            monkeypatch.setenv(name, value)
        dist = Distribution({"name": "devmem", "rust_extensions": extensions,
                             "cmdclass": {"build_rust": hook.build_rust_command()}})
        dist.run_command("build_rust")
        return seen.pop()

    monkeypatch.delenv(hook.ZIG_GLIBC, raising=False)
    cargo, _, optional = run({})
    assert cargo != str(tool) and optional == [True, True, True]
    cargo, target, optional = run({"PATH": str(bin_dir), hook.ZIG_GLIBC: "2.28"})
    assert (cargo, target) == (str(tool), f"{os.uname().machine}-unknown-linux-gnu.2.28")
    assert optional == [False, False, False]
    # A setuptools-rust that would pass the glibc-suffixed target to rustc: refused, saying why.
    monkeypatch.setattr(setuptools_rust, "__version__", "1.12.0")
    with pytest.raises(hook.ZigBuildError, match="needs setuptools-rust 1.13 or later, this build has 1.12.0"):
        run({})
    assert not seen
