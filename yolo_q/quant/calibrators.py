"""Calibrators: collect activation statistics, then compute a clipping range ``amax``.

* :class:`MaxCalibrator` - running absolute maximum (per tensor or per channel).
* :class:`HistogramCalibrator` - histogram of ``|x|`` (2048 bins over ``[0, max]``; when a later
  batch exceeds the range the bin width is kept and bins are appended, as pytorch-quantization
  does), then ``compute_amax(method)`` with

  - ``"percentile"``: the left edge of the bin in which the cumulative count reaches
    ``percentile`` % (pytorch-quantization's rule);
  - ``"entropy"``: TensorRT's KL-divergence method: for every candidate end bin ``i >= 128``,
    the reference distribution is ``hist[:i]`` with all counts beyond ``i`` added to bin ``i-1``,
    the candidate is ``hist[:i]`` merged into ``2**(bits-1)`` (``2**bits`` unsigned) groups and
    expanded back over the non-empty bins; amax is the left edge of bin ``i`` with the smallest
    KL(reference || candidate) (the last one on ties). Bin 0 is replaced by bin 1 first;
  - ``"mse"``: amax = the bin center ``c_i`` (``i >= 128``) minimising
    ``sum_j hist_j * (c_j - fakequant(c_j; c_i))**2`` over the bin centers (a histogram that
    grew beyond 4096 bins is first merged by an integer factor to at most 4096 bins);
  - ``"max"``: the exact running maximum.

Everything runs on CPU (histograms are built with ``torch.histc`` on the tensor's device and
reduced with numpy).
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

METHODS = ("max", "percentile", "mse", "entropy")


def _reduce_dims(x: torch.Tensor, axis: Optional[int]):
    return [d for d in range(x.dim()) if d != axis] if axis is not None else None


def _abs_max(x: torch.Tensor, axis: Optional[int]) -> torch.Tensor:
    x = x.detach().abs().float()
    if axis is None:
        return x.max() if x.numel() else torch.zeros((), device=x.device)
    return x.amax(dim=_reduce_dims(x, axis))


class MaxCalibrator:
    """Running ``max(|x|)``; per channel along ``axis`` (reduces every other dimension)."""

    def __init__(self, num_bits: int = 8, axis: Optional[int] = None, unsigned: bool = False):
        self.num_bits, self.axis, self.unsigned = num_bits, axis, unsigned
        self._amax: Optional[torch.Tensor] = None

    def collect(self, x: torch.Tensor) -> None:
        amax = _abs_max(x, self.axis)
        if self._amax is None:
            self._amax = amax.clone()
        elif amax.shape != self._amax.shape:
            raise RuntimeError(f"MaxCalibrator: amax shape changed from {tuple(self._amax.shape)} "
                               f"to {tuple(amax.shape)}")
        else:
            torch.maximum(self._amax, amax, out=self._amax)

    def reset(self) -> None:
        self._amax = None

    @property
    def has_data(self) -> bool:
        return self._amax is not None

    def compute_amax(self, method: str = "max", **_) -> Optional[torch.Tensor]:
        if method != "max":
            raise ValueError(f"MaxCalibrator computes only method='max', got '{method}' "
                             "(use a HistogramCalibrator for percentile/mse/entropy)")
        return None if self._amax is None else self._amax.detach().cpu().clone()


class HistogramCalibrator:
    """Histogram of ``|x|`` over ``[0, running max]``, ``num_bins`` initial bins (per tensor)."""

    def __init__(self, num_bits: int = 8, axis: Optional[int] = None, unsigned: bool = False,
                 num_bins: int = 2048):
        if axis is not None:
            raise NotImplementedError("HistogramCalibrator supports per-tensor ranges only "
                                      "(axis=None); use MaxCalibrator per channel")
        self.num_bits, self.axis, self.unsigned = num_bits, axis, unsigned
        self.num_bins = int(num_bins)
        self.reset()

    def reset(self) -> None:
        self._hist: Optional[torch.Tensor] = None  # float64 counts
        self._width: Optional[float] = None
        self._max = 0.0
        self._pending_zeros = 0  # all-zero batches seen before the range is known

    @property
    def has_data(self) -> bool:
        return self._hist is not None or self._pending_zeros > 0

    @property
    def bin_edges(self) -> Optional[np.ndarray]:
        if self._hist is None:
            return None
        return np.arange(self._hist.numel() + 1, dtype=np.float64) * self._width

    @property
    def histogram(self) -> Optional[np.ndarray]:
        return None if self._hist is None else self._hist.cpu().numpy().copy()

    @torch.no_grad()
    def collect(self, x: torch.Tensor) -> None:
        x = x.detach().abs().float().flatten()
        if x.numel() == 0:
            return
        x_max = float(x.max())
        self._max = max(self._max, x_max)
        if self._hist is None:
            if x_max == 0.0:
                self._pending_zeros += x.numel()
                return
            self._width = x_max / self.num_bins
            hist = torch.histc(x, bins=self.num_bins, min=0.0, max=x_max).double()
            hist[0] += self._pending_zeros
            self._pending_zeros = 0
            self._hist = hist
            return
        n = self._hist.numel()
        if x_max > n * self._width:  # grow: same bin width, more bins
            n = int(math.ceil(x_max / self._width))
        hist = torch.histc(x, bins=n, min=0.0, max=n * self._width).double()
        hist[: self._hist.numel()] += self._hist.to(hist.device)
        self._hist = hist

    def compute_amax(self, method: str = "percentile", *, percentile: float = 99.99,
                     start_bin: int = 128, stride: int = 1) -> Optional[torch.Tensor]:
        if method not in METHODS:
            raise ValueError(f"unknown calibration method '{method}', expected one of {METHODS}")
        if not self.has_data:
            return None
        if self._hist is None:  # only zeros were seen
            return torch.tensor(0.0)
        if method == "max":
            return torch.tensor(self._max)
        hist = self._hist.cpu().numpy()
        edges = self.bin_edges
        if method == "percentile":
            amax = amax_percentile(hist, edges, percentile)
        elif method == "entropy":
            amax = amax_entropy(hist, edges, self.num_bits, self.unsigned, start_bin, stride)
        else:
            amax = amax_mse(hist, edges, self.num_bits, self.unsigned, start_bin, stride)
        return torch.tensor(float(amax))


def amax_percentile(hist: np.ndarray, edges: np.ndarray, percentile: float) -> float:
    if not 0.0 <= percentile <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {percentile}")
    cdf = np.cumsum(hist / hist.sum())
    idx = int(np.searchsorted(cdf, percentile / 100.0))
    return float(edges[min(idx, len(edges) - 1)])


def amax_entropy(hist: np.ndarray, edges: np.ndarray, num_bits: int = 8, unsigned: bool = False,
                 start_bin: int = 128, stride: int = 1) -> float:
    bins = np.asarray(hist, dtype=np.float64).copy()
    if len(bins) > 1:
        bins[0] = bins[1]
    n = len(bins)
    if n <= start_bin:  # too few bins to clip anything: keep the full range
        return float(edges[-1])
    nq = 1 << (num_bits - 1 + int(unsigned))
    nz = bins != 0
    total = bins.sum()
    csum = np.concatenate([[0.0], np.cumsum(bins)])
    cnz = np.concatenate([[0.0], np.cumsum(nz)])
    blogb = np.where(nz, bins * np.log(np.where(nz, bins, 1.0)), 0.0)
    cblogb = np.concatenate([[0.0], np.cumsum(blogb)])
    i = np.arange(start_bin, n + 1, stride)  # candidate end bins
    # bin j of [0, i) falls in group k when e_k <= j < e_(k+1), e = np.linspace(0, i, nq + 1)
    e = np.arange(nq + 1)[None, :] * (i[:, None] / nq)
    e[:, -1] = i
    bounds = np.ceil(e).astype(np.int64)  # first bin of each group (and i at the end)
    gsum = csum[bounds[:, 1:]] - csum[bounds[:, :-1]]  # (C, nq)
    gcnt = cnz[bounds[:, 1:]] - cnz[bounds[:, :-1]]
    avg = np.divide(gsum, gcnt, out=np.ones_like(gsum), where=gcnt > 0)
    last = i - 1
    b_last = bins[last]
    p_last = b_last + (total - csum[i])  # outliers folded into the last bin
    q_last = avg[:, -1]  # the last bin is in the last group
    gsum_wo_last = gsum.copy()
    gsum_wo_last[:, -1] -= b_last
    qsum = csum[i]
    with np.errstate(divide="ignore", invalid="ignore"):
        cross = (gsum_wo_last * np.log(avg)).sum(1)  # sum_j<i-1 p_j log q_j
        plogp = cblogb[last] + np.where(p_last > 0,
                                        p_last * np.log(np.where(p_last > 0, p_last, 1.0)), 0.0)
        plogq = cross + np.where(p_last > 0, p_last * np.log(q_last), 0.0)
        kl = (plogp - plogq) / total + np.log(qsum / total)
    kl[(p_last > 0) & (b_last == 0)] = math.inf  # p > 0 where q = 0
    kl[qsum <= 0] = math.inf
    best = len(kl) - 1 - int(np.argmin(kl[::-1]))  # the last argmin, as TensorRT does
    return float(edges[i[best]])


def fake_quant_np(x: np.ndarray, amax, num_bits: int = 8, unsigned: bool = False) -> np.ndarray:
    """Symmetric fake quantization on the yolo_q grid (signed: -2^(b-1)..2^(b-1)-1, scale
    amax/(2^(b-1)-1); unsigned: 0..2^b-1, scale amax/(2^b-1)); ``amax`` broadcasts."""
    qmax = (1 << (num_bits - 1 + int(unsigned))) - 1
    qmin = 0 if unsigned else -qmax - 1
    scale = np.asarray(amax, dtype=np.float64) / qmax
    return np.clip(np.round(x / scale), qmin, qmax) * scale


def amax_mse(hist: np.ndarray, edges: np.ndarray, num_bits: int = 8, unsigned: bool = False,
             start_bin: int = 128, stride: int = 1, max_bins: int = 4096) -> float:
    counts = np.asarray(hist, dtype=np.float64)
    edges = np.asarray(edges, dtype=np.float64)
    if len(counts) > max_bins:  # a grown histogram: merge neighbours (the search is O(bins^2))
        f = -(-len(counts) // max_bins)
        pad = (-len(counts)) % f
        counts = np.concatenate([counts, np.zeros(pad)]).reshape(-1, f).sum(1)
        width = edges[1] - edges[0]
        edges = np.arange(len(counts) + 1) * (width * f)
        start_bin = max(1, start_bin // f)
    centers = (edges[1:] + edges[:-1]) / 2
    cand = np.arange(min(start_bin, len(centers) - 1), len(centers), stride)
    best, best_err = cand[-1], math.inf
    for chunk in np.array_split(cand, max(1, len(cand) // 256)):
        amax = centers[chunk][:, None]
        err = ((fake_quant_np(centers[None, :], amax, num_bits, unsigned) - centers) ** 2
               * counts).sum(1)
        k = int(np.argmin(err))
        if err[k] < best_err:
            best, best_err = chunk[k], err[k]
    return float(centers[best])


def make_calibrator(method: str, num_bits: int = 8, axis: Optional[int] = None,
                    unsigned: bool = False, num_bins: int = 2048):
    """``"max"`` (or per channel) -> :class:`MaxCalibrator`; percentile / mse / entropy ->
    :class:`HistogramCalibrator`."""
    if method not in METHODS:
        raise ValueError(f"unknown calibration method '{method}', expected one of {METHODS}")
    if method == "max" or axis is not None:
        return MaxCalibrator(num_bits, axis, unsigned)
    return HistogramCalibrator(num_bits, axis, unsigned, num_bins)
