"""Weight transfer between lattice sizes: shape-free weights copied, spatial factors interpolated."""
import dataclasses
import math

import pytest
import torch

from model import EnergyLattice, preset
from model.transfer import _nearest_cells, transfer


def smooth_planes(cfg, batch=2, variant=0):
    """A smooth function of the normalized cell position, sampled on this lattice's cells."""
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, cfg.height), torch.linspace(-1, 1, cfg.width), indexing="ij")
    if variant == 0:
        planes = [torch.sin(math.pi * xs / 2) * torch.cos(math.pi * ys / 3) + 0.3, xs * ys + 0.5 * ys]
    else:
        planes = [torch.exp(-2 * (xs - 0.3) ** 2) - ys, torch.cos(2 * ys) * xs ** 2]
    return torch.stack(planes)[None].repeat(batch, 1, 1, 1)


@pytest.fixture(params=["nearest", "linear"])
def small_and_large(request):
    torch.manual_seed(0)
    small_cfg = dataclasses.replace(preset("scale-50"), width=24, height=20, depth=12)
    small = EnergyLattice(small_cfg)
    # Smooth spatial factors, as training on a smooth task gives; random ones have nothing to interpolate.
    with torch.no_grad():
        for module in (small.mapper, small.collector):
            for name, axis_len in (("row_factors", small_cfg.height), ("col_factors", small_cfg.width)):
                p = getattr(module, name)
                t = torch.linspace(-1, 1, axis_len)
                freq = (torch.arange(p.shape[-2], dtype=torch.float32)[:, None] % 6 + 1) * 0.7
                p.copy_(torch.cos(freq * t).expand_as(p))
        small.mapper.bias.copy_(smooth_planes(small_cfg, 1)[0, 0])
    # 3x the cell spacing: every third cell of the large lattice sits exactly on a small-lattice cell.
    large_cfg = dataclasses.replace(small_cfg, width=3 * 23 + 1, height=3 * 19 + 1, depth=36)
    return small, transfer(small, large_cfg, mode=request.param), request.param


def test_shape_free_weights_are_copied(small_and_large):
    small, large, mode = small_and_large
    for part in ("neuron", "carrier"):
        for (name, a), (_, b) in zip(getattr(small, part).state_dict().items(), getattr(large, part).state_dict().items()):
            assert torch.equal(a, b), f"{part}.{name}"
    assert torch.equal(small.collector.out.weight, large.collector.out.weight)
    assert large.mapper.row_factors.shape == (small.cfg.mapper_rank, 58)


def test_resized_mapper_matches_the_original_up_to_interpolation_error(small_and_large):
    small, large, mode = small_and_large
    x = torch.nn.functional.normalize(torch.randn(3, 384), dim=-1)
    with torch.no_grad():
        original = small.mapper(x)[:, 0]                 # (3, 20, 24): one energy channel
        resized = large.mapper(x)[:, 0]                  # (3, 58, 70)
    # On shared cell positions the resized map is the original one; between them it interpolates
    # (linear) or copies the nearest original cell (nearest: cell 3i+1 sits a third of the way to i+1).
    torch.testing.assert_close(resized[:, ::3, ::3], original, rtol=1e-5, atol=1e-5)
    between = resized[:, 1::3, 1::3][:, :19, :23]
    if mode == "nearest":
        torch.testing.assert_close(between, original[:, :-1, :-1], rtol=1e-5, atol=1e-5)
    else:
        neighbours = (original[:, :-1, :-1] + original[:, 1:, 1:]) / 2
        assert (between - neighbours).abs().mean() < 0.1 * original.abs().mean()


def test_resized_collector_gives_the_same_embedding_for_a_smooth_input(small_and_large):
    small, large, mode = small_and_large
    with torch.no_grad():
        a = small.collector(smooth_planes(small.cfg))
        b = large.collector(smooth_planes(large.cfg))
        other = small.collector(smooth_planes(small.cfg, variant=1))  # another input, for scale
    assert torch.nn.functional.cosine_similarity(a, b).min() > 0.99
    assert (a - b).norm() < 0.2 * (a - other).norm()


def test_models_of_different_width_cannot_exchange_weights():
    with pytest.raises(ValueError, match="carrier_hidden: source 32 vs target 256"):
        transfer(EnergyLattice(preset("smoke")), preset("debug").resolved())


def test_nearest_resampling_keeps_a_rough_collectors_reading_of_blockwise_copied_planes():
    # Trained factors are rough from cell to cell (random ones here). A plane copied blockwise to the
    # larger lattice is read the same by the nearest-resampled collector, not by the linear one.
    torch.manual_seed(0)
    small = EnergyLattice(preset("scale-12"))        # 12 x 12
    large_cfg = preset("scale-12", width=24, height=24)
    planes = torch.rand(3, 2, 12, 12)
    rows, cols = _nearest_cells(12, 24), _nearest_cells(12, 24)
    copied = planes[:, :, rows][:, :, :, cols]
    with torch.no_grad():
        original = small.collector(planes)
        error = {mode: (transfer(small, large_cfg, mode=mode).collector(copied) - original).norm() / original.norm()
                 for mode in ("nearest", "linear")}
    assert error["nearest"] < 0.1 < error["linear"]
