import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fake_runtime import FakeRuntime

import codewords_lite as cw


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    """No test sees the caller's CODEWORDS_* settings or RUNTIME_URI, proxies or CA bundle."""
    for name in list(os.environ):
        if (
            name.startswith("CODEWORDS_")
            or name == "RUNTIME_URI"
            or name.lower().endswith("_proxy")
            or name.endswith("CA_BUNDLE")
        ):
            monkeypatch.delenv(name)


FIGURES = pytest.StashKey[list]()


@pytest.fixture
def figures(request):
    """A list for the figures a test measures (counts, timings), printed once the tests have run.

    They go in the terminal summary, after the progress line: printed from the test itself (with
    capsys disabled), they broke into the middle of -q's dots. Shown with or without -q or -s,
    since docs/guarantees.md quotes them.
    """
    lines = []
    yield lines
    request.config.stash.setdefault(FIGURES, []).extend(lines)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    lines = config.stash.get(FIGURES, [])
    if lines:
        terminalreporter.write_sep("-", "figures")
        for line in lines:
            terminalreporter.write_line(f"  {line}")


@pytest.fixture
def quick_retries(monkeypatch):
    """Retries back off in milliseconds, so tests of them stay fast."""
    monkeypatch.setattr(cw, "RETRY_BACKOFF", (0.01, 0.05))


@pytest.fixture
def runtime():
    with FakeRuntime() as runtime:
        yield runtime


@pytest.fixture
def client(runtime):
    with cw.Client(runtime.api_key, base_url=runtime.url) as client:
        yield client
