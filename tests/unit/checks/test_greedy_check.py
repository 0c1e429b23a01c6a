"""The greedy check's B side: teacher-forced on A's continuation, from the state B's run over the prompt kept."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from pytest_convdiff.backends.base import ForwardOutput, logits_from
from pytest_convdiff.checks import greedy
from pytest_convdiff.core.corpus import Corpus, Prompt
from pytest_convdiff.core.settings import RunSettings
from pytest_convdiff.runner import ProduceContext

V = 11


def _logits(tokens: list[int]) -> np.ndarray:
    """A causal toy model: position i's logits depend on tokens[: i + 1] only."""
    out = np.zeros((len(tokens), V), dtype=np.float32)
    for i in range(len(tokens)):
        out[i, sum(tokens[: i + 1]) % V] = 1.0
    return out


class Plain:
    def __init__(self) -> None:
        self.runs: list[int] = []

    def forward(self, tokens, hidden_states=True, inject=None):
        self.runs.append(len(tokens))
        return ForwardOutput(logits=_logits(list(tokens)))


class Keeper(Plain):
    def __init__(self) -> None:
        super().__init__()
        self.asked: list[tuple[int, ...]] = []

    def keep_prefixes(self, prefixes):
        self.asked = [tuple(p) for p in prefixes]

    def forward_from(self, tokens, start):
        self.runs.append(len(tokens) - start)
        return _logits(list(tokens))[start:]


CORPUS = Corpus((Prompt("one", "a"), Prompt("long", "b", kind="long"), Prompt("two", "c"), Prompt("three", "d")))
INPUTS = {"one": [1, 2, 3, 4, 5], "long": list(range(30)), "two": [7], "three": [2, 2, 2, 2]}


def _feed(greedy_meta: dict) -> SimpleNamespace:
    return SimpleNamespace(meta={"greedy": greedy_meta}, inputs=lambda pid: np.asarray(INPUTS[pid]))


A_GREEDY = {"one": {"prefix_len": 4, "generated": [6, 9, 1]}, "two": {"prefix_len": 1, "generated": [3, 3]},
            "three": {"prefix_len": 3, "generated": [5, 8]}}


def test_the_kept_prefixes_are_each_forced_run_before_its_first_compared_position():
    assert greedy.forced_prefixes(_feed(A_GREEDY), CORPUS) == [[1, 2, 3], [2, 2]]  # "two": a 1-token prefix keeps nothing
    assert greedy.forced_prefixes(None, CORPUS) == []  # A decodes by itself


def _produce(backend) -> dict:
    ctx = ProduceContext(backend, SimpleNamespace(path="b"), CORPUS, _feed(A_GREEDY), RunSettings(greedy_tokens=3),
                         [p.id for p in CORPUS], None, None, lambda *_: None, "B ")
    return greedy.produce(ctx)


def test_b_is_forced_from_the_kept_state_and_gets_what_a_whole_run_gives():
    keeper, plain = Keeper(), Plain()
    got, whole = _produce(keeper), _produce(plain)
    assert got == whole  # the same records either way
    assert keeper.runs == [3, 2, 2]  # only from each prefix's last token on (the whole runs: 6, 2, 4 tokens)
    assert plain.runs == [6, 2, 4]
    forced = [1, 2, 3, 4] + [6, 9]
    assert got["one"]["generated"] == [int(r.argmax()) for r in _logits(forced)[3:]]
    assert got["one"]["teacher_forced"] and got["one"]["prefix_len"] == 4


def test_logits_from_cuts_a_whole_forward_where_the_backend_keeps_no_state():
    backend = Plain()
    np.testing.assert_array_equal(logits_from(backend, [1, 2, 3, 4], 2), _logits([1, 2, 3, 4])[2:])
    assert backend.runs == [4]
