"""docker-compose.yml gives the workers what a reload needs (no Docker engine here: the file itself)."""

from __future__ import annotations

from pathlib import Path

import yaml

from worker.settings import MODEL_FIELDS

ROOT = Path(__file__).resolve().parents[2]


def workers() -> dict[str, dict]:
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    return {name: service for name, service in services.items() if name.startswith("worker")}


def test_a_reload_in_compose_reads_the_mounted_settings_file_and_the_artifacts():
    """The model variables come from .env mounted where the worker runs (/app, the image's WORKDIR),
    never from the container's environment, which a reload cannot change and which wins over .env."""
    assert "WORKDIR /app" in (ROOT / "Dockerfile").read_text()
    assert workers()
    for name, service in workers().items():
        assert "env_file" not in service, f"{name}: .env copied into the environment never changes"
        variables = {v.upper() for v in service.get("environment", {})}
        assert not variables & {f.upper() for f in MODEL_FIELDS}, f"{name}: a model variable in its environment"
        mounts = service["volumes"]
        dotenv = [m for m in mounts if isinstance(m, dict) and m.get("target") == "/app/.env"]
        assert dotenv == [{"type": "bind", "source": "./.env", "target": "/app/.env", "read_only": True,
                           "bind": {"create_host_path": False}}], name
        assert "./artifacts:/app/artifacts:ro" in mounts, name
