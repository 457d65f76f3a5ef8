"""Prepared snapshots: built once, loaded directly, rebuilt when stale or damaged, built once under concurrency."""

from __future__ import annotations

import json
import multiprocessing
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tests import factories
from worker.loading import get_loader
from worker.loading.snapshot_loader import MANIFEST
from worker.serving.classifiers import SpamClassifier
from worker.settings import ModelSource, Settings

TEXTS = ["무료 쿠폰 당첨! 지금 바로 링크를 클릭하세요", "내일 회의는 오후 3시에 시작합니다", "a"]


def settings_for(tmp_path: Path, **overrides) -> Settings:
    base = Settings.from_env({"DEVICE": "cpu", "TORCH_DTYPE": "float32"}, dotenv=False)
    return replace(base, snapshot_dir=str(tmp_path / "snapshots"), **overrides)


def load(settings: Settings, name: str, model: Path, adapter: Path | None):
    return get_loader(settings).load_model(ModelSource(name, str(model), adapter))


def scores(loaded) -> list[float]:
    return [s.spam_score for s in SpamClassifier(loaded, batch_size=4).score(TEXTS)]


def snapshot_folders(settings: Settings, base: bool = False) -> list[Path]:
    """The serving snapshots (``base``: the converted bases the adapters' snapshots merge into)."""
    root = settings.snapshot_path
    return sorted(p for p in root.iterdir() if p.is_dir() and ("-base-" in p.name) == base) if root.is_dir() else []


@pytest.mark.parametrize("which", ["exaone", "exaone_cls", "koelectra"])
def test_first_start_builds_later_starts_load_the_snapshot(models, tmp_path, which):
    name = "koelectra" if which == "koelectra" else "exaone"
    base = models.koelectra if which == "koelectra" else models.exaone
    adapter = {"exaone": models.exaone_adapter, "exaone_cls": models.exaone_cls_adapter,
               "koelectra": models.koelectra_adapter}[which]
    settings = settings_for(tmp_path)
    reference = scores(load(replace(settings, model_loader="transformers"), name, base, adapter))

    first = load(settings, name, base, adapter)
    assert first.source == "checkpoint+snapshot" and "snapshot" in first.timings
    second = load(settings, name, base, adapter)
    assert second.source == "snapshot"
    assert set(second.timings) == {"resolve", "materialise", "read", "version", "tokenizer"}  # no adapter/merge/build
    assert not any("lora_" in n for n, _ in second.model.named_modules())
    (folder,) = snapshot_folders(settings)
    assert second.bytes_read == sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    assert scores(first) == scores(second)
    assert scores(second) == pytest.approx(reference, abs=1e-5)  # merged == adapter applied at run time


def test_changed_inputs_build_a_new_snapshot(models, tmp_path):
    settings = settings_for(tmp_path, snapshot_keep=3)
    before = scores(load(settings, "exaone", models.exaone, models.exaone_adapter))
    adapter = tmp_path / "adapter"
    shutil.copytree(models.exaone_adapter, adapter)
    factories.perturb_adapter_module(adapter, "transformer.h.1.mlp.c_proj.")
    changed = load(settings, "exaone", models.exaone, adapter)
    assert changed.source == "checkpoint+snapshot"
    assert scores(changed) != before
    bf16 = load(replace(settings, torch_dtype="bfloat16"), "exaone", models.exaone, models.exaone_adapter)
    assert bf16.source == "checkpoint+snapshot" and next(bf16.model.parameters()).dtype == torch.bfloat16
    assert len(snapshot_folders(settings)) == 3
    assert len(snapshot_folders(settings, base=True)) == 2  # float32 and bfloat16


_SERVE_TOO = """
import json, sys
from pathlib import Path
from worker.loading import get_loader
from worker.settings import ModelSource, Settings
settings = Settings.from_env({"DEVICE": "cpu", "TORCH_DTYPE": "float32", "SNAPSHOT_DIR": sys.argv[1]}, dotenv=False)
loaded = get_loader(settings, serve_before_build=True).load_model(ModelSource("exaone", sys.argv[2], Path(sys.argv[3])))
print(json.dumps([loaded.source, loaded.finish is None]), flush=True)
"""


def test_a_first_start_serves_from_the_checkpoint_and_builds_after(models, tmp_path):
    """Every process that starts before the snapshot exists serves at once from the checkpoint, none
    waits for another's build; ``finish`` (what a builder process runs) builds it, and a later load
    serves the snapshot with the same scores."""
    settings = settings_for(tmp_path)
    source = ModelSource("exaone", str(models.exaone), models.exaone_adapter)
    first = get_loader(settings, serve_before_build=True).load_model(source)
    assert first.source == "checkpoint" and first.finish is not None
    assert snapshot_folders(settings) == []
    other = subprocess.run([sys.executable, "-c", _SERVE_TOO, str(settings.snapshot_path), str(models.exaone),
                            str(models.exaone_adapter)], capture_output=True, text=True, timeout=240,
                           cwd=Path(__file__).parents[2])
    assert json.loads(other.stdout.splitlines()[-1]) == ["checkpoint", False], other.stderr[-2000:]
    served = scores(first)
    first.finish()
    again = get_loader(settings, serve_before_build=True).load_model(source)
    assert again.source == "snapshot" and again.finish is None
    assert scores(again) == pytest.approx(served, abs=1e-5)  # merged weights == the adapter applied at run time


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("which", ["exaone", "koelectra"])
def test_the_fused_merge_equals_peft_merge_and_unload(models, which, dtype):
    """One addmm_ per LoRA layer in the weight's dtype, against PEFT's float32 delta then add; the
    SEQ_CLS classifier (modules_to_save) comes out the same way."""
    from worker.loading import plan as planning
    from worker.loading.adapters import attach_adapter, merge_and_unload
    from worker.loading.base import load_base
    from worker.loading.devices import Placement

    base, adapter = (models.exaone, models.exaone_adapter) if which == "exaone" else \
        (models.koelectra, models.koelectra_adapter)
    settings = Settings.from_env({"DEVICE": "cpu", "TORCH_DTYPE": str(dtype).removeprefix("torch.")}, dotenv=False)
    plan = planning.resolve(ModelSource(which, str(base), adapter), settings)
    placement = Placement.for_model(which, settings)
    unmerged = load_base(plan, base, placement).state_dict()
    ours = merge_and_unload(attach_adapter(which, load_base(plan, base, placement), plan.adapter)).state_dict()
    theirs = attach_adapter(which, load_base(plan, base, placement), plan.adapter).merge_and_unload().state_dict()
    assert ours.keys() == theirs.keys() == unmerged.keys()
    tolerance = 1e-6 if dtype == torch.float32 else 2e-2  # bf16 keeps 8 bits: one rounding against two
    for key, value in theirs.items():
        assert ours[key].dtype == value.dtype
        torch.testing.assert_close(ours[key].float(), value.float(), atol=tolerance, rtol=tolerance)
    adapted = [k for k in ours if k.endswith(("q_proj.weight", "query.weight"))]
    assert adapted and all(not torch.equal(ours[k], unmerged[k]) for k in adapted), "the adapter was merged"


def test_a_new_adapter_merges_into_the_converted_base_without_reading_the_checkpoint(models, tmp_path,
                                                                                     monkeypatch):
    from worker.loading import snapshot_loader

    settings = settings_for(tmp_path)
    load(settings, "exaone", models.exaone, models.exaone_adapter)
    (base,) = snapshot_folders(settings, base=True)
    adapter = tmp_path / "retrained"
    shutil.copytree(models.exaone_adapter, adapter)
    factories.perturb_adapter_module(adapter, "transformer.h.0.mlp.c_fc_1.")
    read: list[set[Path]] = []  # the files each streamed build reads its tensors from
    real = snapshot_loader.streamed_build.prepare

    def prepare(*args, **kwargs):
        snapshot = real(*args, **kwargs)
        read.append({source.file for source in snapshot.tensors.values() if source.file is not None})
        return snapshot

    monkeypatch.setattr(snapshot_loader.streamed_build, "prepare", prepare)
    monkeypatch.setattr(snapshot_loader, "load_base", lambda *a, **k: pytest.fail("built the reference way"))
    monkeypatch.setattr(snapshot_loader, "load_adapted", lambda *a, **k: pytest.fail("read the checkpoint"))
    changed = load(settings, "exaone", models.exaone, adapter)
    assert changed.source == "checkpoint+snapshot" and read == [set(base.glob("*.safetensors"))]
    reference = scores(load(replace(settings, model_loader="transformers"), "exaone", models.exaone, adapter))
    assert scores(changed) == pytest.approx(reference, abs=1e-5)


def test_old_snapshots_are_deleted_after_a_build(models, tmp_path):
    """SNAPSHOT_KEEP=2: a build keeps the two most recently used snapshots of the model, deletes the
    rest and the temporary folders of dead builds, and leaves alone a build another process is running."""
    from filelock import FileLock

    settings = settings_for(tmp_path)
    adapters = []
    for n in range(3):  # the same adapter at three paths: three fingerprints
        adapters.append(tmp_path / f"adapter{n}")
        shutil.copytree(models.koelectra_adapter, adapters[-1])

    def start(n: int) -> tuple[str, set[Path]]:
        before = set(snapshot_folders(settings)) if settings.snapshot_path.is_dir() else set()
        source = load(settings, "koelectra", models.koelectra, adapters[n]).source
        return source, set(snapshot_folders(settings)) - before

    _, (a,) = start(0)
    _, (b,) = start(1)
    time.sleep(0.05)
    assert start(0) == ("snapshot", set())  # a is now used more recently than b
    dead = settings.snapshot_path / "koelectra-0123456789abcdef.tmp-999999"
    running = settings.snapshot_path / "koelectra-fedcba9876543210.tmp-1"
    for folder in (dead, running):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"partial")
    other_model = settings.snapshot_path / "exaone-0123456789abcdef"
    other_model.mkdir()
    with FileLock(str(running).split(".tmp-")[0] + ".lock"):  # held as a live builder holds it
        _, (c,) = start(2)
        assert set(snapshot_folders(settings)) == {a, c, running, other_model}
    assert start(0)[0] == "snapshot"
    assert start(1)[0] == "checkpoint+snapshot"  # b was deleted, so it is built again


@pytest.mark.parametrize("damage", ["truncate", "manifest", "garbage"])
def test_damaged_snapshot_is_rebuilt_not_served(models, tmp_path, damage):
    settings = settings_for(tmp_path)
    good = scores(load(settings, "exaone", models.exaone, models.exaone_adapter))
    (folder,) = snapshot_folders(settings)
    weights = next(folder.glob("*.safetensors"))
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "manifest":
        (folder / MANIFEST).unlink()
    else:
        size = weights.stat().st_size
        weights.write_bytes(b"\xff" * size)
    again = load(settings, "exaone", models.exaone, models.exaone_adapter)
    assert again.source == "checkpoint+snapshot"
    assert scores(again) == good
    assert load(settings, "exaone", models.exaone, models.exaone_adapter).source == "snapshot"


def _load_in_process(args) -> tuple[str, list[float]]:
    settings, base, adapter = args
    loaded = load(settings, "exaone", Path(base), Path(adapter))
    return loaded.source, scores(loaded)


def test_concurrent_first_starts_build_once(models, tmp_path):
    settings = settings_for(tmp_path)
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        results = pool.map(_load_in_process, [(settings, str(models.exaone), str(models.exaone_adapter))] * 3)
    sources = sorted(source for source, _ in results)
    assert sources == ["checkpoint+snapshot", "snapshot", "snapshot"]
    assert all(s == results[0][1] for _, s in results)
    assert [p.name for p in settings.snapshot_path.iterdir() if ".tmp-" in p.name] == []
    assert len(snapshot_folders(settings)) == 1


_START_FROM_SNAPSHOT = """
import json, sys
from pathlib import Path
from worker.loading import get_loader
from worker.settings import ModelSource, Settings
settings = Settings.from_env({"DEVICE": "cpu", "TORCH_DTYPE": "float32", "SNAPSHOT_DIR": sys.argv[1]}, dotenv=False)
loaded = get_loader(settings).load_model(ModelSource("exaone", sys.argv[2], Path(sys.argv[3])))
print(json.dumps([loaded.source, sorted(m for m in ("peft", "bitsandbytes") if m in sys.modules)]))
"""


def test_a_start_from_the_snapshot_never_imports_peft(models, tmp_path):
    """PEFT and the bitsandbytes it pulls in cost seconds of import; the merged snapshot needs neither."""
    load(settings_for(tmp_path), "exaone", models.exaone, models.exaone_adapter)  # builds it
    out = subprocess.run([sys.executable, "-c", _START_FROM_SNAPSHOT, str(tmp_path / "snapshots"), str(models.exaone),
                          str(models.exaone_adapter)], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parents[2])
    assert json.loads(out.stdout.splitlines()[-1]) == ["snapshot", []]


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_quantized_snapshot_holds_the_quantized_weights(models, tmp_path, bits):
    """With USE_QUANTIZATION the first start writes the bitsandbytes weights; later starts load them
    as they are (no quantization at start-up) and score exactly as the start that quantized them."""
    import bitsandbytes as bnb

    settings = settings_for(tmp_path, use_quantization=True, quantization_bits=bits)
    reference = scores(load(replace(settings, use_quantization=False), "exaone", models.exaone, models.exaone_adapter))
    first = load(settings, "exaone", models.exaone, models.exaone_adapter)
    assert first.source == "checkpoint+snapshot" and first.placement.quantization == bits
    second = load(settings, "exaone", models.exaone, models.exaone_adapter)
    assert second.source == "snapshot" and "snapshot" not in second.timings
    layer = {"4bit": bnb.nn.Linear4bit, "8bit": bnb.nn.Linear8bitLt}[bits]
    assert any(isinstance(m, layer) for m in second.model.modules())
    assert scores(second) == scores(first)
    assert scores(second) == pytest.approx(reference, abs=0.05)  # quantization moves scores only a little
    folders = snapshot_folders(settings)
    assert len(folders) == 2  # the merged weights, and the quantized ones made from them
    merged, quantized = sorted(folders, key=lambda f: sum(x.stat().st_size for x in f.glob("*.safetensors")))[::-1]
    config = json.loads((quantized / "config.json").read_text())
    assert config["quantization_config"]["load_in_" + bits] is True
    assert second.bytes_read == sum(f.stat().st_size for f in quantized.glob("*.safetensors"))


_FULL_DISK = """
import json, os, shutil, subprocess, sys, time
from pathlib import Path
from worker.errors import ModelLoadError
from worker.loading import get_loader
from worker.settings import ModelSource, Settings

disk, model, adapters = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]


def load(folder, adapter, keep=2):
    settings = Settings.from_env({"DEVICE": "cpu", "TORCH_DTYPE": "float32", "SNAPSHOT_DIR": str(folder),
                                  "SNAPSHOT_KEEP": str(keep)}, dotenv=False)
    try:
        return get_loader(settings).load_model(ModelSource("koelectra", model, Path(adapter))).source
    except ModelLoadError as exc:
        return str(exc)


def pages(folder):
    return sum(-(-f.stat().st_size // 4096) * 4096 for f in folder.iterdir())


def listing():
    return sorted(p.name for p in disk.iterdir() if p.is_dir())


scratch = disk.with_name("built")
load(scratch, adapters[0])
(base,) = scratch.glob("koelectra-base-*[0-9a-f]")
(merged,) = [p for p in scratch.glob("koelectra-*[0-9a-f]") if p != base]
unit = pages(merged)
disk.mkdir()
subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={pages(base) + unit * 7 // 2}", "tmpfs", str(disk)], check=True)
shutil.copytree(base, disk / base.name)
old, dead = disk / "koelectra-00000000000000aa", disk / "koelectra-00000000000000bb.tmp-999999"
for copy in (old, dead):
    shutil.copytree(merged, copy)
    os.utime(copy, (time.time() - 3600,) * 2)
shutil.copytree(merged, disk / merged.name)  # the version in use: the most recently used
report = {"full": listing(), "base": base.name, "in use": merged.name, "old": old.name, "dead": dead.name}
report["new version"] = load(disk, adapters[1])
report["after"] = listing()
with open(disk / "filler", "wb", buffering=0) as fh:  # nothing left for a snapshot, nothing prunable (KEEP=9)
    try:
        while fh.write(b"x" * 4096):
            pass
    except OSError:
        pass
report["disk full"] = load(disk, adapters[2], keep=9)
report["left"] = listing()
(disk / "filler").unlink()
report["room again"] = load(disk, adapters[2], keep=9)
print(json.dumps(report))
"""


def test_a_disk_full_of_old_snapshots_makes_room_and_a_failed_build_leaves_nothing(models, tmp_path):
    """On a real full filesystem (a tmpfs in a private mount namespace): old versions and a dead
    build's folder fill SNAPSHOT_DIR, and the next version still builds, since pruning runs before
    the build too; a build that hits ENOSPC fails with that error, leaves no temporary folder, and
    the next one succeeds once there is room."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-Urm", "true"]).returncode != 0:
        pytest.skip("no unprivileged mount namespaces here (unshare -Urm)")
    adapters = []
    for n in range(3):
        adapters.append(tmp_path / f"adapter{n}")
        shutil.copytree(models.koelectra_adapter, adapters[-1])
    out = subprocess.run(["unshare", "-Urm", sys.executable, "-c", _FULL_DISK, str(tmp_path / "disk"),
                          str(models.koelectra), *map(str, adapters)],
                         capture_output=True, text=True, cwd=Path(__file__).parents[2], timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.splitlines()[-1])
    base, in_use = report["base"], report["in use"]
    assert report["full"] == sorted([base, in_use, report["old"], report["dead"]])
    assert report["new version"] == "checkpoint+snapshot"
    (new,) = set(report["after"]) - {base, in_use}
    assert new.startswith("koelectra-") and ".tmp-" not in new
    assert set(report["after"]) == {base, in_use, new}  # the old version and the dead build made room
    assert "No space left on device" in report["disk full"]
    assert report["left"] == report["after"]  # no temporary folder left behind
    assert report["room again"] == "checkpoint+snapshot"
