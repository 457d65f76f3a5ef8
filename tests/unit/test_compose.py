"""docker-compose.yml, read as compose reads it (YAML merge keys, ``${VAR:-default}`` from .env): every
worker gets a warm shutdown long enough for its longest task, and says so to the worker, which refuses
a grace too short for TASK_TIME_LIMIT_S. (No Docker engine here: the file is checked, not run.)"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from worker.errors import SettingsError
from worker.settings import Settings

COMPOSE = Path(__file__).resolve().parents[2] / "docker-compose.yml"
WORKERS = ("worker-koelectra", "worker-exaone")


def compose(dotenv: dict[str, str]) -> dict:
    """The file with its variables filled in from ``dotenv`` (``${X:-d}``, ``${X:?msg}``, ``${X}``)."""
    def fill(match: re.Match) -> str:
        name, op, default = match.group(1), match.group(2), match.group(3) or ""
        value = dotenv.get(name, "")
        if op == ":?" and not value:
            raise AssertionError(f"compose would refuse: {default}")
        return value or (default if op == ":-" else "")

    text = re.sub(r"\$\{(\w+)(?:(:[-?])([^}]*))?\}", fill, COMPOSE.read_text())
    return yaml.safe_load(text)


def _seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+)s", duration)
    assert match, f"stop_grace_period {duration!r} is not whole seconds"
    return float(match.group(1))


def _worker_settings(service: dict, dotenv: dict[str, str]) -> Settings:
    """What the worker in ``service`` reads: the .env file (env_file), then the service's environment."""
    return Settings.from_env({**dotenv, **{k: str(v) for k, v in service["environment"].items()}}, dotenv=False)


DOTENV = {"REDIS_PASSWORD": "pw", "FLOWER_BASIC_AUTH": "a:b"}


@pytest.mark.parametrize("name", WORKERS)
def test_each_worker_may_finish_its_longest_task_when_stopped(name):
    service = compose(DOTENV)["services"][name]
    settings = _worker_settings(service, DOTENV)
    grace = _seconds(service["stop_grace_period"])
    assert grace >= settings.task_time_limit_s + 30
    assert settings.stop_grace_period_s == grace  # the worker knows the grace it gets, and checked it
    assert service["environment"]["CELERY_BROKER_URL"].startswith("redis://:pw@redis")


def test_a_time_limit_raised_without_the_grace_stops_the_worker_naming_both():
    dotenv = {**DOTENV, "TASK_TIME_LIMIT_S": "600"}
    service = compose(dotenv)["services"]["worker-exaone"]
    with pytest.raises(SettingsError, match=r"STOP_GRACE_PERIOD_S: 360 s is shorter than TASK_TIME_LIMIT_S \+ 30"):
        _worker_settings(service, dotenv)
    dotenv["STOP_GRACE_PERIOD_S"] = "630"
    service = compose(dotenv)["services"]["worker-exaone"]
    assert _seconds(service["stop_grace_period"]) == 630 == _worker_settings(service, dotenv).stop_grace_period_s


def test_redis_states_its_fsync_policy():
    command = compose(DOTENV)["services"]["redis"]["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--appendfsync") + 1] == "everysec"
    command = compose({**DOTENV, "REDIS_APPENDFSYNC": "always"})["services"]["redis"]["command"]
    assert command[command.index("--appendfsync") + 1] == "always"
