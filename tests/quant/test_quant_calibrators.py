import numpy as np
import pytest
import torch

from yolo_q.quant.calibrators import (HistogramCalibrator, MaxCalibrator, amax_mse,
                                      fake_quant_np, make_calibrator)


def _batches(seed=0):
    """Three activation-like batches with a growing range (forces histogram growth)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for scale in (1.0, 2.5, 1.5):  # Student-t (4 dof): heavy tails like activations
        z = torch.randn(4, 8, 16, 16, generator=g)
        chi2 = torch.randn(4, 4, 8, 16, 16, generator=g).square().sum(0)
        out.append(z / (chi2 / 4).sqrt() * scale)
    return out


def _pq_hist(batches, unsigned=False, num_bins=2048):
    calib = pytest.importorskip("pytorch_quantization.calib")
    pq = calib.HistogramCalibrator(8, None, unsigned, num_bins=num_bins)
    for b in batches:
        pq.collect(b)
    return pq


def _ours(batches, unsigned=False, num_bins=2048):
    h = HistogramCalibrator(8, None, unsigned, num_bins)
    for b in batches:
        h.collect(b)
    return h


def test_max_calibrator_matches_pytorch_quantization():
    calib = pytest.importorskip("pytorch_quantization.calib")
    batches = _batches(1)
    for axis in (None, 1):
        ours, ref = MaxCalibrator(8, axis, False), calib.MaxCalibrator(8, axis, False)
        for b in batches:
            ours.collect(b)
            ref.collect(b)
        torch.testing.assert_close(ours.compute_amax(), ref.compute_amax().reshape(-1).squeeze())
    expected = torch.stack([b.abs().amax(dim=(0, 2, 3)) for b in batches]).amax(0)
    torch.testing.assert_close(ours.compute_amax(), expected)


def test_histogram_matches_pytorch_quantization_histogram():
    batches = _batches(2)
    ours, ref = _ours(batches), _pq_hist(batches)
    width = ours.bin_edges[1]
    assert len(ours.histogram) > 2048  # the range grew: bins were appended, width kept
    assert ours.histogram.sum() == sum(b.numel() for b in batches)
    n = min(len(ours.histogram), ref._calib_hist.numel())
    np.testing.assert_allclose(ours.bin_edges[1], float(ref._calib_bin_edges[1]), rtol=1e-6)
    assert len(ours.histogram) == ref._calib_hist.numel()
    np.testing.assert_array_equal(ours.histogram[:n], ref._calib_hist[:n].numpy())
    assert ours.compute_amax("max").item() == pytest.approx(max(b.abs().max().item()
                                                                for b in batches))
    assert width > 0


@pytest.mark.parametrize("method,kw", [("percentile", dict(percentile=99.9)),
                                       ("percentile", dict(percentile=99.99)),
                                       ("entropy", {})])
@pytest.mark.parametrize("unsigned", [False, True])
def test_histogram_methods_match_pytorch_quantization(method, kw, unsigned):
    batches = _batches(3)
    if unsigned:
        batches = [b.relu() for b in batches]
    bins = 2048 if method == "percentile" else 320  # the reference KL search is O(bins^2) Python
    ours, ref = _ours(batches, unsigned, bins), _pq_hist(batches, unsigned, bins)
    a = ours.compute_amax(method, **kw).item()
    b = float(ref.compute_amax(method, **kw))
    width = ours.bin_edges[1]
    # same histogram, same rule: equal up to float32 edges (entropy: KL ties may pick a
    # neighbouring bin, float64 here vs float32 there)
    assert a == pytest.approx(b, abs=(1e-3 if method == "percentile" else 1.01) * width)
    assert 0 < a <= ours.compute_amax("max").item()


def test_entropy_matches_reference_on_identical_histograms():
    """Same histogram in, same amax out (pytorch-quantization's KL search, vectorized)."""
    hist_mod = pytest.importorskip("pytorch_quantization.calib.histogram")
    from yolo_q.quant.calibrators import amax_entropy
    rng = np.random.default_rng(0)
    for n, uns in ((700, False), (900, True), (300, False)):
        x = np.abs(rng.laplace(size=20000))
        hist, edges = np.histogram(x, bins=n, range=(0, x.max()))
        hist[n // 3: n // 2] = 0  # empty stretches exercise the zero-bin rules
        ref = float(hist_mod._compute_amax_entropy(hist.copy(), edges, 8, uns))
        assert amax_entropy(hist, edges, 8, uns) == pytest.approx(ref, rel=1e-6)


@pytest.mark.parametrize("unsigned", [False, True])
def test_mse_is_near_the_brute_force_optimum_on_raw_data(unsigned):
    u = torch.rand(200_000, generator=torch.Generator().manual_seed(4)) - 0.5
    x = -u.sign() * torch.log1p(-2 * u.abs())  # Laplace(0, 1)
    x = x.relu() if unsigned else x
    h = HistogramCalibrator(8, None, unsigned)
    for part in x.split(50_000):
        h.collect(part)
    amax = h.compute_amax("mse").item()
    xs = x.numpy().astype(np.float64)
    cands = np.linspace(0.05, 1.0, 400) * np.abs(xs).max()

    def mse(a):
        return float(np.mean((fake_quant_np(xs, a, 8, unsigned) - xs) ** 2))
    errs = np.array([mse(a) for a in cands])
    best = cands[int(np.argmin(errs))]
    assert mse(amax) <= 1.02 * errs.min()
    assert amax == pytest.approx(best, rel=0.1)


def test_mse_merges_grown_histograms():
    counts = np.ones(10_000)
    edges = np.arange(10_001) * 0.001
    amax = amax_mse(counts, edges)  # uniform data: the optimum keeps (almost) the full range
    assert 9.0 < amax <= 10.0


def test_all_zero_batches_and_errors():
    h = HistogramCalibrator()
    assert h.compute_amax("percentile") is None
    h.collect(torch.zeros(100))
    assert h.compute_amax("entropy").item() == 0.0
    h.collect(torch.tensor([0.0, 1.0, 2.0]))
    assert h.histogram.sum() == 103 and h.histogram[0] >= 101
    with pytest.raises(ValueError, match="unknown calibration method"):
        h.compute_amax("median")
    with pytest.raises(NotImplementedError):
        HistogramCalibrator(axis=0)
    assert isinstance(make_calibrator("percentile", axis=0), MaxCalibrator)
    with pytest.raises(ValueError):
        MaxCalibrator().compute_amax("entropy")
