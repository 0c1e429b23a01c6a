"""An example of a user's own check on top of the generated ones.

Run with the generated checks:
    pytest examples --model-a fixtures/models/tiny-llama --model-b fixtures/models/tiny-llama-bf16
The ``convdiff_pair`` fixture is parametrized over every --model-b and hands over
both models' cached outputs; nothing is recomputed.
"""

from __future__ import annotations

import numpy as np


def test_last_token_prediction_survives_conversion(convdiff_pair):
    """The seed scripts look at the last position only; here, on every prompt: A's next-token
    prediction must stay among B's five most likely tokens."""
    for prompt in convdiff_pair.corpus:
        a = np.asarray(convdiff_pair.a.logits(prompt.id))[-1]
        b = np.asarray(convdiff_pair.b.logits(prompt.id))[-1]
        top5_b = np.argsort(-b)[:5]
        assert int(a.argmax()) in top5_b, f"prompt {prompt.id!r}: A's argmax {a.argmax()} not in B's top-5 {top5_b}"
