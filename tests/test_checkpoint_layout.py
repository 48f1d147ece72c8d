"""The global checkpoint layout in one process: ZeRO-style flat ranges cut into boxes, pieces written and read
back at any other cut (DCP resharding through moe_dist's planners), and the verification shares."""

from __future__ import annotations

import itertools
import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_dist.checkpoint import SafeFileSystemReader, _share, read_into, read_tensors, save_checkpoint
from moe_dist.parallel.layout import Fragments, flat_fragment, flat_range_boxes

shapes = st.lists(st.integers(1, 5), min_size=0, max_size=4).map(tuple)


@settings(max_examples=300, deadline=None)
@given(shape=shapes, data=st.data())
def test_flat_range_boxes_tile_the_range_in_flat_order(shape, data):
    numel = math.prod(shape)
    start = data.draw(st.integers(0, numel), label="start")
    stop = data.draw(st.integers(start, numel), label="stop")
    boxes = flat_range_boxes(shape, start, stop)
    assert len(boxes) <= max(1, 2 * len(shape) - 1)
    index = torch.arange(numel).reshape(shape)
    covered = [
        index[tuple(slice(o, o + n) for o, n in zip(offsets, sizes))].reshape(-1) for offsets, sizes in boxes
    ]
    got = torch.cat(covered).tolist() if covered else []
    assert got == list(
        range(start, stop)
    )  # every element once, in order: each box is contiguous in flat order


def cut_into_fragments(
    flat: torch.Tensor, cuts: list[int], *, local_shape, global_shape, dim0_offset
) -> Fragments:
    """The flat elements of a local shard, cut at ``cuts`` as ZeRO ranks would own them, as one Fragments."""
    bounds = [0, *sorted(cuts), flat.numel()]
    pieces = []
    for a, b in itertools.pairwise(bounds):
        part = flat_fragment(
            flat[a:b], local_shape=local_shape, start=a, global_shape=global_shape, dim0_offset=dim0_offset
        )
        pieces += part.pieces
    return Fragments(global_shape=global_shape, dtype=flat.dtype, pieces=pieces)


@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_fragments_written_at_one_cut_read_back_whole_and_at_another_cut(tmp_path_factory, data):
    """An expert tensor [E, D, F] whose two EP shards are each cut into flat ranges (as ZeRO partitions them),
    written, then read whole and into a different cut of the flat ranges: the same values everywhere."""
    e, d, f = data.draw(
        st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 5)), label="local shape"
    )
    global_shape = (2 * e, d, f)
    full = torch.randn(global_shape, generator=torch.Generator().manual_seed(data.draw(st.integers(0, 99))))
    numel = e * d * f

    def fragments(tensor_of_shard, cut_label):
        pieces = []
        for shard in range(2):
            flat = tensor_of_shard(shard).reshape(-1)
            cuts = data.draw(st.lists(st.integers(0, numel), max_size=3), label=f"{cut_label} {shard}")
            pieces += cut_into_fragments(
                flat, cuts, local_shape=(e, d, f), global_shape=global_shape, dim0_offset=shard * e
            ).pieces
        return Fragments(global_shape=global_shape, dtype=torch.float32, pieces=pieces)

    out = tmp_path_factory.mktemp("fragments")
    state = {"optim.w.exp_avg": fragments(lambda s: full[s * e : (s + 1) * e].clone(), "save cuts")}
    path = save_checkpoint(out, step=1, state=state, meta={"model": {}}, keep=1)
    reader = SafeFileSystemReader(str(path))
    assert torch.equal(read_tensors(reader, ["optim.w.exp_avg"])["optim.w.exp_avg"], full)
    shards = [torch.zeros(e, d, f) for _ in range(2)]
    read_into(
        SafeFileSystemReader(str(path)), {"optim.w.exp_avg": fragments(lambda s: shards[s], "load cuts")}
    )
    assert torch.equal(torch.cat(shards), full)


@given(sizes=st.lists(st.integers(0, 10**6), min_size=1, max_size=30), world=st.integers(1, 9))
def test_verification_shares_cover_every_file_once_and_balance_bytes(sizes, world):
    files = {f"__{i}_0.distcp": size for i, size in enumerate(sizes)}
    shares = [_share(files, world, rank) for rank in range(world)]
    assert sorted(name for share in shares for name in share) == sorted(files)
    loads = [sum(files[name] for name in share) for share in shares]
    assert max(loads) - min(loads) <= max(sizes)  # greedy largest-first: within one file of balanced
