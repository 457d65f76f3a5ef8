"""How both sides connect to Redis: rediss:// URLs must check certificates, and every connection has a
socket timeout, keepalive and health checks (the settings pinned here; a paused Redis in
tests/integration/test_connections.py shows what they do)."""

from __future__ import annotations

import logging
import socket

import pytest

from producer.client import make_app
from producer.connection import tls_problem
from producer.settings import ProducerSettings, ProducerSettingsError
from worker.celeryconfig import celery_config
from worker.errors import SettingsError
from worker.settings import Settings

CA = "ssl_ca_certs=%2Fetc%2Fca.crt"


@pytest.mark.parametrize(("url", "problem"), [
    ("rediss://:secret@redis:6380/0", "must say ssl_cert_reqs=required"),
    (f"rediss://:secret@redis:6380/0?{CA}", "must say ssl_cert_reqs=required"),
    ("rediss://redis:6380/0?ssl_cert_reqs=none", "ssl_cert_reqs=none turns certificate checks off"),
    ("rediss://redis:6380/0?ssl_cert_reqs=CERT_NONE", "ssl_cert_reqs=CERT_NONE turns certificate checks off"),
    ("rediss://redis:6380/0?ssl_cert_reqs=REQUIRED", "'REQUIRED' is not one of required, optional, none"),
    ("redis://a:6379/0;rediss://b:6380/0", "must say ssl_cert_reqs=required"),  # a failover URL
])
def test_unverified_tls_urls_are_refused_naming_ssl_cert_reqs(url, problem):
    assert problem in tls_problem(url, insecure_allowed=False)
    for variable in ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND"):
        with pytest.raises(SettingsError, match=f"{variable}: .*ssl_cert_reqs") as worker_error:
            Settings.from_env({variable: url}, dotenv=False)
        with pytest.raises(ProducerSettingsError, match=f"{variable}: .*ssl_cert_reqs") as producer_error:
            ProducerSettings(**{"broker_url" if variable == "CELERY_BROKER_URL" else "result_backend": url})
        for error in (worker_error.value, producer_error.value):
            assert "secret" not in str(error) and "\n" not in str(error)


@pytest.mark.parametrize("url", [
    "redis://localhost:6379/0", f"rediss://redis:6380/0?ssl_cert_reqs=required&{CA}",
    "rediss://redis:6380/0?ssl_cert_reqs=CERT_REQUIRED", "rediss://redis:6380/0?ssl_cert_reqs=optional",
])
def test_verifying_and_plain_urls_pass(url):
    assert tls_problem(url, insecure_allowed=False) is None
    Settings.from_env({"CELERY_BROKER_URL": url}, dotenv=False)
    ProducerSettings(broker_url=url)


def test_turning_checks_off_takes_an_explicit_opt_out_and_is_warned_about(caplog):
    url = "rediss://redis:6380/0?ssl_cert_reqs=none"
    assert Settings.from_env({"CELERY_BROKER_URL": url, "REDIS_TLS_INSECURE": "true"}, dotenv=False).redis_tls_insecure
    missing = "rediss://redis:6380/0"  # the opt-out is for ssl_cert_reqs=none said out loud, not for a forgotten one
    with pytest.raises(SettingsError, match="must say ssl_cert_reqs=required"):
        Settings.from_env({"CELERY_BROKER_URL": missing, "REDIS_TLS_INSECURE": "true"}, dotenv=False)
    with caplog.at_level(logging.WARNING, logger="producer.client"):
        make_app(ProducerSettings(broker_url=url, redis_tls_insecure=True))
    assert [r.getMessage() for r in caplog.records] == [
        "CELERY_BROKER_URL connects with ssl_cert_reqs=none (REDIS_TLS_INSECURE=true): the server's certificate is "
        "not checked, so anyone in between can read the messages and the password"]


def test_producer_reads_the_connection_variables(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("REDIS_SOCKET_TIMEOUT_S", "4.5")
    monkeypatch.setenv("REDIS_HEALTH_CHECK_INTERVAL_S", "7")
    monkeypatch.setenv("REDIS_TLS_INSECURE", "no")
    settings = ProducerSettings.from_env()
    assert (settings.redis_socket_timeout_s, settings.redis_health_check_interval_s) == (4.5, 7)
    assert not settings.redis_tls_insecure
    monkeypatch.setenv("REDIS_SOCKET_TIMEOUT_S", "soon")
    with pytest.raises(ProducerSettingsError, match="REDIS_SOCKET_TIMEOUT_S: 'soon' is not a number"):
        ProducerSettings.from_env()
    monkeypatch.setenv("REDIS_SOCKET_TIMEOUT_S", "0.5")
    with pytest.raises(ProducerSettingsError, match="REDIS_SOCKET_TIMEOUT_S: must be at least 1"):
        ProducerSettings.from_env()


def _expected_broker(timeout: float, health: int) -> dict:
    keepalive = {socket.TCP_KEEPIDLE: 30, socket.TCP_KEEPINTVL: 10, socket.TCP_KEEPCNT: 3}
    return {"socket_timeout": timeout, "socket_connect_timeout": timeout, "socket_keepalive": True,
            "socket_keepalive_options": keepalive, "health_check_interval": health}


def test_worker_connections_have_timeouts_keepalive_and_health_checks():
    settings = Settings.from_env({"REDIS_SOCKET_TIMEOUT_S": "9", "REDIS_HEALTH_CHECK_INTERVAL_S": "11"}, dotenv=False)
    config = celery_config(settings)
    transport = config["broker_transport_options"]
    assert {k: transport[k] for k in _expected_broker(9, 11)} == _expected_broker(9.0, 11)
    assert transport["visibility_timeout"] == settings.visibility_timeout_s  # the delivery options stay
    from celery import Celery

    app = Celery("pinned")
    app.conf.update(config)
    params = app.backend.connparams  # what the result backend's connection pool is built with
    assert (params["socket_timeout"], params["socket_connect_timeout"]) == (9.0, 9.0)
    assert params["socket_keepalive"] is True and params["health_check_interval"] == 11


def test_producer_connections_have_the_same_bounds():
    app = make_app(ProducerSettings(redis_socket_timeout_s=6, redis_health_check_interval_s=12))
    transport = app.conf.broker_transport_options
    assert {k: transport[k] for k in _expected_broker(6, 12)} == _expected_broker(6, 12)
    params = app.backend.connparams
    assert (params["socket_timeout"], params["socket_connect_timeout"]) == (6, 6)
    assert params["socket_keepalive"] is True and params["health_check_interval"] == 12
    defaults = Settings.from_env({}, dotenv=False)
    assert (ProducerSettings().redis_socket_timeout_s, ProducerSettings().redis_health_check_interval_s) == (
        defaults.redis_socket_timeout_s, defaults.redis_health_check_interval_s)


@pytest.mark.parametrize(("env", "message"), [
    ({"REDIS_SOCKET_TIMEOUT_S": "0"}, "REDIS_SOCKET_TIMEOUT_S: must be at least 1 second"),
    ({"REDIS_HEALTH_CHECK_INTERVAL_S": "-1"}, "REDIS_HEALTH_CHECK_INTERVAL_S: must be 0"),
    ({"STOP_GRACE_PERIOD_S": "120"}, r"STOP_GRACE_PERIOD_S: 120 s is shorter than TASK_TIME_LIMIT_S \+ 30 \(330 s\)"),
    ({"TASK_TIME_LIMIT_S": "600", "VISIBILITY_TIMEOUT_S": "630"},
     r"VISIBILITY_TIMEOUT_S: 630 s must exceed the longest task, TASK_TIME_LIMIT_S \+ 30 \(630 s\)"),
    ({"METRICS_BIND": "0.0.0.0:9100"}, "METRICS_BIND: '0.0.0.0:9100' is not an IP address or host name"),
])
def test_bad_connection_and_shutdown_values_name_the_variable(env, message):
    with pytest.raises(SettingsError, match=message):
        Settings.from_env(env, dotenv=False)


def test_grace_and_bind_values_that_fit():
    s = Settings.from_env({"STOP_GRACE_PERIOD_S": "330", "METRICS_BIND": "0.0.0.0"}, dotenv=False)
    assert s.stop_grace_period_s == 330 and s.metrics_bind == "0.0.0.0"
    assert Settings.from_env({}, dotenv=False).metrics_bind == "127.0.0.1"  # loopback unless asked
    for bind in ("::", "localhost", "metrics.internal"):
        assert Settings.from_env({"METRICS_BIND": bind}, dotenv=False).metrics_bind == bind
