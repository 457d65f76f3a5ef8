"""TLS to Redis: a worker and a producer reach a TLS-only redis-server through ``rediss://`` URLs that
verify its certificate against a CA of the test's own."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

import pytest
import redis

from tests.conftest import free_port
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
