"""A test that cannot run here is skipped locally and fails under CI=true, with its reason."""

from __future__ import annotations

import pytest
from needs import require, unavailable


def test_missing_need_skips_locally(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no namespaces here"):
        unavailable("no namespaces here")


@pytest.mark.parametrize("value", ["true", "1", "TRUE"])
def test_missing_need_fails_under_ci(monkeypatch, value):
    monkeypatch.setenv("CI", value)
    with pytest.raises(pytest.fail.Exception, match="cannot run under CI: no tmpfs"):
        unavailable("no tmpfs")


def test_require_names_the_first_missing_need(monkeypatch):
    monkeypatch.setenv("CI", "true")
    require(None, None)  # nothing missing: returns
    with pytest.raises(pytest.fail.Exception, match="zookeeper missing"):
        require(None, "zookeeper missing", "netns missing")
