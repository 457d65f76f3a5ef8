"""Build the demo models: tiny random-weight bases in the real layouts, with LoRA adapters trained
on a small SYNTHETIC Korean spam/ham set, for trying the service without the Hub.

The adapters have learnt the synthetic set (spam near 1, ham near 0 on messages like it), and a
held-out split is written next to them as a labeled file (``data/heldout.jsonl`` and ``.csv``) to
evaluate them on. The data is synthetic: the figures say the demo works, nothing about real spam.

Prints the environment variables that point the worker at the models (``scripts/run`` evals them),
plus ``DEMO_HELDOUT``. Rebuilds when the recipe changes: a stamp file records a hash of the scripts
and factories that make the models and the library versions that train them.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _p in (str(ROOT), str(ROOT / "scripts")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

STAMP = "recipe.txt"
PARTS = ("koelectra", "koelectra-spam-lora", "exaone", "exaone-spam-lora", "data")
RECIPE_FILES = ("scripts/demo_models.py", "scripts/demo_data.py", "scripts/demo_train.py", "tests/factories.py")


def recipe() -> str:
    """What the demo models are a function of: the code that builds them and the library versions."""
    import peft
    import tokenizers
    import torch
    import transformers

    digest = hashlib.sha256()
    for name in RECIPE_FILES:
        digest.update(name.encode() + b"\0" + (ROOT / name).read_bytes() + b"\0")
    versions = f"torch {torch.__version__} transformers {transformers.__version__} peft {peft.__version__} " \
               f"tokenizers {tokenizers.__version__}"
    return f"{digest.hexdigest()[:16]} {versions}\n"


def ensure(root: Path) -> bool:
    """Build the demo under ``root`` unless it is complete and from the current recipe; True if built."""
    want = recipe()
    stamp = root / STAMP
    if stamp.is_file() and stamp.read_text() == want and all((root / p).is_dir() for p in PARTS):
        return False
    import demo_train

    print(f"demo: building the demo models in {root} (tiny models, LoRA training on synthetic data; "
          "under a minute on two cores)", file=sys.stderr, flush=True)
    stamp.unlink(missing_ok=True)
    for part in PARTS:
        shutil.rmtree(root / part, ignore_errors=True)
    # stdout carries the exports; the tokenizer trainers write progress lines to it from Rust.
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        metrics = demo_train.build(root)
    finally:
        os.dup2(saved, 1)
        os.close(saved)
    print(f"demo: {demo_train.summary(metrics)}", file=sys.stderr, flush=True)
    stamp.write_text(want)
    return True


def main(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    ensure(root)
    q = shlex.quote
    print(f"export KOELECTRA_MODEL={q(str(root / 'koelectra'))} "
          f"KOELECTRA_ADAPTER_DIR={q(str(root / 'koelectra-spam-lora'))}")
    print(f"export EXAONE_MODEL={q(str(root / 'exaone'))} EXAONE_ADAPTER_DIR={q(str(root / 'exaone-spam-lora'))}")
    print(f"export DEMO_HELDOUT={q(str(root / 'data' / 'heldout.jsonl'))}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else ".cache/demo-models").resolve())
