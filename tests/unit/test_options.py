"""Options from one table: each row names its parser and the RunSettings field it sets, and a bad value is
a usage error that names the option (pytest_convdiff/options.py, plugin/session.py)."""

from __future__ import annotations

import dataclasses

import pytest

from pytest_convdiff import options as option_values
from pytest_convdiff.core.settings import RunSettings
from pytest_convdiff.options import OPTIONS


def test_every_row_names_a_parser_and_every_run_setting_has_one_option():
    assert all(o.parse in option_values.PARSERS for o in OPTIONS), [o.ini for o in OPTIONS
                                                                    if o.parse not in option_values.PARSERS]
    fields = [o.setting for o in OPTIONS if o.setting]
    assert len(fields) == len(set(fields))
    assert set(fields) == {f.name for f in dataclasses.fields(RunSettings)}


@pytest.mark.parametrize(("kind", "raw", "expected"), [
    ("int>=2", "8", 8), ("int>=0", "0", 0), ("negated", True, False), ("negated", False, True),
    ("cache_dtype", "fp16", "float16"), ("store", "FULL", "full"), ("runtime_twin", "off", "off"),
    ("weights_twin", " Sampled", "sampled"),
    ("backend", "gguf", "llama.cpp"), ("backend_items", ["n_ctx=8,flash_attn=false"], {"n_ctx": "8", "flash_attn": "false"}),
    ("bounds", ["rfn=0.1", "kl_mean=0.02"], {"rfn": 0.1, "kl_mean": 0.02}), ("texts", ["a", " ", "b"], ["a", "b"]),
    ("text", None, None), ("bounds", [], None), ("shard", "2/4", (2, 4)), ("shard", " 1/1 ", (1, 1)),
])
def test_parsers_read_text_as_the_setting_wants_it(kind, raw, expected):
    assert option_values.parse(kind, raw) == expected


@pytest.mark.parametrize(("kind", "raw", "says"), [
    ("int>=2", "1", "expected an integer >= 2"), ("int>=1", "two", "expected an integer >= 1"),
    ("cache_dtype", "int8", "not one of float32, float16"), ("store", "tiny", "not one of compact, full"),
    ("weights_twin", "half", "not one of auto, full, sampled"),
    ("backend", "mlx", "known backends"), ("shard", "5/4", "1 <= K <= N"), ("shard", "2", "K/N"), ("bounds", ["rfn"], "NAME=VALUE"), ("size", "lots", "not a size .accepted: 20GB"),
])
def test_a_bad_value_says_what_is_accepted(kind, raw, says):
    with pytest.raises(Exception, match=says):
        option_values.parse(kind, raw)


def test_a_bad_value_on_the_command_line_is_a_usage_error_naming_the_option(pytester):
    res = pytester.runpytest_subprocess("--model-a", "x", "--model-b", "y", "--convdiff-greedy-tokens", "-3")
    assert res.ret == pytest.ExitCode.USAGE_ERROR
    assert "--convdiff-greedy-tokens: expected an integer >= 0, got '-3'" in res.stderr.str()
