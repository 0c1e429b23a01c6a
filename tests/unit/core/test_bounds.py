"""The precision class comes from what the weights are stored as, not from the file's type label."""

from __future__ import annotations

import math

import pytest

from pytest_convdiff.core import bounds
from pytest_convdiff.core.weight_errors import TYPE_ERROR


def _gguf(label: str, types: dict[str, float]) -> dict:
    return {"quantization": label, "extra": {"tensor_types": types}}


def test_weight_noise_is_the_rms_of_the_types_errors_by_share():
    assert bounds.weight_noise({"Q8_0": 1.0}) == pytest.approx(TYPE_ERROR["Q8_0"])
    # F32 norms are exact: half the weights in F32 and half in Q4_0 carry Q4_0's error times sqrt(1/2)
    assert bounds.weight_noise({"F32": 0.5, "Q4_0": 0.5}) == pytest.approx(TYPE_ERROR["Q4_0"] * math.sqrt(0.5))
    mixed = math.sqrt(0.8 * TYPE_ERROR["Q4_0"] ** 2 + 0.2 * TYPE_ERROR["Q3_K"] ** 2)
    assert bounds.weight_noise({"Q4_0": 0.8, "Q3_K": 0.2}) == pytest.approx(mixed)
    # shares or element counts: only the proportions matter
    assert bounds.weight_noise({"Q4_0": 800, "Q3_K": 200}) == pytest.approx(mixed)


@pytest.mark.parametrize(("noise", "cls"), [
    (0.0, "float"), (TYPE_ERROR["F16"], "float"), (TYPE_ERROR["BF16"], "bf16"), (TYPE_ERROR["Q8_0"], "q8"),
    (TYPE_ERROR["Q6_K"], "q5-6"), (TYPE_ERROR["Q5_0"], "q5-6"), (TYPE_ERROR["Q4_K"], "q4"),
    (TYPE_ERROR["Q4_0"], "q4"), (TYPE_ERROR["Q3_K"], "q2-3"), (TYPE_ERROR["Q2_K"], "q2-3"),
])
def test_each_pure_type_falls_in_its_class(noise, cls):
    assert bounds.class_of_noise(noise) == cls


def test_the_stored_types_decide_not_the_label():
    # a "Q4_K_M" whose rows fell back to Q5_0 and Q8_0 (SmolLM2's 576-wide rows do not fit K-quants)
    assert bounds.precision_class(_gguf("Q4_K_M", {"Q5_0": 0.6, "Q8_0": 0.3, "Q6_K": 0.1})) == "q5-6"
    # a "Q2_K" that is mostly Q4_0, with a fifth in Q3_K: q4, not q2-3 (and not q5-6, as its 5 bits would say)
    assert bounds.precision_class(_gguf("Q2_K", {"Q4_0": 0.8, "Q3_K": 0.2})) == "q4"
    # a "Q8_0" file is q8 whatever share of F32 norms it holds
    assert bounds.precision_class(_gguf("Q8_0", {"Q8_0": 0.99, "F32": 0.01})) == "q8"
    # a genuine all-Q2_K file stays in the loosest class
    assert bounds.precision_class(_gguf("Q2_K", {"Q2_K": 0.9, "Q3_K": 0.1})) == "q2-3"


def test_without_tensor_types_the_label_or_dtype_decides():
    assert bounds.precision_class({"quantization": "Q5_K_M"}) == "q5-6"
    assert bounds.precision_class({"quantization": "BF16"}) == "bf16"
    assert bounds.precision_class({"dtype": "torch.float16"}) == "float"
    assert bounds.precision_class({"extra": {"bits": 4.0}}) == "q4"  # EXL2 states its bits per weight


def test_a_pair_takes_the_less_precise_class():
    q4 = _gguf("Q4_0", {"Q4_0": 1.0})
    assert bounds.pair_class({"dtype": "bfloat16"}, {"dtype": "float32"}) == "bf16"
    assert bounds.pair_class({"dtype": "float32"}, q4) == "q4"
