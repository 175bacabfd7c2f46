"""The streaming shard writer against safetensors' own writer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save

from mergeshield.io.checkpoint import ShardWriter

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32,
          torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn]
SHAPES = st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple)


def _random(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    return torch.randint(-100 if dtype != torch.uint8 else 0, 100, shape, generator=g).to(dtype)


@settings(max_examples=60, deadline=None)
@given(
    specs=st.dictionaries(st.from_regex(r"[a-z][a-z0-9_.]{0,12}", fullmatch=True),
                          st.tuples(st.sampled_from(DTYPES), SHAPES), min_size=1, max_size=8),
    metadata=st.sampled_from([None, {"format": "pt"}, {"note": "é"}, {"format": "pt", "note": "x"}]),
    seed=st.integers(0, 2**16),
)
def test_streamed_shard_is_byte_identical_to_safetensors(tmp_path_factory, specs, metadata, seed):
    tensors = {n: _random(d, s, seed + k) for k, (n, (d, s)) in enumerate(specs.items())}
    path = tmp_path_factory.mktemp("w") / "x.safetensors"
    with ShardWriter(path, {n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()}, metadata) as w:
        for name in w.order:
            w.write(name, tensors[name])
    if metadata is None or len(metadata) == 1:  # safetensors writes several metadata keys in random order (a Rust HashMap); ours sorts them
        assert path.read_bytes() == save(tensors, metadata=metadata)
    back = load_file(path)
    assert set(back) == set(tensors)
    for n, t in tensors.items():
        assert back[n].dtype == t.dtype and back[n].shape == t.shape and torch.equal(back[n].view(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8))


def test_writer_refuses_wrong_order_dtype_shape_and_missing_tensors(tmp_path):
    specs = {"a": (torch.float32, (2,)), "b": (torch.float16, (3,))}
    with pytest.raises(ValueError, match="expected 'a' next"), ShardWriter(tmp_path / "1", specs, None) as w:
        w.write("b", torch.zeros(3, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"declared torch.float32 \[2\] but is torch.float64 \[2\]"), \
            ShardWriter(tmp_path / "2", specs, None) as w:
        w.write("a", torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"declared torch.float32 \[2\] but is torch.float32 \[1, 2\]"), \
            ShardWriter(tmp_path / "3", specs, None) as w:
        w.write("a", torch.zeros(1, 2))
    with pytest.raises(ValueError, match="1 declared tensor"), ShardWriter(tmp_path / "4", specs, None) as w:
        w.write("a", torch.zeros(2))


def test_writer_streams_non_contiguous_views(tmp_path):
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4).T  # a transposed view
    with ShardWriter(tmp_path / "x", {"t": (t.dtype, tuple(t.shape))}, {"format": "pt"}) as w:
        w.write("t", t)
    assert torch.equal(load_file(tmp_path / "x")["t"], t)


def test_unmapping_inputs_mid_shard_changes_no_byte(tiny_pair, tmp_path, monkeypatch):
    import mergeshield.io.checkpoint as io
    from mergeshield import make_method, merge_checkpoints, protect

    base, ft, ft2 = tiny_pair("llama")
    for tag, limit in (("kept", io.RELEASE_BYTES), ("released", 1)):  # 1: unmap after every tensor
        monkeypatch.setattr(io, "RELEASE_BYTES", limit)
        protect(ft, base, tmp_path / f"p-{tag}", progress=False)
        merge_checkpoints(base, [ft, ft2], tmp_path / f"m-{tag}", make_method("ties", lam=0.8), progress=False)
    for kind in ("p", "m"):
        a, b = (tmp_path / f"{kind}-{tag}" / "model.safetensors" for tag in ("kept", "released"))
        assert a.read_bytes() == b.read_bytes()


def test_prefetch_ranges_are_the_tensors_bytes(tmp_path):
    """prefetch hints the kernel with each tensor's byte range: the ranges must hold exactly the
    tensors' bytes; unknown names, pickle shards and a corrupt header are ignored (a hint only)."""
    from safetensors.torch import save_file

    from mergeshield.io.checkpoint import Checkpoint

    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    tensors = {"b": torch.arange(10, dtype=torch.float32), "a": torch.ones(3, 4, dtype=torch.bfloat16)}
    save_file(tensors, str(folder / "model.safetensors"))
    ckpt = Checkpoint(folder)
    raw = (folder / "model.safetensors").read_bytes()
    spans = ckpt._offsets(folder / "model.safetensors")
    for name, t in tensors.items():
        lo, hi = spans[name]
        assert raw[lo:hi] == t.contiguous().view(torch.uint8).numpy().tobytes()
    ckpt.prefetch(["a", "b", "not-there"])  # no error
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{oops")
    assert ckpt._offsets(broken) == {}


def test_reading_while_another_thread_releases_the_handles(tiny_pair):
    """protect's planner thread reads tensors while the main thread unmaps the inputs
    (`Checkpoint.release` clears the open handles): a clear that lands between opening a file and
    using its handle must not make the read fail (it once could: the handle was looked up again)."""
    from mergeshield.io.checkpoint import Checkpoint

    _, ft, _ = tiny_pair("llama")
    ckpt = Checkpoint(ft)

    class ClearedRightAfter(dict):
        def __setitem__(self, key, value):
            super().__setitem__(key, value)
            self.clear()  # another thread's release, right after the handle was stored

    ckpt._handles = ClearedRightAfter()
    for name in ckpt.names:
        assert ckpt.get(name).shape == ckpt.shape(name)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux's /proc/self/maps")
def test_own_map_reads_the_same_and_unmaps_with_the_tensor(tmp_path):
    """``get(name, own_map=True)`` (protect's planner) gives the same values from a mapping of
    its own, which goes when the tensor goes; the shared mapping stays until `release`."""
    import gc

    from safetensors.torch import save_file

    from mergeshield.io.checkpoint import Checkpoint

    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    save_file({"w": torch.randn(64, 1024), "v": torch.randn(8)}, str(folder / "model.safetensors"))

    def mappings() -> int:
        gc.collect()
        return sum(str(folder / "model.safetensors") in line for line in Path("/proc/self/maps").read_text().splitlines())

    ckpt = Checkpoint(folder)
    shared = ckpt.get("w")
    assert mappings() == 1
    own = ckpt.get("w", own_map=True)
    assert torch.equal(own, shared) and own.data_ptr() != shared.data_ptr()
    assert mappings() == 2
    del own
    assert mappings() == 1
    ckpt.release()
    assert mappings() == 1  # the shared mapping lives while a tensor from it does
    del shared
    assert mappings() == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_save_as_dtype_rounds_every_float_tensor_and_keeps_the_layout(dtype, tmp_path):
    """`save_as_dtype` (half-precision eval suites, float16_scales.py): a sharded checkpoint comes
    back sharded the same way, every float tensor equal to torch's rounding of it, integer
    tensors untouched, the config naming the dtype, the other files copied; an existing output is
    refused unless overwriting, and so (before anything is written, the input untouched) are an
    output overlapping the input and a non-floating dtype; ``.bin`` shards come out as
    safetensors, as protect writes them."""
    import json

    from safetensors.torch import save_file
    from tiny_models import build
    from tiny_models import save as save_model

    from mergeshield.errors import MergeShieldError
    from mergeshield.io.checkpoint import Checkpoint, save_as_dtype

    src = save_model(build("llama", 0), tmp_path / "src", max_shard_size="20KB")
    shards = sorted(p.name for p in src.glob("*.safetensors"))
    assert len(shards) > 2
    extra = load_file(src / shards[0])
    extra["ids"] = torch.arange(7, dtype=torch.int64)
    save_file(extra, src / shards[0], metadata={"format": "pt"})
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"]["ids"] = shards[0]
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    (src / "notes.txt").write_text("kept")
    out = save_as_dtype(src, tmp_path / "out", dtype)
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    a, b = Checkpoint(src), Checkpoint(out)
    assert sorted(b.names) == sorted(a.names)
    for name in a.names:
        x, y = a.get(name), b.get(name)
        want = x.to(dtype) if x.is_floating_point() else x
        assert y.dtype == want.dtype and torch.equal(y, want), name
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == str(dtype).removeprefix("torch.")
    assert (out / "notes.txt").read_text() == "kept"
    total = json.loads((out / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    assert total == sum(b.get(n).numel() * b.get(n).element_size() for n in b.names)
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    with pytest.raises(MergeShieldError, match="already exists"):
        save_as_dtype(src, out, dtype)
    save_as_dtype(src, out, dtype, overwrite=True)
    # bad input: refused before anything is written, the input untouched
    with pytest.raises(MergeShieldError, match="is input"):
        save_as_dtype(src, src, dtype, overwrite=True)
    with pytest.raises(MergeShieldError, match="overlaps input"):
        save_as_dtype(src, src / "half", dtype)
    with pytest.raises(ValueError, match="floating-point dtype, not torch.int8"):
        save_as_dtype(src, tmp_path / "ints", torch.int8)
    torch.save({"w": torch.ones(2)}, tmp_path / "pytorch_model.bin")
    (tmp_path / "binsrc").mkdir()
    (tmp_path / "binsrc" / "config.json").write_text((src / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").rename(tmp_path / "binsrc" / "pytorch_model.bin")
    frombin = save_as_dtype(tmp_path / "binsrc", tmp_path / "frombin", dtype)
    assert torch.equal(load_file(frombin / "model.safetensors")["w"], torch.ones(2, dtype=dtype))
    assert not (tmp_path / "ints").exists() and not (src / "half").exists()
    assert not [p for p in tmp_path.iterdir() if "mergeshield-tmp" in p.name]
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before
