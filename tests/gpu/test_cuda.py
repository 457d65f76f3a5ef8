"""The CUDA path, run by bench/gpu_check.sh on a GPU machine; skipped where torch sees no GPU."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from worker.loading import get_loader
from worker.serving.classifiers import SpamClassifier
from worker.settings import ModelSource, Settings
from worker.telemetry.stats import memory_mb

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

TEXTS = ["무료 쿠폰 당첨! 지금 바로 링크를 클릭하세요", "내일 회의는 오후 3시에 시작합니다", "a"]


def _scores(settings: Settings, models, name="exaone") -> tuple[list[float], object]:
    base = models.exaone if name == "exaone" else models.koelectra
    adapter = models.exaone_adapter if name == "exaone" else models.koelectra_adapter
    loaded = get_loader(settings).load_model(ModelSource(name, str(base), adapter))
    return [s.spam_score for s in SpamClassifier(loaded, batch_size=4).score(TEXTS)], loaded


@pytest.fixture
def cpu_settings(tmp_path):
    return Settings.from_env({"DEVICE": "cpu", "TORCH_DTYPE": "float32", "SNAPSHOT_DIR": str(tmp_path / "snap")},
                             dotenv=False)


@pytest.mark.parametrize("loader", ["transformers", "snapshot"])
def test_cuda_bf16_matches_cpu(models, cpu_settings, loader):
    reference, _ = _scores(replace(cpu_settings, model_loader="transformers"), models)
    got, loaded = _scores(replace(cpu_settings, device="cuda", torch_dtype="bfloat16", model_loader=loader), models)
    assert next(loaded.model.parameters()).device.type == "cuda"
    assert got == pytest.approx(reference, abs=2e-2)
    figures = memory_mb()
    assert figures["cuda0_allocated_mb"] > 0 and figures["cuda0_peak_mb"] >= figures["cuda0_allocated_mb"]


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_bitsandbytes_quantization_loads_and_scores(models, cpu_settings, bits):
    settings = replace(cpu_settings, device="cuda", torch_dtype="bfloat16", use_quantization=True,
                       quantization_bits=bits, model_loader="transformers")
    got, loaded = _scores(settings, models)
    assert loaded.placement.quantization == bits
    kinds = {type(m).__name__ for m in loaded.model.modules()}
    assert kinds & {"Linear4bit", "Linear8bitLt"}, kinds
    assert all(0.0 <= s <= 1.0 for s in got)


def test_max_memory_gb_that_holds_the_model_places_it_on_the_gpu(models, cpu_settings):
    settings = replace(cpu_settings, device="cuda", torch_dtype="bfloat16", max_memory_gb=1.0)
    got, loaded = _scores(settings, models)
    assert set(loaded.model.hf_device_map.values()) == {0}
    assert all(0.0 <= s <= 1.0 for s in got)


@pytest.mark.parametrize("loader", ["transformers", "snapshot"])
def test_max_memory_gb_below_the_model_spills_to_cpu_memory_never_disk(models, cpu_settings, loader, caplog):
    from worker.loading import plan as planning
    from worker.loading.memory_cap import plan_device_map

    plan = planning.resolve(ModelSource("exaone", str(models.exaone), models.exaone_adapter), cpu_settings)
    cap = plan_device_map(plan, torch.bfloat16, None, 0, 100).total / 2**30 * 0.8
    reference, _ = _scores(replace(cpu_settings, device="cuda", torch_dtype="bfloat16", model_loader=loader), models)
    settings = replace(cpu_settings, device="cuda", torch_dtype="bfloat16", max_memory_gb=cap, model_loader=loader)
    got, loaded = _scores(settings, models)
    assert set(loaded.model.hf_device_map.values()) == {0, "cpu"}
    assert "spills" in caplog.text
    assert got == pytest.approx(reference, abs=2e-2)


def test_max_memory_gb_below_a_quantized_model_is_refused(models, cpu_settings):
    from worker.errors import ModelLoadError

    settings = replace(cpu_settings, device="cuda", torch_dtype="bfloat16", use_quantization=True,
                       max_memory_gb=1e-5)
    with pytest.raises(ModelLoadError, match="set MAX_MEMORY_GB to at least"):
        _scores(settings, models)


def test_koelectra_on_cuda_matches_cpu(models, cpu_settings):
    reference, _ = _scores(cpu_settings, models, "koelectra")
    got, loaded = _scores(replace(cpu_settings, device="cuda"), models, "koelectra")
    assert next(loaded.model.parameters()).device.type == "cuda"
    assert got == pytest.approx(reference, abs=1e-3)


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_quantized_snapshot_is_written_and_loaded_on_cuda(models, cpu_settings, bits):
    settings = replace(cpu_settings, device="cuda", torch_dtype="bfloat16", use_quantization=True,
                       quantization_bits=bits)
    first, built = _scores(settings, models)
    assert built.source == "checkpoint+snapshot"
    again, loaded = _scores(settings, models)
    assert loaded.source == "snapshot" and loaded.placement.quantization == bits
    assert {type(m).__name__ for m in loaded.model.modules()} & {"Linear4bit", "Linear8bitLt"}
    assert {p.device.type for p in loaded.model.parameters()} == {"cuda"}
    assert again == pytest.approx(first, abs=1e-3)


def test_cuda_n_out_of_range_is_a_clear_load_error(models, cpu_settings):
    from worker.errors import ModelLoadError

    settings = replace(cpu_settings, device=f"cuda:{torch.cuda.device_count()}")
    with pytest.raises(ModelLoadError, match="but torch sees"):
        _scores(settings, models)

