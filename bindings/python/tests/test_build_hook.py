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
