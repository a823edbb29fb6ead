"""What a new user tripped on (issue 20, deliverable 6): a typo in a tag, C's offload/discard
pair passed to ``sleep``, ``use_tag`` without ``with``, and the message without a driver."""

import gc
import inspect
import threading
import warnings

import pytest

import devmem
import devmem.torch_memory_saver
from conftest import EMULATED
from test_environment import run_clean

pytestmark = pytest.mark.skipif(not EMULATED, reason="runs on the emulator")
MIB = 1 << 20


def state(ptr):
    return devmem.allocation_info(ptr).state


@pytest.fixture
def weights_and_kv():
    with devmem.use_tag("weights"):
        w = devmem.malloc(2 * MIB)
    with devmem.use_tag("kv_cache"):
        kv = devmem.malloc(2 * MIB)
    yield w, kv
    devmem.wake_up()
    devmem.free(w)
    devmem.free(kv)


@pytest.fixture
def no_unknown_tag_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error", devmem.UnknownTagWarning)
        yield


# -- a typo in a tag -------------------------------------------------------------------------


def test_a_typo_in_an_offload_tag_warns_naming_the_tags_that_exist(weights_and_kv):
    w, kv = weights_and_kv
    assert issubclass(devmem.UnknownTagWarning, UserWarning)
    with pytest.warns(devmem.UnknownTagWarning, match=r"'wieghts'.*\['kv_cache', 'weights'\]") as caught:
        devmem.sleep(("wieghts",))
    assert caught[0].filename == __file__, "the warning points at the caller's line"
    # vLLM's meaning stays: the tags not named are discarded.
    assert state(w) == devmem.State.DISCARDED and state(kv) == devmem.State.DISCARDED
    with pytest.warns(devmem.UnknownTagWarning, match="wieghts"):
        assert devmem.wake_up(["wieghts"]).allocations == 0  # wakes nothing
    devmem.wake_up()
    for call in (
        lambda: devmem.offload(["wieghts"]),
        lambda: devmem.discard("wieghts"),
        lambda: devmem.sleep_tags(offload=["weights"], discard=["kv_cahce"]),
        lambda: devmem.wake_up_except(["wieghts"]),
    ):
        with pytest.warns(devmem.UnknownTagWarning, match=r"wieghts|kv_cahce"):
            call()
        devmem.wake_up()


def test_allocator_sleep_and_wake_warn_on_a_typo(weights_and_kv):
    w, _kv = weights_and_kv
    alloc = devmem.CuMemAllocator()
    with pytest.warns(devmem.UnknownTagWarning, match="CuMemAllocator.sleep.*wieghts") as caught:
        alloc.sleep(offload_tags=("wieghts",))
    assert caught[0].filename == __file__
    assert state(w) == devmem.State.DISCARDED
    alloc.wake_up()
    alloc.sleep(offload_tags=("weights",))
    with pytest.warns(devmem.UnknownTagWarning, match="CuMemAllocator.wake_up.*wieghts"):
        alloc.wake_up(["wieghts"])


def test_tags_that_exist_do_not_warn(weights_and_kv, no_unknown_tag_warning):
    w, kv = weights_and_kv
    devmem.sleep(("weights",))
    devmem.wake_up(["weights", "kv_cache"])  # asleep allocations are live: no warning
    devmem.sleep_tags(offload=["weights"], discard=["kv_cache"])
    devmem.wake_up_except(["kv_cache"])
    devmem.offload("weights")
    devmem.discard(["kv_cache"])
    devmem.wake_up()
    alloc = devmem.CuMemAllocator()
    alloc.sleep()  # the default tag is not named by the caller: no check
    alloc.wake_up(["weights"])
    alloc.sleep(("weights",), strict=True)
    alloc.wake_up(["weights"], strict=True)
    assert state(w) == devmem.State.MAPPED and state(kv) == devmem.State.DISCARDED


def test_strict_refuses_an_unknown_tag_before_anything_happens(weights_and_kv, no_unknown_tag_warning):
    w, kv = weights_and_kv
    alloc = devmem.CuMemAllocator()
    for call in (
        lambda: devmem.sleep(("wieghts",), strict=True),
        lambda: devmem.offload(["wieghts"], strict=True),
        lambda: devmem.discard("wieghts", strict=True),
        lambda: devmem.sleep_tags(["weights"], ["wieghts"], strict=True),
        lambda: alloc.sleep(("wieghts",), strict=True),
        lambda: alloc.discard(("wieghts",), strict=True),
    ):
        with pytest.raises(devmem.InvalidArgumentError, match=r"'wieghts'.*\['kv_cache', 'weights'\].*nothing was done"):
            call()
        assert state(w) == devmem.State.MAPPED and state(kv) == devmem.State.MAPPED
    devmem.sleep(("weights",))
    for call in (
        lambda: devmem.wake_up(["wieghts"], strict=True),
        lambda: devmem.wake_up_except(["wieghts"], strict=True),
        lambda: alloc.wake_up(["wieghts"], strict=True),
    ):
        with pytest.raises(devmem.InvalidArgumentError, match="wieghts"):
            call()
        assert state(w) == devmem.State.OFFLOADED and state(kv) == devmem.State.DISCARDED
    for fn in (devmem.sleep, devmem.offload, devmem.sleep_tags, devmem.discard, devmem.wake_up,
               devmem.wake_up_except, devmem.CuMemAllocator.sleep, devmem.CuMemAllocator.wake_up,
               devmem.CuMemAllocator.discard):
        assert inspect.signature(fn).parameters["strict"].kind == inspect.Parameter.KEYWORD_ONLY, fn


# -- C's offload/discard pair passed to sleep ------------------------------------------------


def test_two_tag_lists_to_sleep_name_the_right_call(weights_and_kv):
    w, kv = weights_and_kv
    with pytest.raises(TypeError, match=r"devmem\.sleep_tags\(offload=\.\.\., discard=\.\.\.\)"):
        devmem.sleep(("weights",), ("kv_cache",))
    assert state(w) == devmem.State.MAPPED and state(kv) == devmem.State.MAPPED, "nothing happened"
    with pytest.raises(TypeError):
        devmem.sleep_tags(("weights",), ("kv_cache",), threading.Event())
    devmem.sleep_tags(offload=("weights",), discard=("kv_cache",))
    assert state(w) == devmem.State.OFFLOADED and state(kv) == devmem.State.DISCARDED


def test_private_parameters_are_keyword_only_in_every_public_function():
    checked = 0
    for module in (devmem, devmem.CuMemAllocator, devmem.torch_memory_saver.TorchMemorySaver):
        for name in dir(module):
            fn = getattr(module, name)
            if name.startswith("_") or not callable(fn) or isinstance(fn, type):
                continue
            try:
                params = inspect.signature(fn).parameters.values()
            except (TypeError, ValueError):
                continue
            checked += 1
            for p in params:
                if p.name.startswith("_"):
                    assert p.kind == inspect.Parameter.KEYWORD_ONLY, f"{name}({p.name}) can be passed by position"
    assert checked > 40


# -- use_tag without with, and threads -------------------------------------------------------


def test_use_tag_never_entered_warns():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        devmem.use_tag("weights")  # the mistake: no with
        gc.collect()
    found = [w for w in caught if issubclass(w.category, UserWarning) and "never entered" in str(w.message)]
    assert found, [str(w.message) for w in caught]
    message = str(found[0].message)
    assert "use_tag('weights')" in message and "with devmem.use_tag('weights'):" in message
    assert __file__ in message, "names where it was created"
    assert devmem.current_tag() == "default"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with devmem.use_tag("weights"):
            assert devmem.current_tag() == "weights"
        scope = devmem.use_tag("kv_cache")
        with scope:
            with scope:  # re-entering restores each level
                pass
            assert devmem.current_tag() == "kv_cache"
        del scope
        gc.collect()
    assert not [w for w in caught if "never entered" in str(w.message)]
    assert devmem.current_tag() == "default"
    with pytest.raises(TypeError):
        devmem.use_tag(b"weights")


def test_use_tag_documents_the_thread_rule():
    for fn in (devmem.use_tag, devmem.set_current_tag):
        doc = " ".join(fn.__doc__.split())
        assert "per thread" in doc and "thread that allocates" in doc, fn
    seen = []
    with devmem.use_tag("weights"):
        t = threading.Thread(target=lambda: seen.append(devmem.current_tag()))
        t.start()
        t.join()
    assert seen == ["default"], "the C library's tag is thread-local, as documented"


# -- no driver -------------------------------------------------------------------------------


def test_driver_not_found_says_first_what_to_do_without_a_gpu(monkeypatch):
    monkeypatch.delenv("DEVMEM_EMULATOR", raising=False)  # the installed package's tests set it
    detail = "; ".join(f"could not open library {i} (set X to override): dlopen failed: no such file" for i in range(5))
    err = devmem.DriverNotFoundError(devmem.Status.DRIVER_NOT_FOUND, detail)
    lines = str(err).splitlines()
    assert lines[0].startswith("DRIVER_NOT_FOUND: ")
    assert "DEVMEM_EMULATOR=1" in lines[0] and "devmem.use_emulator()" in lines[0], lines[0]
    assert lines[-5:] == [f"  could not open library {i} (set X to override): dlopen failed: no such file"
                          for i in range(5)], lines
    assert all(len(line) < 200 for line in lines), lines
    assert err.message == detail and err.status == devmem.Status.DRIVER_NOT_FOUND
    assert isinstance(err, OSError) and isinstance(err, devmem.DevmemError)


def test_driver_not_found_in_a_process_without_a_driver():
    out = run_clean(
        "import devmem\n"
        "try:\n"
        "    devmem.malloc(1 << 20)\n"
        "except devmem.DriverNotFoundError as e:\n"
        "    print(e)\n",
        DEVMEM_EMULATOR="0",
        DEVMEM_ZE_LIBRARY="/nonexistent/libze_loader.so.1",
        DEVMEM_HIP_LIBRARY="/nonexistent/libamdhip64.so",
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("DRIVER_NOT_FOUND: "), out.stdout
    assert "DEVMEM_EMULATOR=1" in lines[0] and "devmem.use_emulator()" in lines[0], lines[0]
    assert any("/nonexistent/libcuda.so.1" in line for line in lines[1:]), out.stdout
    assert max(len(line) for line in lines) < 300, out.stdout
