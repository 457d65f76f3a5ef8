"""Settings: the guide's variable names, typed, and a message naming the variable when wrong."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from worker.errors import SettingsError
from worker.settings import Settings


def test_defaults_point_at_the_published_models():
    s = Settings.from_env({}, dotenv=False)
    assert s.koelectra_model == "monologg/koelectra-small-v3-discriminator"
    assert s.exaone_model == "LGAI-EXAONE/EXAONE-3.5-2.4B-Instruct"
    assert s.preload_models == ("koelectra", "exaone")
    assert s.use_safetensors and not s.use_quantization and not s.trust_remote_code
    assert s.device == "auto" and s.torch_dtype == "auto"


def test_values_are_parsed():
    s = Settings.from_env({
        "PRELOAD_MODELS": " EXAONE , koelectra,exaone ", "USE_SAFETENSORS": "false", "LOW_CPU_MEM_USAGE": "0",
        "TORCH_DTYPE": "BFloat16", "MAX_MEMORY_GB": "7.5", "USE_QUANTIZATION": "yes", "DEVICE": "cuda:1",
        "KOELECTRA_ADAPTER_DIR": "", "EXAONE_ADAPTER_DIR": "~/adapters/exaone", "BATCH_SIZE": "4",
        "CASCADE_BAND": " 0.3 , 0.7",
    }, dotenv=False)
    assert s.cascade_band == (0.3, 0.7)
    assert Settings.from_env({"CASCADE_BAND": ""}, dotenv=False).cascade_band is None
    assert s.preload_models == ("exaone", "koelectra")
    assert not s.use_safetensors and not s.low_cpu_mem_usage
    assert s.torch_dtype == "bfloat16" and s.max_memory_gb == 7.5 and s.use_quantization
    assert s.device == "cuda:1" and s.batch_size == 4
    assert s.source("koelectra").adapter_dir is None
    assert s.source("exaone").adapter_dir == Path("~/adapters/exaone").expanduser()


@pytest.mark.parametrize(("env", "message"), [
    ({"PRELOAD_MODELS": "koelectra,gpt"}, "PRELOAD_MODELS: unknown model 'gpt'"),
    ({"USE_SAFETENSORS": "maybe"}, "USE_SAFETENSORS: 'maybe' is not a boolean"),
    ({"TORCH_DTYPE": "float8"}, "TORCH_DTYPE: 'float8' is not one of"),
    ({"MAX_MEMORY_GB": "lots"}, "MAX_MEMORY_GB: 'lots' is not a number"),
    ({"MAX_MEMORY_GB": "-1"}, "MAX_MEMORY_GB: must be a positive"),
    ({"DEVICE": "tpu"}, "DEVICE: 'tpu' is not one of auto, cpu, cuda, cuda:N"),
    ({"BATCH_SIZE": "0"}, "BATCH_SIZE: must be at least 1"),
    ({"SNAPSHOT_KEEP": "0"}, "SNAPSHOT_KEEP: must be at least 1"),
    ({"BATCH_SIZE": "many"}, "BATCH_SIZE: 'many' is not a whole number"),
    ({"CELERY_BROKER_URL": "localhost"}, "CELERY_BROKER_URL: must be a URL"),
    ({"SPAM_THRESHOLD": "2"}, "SPAM_THRESHOLD: must be between 0 and 1"),
    ({"METRICS_PORT": "70000"}, "METRICS_PORT: must be a TCP port"),
    ({"CASCADE_BAND": "0.5"}, "CASCADE_BAND: '0.5' is not two numbers"),
    ({"CASCADE_BAND": "0.8,0.2"}, "CASCADE_BAND: 0.8,0.2 is not low,high"),
    ({"BATCH_WAIT_MS": "-1"}, "BATCH_WAIT_MS: must be 0 or a positive"),
    ({"PUBLISH_RETRY_S": "0"}, "PUBLISH_RETRY_S: must be a positive number of seconds"),
    ({"ESCALATION_TIMEOUT_S": "-5"}, "ESCALATION_TIMEOUT_S: must be a positive number of seconds"),
    ({"MAX_TASK_ATTEMPTS": "0"}, "MAX_TASK_ATTEMPTS: must be at least 1"),
    ({"MAX_MESSAGE_BYTES": "-1"}, "MAX_MESSAGE_BYTES: must be 0"),
])
def test_bad_values_name_the_variable(env, message):
    with pytest.raises(SettingsError, match=message.replace("(", r"\(")):
        Settings.from_env(env, dotenv=False)


def test_dotenv_fills_but_never_overrides(tmp_path, monkeypatch):
    (tmp_path / ".env").write_text("TORCH_DTYPE=bfloat16\nBATCH_SIZE=3\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BATCH_SIZE", "5")
    monkeypatch.delenv("TORCH_DTYPE", raising=False)
    s = Settings.from_env()
    assert s.torch_dtype == "bfloat16" and s.batch_size == 5
    monkeypatch.delenv("TORCH_DTYPE")  # load_dotenv wrote it into os.environ


def test_env_example_documents_every_variable_and_parses():
    from dataclasses import fields

    from dotenv import dotenv_values

    path = Path(__file__).resolve().parents[2] / ".env.example"
    text = path.read_text()
    assert [f.name.upper() for f in fields(Settings) if f.name.upper() not in text] == []
    values = {k: v for k, v in dotenv_values(path).items() if v is not None}
    Settings.from_env(values, dotenv=False)


def test_settings_reread_only_the_model_variables(tmp_path, monkeypatch):
    """A reload reads the model, adapter and prompt-file variables again; every other setting stays."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("EXAONE_ADAPTER_DIR", raising=False)
    (tmp_path / ".env").write_text(f"EXAONE_ADAPTER_DIR={tmp_path / 'from-env-file'}\nBATCH_SIZE=3\n")
    started = replace(Settings.from_env({}, dotenv=False), batch_size=16)
    fresh = started.with_models_reread()
    assert fresh.exaone_adapter_dir == str(tmp_path / "from-env-file") and fresh.batch_size == 16
