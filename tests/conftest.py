import pytest


@pytest.fixture(scope="session")
def parallel_state():
    """One-process gloo group + megatron parallel state (TP=PP=EP=1), shared by the in-process tests."""
    from bridge.parallel import ensure_parallel_state

    ensure_parallel_state()
    from megatron.core import parallel_state as ps

    return ps
