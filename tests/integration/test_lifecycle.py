"""The states around a rollout or a first start that used to take a fleet down later, each pinned
through real Redis and real workers: a refused version that a respawned child loaded anyway, a child
forked while a reload held a lock, children of a first start waiting for one build, a build that died
with its process, a replaced model kept in memory, a per-model fleet, the compose settings path."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from filelock import FileLock

from producer.reload import EXIT_OK, EXIT_REFUSED, exit_code, reload_fleet
from tests import factories
from tests.conftest import ROOT
from tests.integration.helpers import (
    TEXTS,
    builders,
    client_for,
    flip,
    pool_children,
    scores,
    serving_figures,
    wait_for_snapshots,
    wait_until,
    wait_until_serving,
)
from tests.prompt_reference import KOREAN
from worker.serving.prompt import FILE_NAME

pytestmark = pytest.mark.integration


def cli_reload(worker, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "producer", "reload", "--timeout", "180", *args], cwd=ROOT,
                          text=True, capture_output=True, timeout=240,
                          env={**os.environ, "CELERY_BROKER_URL": worker.broker_url,
                               "CELERY_RESULT_BACKEND": worker.backend_url})


def snapshot_lock(env: dict[str, str], name: str = "exaone") -> FileLock:
    """The lock a build of ``name``'s snapshot takes first; held by a test, no build can end."""
    from worker.loading import plan as planning
    from worker.loading.base import checkpoint_files
    from worker.loading.devices import Placement
    from worker.loading.snapshot_loader import fingerprint
    from worker.settings import Settings

    settings = Settings.from_env(env, dotenv=False)
    plan = planning.resolve(settings.source(name), settings)
    placement = Placement.for_model(name, settings)
    folder = settings.snapshot_path / f"{name}-{fingerprint(plan, placement, checkpoint_files(plan, settings))}"
    folder.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(folder) + ".lock")


def two_without(client, gone: int, figure: str = "version") -> dict | None:
    """``serving_figures(client, figure)`` once two processes serve and ``gone`` is not one of them."""
    found = serving_figures(client, figure)
    return found if len(found) == 2 and gone not in found else None


# --- a refused version reaches no process ------------------------------------------------------------


@pytest.mark.parametrize("case", ["truncated-weights", "prompt-longer-than-the-window"])
def test_a_refused_version_reaches_no_process_not_even_a_respawned_one(worker_factory, models, adapters, tmp_path,
                                                                     case):
    bad = tmp_path / case
    shutil.copytree(adapters["v2"], bad)
    if case == "truncated-weights":
        weights = bad / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:5000])
    else:  # only a loaded classifier knows: the prompt alone does not fit EXAONE_MAX_TOKENS
        (bad / FILE_NAME).write_text(json.dumps({**KOREAN, "system": "스팸 " * 400}, ensure_ascii=False))
    env = models.env(PRELOAD_MODELS="exaone", EXAONE_ADAPTER_DIR=str(adapters["current"]),
                     SNAPSHOT_DIR=str(tmp_path / "snapshots"))
    worker = worker_factory(env, pool="prefork", concurrency=2, name=f"refused-{case}")
    client = client_for(worker, timeout=120)
    wait_until_serving(worker, client)
    wait_for_snapshots(client, 2)  # the reference scores from the snapshot every process serves later
    before = serving_figures(client)
    (v1,) = {v["exaone"] for v in before.values()}
    expected = scores(client)

    flip(adapters["current"], bad)
    cli = cli_reload(worker)
    assert cli.returncode == EXIT_REFUSED, cli.stdout + cli.stderr
    (line,) = cli.stdout.splitlines()
    cause = "corrupt adapter weights" if case == "truncated-weights" else "the prompt alone takes"
    assert re.match(rf"\S+@\S+: exaone refused, still serving {v1}: ", line), line
    assert cause in line and "every process serves" in line and "as will any that restarts" in line, line
    assert f"point EXAONE_ADAPTER_DIR at {adapters['v1']} before the next restart" in line, line

    # A child dies (an OOM kill, max_tasks_per_child): the one forked in its place loads what the
    # worker serves, not what the settings name now.
    victim = pool_children(worker)[0]
    victim.send_signal(signal.SIGKILL)
    after = wait_until(lambda: two_without(client, victim.pid), 120, "a respawned child serving", worker)
    assert {v["exaone"] for v in after.values()} == {v1}
    assert scores(client) == pytest.approx(expected, abs=1e-6)
    assert worker.process.poll() is None
    client.close()


# --- a child forked while a reload prepares -----------------------------------------------------------


def test_a_child_respawned_while_a_reload_prepares_serves_at_once_and_ends_on_the_new_version(
        worker_factory, models, adapters, tmp_path):
    """One child is stopped (SIGSTOP) before the reload, so the reload cannot get past its prepare
    phase; the other child is killed meanwhile: the one forked in its place loads at once (nothing it
    inherits is locked by the reload), prepares the new version too, and every process ends on it."""
    env = models.env(PRELOAD_MODELS="exaone", EXAONE_ADAPTER_DIR=str(adapters["current"]),
                     SNAPSHOT_DIR=str(tmp_path / "snapshots"))
    worker = worker_factory(env, pool="prefork", concurrency=2, name="respawn-during-reload")
    client = client_for(worker, timeout=120)
    wait_until_serving(worker, client)
    wait_for_snapshots(client, 2)
    (v1,) = {v["exaone"] for v in serving_figures(client).values()}

    flip(adapters["current"], adapters["v2"])
    stopped, victim = pool_children(worker)
    outcomes: list = []
    stopped.send_signal(signal.SIGSTOP)
    try:
        reloading = threading.Thread(target=lambda: outcomes.extend(reload_fleet(client.app, timeout=300)))
        reloading.start()
        wait_until(lambda: _outcome(client, victim.pid) == "ready", 120, "the running child ready", worker)
        victim.send_signal(signal.SIGKILL)
        respawned = wait_until(lambda: next((p for p in pool_children(worker) if p.pid not in
                                             (stopped.pid, victim.pid)), None), 60, "a respawned child", worker)
        wait_until(lambda: _outcome(client, respawned.pid) == "ready", 120,
                   "the respawned child loaded and prepared the new version", worker)
        assert _version(client, respawned.pid) == v1, "it serves the accepted version meanwhile"
        assert reloading.is_alive() and not outcomes, "the reload waits for every child"
    finally:
        stopped.send_signal(signal.SIGCONT)
    reloading.join(timeout=300)
    assert exit_code(outcomes) == EXIT_OK, outcomes
    after = serving_figures(client)
    assert set(after) == {stopped.pid, respawned.pid}
    (v2,) = {v["exaone"] for v in after.values()}
    assert v2 != v1
    assert {r["model_version"] for r in client.submit_batch(TEXTS * 3, model="exaone").get(timeout=60)} == {v2}
    client.close()


def _figures(client, pid: int) -> dict:
    stats = client.app.control.inspect(timeout=2.0).stats() or {}
    return {k.split(".", 2)[2]: v for s in stats.values() for k, v in s.items() if f".pid{pid}." in k}


def _outcome(client, pid: int) -> str | None:
    return _figures(client, pid).get("reload_outcome")


def _version(client, pid: int) -> str | None:
    return _figures(client, pid).get("exaone.version")


# --- a first start: every child serves, one builder builds, a failed build is retried -------------------


def test_every_child_of_a_first_start_serves_before_the_snapshot_build_ends(worker_factory, models, tmp_path):
    env = models.env(PRELOAD_MODELS="exaone", SNAPSHOT_DIR=str(tmp_path / "snapshots"))
    with snapshot_lock(env):  # the build cannot end before this test lets it
        worker = worker_factory(env, pool="prefork", concurrency=2, name="first-start")
        client = client_for(worker, timeout=120)
        wait_until_serving(worker, client)
        sources = wait_until(lambda: two_without(client, 0, "source"), 60, "both children serving", worker)
        assert {v["exaone"] for v in sources.values()} == {"checkpoint"}
        before = scores(client)
        wait_until(lambda: builders(worker), 60, "the builder process", worker)
    wait_for_snapshots(client, 2)
    assert scores(client) == pytest.approx(before, abs=1e-5)
    assert worker.log().count("building snapshot") == 2, "the base, then the merged snapshot, once each"
    client.close()


def test_a_build_that_dies_leaves_the_worker_serving_and_is_retried(worker_factory, models, tmp_path):
    """The builder is killed (an OOM kill); children are recycled meanwhile (max_tasks_per_child): the
    worker serves on, and its main process builds once more."""
    env = models.env(PRELOAD_MODELS="exaone", SNAPSHOT_DIR=str(tmp_path / "snapshots"))
    with snapshot_lock(env):
        worker = worker_factory(env, pool="prefork", concurrency=2, name="build-dies",
                                args=("--max-tasks-per-child=3",))
        client = client_for(worker, timeout=120)
        wait_until_serving(worker, client)
        (builder,) = wait_until(lambda: builders(worker), 60, "the builder process", worker)
        builder.send_signal(signal.SIGKILL)
        wait_until(lambda: "the snapshot build failed" in worker.log(), 30, "the failure logged", worker)
        pids = {p.pid for p in pool_children(worker)}
        results = [h.get(timeout=120) for h in [client.submit(t, model="exaone") for t in TEXTS * 4]]
        assert {r["label"] for r in results} <= {"spam", "ham"}
        assert pids != {p.pid for p in pool_children(worker)}, "children were recycled meanwhile"
    wait_for_snapshots(client, 2)  # the retry, 10 s after the failure
    log = worker.log()
    assert "retrying in 10s" in log and log.count("building snapshot") == 2, log[-3000:]
    assert worker.process.poll() is None
    client.close()


# --- a replaced model is freed ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sizeable(tmp_path_factory) -> dict[str, Path]:
    """An EXAONE-layout model of ~150 MB in float32, so that one copy more or less shows in RSS."""
    root = tmp_path_factory.mktemp("sizeable")
    base = factories.build_exaone(root / "exaone", config={"hidden_size": 512, "intermediate_size": 1536,
                                                             "num_layers": 12, "num_attention_heads": 8,
                                                             "num_key_value_heads": 4, "head_dim": 64})
    v1 = factories.build_exaone_adapter(root / "v1", base)
    v2 = factories.build_exaone_adapter(root / "v2", base, seed=2)
    return {"base": base, "v1": v1, "v2": v2}


def memory(worker) -> tuple[float, set[str]]:
    """The worker process's anonymous memory in MB, and the weight files it maps."""
    pid = worker.process.pid
    with open(f"/proc/{pid}/smaps_rollup") as rollup:
        anonymous = next(int(line.split()[1]) for line in rollup if line.startswith("Anonymous:")) / 1024
    with open(f"/proc/{pid}/maps") as maps:
        files = {line.split()[-1] for line in maps if line.rstrip().endswith(".safetensors")}
    return anonymous, files


def test_a_threads_worker_keeps_one_copy_after_each_switch(worker_factory, models, sizeable, tmp_path):
    """Each switch frees the model it replaces: the checkpoint's copy once the snapshot serves, then a
    reload to v2 (unmerged over the converted base, then v2's snapshot) and back to v1. The process is
    measured against itself (what it imported on the way, PEFT for unmerged serving, is no copy): its
    anonymous memory, and the weight files it maps (a copy kept alive by a closure stays mapped)."""
    copy_mb = sum(f.stat().st_size for f in sizeable["base"].glob("*.safetensors")) / 2**20
    current = tmp_path / "current"
    current.symlink_to(sizeable["v1"])
    snapshots = tmp_path / "snapshots"
    env = models.env(PRELOAD_MODELS="exaone", EXAONE_MODEL=str(sizeable["base"]), EXAONE_ADAPTER_DIR=str(current),
                     SNAPSHOT_DIR=str(snapshots))
    with snapshot_lock(env):  # serving from the checkpoint until the test lets the build end
        first = worker_factory(env, pool="threads", concurrency=4, name="frees")
        client = client_for(first, timeout=120)
        wait_until_serving(first, client)
        scores(client)
        on_checkpoint, files = memory(first)
    model_files = lambda mapped: {f for f in mapped if not f.endswith("adapter_model.safetensors")}  # noqa: E731
    assert model_files(files) == {str(f) for f in sizeable["base"].glob("*.safetensors")}, files
    wait_for_snapshots(client, 1)
    scores(client)
    switched, files = memory(first)
    assert len(model_files(files)) == 1 and next(iter(model_files(files))).startswith(str(snapshots)), files
    assert switched < on_checkpoint + copy_mb / 2, (on_checkpoint, switched, copy_mb)

    for version in ("v2", "v1"):  # unmerged over the base, then its own snapshot; then back
        flip(current, sizeable[version])
        assert exit_code(reload_fleet(client.app, timeout=180)) == EXIT_OK
        wait_for_snapshots(client, 1)
        scores(client)
        anonymous, files = memory(first)
        assert len(model_files(files)) == 1, (version, files)
        assert anonymous < switched + copy_mb / 2, (version, anonymous, switched, copy_mb)
    client.close()


# --- a per-model fleet, the compose settings path ------------------------------------------------------


def test_a_reload_of_one_model_skips_the_workers_without_it(worker_factory, models, adapters, tmp_path):
    env = models.env(EXAONE_ADAPTER_DIR=str(adapters["current"]), SNAPSHOT_DIR=str(tmp_path / "snapshots"))
    gpu = worker_factory({**env, "PRELOAD_MODELS": "exaone"}, pool="threads", concurrency=2, name="exaone-only",
                         args=("--queues=spam.exaone",))
    cpu = worker_factory({**env, "PRELOAD_MODELS": "koelectra"}, pool="threads", concurrency=2,
                         name="koelectra-only", urls=(gpu.broker_url, gpu.backend_url))
    client = client_for(gpu)
    wait_until_serving(gpu, client, handle=client.submit("준비", model="exaone"))
    wait_until_serving(cpu, client, handle=client.submit("준비", model="koelectra"))
    flip(adapters["current"], adapters["v2"])
    cli = cli_reload(gpu, "--model", "exaone")
    assert cli.returncode == EXIT_OK, cli.stdout + cli.stderr
    lines = dict(line.split(": ", 1) for line in cli.stdout.splitlines())
    assert len(lines) == 2
    assert re.match(r"exaone [0-9a-f]{12} -> [0-9a-f]{12}", lines[next(w for w in lines if "exaone-only" in w)])
    skipped = lines[next(w for w in lines if "koelectra-only" in w)]
    assert skipped.startswith("skipped: this worker does not load exaone"), skipped
    client.close()


def test_a_reload_follows_the_settings_file_and_relative_links_as_compose_mounts_them(worker_factory, models,
                                                                                      tmp_path):
    """As in docker-compose.yml: the worker runs in /app with .env mounted there (not copied into its
    environment), adapters under ./artifacts behind a relative symlink."""
    app = tmp_path / "app"
    exaone = app / "artifacts" / "exaone"
    factories.adapter_versions(models.exaone_adapter, exaone)  # current -> v1, a relative link
    (app / ".env").write_text("EXAONE_ADAPTER_DIR=artifacts/exaone/current\n")
    env = {k: v for k, v in models.env(PRELOAD_MODELS="exaone", SNAPSHOT_DIR=str(tmp_path / "snapshots")).items()
           if k != "EXAONE_ADAPTER_DIR"}
    worker = worker_factory(env, pool="threads", concurrency=2, name="compose", cwd=app)
    client = client_for(worker)
    wait_until_serving(worker, client, handle=client.submit("준비", model="exaone"))
    (v1,) = {v["exaone"] for v in serving_figures(client).values()}

    flip(exaone / "current", Path("v2"))  # relative: it resolves inside the container too
    (switched,) = reload_fleet(client.app, model="exaone", timeout=180)
    assert switched.ok and f"exaone {v1} -> " in switched.line, switched
    (v2,) = {v["exaone"] for v in serving_figures(client).values()}

    (app / ".env").write_text("EXAONE_ADAPTER_DIR=artifacts/exaone/v1\n")  # an edit of the mounted file
    (back,) = reload_fleet(client.app, model="exaone", timeout=180)
    assert back.ok and f"exaone {v2} -> {v1}" in back.line, back
    client.close()
