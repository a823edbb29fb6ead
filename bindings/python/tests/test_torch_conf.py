"""The expandable_segments switch rewrites the whole configuration string and restores it."""

import pytest

from devmem import _torch_conf


@pytest.fixture
def settings(monkeypatch):
    calls = []
    monkeypatch.setattr(_torch_conf, "_applied", None)
    for name in _torch_conf.ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    return calls


def test_other_options_survive(settings, monkeypatch):
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:256, expandable_segments:True,garbage_collection_threshold:0.6")
    with _torch_conf.expandable_segments_disabled(settings.append):
        assert settings == ["max_split_size_mb:256,expandable_segments:False,garbage_collection_threshold:0.6"]
        assert not _torch_conf.expandable_enabled(_torch_conf.current_settings())
    assert settings[-1] == "max_split_size_mb:256, expandable_segments:True,garbage_collection_threshold:0.6"
    assert _torch_conf.expandable_enabled(_torch_conf.current_settings())


def test_restored_when_the_body_raises(settings, monkeypatch):
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    with pytest.raises(KeyError):
        with _torch_conf.expandable_segments_disabled(settings.append):
            raise KeyError("boom")
    assert settings == ["expandable_segments:False", "expandable_segments:True"]


def test_nested_pools_switch_once(settings, monkeypatch):
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "Expandable_Segments: true")
    with _torch_conf.expandable_segments_disabled(settings.append):
        with _torch_conf.expandable_segments_disabled(settings.append):
            pass
    assert settings == ["Expandable_Segments:False", "Expandable_Segments: true"]


@pytest.mark.parametrize("conf", ["", "max_split_size_mb:128", "expandable_segments:False"])
def test_nothing_changes_when_off(settings, monkeypatch, conf):
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", conf)
    with _torch_conf.expandable_segments_disabled(settings.append):
        pass
    assert settings == []


def test_two_threads_in_pools_restore_only_after_the_last_leaves(settings, monkeypatch):
    """Thread A enters, thread B enters, A leaves while B is still allocating: the setting
    must stay off until B leaves too (it used to be restored when A left)."""
    import threading

    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    a_inside, b_inside, a_left, b_may_leave = (threading.Event() for _ in range(4))
    seen_by_b = []

    def thread_a():
        with _torch_conf.expandable_segments_disabled(settings.append):
            a_inside.set()
            b_inside.wait(5)
        a_left.set()

    def thread_b():
        a_inside.wait(5)
        with _torch_conf.expandable_segments_disabled(settings.append):
            b_inside.set()
            a_left.wait(5)
            seen_by_b.append(_torch_conf.current_settings())
            b_may_leave.wait(5)

    threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    for t in threads:
        t.start()
    a_left.wait(5)
    assert settings == ["expandable_segments:False"], "A's exit must not restore under B"
    b_may_leave.set()
    for t in threads:
        t.join(5)
    assert seen_by_b == ["expandable_segments:False"]
    assert settings == ["expandable_segments:False", "expandable_segments:True"]
