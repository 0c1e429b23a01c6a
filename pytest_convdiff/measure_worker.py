"""A file-only measurement made in a worker process while this one reads the configuration.

The families that read only the two files come first in a pair, before any model runs: the config check,
then the weights check (``CheckFamily.measure_apart``). The config check's first read of a GGUF imports
torch and transformers, seconds of work on one core, which the imports hold under the GIL, so a thread
cannot use the other core meanwhile. A worker process can: it measures the weights while this process
imports, and the weights check then reads its value instead of measuring (SmolLM2's cold run, a Q4_1 GGUF
against its checkpoint: 3.5 s for the config read, the weights and A's load one after another in one
process, 4.6-5.3 s before; ``docs/performance.md``).

The worker runs the family's own ``measure`` on the same specs, settings and plan, so its value is the one
this process would make. It is used only where it can pay for its start (about 0.3 s here: python, numpy and
the check's modules): this process's share of the cores is at least two (``core.threads``; not under
``pytest -n`` on two cores, where the other core runs the other worker), and the two models' files hold at
least ``WORKER_MIN_BYTES``. A worker that cannot start, fails, or answers with anything but a value gives
nothing, and the family measures in this process as it did before: its own errors are raised here, where
they are reported.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import sources
from .core import threads

__all__ = ["WORKER_MIN_BYTES", "Worker", "file_bytes", "serve", "start", "worth_a_worker"]

# Below this, the weights check takes about as long as a worker's start (0.25-0.3 s for 256 MiB of files on the
# 2-core machine of docs/performance.md; SmolLM2's 517 MiB checkpoint and 80 MiB GGUF about 1 s).
WORKER_MIN_BYTES = 256 << 20

# The worker's first lines: the request's sys.path before any of this package is imported (pickle imports the
# specs' classes), so it runs this process's code, wherever it was imported from.
_BOOT = ("import pickle, sys; r = pickle.load(sys.stdin.buffer); sys.path[:] = r['path']; "
         "from pytest_convdiff.measure_worker import serve; serve(r['payload'])")


def file_bytes(spec: Any) -> int:
    """The bytes of the files a model's tensors are read from (0 for a source that has none, or is unreadable)."""
    try:
        if not spec.can(sources.TENSORS):
            return 0
        from .backends import backend_module

        files = backend_module(spec.resolved_backend()).fingerprint_files(Path(spec.path))
        return sum(Path(f).stat().st_size for f in files)
    except Exception:  # noqa: BLE001 - only a guess of the work: an unreadable model is measured (and reported) here
        return 0


def worth_a_worker(spec_a: Any, spec_b: Any) -> bool:
    """Whether a worker can pay for its start: a core of this process's share to run on, and enough to read."""
    if threads.default_threads() < 2 or not sys.executable:
        return False
    return file_bytes(spec_a) + file_bytes(spec_b) >= WORKER_MIN_BYTES


@dataclass
class Worker:
    """A measurement under way in a worker process."""

    family: str
    proc: subprocess.Popen[bytes]

    def value(self) -> tuple[bool, Any]:
        """(True, the family's measurement) once the worker has answered; (False, None) when it gave nothing."""
        try:
            assert self.proc.stdout is not None
            out = self.proc.stdout.read()
            self.proc.wait()
        except BaseException:
            self.cancel()
            raise
        finally:
            self._close()
        if self.proc.returncode != 0:
            return False, None
        try:
            reply = pickle.loads(out)
        except Exception:  # noqa: BLE001 - a worker that died writing: measured here instead
            return False, None
        if not isinstance(reply, dict) or reply.get("family") != self.family or "value" not in reply:
            return False, None
        return True, reply["value"]

    def cancel(self) -> None:
        """Stop it (a pair that ended before reading its value)."""
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self._close()

    def _close(self) -> None:
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None and not stream.closed:
                stream.close()


def start(family: str, spec_a: Any, spec_b: Any, settings: Any, plan: list[Any] | None) -> Worker | None:
    """A worker measuring ``family`` for these two models, or None when none could start (options that cannot be
    sent to another process, say: the family then measures in this one)."""
    try:
        payload = pickle.dumps({"family": family, "spec_a": spec_a, "spec_b": spec_b, "settings": settings,
                                "plan": plan})
    except Exception:  # noqa: BLE001 - pickle raises several types (PicklingError, TypeError, AttributeError)
        return None
    request = pickle.dumps({"path": list(sys.path), "payload": payload})
    try:
        proc = subprocess.Popen([sys.executable, "-c", _BOOT], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL)
    except OSError:
        return None
    try:
        assert proc.stdin is not None
        proc.stdin.write(request)
        proc.stdin.close()
    except OSError:
        worker = Worker(family, proc)
        worker.cancel()
        return None
    return Worker(family, proc)


def context(spec_a: Any, spec_b: Any, settings: Any, plan: list[Any] | None) -> Any:
    """What a ``measure_apart`` family's ``measure`` may read: the two specs, the settings and the plan."""
    from .checks.base import EvalContext

    return EvalContext(None, None, None, None, settings, None, _no_metrics, plan=plan, spec_a=spec_a,
                       spec_b=spec_b)


def _no_metrics() -> Any:
    raise RuntimeError("a file-only measurement has no pair metrics")


def serve(payload: bytes) -> None:
    """The worker's side: measure and write ``{"family", "value"}`` to stdout (an exception exits non-zero)."""
    from . import checks

    req = pickle.loads(payload)
    family = next(f for f in checks.families() if f.name == req["family"] and f.measure_apart)
    value = family.measure(context(req["spec_a"], req["spec_b"], req["settings"], req["plan"]))
    out = pickle.dumps({"family": family.name, "value": value})
    sys.stdout.buffer.write(out)
    sys.stdout.buffer.flush()
