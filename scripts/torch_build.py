#!/usr/bin/env python3
"""Make sure .venv ends with a CUDA build of torch on a host with an NVIDIA GPU (run by bootstrap).

``torch==2.13.0`` is satisfied by a CPU build (``2.13.0+cpu``, which a local wheel folder may
offer, and which pip then prefers: a local version sorts above the plain one), and bootstrap's stamp
does not change with the host, so a GPU host could keep a CPU build for good. On a host whose
driver exposes ``/dev/nvidiaN``, this checks the installed build, reinstalls torch with the CPU
build excluded (``torch==X,!=X+cpu``) when it is not a CUDA one, and stops with a line saying how
to get one if that did not help. Hosts without an NVIDIA GPU are left alone.

    scripts/torch_build.py .venv/bin/python 'torch==2.13.0'
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

OK, INSTALL, STOP = "ok", "install", "stop"


def nvidia_devices(root: Path = Path("/")) -> list[str]:
    return sorted(p.name for p in (root / "dev").glob("nvidia[0-9]*"))


def decide(gpus: list[str], version: str | None, cuda: str | None, tried: bool) -> str:
    """``ok`` (no GPU, or a CUDA build already), ``install`` (a GPU and no CUDA build yet), or
    ``stop`` (a GPU, and the reinstall still gave no CUDA build)."""
    if not gpus or (version and cuda):
        return OK
    return STOP if tried else INSTALL


def cuda_spec(spec: str) -> str:
    """``torch==X`` becomes ``torch==X,!=X+cpu``; any other spec is the caller's choice, kept."""
    match = re.fullmatch(r"torch==([0-9][0-9.]*)", spec.strip())
    return f"torch=={match[1]},!={match[1]}+cpu" if match else spec


def probe(python: str) -> tuple[str | None, str | None]:
    """The installed torch's version and CUDA version (None, None when torch does not import)."""
    out = subprocess.run([python, "-c", "import torch; print(torch.__version__, torch.version.cuda or '-')"],
                         capture_output=True, text=True, check=False)
    if out.returncode:
        return None, None
    version, cuda = out.stdout.split()[-2:]
    return version, None if cuda == "-" else cuda


def ensure(python: str, spec: str, root: Path = Path("/"), run: Callable = subprocess.run,
           say: Callable[[str], None] = lambda line: print(line, file=sys.stderr)) -> int:
    gpus = nvidia_devices(root)
    tried = False
    while True:
        version, cuda = probe(python)
        action = decide(gpus, version, cuda, tried)
        if action == OK:
            if gpus:
                say(f"bootstrap: torch {version} (CUDA {cuda}) for {', '.join(gpus)}")
            return 0
        if action == STOP:
            say(f"bootstrap: this host has an NVIDIA GPU ({', '.join(gpus)}) but .venv has torch {version or 'none'}, "
                f"not a CUDA build, and pip found none for {cuda_spec(spec)!r}. Get one with PIP_FIND_LINKS= "
                "PIP_INDEX_URL=https://download.pytorch.org/whl/cu128 scripts/bootstrap (the PyTorch index for your "
                "CUDA driver), or TORCH_CUDA_SPEC=/path/to/a/cuda/torch.whl scripts/bootstrap.")
            return 1
        target = os.environ.get("TORCH_CUDA_SPEC") or cuda_spec(spec)
        say(f"bootstrap: {', '.join(gpus)} found but torch {version or 'none'} is not a CUDA build: installing "
            f"{target!r}")
        run([python, "-m", "pip", "install", "-q", "--force-reinstall", "--no-deps", target], check=False)
        tried = True


if __name__ == "__main__":
    sys.exit(ensure(sys.argv[1], sys.argv[2]))
