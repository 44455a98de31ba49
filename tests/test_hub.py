"""hub_reachable: offline settings and an unreachable endpoint both answer False, quickly."""

import socket
import time

import pytest

from hf_kvcache.hub import hub_reachable


@pytest.mark.parametrize("variable", ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"])
def test_offline_settings(monkeypatch, variable):
    monkeypatch.setenv(variable, "1")
    assert hub_reachable() is False


def test_endpoint_that_refuses_connections(monkeypatch):
    with socket.socket() as listener:  # a free loopback port with nobody listening once closed
        listener.bind(("127.0.0.1", 0))
        port = listener.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    started = time.perf_counter()
    assert hub_reachable(timeout=1.0) is False
    assert time.perf_counter() - started < 1.5


def test_endpoint_that_accepts_connections(monkeypatch):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{listener.getsockname()[1]}")
        assert hub_reachable(timeout=1.0) is True
