"""Worker settings: read once from the environment (and an optional ``.env``), typed and validated.

The variable names are the ones the loading guide this service replaces already used, so existing
``.env`` files keep working. A bad value stops start-up with a message that names the variable.
This is the only module that reads ``os.environ`` for the worker.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, fields, replace
from pathlib import Path

from dotenv import dotenv_values, load_dotenv

from producer.connection import tls_problem
from worker.errors import SettingsError

MODEL_NAMES = ("koelectra", "exaone")
DTYPES = ("auto", "float32", "bfloat16", "float16")
LOADERS = ("snapshot", "transformers")  # worker.loading.LOADERS; named here to validate without torch
QUANTIZATIONS = ("4bit", "8bit")

MODEL_FIELDS = ("koelectra_model", "koelectra_adapter_dir", "exaone_model", "exaone_adapter_dir", "exaone_prompt_file")
"""What a reload re-reads (``KOELECTRA_MODEL``, ``EXAONE_ADAPTER_DIR``, ...); every other setting stays."""

_process_env: dict[str, str] | None = None
"""The environment before ``.env`` was merged into it, kept so a reload can read ``.env`` again."""

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


@dataclass(frozen=True)
class ModelSource:
    """Where one model comes from: a Hub id or local folder, plus an optional PEFT adapter folder."""

    name: str
    model: str
    adapter_dir: Path | None
    prompt_file: Path | None = None
    """EXAONE: the prompt contract to use instead of the adapter's ``spam_prompt.json``."""


@dataclass(frozen=True)
class Settings:
    """Everything the worker reads from the environment. Field names are the variables, lower-cased."""

    celery_broker_url: str = "redis://localhost:6379/0"
    celery_result_backend: str = "redis://localhost:6379/1"
    koelectra_model: str = "monologg/koelectra-small-v3-discriminator"
    koelectra_adapter_dir: str = "artifacts/koelectra/spam_adapter"
    exaone_model: str = "LGAI-EXAONE/EXAONE-3.5-2.4B-Instruct"
    exaone_adapter_dir: str = "artifacts/exaone/spam_adapter"
    exaone_prompt_file: str = ""
    """The prompt contract of a ``CAUSAL_LM`` EXAONE adapter (:mod:`worker.serving.prompt`); empty means the
    adapter folder's ``spam_prompt.json`` if there is one, else the built-in prompt."""
    preload_models: tuple[str, ...] = MODEL_NAMES
    """Models each worker process loads at start: a comma list of ``koelectra``, ``exaone``."""
    use_safetensors: bool = True
    low_cpu_mem_usage: bool = True
    """Accepted for the guide's ``.env`` files; transformers 5 always loads on the meta device."""
    torch_dtype: str = "auto"
    """``auto`` (bfloat16 on CUDA, float32 on CPU), ``float32``, ``bfloat16``, ``float16``."""
    max_memory_gb: float | None = None
    """Per-GPU memory cap for the EXAONE weights (``device_map="auto"``); unset means no cap."""
    use_quantization: bool = False
    """Load EXAONE quantized by bitsandbytes (see ``QUANTIZATION_BITS``), on CUDA or CPU."""
    quantization_bits: str = "4bit"
    device: str = "auto"
    """``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``."""
    model_loader: str = "snapshot"
    """``snapshot`` (prepared merged weights, built on first start) or ``transformers`` (the checkpoint
    converted and adapted at every start, the old guide's path)."""
    snapshot_dir: str = ""
    """Where prepared snapshots are kept; empty means ``$HF_HOME/spam-snapshots`` or
    ``~/.cache/spam-workers/snapshots``. Use a local SSD."""
    snapshot_keep: int = 2
    """Snapshots kept per model, the most recently used first; older ones are deleted before a build
    (so a disk full of old versions makes room) and after it (2 keeps the previous one for a worker not
    yet upgraded, and a quantized model's merged source)."""
    prefetch_weights: bool = True
    """Read the weight files into the page cache while torch and transformers import (overlaps them)."""
    trust_remote_code: bool = False
    spam_threshold: float = 0.5
    """A message is labelled spam when its spam score is at least this."""
    batch_size: int = 16
    """Texts per forward pass inside a batch task."""
    max_text_chars: int = 20_000
    """Longer texts are refused; texts longer than the model's window are truncated and flagged."""
    max_batch_items: int = 1_000
    batch_chunk_items: int = 250
    """A batch task with more texts is split into chunk tasks of this size, served by any worker."""
    batch_wait_ms: float = 2.0
    """Dynamic batching (threads pool): how long a forward pass may wait for more of the messages
    this process is already running. It never waits when no other message is in flight."""
    cascade_band: tuple[float, float] | None = (0.2, 0.8)
    """``model=auto``: KoELECTRA scores within ``low,high`` (inclusive) escalate to EXAONE. Empty
    turns escalation off (KoELECTRA alone decides)."""
    exaone_max_tokens: int = 512
    """Token window for the EXAONE prompt (longer messages are truncated and flagged)."""
    load_timeout_s: float = 600.0
    """How long a worker process may take to load its models before Celery gives up on it."""
    torch_threads: int = 0
    """Intra-op threads per worker process; 0 divides the machine's cores among the processes (a
    threads-pool worker keeps one core for Celery's threads)."""
    task_time_limit_s: float = 300.0
    """A task still running after this gets ``SoftTimeLimitExceeded``; 30 s later its process is killed
    (prefork). Threads and solo pools: the task stops waiting for its forward pass and fails with it."""
    visibility_timeout_s: float = 3600.0
    """Redis redelivers a message unacknowledged this long (a worker that died); above the time limit."""
    metrics_port: int = 0
    """Port of the worker's Prometheus endpoint; 0 (the default) turns it off."""
    # --- connections, shutdown, telemetry (issue 19): producer.connection has the why ---------------
    redis_socket_timeout_s: float = 5.0
    """No Redis command (publish, ack, result) waits longer on a dead or half-open connection; the
    connect timeout too. The producer reads the same variable."""
    redis_health_check_interval_s: int = 25
    """A Redis connection idle this long is PINGed before it is used; 0 turns the checks off."""
    redis_tls_insecure: bool = False
    """Accept ``ssl_cert_reqs=none`` in a ``rediss://`` URL (no certificate check), with a warning
    at every start. Without it such a URL, or one that does not name ``ssl_cert_reqs``, is refused."""
    stop_grace_period_s: float | None = None
    """What the container runtime gives a stopping worker before SIGKILL (compose
    ``stop_grace_period``, Kubernetes ``terminationGracePeriodSeconds``), passed in so a grace too
    short for ``TASK_TIME_LIMIT_S`` stops the start; unset means not checked."""
    metrics_bind: str = "127.0.0.1"
    """Address the Prometheus endpoint listens on; the endpoint has no authentication. In a
    container, ``0.0.0.0`` lets a scraper on the container network in."""
    # --- Delivery: broker outages, poison messages, escalations nobody takes (worker/delivery/consumer.py) ---
    publish_retry_s: float = 60.0
    """How long a task keeps retrying what it publishes (a forward, an escalation, the chunks of a
    split batch, their join) while the broker is unreachable; then its own message goes back to
    its queue, to run again, instead of failing."""
    max_task_attempts: int = 3
    """A message delivered more often than this without ever finishing (its worker process died
    running it each time) is dead-lettered: its task fails and the message is kept in the Redis
    list ``spam.dead_letter`` (``python -m producer stats`` shows it)."""
    max_message_bytes: int = 0
    """Task messages with a bigger body are refused before it is decoded (dead-lettered, their task
    failed with ``InvalidInput``); 0 means room for any valid batch: 12 bytes (JSON's escaped worst
    case) per character of ``MAX_BATCH_ITEMS`` x ``MAX_TEXT_CHARS``, plus 1 MiB."""
    escalation_timeout_s: float = 600.0
    """An escalation or forward that no worker of its model takes within this fails with
    ``ModelUnavailable`` (e.g. no EXAONE worker runs), instead of waiting forever."""

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, dotenv: bool = True) -> Settings:
        """Read the settings, loading ``.env`` from the working directory first (it never overrides)."""
        global _process_env
        if env is None:
            if dotenv:
                if _process_env is None:
                    _process_env = dict(os.environ)
                load_dotenv(Path.cwd() / ".env", override=False)
            env = dict(os.environ)
        values: dict[str, object] = {}
        for field in fields(cls):
            raw = env.get(field.name.upper())
            if raw is None:
                continue
            values[field.name] = _parse(field.name, field.type, raw.strip())
        settings = cls(**values)
        settings.validate()
        return settings

    def to_env(self) -> dict[str, str]:
        """The variables that :meth:`from_env` reads back as these settings: how a builder process
        (:mod:`worker.lifecycle.builder`) is told exactly what the worker would load."""
        env = {}
        for field in fields(self):
            value = getattr(self, field.name)
            if value is None:
                text = ""
            elif isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, tuple):
                text = ",".join(str(v) for v in value)
            else:
                text = str(value)
            env[field.name.upper()] = text
        return env

    def with_models_reread(self) -> Settings:
        """These settings with the model, adapter and prompt-file variables read again from ``.env``
        and the process environment (which still wins), as a start would read them now."""
        env = {k: v for k, v in dotenv_values(Path.cwd() / ".env").items() if v is not None}
        env.update(_process_env if _process_env is not None else os.environ)
        fresh = Settings.from_env(env)
        return replace(self, **{name: getattr(fresh, name) for name in MODEL_FIELDS})

    def validate(self) -> None:
        unknown = [m for m in self.preload_models if m not in MODEL_NAMES]
        if unknown:
            raise SettingsError("PRELOAD_MODELS", f"unknown model {unknown[0]!r}; choose from {', '.join(MODEL_NAMES)}")
        _choice("TORCH_DTYPE", self.torch_dtype, DTYPES)
        _choice("MODEL_LOADER", self.model_loader, LOADERS)
        _choice("QUANTIZATION_BITS", self.quantization_bits, QUANTIZATIONS)
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")
                and self.device[5:].isdigit()):
            raise SettingsError("DEVICE", f"{self.device!r} is not one of auto, cpu, cuda, cuda:N")
        if self.max_memory_gb is not None and self.max_memory_gb <= 0:
            raise SettingsError("MAX_MEMORY_GB", "must be a positive number of GB")
        for name in ("snapshot_keep", "batch_size", "max_text_chars", "max_batch_items", "batch_chunk_items",
                     "exaone_max_tokens"):
            if getattr(self, name) < 1:
                raise SettingsError(name.upper(), "must be at least 1")
        if not 0.0 <= self.spam_threshold <= 1.0:
            raise SettingsError("SPAM_THRESHOLD", "must be between 0 and 1")
        if self.batch_wait_ms < 0:
            raise SettingsError("BATCH_WAIT_MS", "must be 0 or a positive number of milliseconds")
        if self.cascade_band is not None:
            low, high = self.cascade_band
            if not 0.0 <= low <= high <= 1.0:
                raise SettingsError("CASCADE_BAND", f"{low},{high} is not low,high with 0 <= low <= high <= 1")
        if self.task_time_limit_s <= 0:
            raise SettingsError("TASK_TIME_LIMIT_S", "must be a positive number of seconds")
        longest = self.task_time_limit_s + 30
        if self.visibility_timeout_s <= longest:
            raise SettingsError("VISIBILITY_TIMEOUT_S", f"{self.visibility_timeout_s:g} s must exceed the longest "
                                f"task, TASK_TIME_LIMIT_S + 30 ({longest:g} s), or Redis delivers running tasks "
                                "a second time")
        if not 0 <= self.metrics_port <= 65535:
            raise SettingsError("METRICS_PORT", "must be a TCP port (1-65535), or 0 for no endpoint")
        if self.torch_threads < 0:
            raise SettingsError("TORCH_THREADS", "must be 0 (automatic) or a positive count")
        if self.load_timeout_s <= 0:
            raise SettingsError("LOAD_TIMEOUT_S", "must be a positive number of seconds")
        for name in ("publish_retry_s", "escalation_timeout_s"):
            if getattr(self, name) <= 0:
                raise SettingsError(name.upper(), "must be a positive number of seconds")
        if self.max_task_attempts < 1:
            raise SettingsError("MAX_TASK_ATTEMPTS", "must be at least 1")
        if self.max_message_bytes < 0:
            raise SettingsError("MAX_MESSAGE_BYTES", "must be 0 (room for any valid batch) or a number of bytes")
        for name in ("celery_broker_url", "celery_result_backend"):
            if "://" not in getattr(self, name):
                raise SettingsError(name.upper(), "must be a URL such as redis://host:6379/0")
            if problem := tls_problem(getattr(self, name), self.redis_tls_insecure):
                raise SettingsError(name.upper(), problem)
        if self.redis_socket_timeout_s < 1:
            raise SettingsError("REDIS_SOCKET_TIMEOUT_S", "must be at least 1 second")
        if self.redis_health_check_interval_s < 0:
            raise SettingsError("REDIS_HEALTH_CHECK_INTERVAL_S", "must be 0 (off) or a number of seconds")
        if self.stop_grace_period_s is not None and self.stop_grace_period_s < longest:
            raise SettingsError("STOP_GRACE_PERIOD_S", f"{self.stop_grace_period_s:g} s is shorter than "
                                f"TASK_TIME_LIMIT_S + 30 ({longest:g} s): a stopping worker would be killed with "
                                "tasks running; raise the grace period (compose stop_grace_period) with it")
        if not _is_host(self.metrics_bind):
            raise SettingsError("METRICS_BIND", f"{self.metrics_bind!r} is not an IP address or host name")

    @property
    def message_bytes_limit(self) -> int:
        """``MAX_MESSAGE_BYTES``, or room for any valid batch when it is 0."""
        return self.max_message_bytes or 12 * self.max_batch_items * self.max_text_chars + (1 << 20)

    @property
    def snapshot_path(self) -> Path:
        if self.snapshot_dir:
            return Path(self.snapshot_dir).expanduser()
        hf_home = os.environ.get("HF_HOME")
        if hf_home:
            return Path(hf_home).expanduser() / "spam-snapshots"
        return Path.home() / ".cache" / "spam-workers" / "snapshots"

    def source(self, name: str) -> ModelSource:
        """The model id and adapter folder configured for ``name``; an empty adapter dir means none."""
        model = getattr(self, f"{name}_model")
        model = str(Path(model).expanduser()) if model.startswith("~") else model
        adapter = getattr(self, f"{name}_adapter_dir")
        prompt = getattr(self, f"{name}_prompt_file", "")
        return ModelSource(name=name, model=model, adapter_dir=Path(adapter).expanduser() if adapter else None,
                           prompt_file=Path(prompt).expanduser() if prompt else None)

    def quantization_for(self, name: str) -> str | None:
        """``4bit``/``8bit`` when ``name`` loads quantized: only EXAONE is; KoELECTRA is too small to gain."""
        return self.quantization_bits if self.use_quantization and name == "exaone" else None


def _parse(name: str, kind: object, raw: str) -> object:
    var = name.upper()
    kind = str(kind)
    if kind == "bool":
        if raw.lower() in _TRUE:
            return True
        if raw.lower() in _FALSE:
            return False
        raise SettingsError(var, f"{raw!r} is not a boolean (use true or false)")
    if kind == "int":
        try:
            return int(raw)
        except ValueError:
            raise SettingsError(var, f"{raw!r} is not a whole number") from None
    if kind in ("float", "float | None"):
        if not raw and kind != "float":
            return None
        try:
            return float(raw)
        except ValueError:
            raise SettingsError(var, f"{raw!r} is not a number") from None
    if kind == "tuple[float, float] | None":
        if not raw:
            return None
        parts = [p.strip() for p in raw.split(",")]
        try:
            if len(parts) == 2:
                return (float(parts[0]), float(parts[1]))
        except ValueError:
            pass
        raise SettingsError(var, f"{raw!r} is not two numbers low,high (e.g. 0.2,0.8), or empty for none")
    if kind == "tuple[str, ...]":
        return tuple(dict.fromkeys(p.strip().lower() for p in raw.split(",") if p.strip()))
    return raw.lower() if name in ("torch_dtype", "device", "model_loader", "quantization_bits") else raw


def _is_host(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
        return True
    except ValueError:
        return bool(re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,252}[A-Za-z0-9])?", value))


def _choice(var: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise SettingsError(var, f"{value!r} is not one of {', '.join(allowed)}")
