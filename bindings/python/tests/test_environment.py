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
