"""Failures of the environment, each in a fresh interpreter: a missing libdevmem.so, a missing
driver."""

import os
import subprocess
import sys

PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(code, **env):
    from conftest import BUNDLED

    # The installed package (bundled library) or the source tree.
    full = dict(os.environ, **env) if BUNDLED else dict(os.environ, PYTHONPATH=PACKAGE, **env)
    return subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=60)


def test_import_needs_no_library_and_a_missing_library_is_a_clear_error():
    out = run(
        "import devmem\n"
        "try:\n"
        "    devmem.version()\n"
        "except devmem.LibraryNotFoundError as e:\n"
        "    assert isinstance(e, OSError)\n"
        "    print('RAISED', e)\n",
        DEVMEM_LIBRARY="/nonexistent/libdevmem.so",
    )
    assert out.returncode == 0, out.stderr
    assert "RAISED" in out.stdout and "/nonexistent/libdevmem.so" in out.stdout and "DEVMEM_LIBRARY" in out.stdout


def test_missing_driver_is_driver_not_found():
    out = run(
        "import devmem\n"
        "try:\n"
        "    devmem.malloc(1 << 20)\n"
        "except devmem.DriverNotFoundError as e:\n"
        "    print('RAISED', e)\n",
        DEVMEM_CUDA_LIBRARY="/nonexistent/libcuda.so.1",
        DEVMEM_ZE_LIBRARY="/nonexistent/libcuda.so.1",
        DEVMEM_HIP_LIBRARY="/nonexistent/libcuda.so.1",
        DEVMEM_EMULATOR="0",  # the installed-package pass selects the bundled emulator otherwise
    )
    assert out.returncode == 0, out.stderr
    assert "RAISED DRIVER_NOT_FOUND" in out.stdout and "/nonexistent/libcuda.so.1" in out.stdout


def test_process_using_devmem_exits_cleanly():
    out = run(
        "import devmem\n"
        "a = devmem.CuMemAllocator.get_instance()\n"
        "devmem.set_current_tag('weights')\n"
        "p = devmem.malloc(1 << 21)\n"
        "a.sleep()\n"
        "a.wake_up()\n"
        "print('done')\n"
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "done"
    assert "pure virtual" not in out.stderr


def test_the_bundled_library_is_used_when_installed():
    from conftest import BUNDLED

    import devmem

    if not BUNDLED:
        assert devmem.library_path() == os.path.abspath(os.environ["DEVMEM_LIBRARY"])
        return
    assert "DEVMEM_LIBRARY" not in os.environ
    assert "site-packages" in devmem.library_path() and os.path.basename(devmem.library_path()).startswith("libdevmem")


def _no_driver_env():
    """The environment of a machine without a GPU driver and without devmem's test settings."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("DEVMEM_") or k in ("DEVMEM_LIBRARY", "DEVMEM_EMU_STRICT", "DEVMEM_TEST_BUNDLED")}
    env["DEVMEM_CUDA_LIBRARY"] = "/nonexistent/libcuda.so.1"  # as on a laptop: no driver
    return env


def run_clean(code, **extra):
    from conftest import BUNDLED

    env = _no_driver_env()
    env.update(extra)
    if not BUNDLED:
        env["PYTHONPATH"] = PACKAGE
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_devmem_emulator_selects_the_bundled_emulator_on_every_face():
    code = (
        "import devmem\n"
        "with devmem.use_tag('weights'):\n"
        "    p = devmem.malloc(64 << 20)\n"
        "print(devmem.sleep(('weights',)).bytes_saved, devmem.backend().name)\n"
        "devmem.wake_up(); devmem.free(p)\n"
    )
    for value, backend in (("1", "CUDA"), ("cuda", "CUDA"), ("hip", "HIP"), ("level_zero", "LEVEL_ZERO")):
        out = run_clean(code, DEVMEM_EMULATOR=value)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == [str(64 << 20), backend], out.stdout
    out = run_clean("import devmem\ndevmem.version()\n", DEVMEM_EMULATOR="yes please")
    assert out.returncode != 0
    assert "DEVMEM_EMULATOR='yes please' is not valid: expected 1 or cuda" in out.stderr


def test_use_emulator_must_come_first():
    out = run_clean(
        "import devmem\n"
        "path = devmem.use_emulator(capacity='256M')\n"
        "assert devmem.mem_get_info()[1] == 256 << 20, devmem.mem_get_info()\n"
        "try:\n"
        "    devmem.use_emulator('level_zero')\n"
        "except devmem.InvalidStateError as e:\n"
        "    print('RAISED', e)\n"
        "try:\n"
        "    devmem.use_emulator('opencl')\n"
        "except devmem.InvalidArgumentError as e:\n"
        "    print('RAISED', e)\n"
    )
    assert out.returncode == 0, out.stderr
    assert "must come before devmem's first use" in out.stdout
    assert "face must be one of" in out.stdout


def _readme_python_example():
    root = os.path.dirname(os.path.dirname(PACKAGE))
    text = open(os.path.join(root, "README.md")).read()
    section = text.split("\n### Python\n", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_readme_python_example_runs_as_written_without_a_gpu():
    code = _readme_python_example()
    assert "use_emulator" in code
    out = run_clean(code)
    assert out.returncode == 0, out.stderr + out.stdout
    assert "TransferResult" in out.stdout or "bytes" in out.stdout, out.stdout


def test_a_source_checkout_without_a_build_says_so():
    from conftest import BUNDLED

    if BUNDLED:
        return  # the installed package is not a source tree
    out = subprocess.run(
        [sys.executable, "-c", "import devmem._lib as l\nl._source_tree = lambda: '/src'\n"
         "l._candidates = lambda: ['/src/target/release/libdevmem.so']\n"
         "try:\n    l.load()\nexcept l.LibraryNotFoundError as e:\n    print(e)\n"],
        env=dict(_no_driver_env(), PYTHONPATH=PACKAGE), capture_output=True, text=True, timeout=60)
    assert "imported from the source tree" in out.stdout and "shadows any installed package" in out.stdout, out.stdout
