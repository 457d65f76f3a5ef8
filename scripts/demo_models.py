"""Build tiny random-weight models in the real layouts, for trying the service without the Hub.

The scores they give are meaningless (random weights, around 0.5); they exercise the real loading,
queueing and result path. Prints the environment variables that point the worker at them.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests import factories  # noqa: E402


def main(root: Path) -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    if not (root / "exaone-spam-lora" / "adapter_config.json").is_file():
        koelectra = factories.build_koelectra(root / "koelectra")
        factories.build_koelectra_adapter(root / "koelectra-spam-lora", koelectra)
        exaone = factories.build_exaone(root / "exaone")
        factories.build_exaone_adapter(root / "exaone-spam-lora", exaone)
    print(f"export KOELECTRA_MODEL={root / 'koelectra'} KOELECTRA_ADAPTER_DIR={root / 'koelectra-spam-lora'}")
    print(f"export EXAONE_MODEL={root / 'exaone'} EXAONE_ADAPTER_DIR={root / 'exaone-spam-lora'}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else ".cache/demo-models").resolve())
