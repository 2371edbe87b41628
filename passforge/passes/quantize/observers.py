"""Observers: the per-tensor range ``[lo, hi]`` an activation is quantized over, from calibration data.

- ``minmax``: the extremes seen. Exact coverage; one outlier token stretches the step for all the others.
- ``moving-average``: the extremes of each window, averaged (``lo += c * (window_lo - lo)``, c = 0.1: tens
  of calibration windows, not the thousands of training batches torch's 0.01 is tuned for). Outlier windows
  count less.
- ``percentile``: the ``percentile`` / ``100 - percentile`` quantiles (99.99 by default): clips the rarest
  values to refine the step for the rest.
- ``mse``: the clipping range (each end shrunk toward 0 in 1% steps) that minimises the expected squared
  error — clipping error of the values outside plus step²/12 rounding noise for those inside.
- ``entropy``: TensorRT's calibration: the threshold whose 128-level quantized histogram of |x| has the least
  KL divergence from the observed one (outliers folded into the last kept bin), applied to both ends and
  cut to the range seen (our activations are asymmetric int8: no levels are spent where no value goes).

The histogram methods take two passes over the data: the first finds the extremes, the second fills a
2048-bin histogram over them. NaN/Inf seen in calibration is an error naming the node (a range computed from
them would be saved silently wrong).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from passforge.passes.base import PassError

Method = Literal["minmax", "moving-average", "percentile", "mse", "entropy"]
HISTOGRAM_METHODS = ("percentile", "mse", "entropy")
BINS = 2048
ENTROPY_LEVELS = 128  # int8, symmetric: 128 magnitudes
MOVING_AVERAGE = 0.1


class RangeObserver:
    """Collects one activation's statistics; :meth:`range` gives the quantization range."""

    def __init__(self, method: Method, where: str, *, percentile: float = 99.99) -> None:
        self.method = method
        self.where = where
        self.percentile = percentile
        self.lo = math.inf
        self.hi = -math.inf
        self.average: tuple[float, float] | None = None
        self.histogram: torch.Tensor | None = None

    @property
    def needs_histogram(self) -> bool:
        return self.method in HISTOGRAM_METHODS

    def update(self, x: torch.Tensor) -> None:
        """First pass: extremes (and their moving average); second pass (after :meth:`start_histogram`):
        the histogram."""
        x = x.detach().float()
        if self.histogram is not None:
            values = x.abs() if self.method == "entropy" else x
            self.histogram += torch.histc(values, BINS, *self._histogram_range()).to(self.histogram.device)
            return
        if not bool(torch.isfinite(x).all()):
            raise PassError(
                f"calibration: the input of {self.where} holds NaN/Inf on calibration data; its scale would be "
                "meaningless — fix the model or its inputs, or skip the layer (skip=...)"
            )
        lo, hi = float(x.min()), float(x.max())
        self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)
        if self.average is None:
            self.average = (lo, hi)
        else:
            a_lo, a_hi = self.average
            self.average = (a_lo + MOVING_AVERAGE * (lo - a_lo), a_hi + MOVING_AVERAGE * (hi - a_hi))

    def start_histogram(self) -> None:
        self.histogram = torch.zeros(BINS, dtype=torch.float64)

    def _histogram_range(self) -> tuple[float, float]:
        if self.method == "entropy":
            return 0.0, max(abs(self.lo), abs(self.hi))
        return self.lo, self.hi

    def range(self) -> tuple[float, float]:
        """``(lo, hi)`` with ``lo <= 0 <= hi`` (zero must be exact: padding, ReLU/SiLU zeros)."""
        if self.average is None:
            raise PassError(f"calibration: {self.where} was never reached by the calibration data")
        if self.method == "minmax":
            lo, hi = self.lo, self.hi
        elif self.method == "moving-average":
            lo, hi = self.average
        else:
            if self.histogram is None:
                raise RuntimeError(f"{self.method} observer of {self.where}: the histogram pass did not run")
            lo, hi = _HISTOGRAM_RANGES[self.method](self)
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        if not hi - lo > 0:
            raise PassError(
                f"calibration: the input of {self.where} was exactly 0 on all calibration data (zero range: no "
                "scale exists); give more varied calibration data or skip the layer (skip=...)"
            )
        return lo, hi


def int8_affine_qparams(lo: float, hi: float) -> tuple[float, int]:
    """Asymmetric int8 (-128..127) ``(scale, zero_point)`` covering ``[lo, hi]`` (``lo <= 0 <= hi``)."""
    scale = (hi - lo) / 255
    zero_point = int(min(127, max(-128, round(-128 - lo / scale))))
    return scale, zero_point


def _bin_centers(obs: RangeObserver) -> torch.Tensor:
    lo, hi = obs._histogram_range()
    width = (hi - lo) / BINS
    return lo + width * (torch.arange(BINS, dtype=torch.float64) + 0.5)


def _percentile_range(obs: RangeObserver) -> tuple[float, float]:
    hist = obs.histogram
    cumulative = hist.cumsum(0) / hist.sum()
    tail = 1 - obs.percentile / 100
    centers = _bin_centers(obs)
    lo_bin = int(torch.searchsorted(cumulative, torch.tensor(tail, dtype=torch.float64)))
    hi_bin = int(torch.searchsorted(cumulative, torch.tensor(1 - tail, dtype=torch.float64)))
    width = (obs.hi - obs.lo) / BINS
    return float(centers[lo_bin]) - width / 2, float(centers[min(hi_bin, BINS - 1)]) + width / 2


def _mse_range(obs: RangeObserver) -> tuple[float, float]:
    """Independent grids for the low and high end (each shrunk in 1% steps toward 0): clipping error below
    ``lo`` and above ``hi`` plus step²/12 for every value inside, minimised over all pairs."""
    hist, centers = obs.histogram, _bin_centers(obs)
    fractions = torch.arange(1, 101, dtype=torch.float64) / 100  # (F,)
    los, his = min(obs.lo, 0.0) * fractions, max(obs.hi, 0.0) * fractions  # (F,)
    below = centers[None, :] < los[:, None]  # (F, BINS)
    above = centers[None, :] > his[:, None]
    clip_low = (hist * (centers[None, :] - los[:, None]) ** 2 * below).sum(1)  # (F,)
    clip_high = (hist * (centers[None, :] - his[:, None]) ** 2 * above).sum(1)
    inside = hist.sum() - (hist * below).sum(1)[:, None] - (hist * above).sum(1)[None, :]  # (F lo, F hi)
    steps = (his[None, :] - los[:, None]) / 255
    errors = clip_low[:, None] + clip_high[None, :] + inside * steps**2 / 12
    best = int(errors.argmin())
    return float(los[best // len(his)]), float(his[best % len(his)])


def _entropy_range(obs: RangeObserver) -> tuple[float, float]:
    hist = obs.histogram.clone()
    amax = max(abs(obs.lo), abs(obs.hi))
    width = amax / BINS
    best_kl, best_bins = math.inf, BINS
    for kept in range(ENTROPY_LEVELS, BINS + 1, 8):
        reference = hist[:kept].clone()
        reference[-1] += hist[kept:].sum()  # outliers clip to the threshold
        target = torch.arange(kept) * ENTROPY_LEVELS // kept  # source bin -> quantized bin
        occupied = (hist[:kept] > 0).double()
        sums = torch.zeros(ENTROPY_LEVELS, dtype=torch.float64).index_add_(0, target, hist[:kept])
        counts = torch.zeros(ENTROPY_LEVELS, dtype=torch.float64).index_add_(0, target, occupied)
        expanded = torch.where(occupied > 0, sums[target] / counts[target].clamp(min=1), 0.0)
        p = reference / reference.sum()
        q = expanded / expanded.sum().clamp(min=1e-30)
        mask = p > 0
        kl = float((p[mask] * torch.log(p[mask] / q[mask].clamp(min=1e-10))).sum())
        if kl < best_kl:
            best_kl, best_bins = kl, kept
    threshold = best_bins * width
    return max(-threshold, obs.lo), min(threshold, obs.hi)  # the quantizer is asymmetric: no unused levels


_HISTOGRAM_RANGES = {"percentile": _percentile_range, "mse": _mse_range, "entropy": _entropy_range}
