"""Shared test settings."""
import importlib.util

import pytest


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Tiny tensors gain nothing from threads, and on 2 shared cores intra-op barriers
    stall them badly: every test runs torch on one thread (the runtime is unaffected)."""
    if importlib.util.find_spec("torch") is None:
        yield
        return
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``slow`` (the 10,000-case fuzz runs) run only when asked: ``pytest -m slow``."""
    if "slow" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="slow: run with pytest -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
