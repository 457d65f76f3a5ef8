"""Integration fixtures shared by several files."""

from __future__ import annotations

import pytest

from tests.integration.helpers import client_for, wait_until_serving


@pytest.fixture(scope="session")
def served(prefork_worker):
    """The session's prefork worker once it serves, with a producer client for it."""
    client = client_for(prefork_worker)
    wait_until_serving(prefork_worker, client)
    yield prefork_worker, client
    client.close()
