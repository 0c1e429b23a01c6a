"""Backend ``reference``: a saved convdiff reference (``--convdiff-save-reference``), not a live model.

A reference holds model A's outputs over a corpus, so it can only be model A: the
runner serves it with ``pytest_convdiff.reference.load_reference_run`` and never
calls ``load``. ``probe`` reads the safetensors header only (the model's info as
it was when the reference was saved), so collection stays cheap.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import ModelLoadError
from .base import ModelInfo

NAME = "reference"


def library_version() -> str:
    from ..reference import plugin_version

    return plugin_version()


def fingerprint_files(path: Path) -> list[Path]:
    return [Path(path)]


def probe(path: Path, options: dict[str, Any] | None = None) -> ModelInfo:  # noqa: ARG001 - no options
    """The saved model's info (layers, vocabulary, dtype, its backend) from the reference's header."""
    from ..reference import HEADER_KEY, _not_reference, read_header

    path = Path(path)
    if path.is_dir():
        raise ModelLoadError(f"{path}: a convdiff reference is one file, not a directory.")
    hdr = read_header(path)
    if HEADER_KEY not in hdr.metadata:
        raise _not_reference(path, "a safetensors file without a convdiff header, e.g. model weights")
    try:
        info = json.loads(hdr.metadata["meta"])["info"]
    except (KeyError, ValueError, TypeError) as exc:
        raise _not_reference(path, f"its convdiff header has no model info ({exc!r})") from exc
    fields = set(ModelInfo.__dataclass_fields__)
    known = {k: v for k, v in info.items() if k in fields}
    known["extra"] = {**(known.get("extra") or {}), "reference": str(path),
                      "reference_created": hdr.metadata.get("created"),
                      "reference_of": hdr.metadata.get("model")}
    known.setdefault("path", str(path))
    known.setdefault("backend", NAME)
    return ModelInfo(**known)


def load(path: Path, options: dict[str, Any] | None = None) -> Any:  # noqa: ARG001
    raise ModelLoadError(
        f"{path}: a saved convdiff reference holds model A's outputs, not a model that can be run: it can "
        f"only be given as model A (--model-a, or compare(model_a=...)), where its outputs are read from the "
        f"file. Pass the converted model itself as --model-b."
    )
