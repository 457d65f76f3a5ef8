"""Integration fixtures shared by several files."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import factories
from tests.integration.helpers import client_for, wait_until_serving


@pytest.fixture(scope="session")
def served(prefork_worker):
    """The session's prefork worker once it serves, with a producer client for it."""
    client = client_for(prefork_worker)
    wait_until_serving(prefork_worker, client)
    yield prefork_worker, client
    client.close()


@pytest.fixture
def adapters(models, tmp_path) -> dict[str, Path]:
    """v1 (the session's adapter), v2 (one module retrained) and ``current``, a symlink to v1."""
    return factories.adapter_versions(models.exaone_adapter, tmp_path)
