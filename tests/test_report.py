"""The terminal summary and the JSON report, from hand-made payloads."""

from __future__ import annotations

import json

from pytest_convdiff import report


def _payload(check, value, outcome, order, layers=None, fdl=None):
    name, _, param = check.partition("[")
    return {"pair": "p", "header": {"id": "p", "model_a": "a", "model_b": "b", "backend_a": "transformers",
                                    "backend_b": "llama.cpp", "error": None, "first_divergent_layer": fdl,
                                    "divergent_sublayer": "mlp" if fdl is not None else None,
                                    "precision_class": "float", "layers": layers or [], "from_cache": {"A": True},
                                    "metrics": {"nmse": 0.5, "nmse_db": -3.0, "nmse_label": "poor match"},
                                    "notes": ["a note"]},
            "check": {"name": name, "param": param.rstrip("]"), "value": value, "threshold": 0.02,
                      "outcome": outcome, "message": "m", "order": order}}


def test_summary_and_json_from_payloads_in_any_order(tmp_path):
    layers = [{"index": 0, "rfn": 0.001}, {"index": 1, "rfn": 0.5}]
    store: dict = {}
    for p in [_payload("rfn[layer-1]", 0.5, "failed", 3, layers, 1), _payload("tokens[x]", 0.0, "passed", 0),
              _payload("tokens[y]", 0.0, "passed", 1), _payload("rfn[layer-0]", 0.001, "passed", 2, layers, 1)]:
        report.merge_payload(store, p)
    (pair,) = report.build_pairs(store, ["p"])
    assert [c["param"] for c in pair["checks"]] == ["x", "y", "layer-0", "layer-1"]  # plan order, not arrival
    assert pair["verdict"] == "fail" and pair["first_divergent_layer"] == 1
    lines = report.summary_lines([pair])
    text = "\n".join(lines)
    assert lines[0].startswith("FAIL  p  [transformers -> llama.cpp, bounds: float, A from cache]")
    assert "tokens            2       0  0 " in text  # equal values: no misleading "worst" prompt
    assert "0.5 (layer-1)" in text and "first divergent layer: 1 (mlp first)" in text and "note: a note" in text
    report.write_json(tmp_path / "r.json", [pair])
    assert json.loads((tmp_path / "r.json").read_text())["pairs"][0]["id"] == "p"
