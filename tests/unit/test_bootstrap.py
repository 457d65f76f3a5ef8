"""What bootstrap decides about torch, given what the host has (scripts/torch_build.py, run with a
stand-in for the venv's python that reports a torch build and records pip's invocations)."""

from __future__ import annotations

import importlib.util
import stat
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("torch_build", ROOT / "scripts" / "torch_build.py")
torch_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(torch_build)

_FAKE_PYTHON = """#!/bin/sh
# Stands for .venv/bin/python: "-c" reports the installed torch; "-m pip install" records its
# arguments and installs what AFTER says pip would find.
dir=$(dirname "$0")
if [ "$1" = "-c" ]; then
  [ "$(cat "$dir/state")" = none ] && exit 1
  cat "$dir/state"
else
  echo "$@" >> "$dir/pip.log"
  cp "$dir/after" "$dir/state"
fi
"""


class Host:
    def __init__(self, root: Path, gpus: list[str], installed: str, pip_finds: str) -> None:
        (root / "dev").mkdir(parents=True)
        for name in [*gpus, "nvidiactl"] if gpus else []:
            (root / "dev" / name).touch()
        self.root = root
        self.python = root / "python"
        self.python.write_text(_FAKE_PYTHON)
        self.python.chmod(self.python.stat().st_mode | stat.S_IEXEC)
        (root / "state").write_text(installed)
        (root / "after").write_text(pip_finds)
        self.lines: list[str] = []

    def ensure(self, spec: str = "torch==2.13.0") -> int:
        return torch_build.ensure(str(self.python), spec, self.root, say=self.lines.append)

    @property
    def pip_calls(self) -> list[str]:
        log = self.root / "pip.log"
        return log.read_text().splitlines() if log.exists() else []


@pytest.mark.parametrize("installed", ["2.13.0+cpu -", "2.13.0 12.8", "none"])
def test_a_host_without_nvidia_gpu_keeps_what_it_has(tmp_path, installed):
    host = Host(tmp_path, [], installed, "2.13.0 12.8")
    assert host.ensure() == 0 and host.pip_calls == [] and host.lines == []


def test_a_gpu_host_with_a_cuda_build_is_left_alone(tmp_path):
    host = Host(tmp_path, ["nvidia0"], "2.13.0 12.8", "x")
    assert host.ensure() == 0 and host.pip_calls == []
    assert host.lines == ["bootstrap: torch 2.13.0 (CUDA 12.8) for nvidia0"]


def test_a_gpu_host_with_a_cpu_build_reinstalls_torch_without_the_cpu_build(tmp_path):
    host = Host(tmp_path, ["nvidia0", "nvidia1"], "2.13.0+cpu -", "2.13.0 12.8")
    assert host.ensure() == 0
    assert host.pip_calls == ["-m pip install -q --force-reinstall --no-deps torch==2.13.0,!=2.13.0+cpu"]
    assert host.lines[-1] == "bootstrap: torch 2.13.0 (CUDA 12.8) for nvidia0, nvidia1"


def test_a_gpu_host_where_pip_finds_no_cuda_build_stops_with_how_to_get_one(tmp_path):
    host = Host(tmp_path, ["nvidia0"], "2.13.0+cpu -", "2.13.0+cpu -")
    assert host.ensure() == 1
    assert len(host.pip_calls) == 1  # one try, then stop
    assert host.lines[-1].startswith("bootstrap: this host has an NVIDIA GPU (nvidia0) but .venv has torch "
                                     "2.13.0+cpu, not a CUDA build")
    assert "PIP_INDEX_URL=https://download.pytorch.org/whl/cu128 scripts/bootstrap" in host.lines[-1]


def test_a_gpu_host_without_torch_gets_the_cuda_build(tmp_path):
    host = Host(tmp_path, ["nvidia0"], "none", "2.13.0 12.8")
    assert host.ensure() == 0 and len(host.pip_calls) == 1


@pytest.mark.parametrize(("spec", "expected"), [("torch==2.13.0", "torch==2.13.0,!=2.13.0+cpu"),
                                                ("torch>=2.5", "torch>=2.5"),
                                                ("/wheels/torch-2.13.0-cp311.whl", "/wheels/torch-2.13.0-cp311.whl")])
def test_only_a_pinned_version_is_narrowed(spec, expected):
    assert torch_build.cuda_spec(spec) == expected


def test_bootstrap_runs_the_check_on_a_gpu_host_every_time():
    """The stamp only covers the spec: the build check must sit outside its `if`."""
    script = (ROOT / "scripts" / "bootstrap").read_text()
    check = script.index("scripts/torch_build.py .venv/bin/python")
    assert script.rindex("\nfi\n", 0, check) > script.index('echo "$want" > "$stamp"')
