"""Snapshots written tensor by tensor hold what the reference path wrote, on the CPU, in a few tensors'
memory; what cannot be streamed is built the reference way."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests import factories
from worker.loading import get_loader, snapshot_loader
from worker.loading import plan as planning
from worker.loading.base import LoadedModel, checkpoint_files, load_base
from worker.loading.devices import Placement
from worker.loading.safetensors_stream import Writer, read_block, read_header, read_tensor, row_blocks
from worker.loading.snapshot_loader import SnapshotLoader, is_valid
from worker.serving.classifiers import SpamClassifier
from worker.settings import ModelSource, Settings

ROOT = Path(__file__).parents[2]
TEXTS = ["무료 쿠폰 당첨! 지금 바로 링크를 클릭하세요", "내일 회의는 오후 3시에 시작합니다", "See you " * 20, "a"]
WHICH = {"koelectra": ("koelectra", "koelectra", "koelectra_adapter"), "exaone": ("exaone", "exaone", "exaone_adapter"),
         "exaone_cls": ("exaone", "exaone", "exaone_cls_adapter")}


def settings_for(tmp_path: Path, dtype: str = "float32", **overrides) -> Settings:
    base = Settings.from_env({"DEVICE": "cpu", "TORCH_DTYPE": dtype}, dotenv=False)
    return replace(base, snapshot_dir=str(tmp_path / "snapshots"), **overrides)


def resolve(models, which: str, settings: Settings, adapter: Path | None = None):
    name, base, adapter_field = WHICH[which]
    source = ModelSource(name, str(getattr(models, base)), adapter or getattr(models, adapter_field))
    return planning.resolve(source, settings), Placement.for_model(name, settings)


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(-1).view(torch.uint8)


def scores(plan, placement, folder: Path) -> list[float]:
    model = plan.model_class.from_pretrained(folder, **placement.from_pretrained_kwargs(plan=plan)).eval()
    loaded = LoadedModel(plan.name, model, planning.load_tokenizer(plan), plan, placement)
    return [s.spam_score for s in SpamClassifier(loaded, batch_size=4).score(TEXTS)]


def no_reference_path(monkeypatch) -> None:
    """Any build that materialises the model fails the test."""
    for name in ("load_base", "load_adapted", "_merged"):
        monkeypatch.setattr(snapshot_loader, name, lambda *a, _n=name, **k: pytest.fail(f"{_n}: not streamed"))


# --- the format --------------------------------------------------------------------------------------


def test_the_writer_and_reader_round_trip_with_safetensors(tmp_path):
    """Byte for byte the file safetensors writes, whether a tensor is given whole or in blocks of rows."""
    gen = torch.Generator().manual_seed(0)
    made = {"w": torch.randn(5, 4, generator=gen).to(torch.bfloat16), "b": torch.randn(4, generator=gen),
            "ids": torch.arange(5), "scalar": torch.tensor(2.5, dtype=torch.float16),
            "mask": torch.tensor([True, False]), "empty": torch.zeros(0, 3)}
    specs = {k: (v.dtype, tuple(v.shape)) for k, v in made.items()}
    with Writer(tmp_path / "ours.safetensors", specs, {"format": "pt"}) as writer:
        for name in writer.order:
            for block in (made[name][:2], made[name][2:]) if name == "w" else (made[name],):
                writer.write(name, block)
    with safe_open(tmp_path / "ours.safetensors", "pt") as handle:
        assert handle.metadata() == {"format": "pt"}
        assert all(torch.equal(handle.get_tensor(k), v) for k, v in made.items())
    save_file(made, tmp_path / "theirs.safetensors", metadata={"format": "pt"})
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "theirs.safetensors").read_bytes()
    fd = os.open(tmp_path / "theirs.safetensors", os.O_RDONLY)
    try:
        entries = read_header(tmp_path / "theirs.safetensors")
        assert all(torch.equal(read_tensor(fd, entries[k]), v) for k, v in made.items())
        w = entries["w"]
        blocks = [read_block(fd, offset, size, torch.bfloat16, shape)
                  for offset, size, shape in row_blocks(w, max_bytes=3 * 4 * 2)]  # 3 rows of 4 bf16 at most
        assert [len(b) for b in blocks] == [3, 2] and torch.equal(torch.cat(blocks), made["w"])
    finally:
        os.close(fd)


def test_the_writer_refuses_a_tensor_out_of_order_short_or_long(tmp_path):
    specs = {"a": (torch.float32, (2,)), "b": (torch.float32, (3, 2))}
    writer = Writer(tmp_path / "x.safetensors", specs)
    with pytest.raises(ValueError, match="'b' written out of order"):
        writer.write("b", torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"'a' is torch.float16 \(2,\), declared torch.float32 \(2,\)"):
        writer.write("a", torch.zeros(2, dtype=torch.float16))
    writer.write("a", torch.zeros(2))
    writer.write("b", torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"'b' is torch.float32 \(2, 2\), declared .* \(2 rows written\)"):
        writer.write("b", torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"1 declared tensors were not written in full \(first: b\)"):
        writer.close()


# --- 1: the streamed snapshots are the reference path's ------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("which", ["koelectra", "exaone", "exaone_cls"])
def test_streamed_snapshots_hold_the_tensors_the_reference_path_wrote(models, tmp_path, monkeypatch, which, dtype):
    """Names, dtypes, shapes and bits; config.json and generation_config.json byte for byte; the
    merged model's scores exactly. The base's head (a SEQ_CLS classifier the checkpoint lacks, which
    only adapters supply) was random in the reference path: it is zeros here."""
    settings = settings_for(tmp_path, dtype)
    plan, placement = resolve(models, which, settings)
    reference = SnapshotLoader(settings)
    ref_base, ref_merged = tmp_path / "ref" / f"{plan.name}-base", tmp_path / "ref" / plan.name
    reference.build(ref_base, None, lambda: load_base(plan, plan.model_id, placement))
    reference.build(ref_merged, None, lambda: snapshot_loader._merged(plan, placement, ref_base))

    no_reference_path(monkeypatch)
    folder, built = SnapshotLoader(settings).ensure_snapshot(plan, placement, checkpoint_files(plan, settings))
    (base,) = settings.snapshot_path.glob(f"{plan.name}-base-*[0-9a-f]")
    assert built and is_valid(folder) and is_valid(base)

    for ours, theirs in ((base, ref_base), (folder, ref_merged)):
        assert sorted(p.name for p in ours.iterdir()) == sorted(p.name for p in theirs.iterdir())
        for name in ("config.json", "generation_config.json"):
            if (theirs / name).exists():
                assert (ours / name).read_text() == (theirs / name).read_text(), name
        a, b = tensors(ours), tensors(theirs)
        assert {k: (v.dtype, v.shape) for k, v in a.items()} == {k: (v.dtype, v.shape) for k, v in b.items()}
        differ = sorted(k for k in a if not torch.equal(bits(a[k]), bits(b[k])))
        if ours == folder:
            assert differ == []
        else:
            assert all(plan.adapter.covers(k) and not a[k].any() for k in differ), differ
            assert bool(differ) == (plan.head == planning.SEQUENCE)
    assert next(iter(tensors(folder).values())).dtype == getattr(torch, dtype)
    assert scores(plan, placement, folder) == scores(plan, placement, ref_merged)


def test_a_streamed_build_holds_a_few_tensors_not_the_model(models, tmp_path):
    """Peak RSS of a process while it builds both snapshots of a 241 MB fp32 checkpoint in bf16, over
    its RSS before (after a first build of the tiny model, which pays the one-time imports): a few
    tensors' worth (~10 MB measured), where the reference path held the model (~360 MB)."""
    sizes = {"hidden_size": 512, "intermediate_size": 2048, "num_layers": 16, "head_dim": 64,
             "num_attention_heads": 8, "num_key_value_heads": 4}
    base = factories.build_exaone(tmp_path / "exaone", config=sizes)
    adapter = factories.build_exaone_adapter(tmp_path / "lora", base)
    model = sum(f.stat().st_size for f in base.glob("*.safetensors")) // 2  # in bf16
    script = textwrap.dedent("""
        import json, sys
        from pathlib import Path
        from worker.loading import get_loader
        from worker.loading import plan as planning
        from worker.loading.base import checkpoint_files
        from worker.loading.devices import Placement
        from worker.settings import ModelSource, Settings

        def rss(field):
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024

        settings = Settings.from_env({"DEVICE": "cpu", "TORCH_DTYPE": "bfloat16", "SNAPSHOT_DIR": sys.argv[1]},
                                     dotenv=False)
        placement = Placement.for_model("exaone", settings)
        for base, adapter in zip(sys.argv[2::2], sys.argv[3::2]):
            plan = planning.resolve(ModelSource("exaone", base, Path(adapter)), settings)
            inputs = checkpoint_files(plan, settings)
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
            before = rss("VmRSS")
            get_loader(settings).ensure_snapshot(plan, placement, inputs)
        print(rss("VmHWM") - before)
    """)
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "snapshots"), str(models.exaone),
                          str(models.exaone_adapter), str(base), str(adapter)],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    grew = int(out.stdout.splitlines()[-1])
    assert grew < model / 4, f"building grew RSS by {grew / 2**20:.0f} MB for a {model / 2**20:.0f} MB model"


# --- what is not streamed is built the reference way ---------------------------------------------------


@pytest.mark.parametrize("case", ["alpha_pattern adapter", "bin checkpoint"])
def test_what_cannot_be_streamed_is_built_the_reference_way(models, tmp_path, caplog, case):
    settings = settings_for(tmp_path)
    base, adapter = models.koelectra, models.koelectra_adapter
    if case == "alpha_pattern adapter":  # not plain LoRA: a per-layer alpha, which PEFT's merge applies
        adapter = tmp_path / "adapter"
        shutil.copytree(models.koelectra_adapter, adapter)
        config = json.loads((adapter / "adapter_config.json").read_text())
        (adapter / "adapter_config.json").write_text(json.dumps({**config, "alpha_pattern": {"query": 16}}))
    else:  # a pickled checkpoint, read with USE_SAFETENSORS=false
        base = tmp_path / "koelectra"
        shutil.copytree(models.koelectra, base)
        torch.save(load_file(base / "model.safetensors"), base / "pytorch_model.bin")
        (base / "model.safetensors").unlink()
        settings = replace(settings, use_safetensors=False)
    source = ModelSource("koelectra", str(base), adapter)
    with caplog.at_level(logging.INFO, logger="worker.loading.snapshot_loader"):
        built = get_loader(settings).load_model(source)
    assert built.source == "checkpoint+snapshot"
    assert "the reference way" in caplog.text
    again = get_loader(settings).load_model(source)
    assert again.source == "snapshot"
    reference = get_loader(replace(settings, model_loader="transformers")).load_model(source)
    ours, theirs = (SpamClassifier(m, batch_size=4).score(TEXTS) for m in (again, reference))
    assert [s.spam_score for s in ours] == pytest.approx([s.spam_score for s in theirs], abs=1e-5)
