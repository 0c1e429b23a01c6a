"""llama-perplexity's statistics, defined as ``tools/perplexity/perplexity.cpp`` defines them.

People who check quantisations with ``llama-perplexity --kl-divergence`` compare against published
figures (mean KLD, Same top p, RMS delta-p, each with its error). To be comparable, the numbers here
follow that tool's arithmetic, not our own metrics':

- per scored token: ``nll`` of the next token under Q (the model tested) and under the base, the KL
  divergence KL(base || Q) over the vocabulary entries whose base log-probability lies above -16
  (the 16-nat range the base file encodes), whether both argmaxes agree, and
  ``delta p = p_Q(token) - p_base(token)``;
- corpus-wide: running sums (``Sums``), each error a standard error ``sqrt(var / (n - 1))`` that is
  reported as 0 below 11 tokens, the PPL ratio's error through the covariance of the two
  log-perplexities, RMS delta-p's error by the delta method, percentiles interpolated as it does.

``encode_rows`` / ``decode_rows`` are the base file's uint16 log-probability rows
(``store.kld_file`` reads and writes the file around them). Float32 is used where the C++ uses float,
so a row encoded here is the row llama-perplexity writes for the same logits.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

LOG_PROB_FLOOR = -16.0  # the base rows encode log-probabilities within 16 nats of the top one
MIN_TOKENS = 100  # llama-perplexity prints its final statistics only from this many scored tokens
KLD_QUANTILES = (("max", 1.0), ("99.9", 0.999), ("99", 0.99), ("95", 0.95), ("90", 0.90), ("median", 0.5),
                 ("10", 0.10), ("5", 0.05), ("1", 0.01), ("0.1", 0.001), ("min", 0.0))
DP_QUANTILES = (("max", 1.0), ("99.9", 0.999), ("99", 0.99), ("95", 0.95), ("90", 0.90), ("75", 0.75),
                ("median", 0.5), ("25", 0.25), ("10", 0.10), ("5", 0.05), ("1", 0.01), ("0.1", 0.001),
                ("min", 0.0))


def row_width(n_vocab: int) -> int:
    """uint16 values per row: float32 scale and min log-prob (4 values), then the vocabulary padded to even."""
    return 2 * ((n_vocab + 1) // 2) + 4


def _lse(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row max (float32) and log-sum-exp over it (float32 of a float64 sum of float32 exps, as the C++)."""
    mx = logits.max(axis=1)
    sum_exp = np.exp(logits - mx[:, None], dtype=np.float32).sum(axis=1, dtype=np.float64)
    return mx, np.log(sum_exp).astype(np.float32)


def encode_rows(logits: np.ndarray) -> np.ndarray:
    """Logits ``[T, V]`` as the base file's rows ``[T, row_width(V)]`` (uint16)."""
    x = np.ascontiguousarray(logits, dtype=np.float32)
    t, v = x.shape
    mx, lse = _lse(x)
    mn = np.maximum(x.min(axis=1), mx - np.float32(16))
    min_log_prob = (mn - mx - lse).astype(np.float32)
    scale = ((mx - mn) / np.float32(65535)).astype(np.float32)
    out = np.zeros((t, row_width(v)), dtype=np.uint16)
    head = out[:, :4].view(np.float32)
    head[:, 0], head[:, 1] = scale, min_log_prob
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = np.where(scale > 0, np.float32(1) / scale, np.float32(0)).astype(np.float32)
        q = np.rint((inv[:, None] * (x - mn[:, None])).astype(np.float32))  # nearest, ties to even, as nearest_int
    q = np.where(x > mn[:, None], q, 0)
    out[:, 4:4 + v] = np.clip(q, 0, 65535).astype(np.uint16)
    return out


def decode_rows(rows: np.ndarray, n_vocab: int) -> np.ndarray:
    """The base log-probabilities ``[T, V]`` (float32) held by rows ``[T, row_width(V)]``."""
    r = np.ascontiguousarray(rows, dtype=np.uint16)
    head = r[:, :4].view(np.float32)
    return (head[:, :1] * r[:, 4:4 + n_vocab].astype(np.float32) + head[:, 1:2]).astype(np.float32)


@dataclass
class TokenScores:
    """Per scored token, as llama-perplexity computes them (float64 for the sums)."""

    nll: np.ndarray
    nll_base: np.ndarray
    kld: np.ndarray
    p_diff: np.ndarray
    same_top: np.ndarray


def score_rows(base_rows: np.ndarray, logits: np.ndarray, next_tokens: np.ndarray) -> TokenScores:
    """Q's logits ``[T, V]`` against the base rows ``[T, W]``; row t predicts ``next_tokens[t]``."""
    t, v = logits.shape
    if base_rows.shape[0] != t:
        raise ValueError(f"{base_rows.shape[0]} base rows for {t} rows of logits")
    return score_log_probs(decode_rows(base_rows, v), logits, next_tokens)


def score_log_probs(base: np.ndarray, logits: np.ndarray, next_tokens: np.ndarray) -> TokenScores:
    """``score_rows`` against rows already decoded (``decode_rows``), for a caller that uses them again."""
    x = np.ascontiguousarray(logits, dtype=np.float32)
    t, v = x.shape
    tok = np.asarray(next_tokens, dtype=np.int64)
    if tok.size and (tok.min() < 0 or tok.max() >= v):
        raise ValueError(f"a scored token id lies outside the vocabulary of {v}")
    mx, lse = _lse(x)
    rows = np.arange(t)
    nll = (mx + lse - x[rows, tok]).astype(np.float32)
    nll_base = (-base[rows, tok]).astype(np.float32)
    log_z = (mx + lse).astype(np.float32)
    kept = base > np.float32(LOG_PROB_FLOOR)
    p_base = np.exp(base, dtype=np.float32)
    terms = np.where(kept, p_base * (base - x + log_z[:, None]), np.float32(0))
    kld = terms.sum(axis=1, dtype=np.float64)
    same = np.argmax(x, axis=1) == np.argmax(base, axis=1)
    p_diff = (np.exp(-nll) - np.exp(-nll_base)).astype(np.float32)
    return TokenScores(nll.astype(np.float64), nll_base.astype(np.float64), kld, p_diff.astype(np.float64), same)


@dataclass
class Sums:
    """The running sums llama-perplexity keeps (``kl_divergence_result``), plus the per-token values
    its percentiles are taken over. Add scores with ``add``; ``stats()`` gives the report."""

    count: int = 0
    sum_nll: float = 0.0
    sum_nll2: float = 0.0
    sum_nll_base: float = 0.0
    sum_nll_base2: float = 0.0
    sum_nll_nll_base: float = 0.0
    sum_kld: float = 0.0
    sum_kld2: float = 0.0
    sum_p_diff: float = 0.0
    sum_p_diff2: float = 0.0
    sum_p_diff4: float = 0.0
    n_same_top: int = 0
    kld_values: list[np.ndarray] = field(default_factory=list)
    p_diff_values: list[np.ndarray] = field(default_factory=list)

    def add(self, s: TokenScores) -> None:
        self.count += int(s.nll.size)
        self.sum_nll += float(s.nll.sum())
        self.sum_nll2 += float((s.nll * s.nll).sum())
        self.sum_nll_base += float(s.nll_base.sum())
        self.sum_nll_base2 += float((s.nll_base * s.nll_base).sum())
        self.sum_nll_nll_base += float((s.nll * s.nll_base).sum())
        self.sum_kld += float(s.kld.sum())
        self.sum_kld2 += float((s.kld * s.kld).sum())
        d2 = s.p_diff * s.p_diff
        self.sum_p_diff += float(s.p_diff.sum())
        self.sum_p_diff2 += float(d2.sum())
        self.sum_p_diff4 += float((d2 * d2).sum())
        self.n_same_top += int(np.sum(s.same_top))
        self.kld_values.append(s.kld.astype(np.float32))
        self.p_diff_values.append(s.p_diff.astype(np.float32))

    def stats(self) -> PerplexityStats:
        return PerplexityStats.from_sums(self)


def mean_and_error(total: float, total2: float, count: int) -> tuple[float, float]:
    """Mean and standard error sqrt(var / (n - 1)); the error is 0 for 10 values or fewer, as llama.cpp's."""
    if count < 1:
        return 0.0, 0.0
    f = total / count
    var = total2 / count - f * f
    return f, (math.sqrt(var / (count - 1)) if var > 0 and count > 10 else 0.0)


def _covariance(a: float, b: float, ab: float, count: int) -> float:
    if count < 10:
        return 0.0
    return (ab / count - (a / count) * (b / count)) / (count - 1)


def percentile(sorted_values: np.ndarray, fraction: float) -> float:
    """llama-perplexity's percentile: linear interpolation at ``fraction * (n - 1)`` of the sorted values."""
    if fraction <= 0:
        return float(sorted_values[0])
    if fraction >= 1:
        return float(sorted_values[-1])
    p = np.float32(fraction) * np.float32(sorted_values.size - 1)
    ip = int(p)
    p -= ip
    nxt = sorted_values[min(ip + 1, sorted_values.size - 1)]
    return float((1 - p) * sorted_values[ip] + p * nxt)


def _median(v: np.ndarray) -> float:
    n = v.size
    return float(np.float32(0.5) * (v[n // 2] + v[n // 2 - 1])) if n % 2 == 0 else float(v[n // 2])


def _quantiles(values: list[np.ndarray], which: tuple[tuple[str, float], ...]) -> dict[str, float]:
    v = np.sort(np.concatenate(values)) if values else np.zeros(0, dtype=np.float32)
    if not v.size:
        return {}
    return {name: (_median(v) if name == "median" else percentile(v, q)) for name, q in which}


@dataclass
class PerplexityStats:
    """llama-perplexity's final report (``Mean PPL(Q)`` ... ``Same top p``), each ± a standard error.
    Fractions (delta p, same top) are fractions here; llama-perplexity prints them in percent."""

    count: int
    ppl_q: float
    ppl_q_err: float
    ppl_base: float
    ppl_base_err: float
    ln_ppl_correlation: float
    ln_ppl_ratio: float
    ln_ppl_ratio_err: float
    ppl_ratio: float
    ppl_ratio_err: float
    ppl_diff: float
    ppl_diff_err: float
    kld_mean: float
    kld_err: float
    kld_quantiles: dict[str, float]
    p_diff_mean: float
    p_diff_err: float
    p_diff_quantiles: dict[str, float]
    rms_p_diff: float
    rms_p_diff_err: float
    same_top: float
    same_top_err: float

    @classmethod
    def from_sums(cls, s: Sums) -> PerplexityStats:
        if s.count < 2:
            raise ValueError(f"{s.count} scored token(s): too few for statistics")
        n = s.count
        log_ppl, log_ppl_err = mean_and_error(s.sum_nll, s.sum_nll2, n)
        log_base, log_base_err = mean_and_error(s.sum_nll_base, s.sum_nll_base2, n)
        cov = _covariance(s.sum_nll, s.sum_nll_base, s.sum_nll_nll_base, n)
        ppl, ppl_base = math.exp(log_ppl), math.exp(log_base)
        ratio_ln = log_ppl - log_base
        ratio_ln_err = math.sqrt(max(log_ppl_err ** 2 + log_base_err ** 2 - 2 * cov, 0.0))
        denom = log_ppl_err * log_base_err
        kld, kld_err = mean_and_error(s.sum_kld, s.sum_kld2, n)
        dp, dp_err = mean_and_error(s.sum_p_diff, s.sum_p_diff2, n)
        mse, mse_err = mean_and_error(s.sum_p_diff2, s.sum_p_diff4, n)
        rms = math.sqrt(mse)
        top = s.n_same_top / n
        ppl_err, base_err = ppl * log_ppl_err, ppl_base * log_base_err
        return cls(
            count=n, ppl_q=ppl, ppl_q_err=ppl_err, ppl_base=ppl_base, ppl_base_err=base_err,
            ln_ppl_correlation=cov / denom if denom else math.nan,
            ln_ppl_ratio=ratio_ln, ln_ppl_ratio_err=ratio_ln_err,
            ppl_ratio=math.exp(ratio_ln), ppl_ratio_err=math.exp(ratio_ln) * ratio_ln_err,
            ppl_diff=ppl - ppl_base,
            ppl_diff_err=math.sqrt(max(ppl_err ** 2 + base_err ** 2 - 2 * ppl * ppl_base * cov, 0.0)),
            kld_mean=kld, kld_err=kld_err, kld_quantiles=_quantiles(s.kld_values, KLD_QUANTILES),
            p_diff_mean=dp, p_diff_err=dp_err, p_diff_quantiles=_quantiles(s.p_diff_values, DP_QUANTILES),
            rms_p_diff=rms, rms_p_diff_err=0.5 / rms * mse_err if rms > 0 else 0.0,
            same_top=top, same_top_err=math.sqrt(top * (1 - top) / (n - 1)),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PerplexityStats:
        return cls(**d)

    def report(self) -> list[str]:
        """The statistics in llama-perplexity's layout and units (percent for delta p and same top)."""
        lines = ["====== Perplexity statistics ======",
                 f"Mean PPL(Q)                   : {self.ppl_q:10.6f} ± {self.ppl_q_err:10.6f}",
                 f"Mean PPL(base)                : {self.ppl_base:10.6f} ± {self.ppl_base_err:10.6f}",
                 f"Cor(ln(PPL(Q)), ln(PPL(base))): {100 * self.ln_ppl_correlation:6.2f}%",
                 f"Mean ln(PPL(Q)/PPL(base))     : {self.ln_ppl_ratio:10.6f} ± {self.ln_ppl_ratio_err:10.6f}",
                 f"Mean PPL(Q)/PPL(base)         : {self.ppl_ratio:10.6f} ± {self.ppl_ratio_err:10.6f}",
                 f"Mean PPL(Q)-PPL(base)         : {self.ppl_diff:10.6f} ± {self.ppl_diff_err:10.6f}",
                 "", "====== KL divergence statistics ======",
                 f"Mean    KLD: {self.kld_mean:10.6f} ± {self.kld_err:10.6f}"]
        lines += [f"{_label(k, 'KLD')}: {v:10.6f}" for k, v in self.kld_quantiles.items()]
        lines += ["", "====== Token probability statistics ======",
                  f"Mean    Δp: {100 * self.p_diff_mean:6.3f} ± {100 * self.p_diff_err:5.3f} %"]
        lines += [f"{_label(k, 'Δp')}: {100 * v:6.3f}%" for k, v in self.p_diff_quantiles.items()]
        lines += [f"RMS Δp    : {100 * self.rms_p_diff:6.3f} ± {100 * self.rms_p_diff_err:5.3f} %",
                  f"Same top p: {100 * self.same_top:6.3f} ± {100 * self.same_top_err:5.3f} %"]
        return lines


def _label(key: str, what: str) -> str:
    if key in ("max", "min"):
        return f"{'Maximum' if key == 'max' else 'Minimum'} {what}"
    if key == "median":
        return f"Median  {what}"
    return f"{float(key):4.1f}%   {what}"
