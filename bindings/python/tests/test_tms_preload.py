"""torch_memory_saver's preload mode on devmem, on the emulator: each test runs a child process
with devmem's preload library in ``LD_PRELOAD`` and a stand-in CUDA runtime
(``ctests/cudart_standin.c``, compiled here) loaded into the global scope, and calls
``cudaMalloc``/``cudaFree`` the way a program linked against the runtime does (resolved in the
global scope, so the preloaded definitions win). PyTorch is replaced by a stand-in whose pools
do nothing: what is tested is which allocations are devmem's, under which tag, and what pause
and resume do to them."""

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from conftest import BUNDLED, EMULATED, HIP, LEVEL_ZERO, ROOT
from devmem import _lib

pytestmark = pytest.mark.skipif(
    not EMULATED or LEVEL_ZERO or HIP, reason="preload mode intercepts the CUDA runtime: the emulator's CUDA face"
)

PRELOAD = _lib.preload_library_path()
#: The child imports the package under test: the source tree, or (DEVMEM_TEST_BUNDLED=1) the
#: installed one, whose interpreter runs the tests.
PACKAGE_ENV = {} if BUNDLED else {"PYTHONPATH": str(ROOT / "bindings" / "python")}

PRELUDE = '''
import ctypes, os, sys, contextlib, types
MIB = 1 << 20
standin = ctypes.CDLL(os.environ["STANDIN"], mode=ctypes.RTLD_GLOBAL)
g = ctypes.CDLL(None)  # the global scope: what a PLT call in libc10_cuda.so resolves to
cudaMalloc = g.cudaMalloc
cudaMalloc.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t]
cudaFree = g.cudaFree
cudaFree.argtypes = [ctypes.c_void_p]

def malloc(n):
    p = ctypes.c_void_p()
    rc = cudaMalloc(ctypes.byref(p), n)
    assert rc == 0, f"cudaMalloc returned {rc}"
    return p.value

class FakeCuda:
    """torch.cuda as devmem's module uses it in preload mode: pools are bookkeeping only
    (PyTorch's caching allocator would call cudaMalloc inside them)."""
    class MemPool:
        def __init__(self, allocator=None):
            self.id = (1, id(self))
    def __init__(self):
        self.entered = []
        self.memory = types.SimpleNamespace(CUDAPluggableAllocator=object)
    def is_available(self): return True
    def is_initialized(self): return True
    def current_device(self): return 0
    def synchronize(self): pass
    def empty_cache(self): pass
    def current_blas_handle(self): return 1
    @contextlib.contextmanager
    def use_mem_pool(self, pool):
        self.entered.append(pool)
        yield

torch = types.SimpleNamespace(cuda=FakeCuda(), version=types.SimpleNamespace(hip=None))
sys.modules["torch"] = torch
import devmem
import devmem.allocator, devmem.torch_memory_saver as tms_module
devmem.allocator._torch = lambda: torch
tms_module._torch = lambda: torch
tms = tms_module.torch_memory_saver

def is_devmem(p):
    try:
        devmem.allocation_info(p)
        return True
    except devmem.UnknownPointerError:
        return False

def expect_preload_refused(what):
    """Asking for preload mode must raise PreloadError (printed for the parent to check)."""
    try:
        tms.hook_mode = "preload"
    except tms_module._preload.PreloadError as err:
        print("refused:", err)
    else:
        sys.exit(what + " was accepted")
'''


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.fail("a C compiler (cc) is needed to build the stand-in CUDA runtime")
    out = tmp_path_factory.mktemp("standin") / "libcudart.so.13"
    subprocess.run(
        [cc, "-shared", "-fPIC", "-O1", "-o", str(out), str(ROOT / "ctests" / "cudart_standin.c"), "-lpthread"],
        check=True,
    )
    return str(out)


def run(standin, body, preload=True, **env):
    """Runs PRELUDE + body in a child; returns the completed process (stdout, stderr)."""
    assert PRELOAD is not None, "cargo build --release --workspace builds the preload library"
    child = dict(os.environ, STANDIN=standin, **PACKAGE_ENV, **env)
    if preload:
        child["LD_PRELOAD"] = PRELOAD
    if "TMS_INIT_ENABLE" not in env:
        child.pop("TMS_INIT_ENABLE", None)
    script = PRELUDE + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", script], env=child, capture_output=True, text=True, timeout=120)


def ok(proc):
    assert proc.returncode == 0, f"child failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


def test_regions_are_devmem_and_pause_by_tag_while_the_rest_is_the_runtimes(standin):
    ok(run(standin, '''
        assert tms.hook_mode == "preload", "the default with devmem's preload library loaded"
        outside = malloc(MIB)
        assert not is_devmem(outside) and standin.standin_live() == 1
        ctypes.memset(outside, 0x5A, MIB)
        with tms.region(tag="weights", enable_cpu_backup=True):
            w = malloc(4 * MIB)
        with tms.region(tag="kv"):
            kv = malloc(2 * MIB)
        assert standin.standin_live() == 1, "region allocations reached the runtime"
        assert devmem.allocation_info(w).tag == "weights:cpu_backup"
        assert devmem.allocation_info(kv).tag == "kv"
        assert not is_devmem(malloc(MIB)), "the switch stayed on after the region"
        ctypes.memset(w, 0x11, 4 * MIB)
        tms.pause("kv")
        assert devmem.allocation_info(kv).state == devmem.State.DISCARDED
        assert devmem.allocation_info(w).state == devmem.State.MAPPED
        tms.pause()
        assert devmem.allocation_info(w).state == devmem.State.OFFLOADED
        assert ctypes.string_at(outside, MIB) == b"\\x5a" * MIB, "the runtime's memory was touched"
        tms.resume()
        assert ctypes.string_at(w, 4 * MIB) == b"\\x11" * (4 * MIB)
        assert len({id(p) for p in torch.cuda.entered}) == 2, "one pool per devmem tag"
        assert cudaFree(w) == 0 and cudaFree(kv) == 0 and cudaFree(outside) == 0
        print("done")
    '''))


def test_tms_init_enable_makes_every_allocation_pausable_and_slimes_switch_works(standin):
    ok(run(standin, '''
        tms._ensure_initialized()  # torch_memory_saver's examples call it
        cdll = tms._impl._binary_wrapper.cdll  # slime's DeepEP patch goes through this
        assert cdll.tms_get_interesting_region() is True
        assert cdll.tms_get_enable_cpu_backup() is True and cdll.tms_get_current_tag() == b"default"
        with tms.region(tag="grad", enable_cpu_backup=False):
            assert cdll.tms_get_current_tag() == b"grad" and not cdll.tms_get_enable_cpu_backup()
        assert cdll.tms_get_current_tag() == b"default" and cdll.tms_get_enable_cpu_backup()
        p = malloc(2 * MIB)
        assert devmem.allocation_info(p).tag == "default:cpu_backup"
        ctypes.memset(p, 0x33, 2 * MIB)
        cdll.tms_set_interesting_region(False)   # DeepEP's buffers: not pausable
        q = malloc(MIB)
        cdll.tms_set_interesting_region(True)
        assert not is_devmem(q)
        with tms.disable():
            assert not is_devmem(malloc(MIB))
        assert cdll.tms_get_interesting_region() is True
        tms.pause()
        assert devmem.allocation_info(p).state == devmem.State.OFFLOADED
        tms.resume()
        assert ctypes.string_at(p, 2 * MIB) == b"\\x33" * (2 * MIB)
        assert cudaFree(p) == 0 and cudaFree(q) == 0
        print("done")
    ''', TMS_INIT_ENABLE="1", TMS_INIT_ENABLE_CPU_BACKUP="1"))


def test_frees_foreign_double_and_null(standin):
    proc = ok(run(standin, '''
        foreign = malloc(MIB)
        with tms.region(tag="t"):
            mine = malloc(MIB)
        assert cudaFree(mine) == 0
        assert not is_devmem(mine)
        assert cudaFree(mine) == 1, "a double free is the runtime's cudaErrorInvalidValue"
        assert cudaFree(foreign) == 0 and standin.standin_live() == 0
        assert cudaFree(foreign) == 1
        assert cudaFree(None) == 0
        print("done")
    '''))
    assert proc.stdout.strip().endswith("done")


def test_the_switch_is_per_thread(standin):
    ok(run(standin, '''
        import threading
        seen = {}
        with tms.region(tag="mine"):
            t = threading.Thread(target=lambda: seen.setdefault("other", malloc(MIB)))
            t.start(); t.join()
            here = malloc(MIB)
        assert is_devmem(here) and not is_devmem(seen["other"])
        assert cudaFree(here) == 0 and cudaFree(seen["other"]) == 0
        print("done")
    '''))


def test_without_libdevmem_everything_is_forwarded_and_said_once(standin):
    proc = ok(run(standin, '''
        p, q = malloc(MIB), malloc(MIB)
        assert standin.standin_live() == 2
        assert cudaFree(p) == 0 and cudaFree(q) == 0
        print("done")
    '''.replace("import devmem\n", ""), TMS_INIT_ENABLE="1", DEVMEM_LIBRARY="/nonexistent/libdevmem.so"))
    lines = [line for line in proc.stderr.splitlines() if "devmem preload" in line]
    assert len(lines) == 1 and "inactive" in lines[0] and "/nonexistent/libdevmem.so" in lines[0], proc.stderr


def test_a_second_copy_of_libdevmem_is_refused(standin, tmp_path):
    copy = tmp_path / "libdevmem.so"
    shutil.copy(_lib.library_path(), copy)
    script = f'''
import ctypes, os, sys
ctypes.CDLL(os.environ["STANDIN"], mode=ctypes.RTLD_GLOBAL)
g = ctypes.CDLL(None)
assert g.devmem_preload_activate() == 0   # loads the copy named by DEVMEM_LIBRARY
os.environ["DEVMEM_LIBRARY"] = {_lib.library_path()!r}
import devmem.torch_memory_saver as tms_module
try:
    tms_module.torch_memory_saver.hook_mode = "preload"
except tms_module._preload.PreloadError as err:
    print("refused:", err)
else:
    sys.exit("two copies of libdevmem were accepted")
'''
    child = dict(os.environ, STANDIN=standin, LD_PRELOAD=PRELOAD, DEVMEM_LIBRARY=str(copy), **PACKAGE_ENV)
    proc = subprocess.run([sys.executable, "-c", script], env=child, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "another copy of libdevmem" in proc.stdout


def test_preload_mode_without_the_library_names_the_fix():
    import devmem.torch_memory_saver as tms_module

    saver = tms_module.TorchMemorySaver()
    assert saver.hook_mode == "torch", "no preload library in this process: torch mode"
    with pytest.raises(RuntimeError, match="LD_PRELOAD.*configure_subprocess|configure_subprocess"):
        saver.hook_mode = "preload"
    with pytest.raises(ValueError, match="'torch' or 'preload'"):
        saver.hook_mode = "prelaod"
    assert saver._impl is None


def test_configure_subprocess_prepends_the_preload_library_and_restores(monkeypatch):
    import devmem.torch_memory_saver as tms_module

    monkeypatch.setenv("LD_PRELOAD", "/other/lib.so")
    monkeypatch.delenv("PYTHONPATH", raising=False)
    with tms_module.configure_subprocess():
        assert os.environ["LD_PRELOAD"].split(":") == [PRELOAD, "/other/lib.so"]
        assert os.environ["PYTHONPATH"] == tms_module.SHIM_DIR
    assert os.environ["LD_PRELOAD"] == "/other/lib.so" and "PYTHONPATH" not in os.environ
    monkeypatch.delenv("LD_PRELOAD")
    with tms_module.configure_subprocess():
        assert os.environ["LD_PRELOAD"] == PRELOAD
    assert "LD_PRELOAD" not in os.environ


def test_slime_finds_the_library_where_it_looks():
    """slime looks next to ``torch_memory_saver.__file__``'s parent folder."""
    import devmem.torch_memory_saver as tms_module

    out = subprocess.run(
        [sys.executable, "-m", "devmem.torch_memory_saver", "--preload-path"],
        env=dict(os.environ, **PACKAGE_ENV), capture_output=True, text=True, check=True,
    )
    assert out.stdout.strip() == PRELOAD
    if BUNDLED:  # the installed package: where slime and torch_memory_saver's users look
        slime_path = os.path.join(
            os.path.dirname(os.path.dirname(tms_module.__file__)), "torch_memory_saver_hook_mode_preload.abi3.so"
        )
        assert PRELOAD == slime_path and os.path.exists(slime_path)


def test_without_a_driver_everything_is_forwarded_and_said_once(standin):
    proc = ok(run(standin, '''
        p, q = malloc(MIB), malloc(MIB)
        assert standin.standin_live() == 2, "allocations failed instead of reaching the runtime"
        assert cudaFree(p) == 0 and cudaFree(q) == 0
        print("done")
    ''', TMS_INIT_ENABLE="1", DEVMEM_CUDA_LIBRARY="/nonexistent/libcuda.so.1"))
    lines = [line for line in proc.stderr.splitlines() if "devmem preload" in line]
    assert len(lines) == 1 and "no GPU driver" in lines[0], proc.stderr


def test_pause_leaves_other_devmem_tags_alone_and_runtime_frees_are_not_devmems(standin):
    ok(run(standin, '''
        with devmem.use_tag("native"):
            native = devmem.malloc(2 * MIB)
        ctypes.memset(native, 0x42, 2 * MIB)
        with tms.region(tag="kv"):
            kv = malloc(MIB)
        unknown = devmem.stats().unknown_frees
        for _ in range(5):
            assert cudaFree(malloc(MIB)) == 0
        assert devmem.stats().unknown_frees == unknown, "runtime frees were counted as devmem's unknown frees"
        tms.pause()
        tms.resume()
        assert devmem.allocation_info(native).state == devmem.State.MAPPED
        assert ctypes.string_at(native, 2 * MIB) == b"\\x42" * (2 * MIB), "pause() discarded a tag not its own"
        assert devmem.allocation_info(kv).state == devmem.State.MAPPED
        devmem.free(native)
        assert cudaFree(kv) == 0
        print("done")
    ''', TMS_INIT_ENABLE="true"))


def test_tms_init_enable_is_read_as_torch_memory_saver_reads_it(standin):
    ok(run(standin, '''
        p = malloc(MIB)
        assert is_devmem(p), "TMS_INIT_ENABLE=yes did not enable"
        assert cudaFree(p) == 0
        print("done")
    ''', TMS_INIT_ENABLE="yes"))


def test_a_tag_too_long_for_preload_mode_is_refused(standin):
    ok(run(standin, '''
        try:
            with tms.region(tag="w" * 250):
                malloc(MIB)
        except ValueError as err:
            assert "too long" in str(err)
        else:
            sys.exit("a 250-byte tag was accepted (it would have landed in another tag)")
        assert tms._impl._binary_wrapper.cdll.tms_get_current_tag() == b"default"
        print("done")
    '''))


def test_a_preload_library_not_in_ld_preload_is_refused(standin):
    proc = ok(run(standin, f'''
        ctypes.CDLL({PRELOAD!r})  # mapped, but the runtime's cudaMalloc comes first
        assert tms.hook_mode == "torch", "an unusable preload library must not make preload the default"
        expect_preload_refused("a preload library that receives no cudaMalloc")
    ''', preload=False))
    assert "does not receive this process's cudaMalloc" in proc.stdout


def test_expandable_segments_with_tms_init_enable_are_refused(standin):
    proc = ok(run(standin, '''
        expect_preload_refused("expandable segments with TMS_INIT_ENABLE")
    ''', TMS_INIT_ENABLE="1", PYTORCH_CUDA_ALLOC_CONF="expandable_segments:True"))
    assert "expandable segments" in proc.stdout
