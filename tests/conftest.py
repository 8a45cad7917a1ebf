"""Session-wide real services: one Prefect test server and one local Ray for the whole suite."""

import os

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("RAY_ACCEPT_AUTH_TOKEN_WARNING", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")


@pytest.fixture(scope="session")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def ray_local():
    import ray

    from tasks.ray_runtime import ensure_ray

    ensure_ray(num_cpus=2)
    yield
    ray.shutdown()
