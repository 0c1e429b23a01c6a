"""The plugin's options: one namespace (``--model-a``, ``--model-b``, ``--convdiff-*``), each also an
ini/pyproject key, declared once in ``pytest_convdiff.options`` (loaded in every pytest run where the
plugin is installed: it imports only the standard library). Values are parsed and validated in
``session``, and only when one of these options (or a manifest) is in play.
"""

from __future__ import annotations

from typing import Any

import pytest

from ..options import OPTIONS


def add_options(parser: pytest.Parser) -> None:
    group = parser.getgroup("convdiff", "model-conversion checks (pytest-convdiff)")
    for o in OPTIONS:
        kw: dict[str, Any] = {"dest": o.ini, "help": o.help}
        if o.action:
            kw["action"] = o.action
        if o.metavar and o.action != "store_true":
            kw["metavar"] = o.metavar
        kw["default"] = False if o.action == "store_true" else None
        group.addoption(*o.flags, **kw)
        if not o.cli_only:
            default: Any = [] if o.ini_type == "linelist" else False if o.ini_type == "bool" else None
            parser.addini(o.ini, help=o.help, type=o.ini_type, default=default)


def value(config: pytest.Config, name: str) -> Any:
    """Command line first, then ini/pyproject."""
    v = config.getoption(name)
    if v in (None, [], False):
        opt = next(o for o in OPTIONS if o.ini == name)
        if not opt.cli_only:
            v = config.getini(name)
    return v


def in_play(config: pytest.Config) -> bool:
    """Whether any convdiff option is set (command line or ini): only then does the plugin do anything."""
    return any(value(config, o.ini) not in (None, "", [], False) for o in OPTIONS)
