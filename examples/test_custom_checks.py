"""An example of a user's own check on top of the generated ones.

Run with the generated checks:
    pytest examples --model-a fixtures/models/tiny-llama --model-b fixtures/models/tiny-llama-bf16
The ``convdiff_pair`` fixture is parametrized over every --model-b and hands over
both models' cached outputs; nothing is recomputed.
"""

from __future__ import annotations

import numpy as np


def test_last_token_argmax_agrees_on_every_prompt(convdiff_pair):
    """The seed scripts' check (last position only), kept as one extra item."""
    for prompt in convdiff_pair.corpus:
        a = np.asarray(convdiff_pair.a.logits(prompt.id))[-1]
        b = np.asarray(convdiff_pair.b.logits(prompt.id))[-1]
        assert int(a.argmax()) == int(b.argmax()), f"prompt {prompt.id!r}: argmax {a.argmax()} vs {b.argmax()}"
