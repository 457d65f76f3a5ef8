"""TLS to Redis: a worker and a producer reach a TLS-only redis-server through ``rediss://`` URLs that
verify its certificate against a CA of the test's own, and refuse URLs that would not check it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import pytest
import redis

from tests.conftest import ROOT, free_port
from tests.integration.helpers import client_for, wait_until_serving

pytestmark = pytest.mark.integration


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _make_certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA, and a server certificate it signed for 127.0.0.1 and localhost."""
    folder.mkdir(parents=True, exist_ok=True)
    key = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.crt", "-days", "1",
             "-subj", "/CN=spam-workers test CA", cwd=folder)
    _openssl("req", "-new", *key, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1",
             cwd=folder)
    (folder / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "server.crt", "-days", "1", "-extfile", "san.cnf", cwd=folder)
    return folder / "ca.crt", folder / "server.crt", folder / "server.key"


@pytest.fixture
def tls_redis(tmp_path: Path):
    """A redis-server that listens only on a TLS port; skips when this redis-server lacks TLS."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed; it makes the test's certificates")
    ca, cert, key = _make_certificates(tmp_path / "tls")
    port = free_port()
    log = tmp_path / "redis-tls.log"
    process = subprocess.Popen(
        [shutil.which("redis-server") or "redis-server", "--port", "0", "--tls-port", str(port),
         "--bind", "127.0.0.1", "--tls-cert-file", str(cert), "--tls-key-file", str(key),
         "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no", "--save", "", "--appendonly", "no",
         "--dir", str(tmp_path)],
        stdout=log.open("w"), stderr=subprocess.STDOUT,
    )
    trusting = redis.Redis(host="127.0.0.1", port=port, ssl=True, ssl_ca_certs=str(ca), ssl_cert_reqs="required")
    deadline = time.monotonic() + 10
    while True:
        if process.poll() is not None:
            output = log.read_text(errors="replace")
            if "tls" in output.lower():  # e.g. "Bad directive or wrong number of arguments ... tls-port"
                pytest.skip(f"this redis-server was built without TLS support: {output.strip()[-300:]}")
            pytest.fail(f"redis-server with TLS did not start:\n{output}")
        try:
            trusting.ping()
            break
        except redis.ConnectionError:
            assert time.monotonic() < deadline, f"redis-server with TLS did not answer:\n{log.read_text()}"
            time.sleep(0.05)
    yield port, ca
    process.terminate()
    process.wait(timeout=10)


def test_worker_and_producer_over_verified_tls(worker_factory, models, tls_redis):
    port, ca = tls_redis
    query = f"ssl_cert_reqs=required&ssl_ca_certs={quote(str(ca), safe='')}"
    broker, backend = (f"rediss://127.0.0.1:{port}/{db}?{query}" for db in (0, 1))

    # The server speaks only TLS, and only to clients that trust its CA.
    with pytest.raises(redis.ConnectionError):
        redis.Redis(host="127.0.0.1", port=port, socket_timeout=5).ping()
    with pytest.raises(redis.ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
        redis.Redis(host="127.0.0.1", port=port, ssl=True, ssl_cert_reqs="required", socket_timeout=5).ping()

    worker = worker_factory(models.env(PRELOAD_MODELS="koelectra"), pool="prefork", concurrency=1, name="tls",
                            urls=(broker, backend))
    client = client_for(worker, timeout=120)
    wait_until_serving(worker, client)
    sent = time.monotonic()
    result = client.classify("무료 쿠폰 당첨! 지금 바로 링크를 클릭하세요", "koelectra")
    round_trip = time.monotonic() - sent
    assert result["model"] == "koelectra" and result["label"] in ("spam", "ham")
    assert 0.0 <= result["spam_score"] <= 1.0
    log = worker.log()
    assert "rediss://" in log and "Connected to rediss://" in log
    assert "insecure" not in log.lower() and "CERT_NONE" not in log, "certificate checks were turned off"
    print(f"\nTLS: one classification over rediss:// (CA-verified) in {round_trip * 1000:.0f} ms")
    client.close()


def _producer_cli(broker: str, backend: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY_", "REDIS_"))}
    environ.update(CELERY_BROKER_URL=broker, CELERY_RESULT_BACKEND=backend, **env)
    return subprocess.run([sys.executable, "-m", "producer", "--timeout", "120", *args], cwd=ROOT, env=environ,
                          capture_output=True, text=True, timeout=180)


def test_unverified_tls_is_refused_on_both_sides_and_the_opt_out_is_loud(worker_factory, models, tls_redis):
    """kombu alone would connect to this server without checking its certificate (one warning), and
    serve; here a rediss:// broker URL without ssl_cert_reqs stops the worker and the producer with one
    line naming it, and ssl_cert_reqs=none works only when REDIS_TLS_INSECURE says so, warned about."""
    port, ca = tls_redis
    verified = f"ssl_cert_reqs=required&ssl_ca_certs={quote(str(ca), safe='')}"
    unchecked = f"rediss://127.0.0.1:{port}/0"  # the URL an operator forgets to finish
    backend = f"rediss://127.0.0.1:{port}/1?{verified}"

    refused = worker_factory(models.env(PRELOAD_MODELS="koelectra"), pool="solo", name="unchecked",
                             urls=(unchecked, backend))
    try:
        code = refused.process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the worker did not refuse the URL:\n{refused.log()[-3000:]}") from None
    lines = [line for line in refused.log().splitlines() if "ssl_cert_reqs" in line]
    assert code != 0 and lines == ["worker: invalid setting CELERY_BROKER_URL: a rediss:// URL must say "
                                   "ssl_cert_reqs=required (and ssl_ca_certs=/path/ca.crt for a private CA); "
                                   "without it kombu connects without checking the server's certificate"]
    cli = _producer_cli(unchecked, backend, "classify", "무료 쿠폰")
    assert cli.returncode == 2 and cli.stdout == ""
    assert cli.stderr.strip() == f"producer classify: invalid setting {lines[0].split('invalid setting ')[1]}"
    cli = _producer_cli(f"{unchecked}?ssl_cert_reqs=none", backend, "classify", "무료 쿠폰")
    assert cli.returncode == 2 and "REDIS_TLS_INSECURE=true" in cli.stderr  # none needs the opt-out

    insecure = f"rediss://127.0.0.1:{port}/{{}}?ssl_cert_reqs=none"
    worker = worker_factory(models.env(PRELOAD_MODELS="koelectra", REDIS_TLS_INSECURE="true"), pool="solo",
                            name="insecure", urls=(insecure.format(0), insecure.format(1)))
    cli = _producer_cli(insecure.format(0), insecure.format(1), "classify", "무료 쿠폰", "--model", "koelectra",
                        REDIS_TLS_INSECURE="true")
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout)["model"] == "koelectra"
    assert [line for line in cli.stderr.splitlines() if "ssl_cert_reqs=none" in line] == [
        f"WARNING {variable} connects with ssl_cert_reqs=none (REDIS_TLS_INSECURE=true): the server's certificate "
        "is not checked, so anyone in between can read the messages and the password"
        for variable in ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND")]
    log = worker.log()
    for variable in ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND"):
        assert f"{variable} connects with ssl_cert_reqs=none (REDIS_TLS_INSECURE=true)" in log, log[-3000:]
