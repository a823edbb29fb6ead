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
