"""The pure parts of the direct path's vLLM weight layout (no vLLM, no Ray): which
region of a probe a loader's view covers, and the WeightSpec asked for it."""

from __future__ import annotations

import math

import pytest
import torch

from rayexec.integrations.vllm.weight_layout import enclosing, full_shaped, region_of, spec_for
from rayexec.weights.plan import WeightSpec


def probe(*shape: int) -> torch.Tensor:
    return torch.empty(shape, dtype=torch.bfloat16, device="meta")


def test_a_narrowed_view_gives_its_box():
    p = probe(512, 256)
    assert region_of(p.narrow(0, 256, 256), p) == ((256, 512), (0, 256))
    assert region_of(p.narrow(1, 128, 128), p) == ((0, 512), (128, 256))
    assert region_of(p, p) == ((0, 512), (0, 256))


def test_anything_but_a_plain_slice_gives_no_box():
    p = probe(512, 256)
    assert region_of(p.t(), p) is None  # transposed
    assert region_of(p.narrow(1, 0, 128).contiguous(), p) is None  # a copy
    assert region_of(p.to(torch.float32), p) is None  # converted


def test_even_parts_become_split_specs():
    assert spec_for((512, 256), "bfloat16", ((256, 512), (0, 256))) == \
        WeightSpec((512, 256), "bfloat16", 0, 2, 1)
    assert spec_for((256, 512), "bfloat16", ((0, 256), (0, 256))) == \
        WeightSpec((256, 512), "bfloat16", 1, 2, 0)
    # GQA with fewer KV heads than TP ranks: ranks share a head (2 heads of 128 rows).
    assert spec_for((256, 64), "bfloat16", ((128, 256), (0, 64))) == \
        WeightSpec((256, 64), "bfloat16", 0, 2, 1)


def test_other_regions_ask_for_the_whole_tensor():
    whole = WeightSpec((4000, 64), "bfloat16")
    # vLLM pads a 4000-row vocab to 3 x 1344 rows: not numpy.array_split's parts.
    assert spec_for((4000, 64), "bfloat16", ((1344, 2688), (0, 64))) == whole
    assert spec_for((4000, 64), "bfloat16", ((0, 2000), (0, 32))) == whole  # two dims cut
    assert spec_for((4000, 64), "bfloat16", None) == whole  # loader did something else


def test_every_even_split_round_trips():
    for full in (7, 64, 4096):
        for parts in (1, 2, 3, 4, 8):
            if parts > full:
                continue
            for index in range(parts):
                spec = WeightSpec((full, 4), "float32", 0, parts, index)
                got = spec_for((full, 4), "float32", spec.box)
                assert got.box == spec.box, (full, parts, index, got)


def test_full_shaped_places_the_piece_and_fills_the_rest():
    spec = WeightSpec((4, 6), "float32", 1, 2, 1)
    piece = torch.arange(12, dtype=torch.float32).view(4, 3)
    ((name, full),) = list(full_shaped({"w": piece}, {"w": spec}, fill=math.nan))
    assert name == "w" and full.shape == (4, 6)
    assert torch.equal(full[:, 3:], piece) and torch.isnan(full[:, :3]).all()
    whole = torch.ones(2, 2)
    assert next(full_shaped({"n": whole}, {"n": WeightSpec((2, 2), "float32")}))[1] is whole


@pytest.mark.parametrize(("dim", "index"), [(0, 0), (0, 1), (1, 0), (1, 1)])
def test_a_piece_that_is_the_box_of_a_whole_tensor_is_passed_as_that_tensor(dim, index):
    whole = torch.arange(24, dtype=torch.float32).view(4, 6)
    spec = WeightSpec((4, 6), "float32", dim, 2, index)
    piece = whole[tuple(slice(a, b) for a, b in spec.box)]
    ((_, full),) = list(full_shaped({"w": piece}, {"w": spec}))
    assert full.data_ptr() == whole.data_ptr() and torch.equal(full, whole)  # no copy
    assert enclosing(piece.clone(), spec) is None  # its own memory: copied as before
    # A test's NaN fill must still reach the loader: no reuse then.
    ((_, filled),) = list(full_shaped({"w": piece}, {"w": spec}, fill=math.nan))
    assert filled.data_ptr() != whole.data_ptr() and torch.isnan(filled).any()


def test_a_piece_whose_storage_ends_inside_the_tensor_is_not_widened():
    spec = WeightSpec((4, 6), "float32", 0, 2, 0)  # rows 0-1: the storage holds 12 of 24
    buffer = torch.arange(14, dtype=torch.float32)  # a bit more than the box, not all
    piece = buffer[:12].view(2, 6)
    assert enclosing(piece, spec) is None
