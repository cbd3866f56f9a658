"""Shared pytest fixtures.

``storage_cluster``: six real storage-node processes (sn1..sn6 in az-a, az-a, az-b, az-b,
az-c, az-c; tests/harness.py), started once per test module and shared by its tests. Every
node is running (resumed / restarted if a previous test stopped it) when a test starts.
Tests isolate their data by using their own volume names. Everything is SIGKILLed when the
module ends, also after a failure.

``--run-slow``: also run the tests marked ``slow`` (skipped otherwise).
"""

from __future__ import annotations

import pytest

from tests.harness import StorageCluster


@pytest.fixture(scope="module")
def storage_cluster_module(tmp_path_factory):
    cluster = StorageCluster(tmp_path_factory.mktemp("storage-cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def storage_cluster(storage_cluster_module):
    storage_cluster_module.ensure_all_running()
    return storage_cluster_module


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False,
                     help="also run tests marked slow (long-running soak tests)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "allow_errors(*patterns): ERROR log lines of storage nodes matching these "
        "regexes do not fail the test (tests/test_storage_node.py)")
