"""Faults beyond tests/test_errors.py: ambiguous layouts, links, permissions, odd files, precision,
tied weights, bases that differ in vocabulary or heads, signals, concurrency, real write failures,
the CLI's exit codes, and a brief run of the fuzz targets in fuzz/fuzz_reader.py.

Every refusal must name what was found and what to do, leave the inputs byte-identical, and leave
no output folder and no temporary folder behind.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import TINY, build, save

from mergeshield import protect, verify
from mergeshield.errors import BaseMismatchError, CheckpointError, NumericError, SpecError
from mergeshield.io.checkpoint import Checkpoint, atomic_output_dir, structural_differences

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "fuzz"))


# ---- helpers ---------------------------------------------------------------------------------
def _snapshot(*folders: Path) -> dict[str, bytes]:
    """Every file's bytes (links followed where they lead somewhere), keyed by path."""
    out: dict[str, bytes] = {}
    for folder in folders:
        for p in sorted(Path(folder).rglob("*")):
            if p.is_symlink():
                out[str(p)] = b"link->" + os.readlink(p).encode()
            elif p.is_file():
                out[str(p)] = p.read_bytes()
    return out


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if "mergeshield-tmp" in p.name or "mergeshield-old" in p.name]


def _refused(ft: Path, base: Path, tmp: Path, error: type[Exception], *needles: str) -> str:
    """protect() must raise `error` whose message holds every needle; nothing may be left behind."""
    before = _snapshot(ft, base)
    with pytest.raises(error) as info:
        protect(ft, base, tmp / "out", key_out=tmp / "key", progress=False)
    message = str(info.value)
    for needle in needles:
        assert needle in message, f"{needle!r} not in: {message}"
    assert not (tmp / "out").exists() and not (tmp / "key").exists()
    assert _leftovers(tmp) == []
    assert _snapshot(ft, base) == before
    return message


def _default_sigint() -> None:
    # a test runner started in the background may ignore SIGINT; its children would inherit that
    signal.signal(signal.SIGINT, signal.SIG_DFL)


Preexec = Callable[[], None]


def _cli_many(runs: Sequence[Sequence[str]], preexec: Preexec | Sequence[Preexec] | None = None,
              timeout: float = 120) -> list[subprocess.CompletedProcess[str]]:
    """Run several ``python -m mergeshield.cli ...`` at once (their imports dominate the time)."""
    hooks = list(preexec) if isinstance(preexec, Sequence) else [preexec or _default_sigint] * len(runs)
    procs = [subprocess.Popen([sys.executable, "-m", "mergeshield.cli", *args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              preexec_fn=hook) for args, hook in zip(runs, hooks, strict=True)]  # noqa: PLW1509
    results = []
    for args, proc in zip(runs, procs, strict=True):
        out, err = proc.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(list(args), proc.returncode, out, err))
    return results


def _assert_cli_refused(res: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert res.returncode == 2, (res.args, res.returncode, res.stderr)
    assert res.stderr.startswith("error: "), res.stderr
    assert "Traceback" not in res.stderr + res.stdout, res.stderr
    text = " ".join(res.stderr.split())
    for needle in needles:
        assert needle in text, f"{needle!r} not in: {res.stderr}"


@pytest.fixture()
def pair(tiny_pair, tmp_path) -> tuple[Path, Path]:
    base, ft, _ = tiny_pair("llama")
    return Path(shutil.copytree(base, tmp_path / "base")), Path(shutil.copytree(ft, tmp_path / "ft"))


@pytest.fixture(scope="module")
def _sharded_gpt2(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("sharded")
    base = build("gpt2", 0)
    save(base, root / "base")
    save(build("gpt2", 1, finetune_of=base), root / "ft", max_shard_size="20KB")
    return root / "base", root / "ft"


@pytest.fixture()
def sharded(_sharded_gpt2, tmp_path) -> tuple[Path, Path]:
    """(base, ft): a GPT-2 whose ft is saved in several shards with an index."""
    base, ft = _sharded_gpt2
    ft = Path(shutil.copytree(ft, tmp_path / "sharded" / "ft"))
    assert not (ft / "model.safetensors").exists() and len(list(ft.glob("model-*.safetensors"))) >= 3
    return Path(shutil.copytree(base, tmp_path / "sharded" / "base")), ft


def _index(ft: Path) -> dict[str, str]:
    return json.loads((ft / "model.safetensors.index.json").read_text())["weight_map"]


def _shards(ft: Path) -> list[str]:
    return sorted(set(_index(ft).values()))


def _edit(path: Path, fn: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


# ---- one tensor, two files ------------------------------------------------------------------------
@pytest.mark.parametrize("direction", ["copy_into_later_shard", "copy_into_earlier_shard"])
def test_tensor_in_two_listed_shards(sharded, tmp_path, direction):
    base, ft = sharded
    first, second = _shards(ft)[:2]
    src, dst = (first, second) if direction == "copy_into_later_shard" else (second, first)
    name = next(n for n, f in _index(ft).items() if f == src)
    _edit(ft / dst, lambda t: t.__setitem__(name, load_file(ft / src)[name]))
    msg = _refused(ft, base, tmp_path, CheckpointError, f"tensor {name!r} is stored in two shards", src, dst,
                   "Re-save it with save_pretrained")
    assert "does not list" not in msg  # the index does list it: the message must not say otherwise


def test_tensor_also_in_a_stale_shard_the_index_does_not_list(sharded, tmp_path):
    base, ft = sharded
    first = _shards(ft)[0]
    save_file(load_file(ft / first), ft / "model-00009-of-00009.safetensors", metadata={"format": "pt"})
    _refused(ft, base, tmp_path, CheckpointError, "stored in two files", first, "model-00009-of-00009.safetensors",
             "not read", "Move the file you do not want out of the folder")


def test_single_file_next_to_shards_is_ambiguous(sharded, tmp_path):
    base, ft = sharded
    merged: dict[str, torch.Tensor] = {}
    for shard in _shards(ft):
        merged |= load_file(ft / shard)
    save_file(merged, ft / "model.safetensors", metadata={"format": "pt"})
    _refused(ft, base, tmp_path, CheckpointError, "stored in two files", "model.safetensors",
             "transformers would load model.safetensors first")


def test_unrelated_safetensors_files_and_an_unused_index_are_not_mistaken_for_duplicates(pair, tmp_path):
    base, ft = pair
    save_file({"base_model.model.lora_A.weight": torch.zeros(2, 2)}, ft / "adapter_model.safetensors")
    (ft / "model.safetensors.index.json").write_text("{not json")  # transformers ignores it next to model.safetensors
    protect(ft, base, tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


# ---- links, odd files -----------------------------------------------------------------------------
def _link_loop(ft: Path, name: str) -> None:
    (ft / name).unlink()
    os.symlink(name, ft / name)  # points at itself


@pytest.mark.parametrize("case", ["weights_loop", "weights_dangling", "config_loop", "shard_dangling"])
def test_broken_symbolic_links(pair, sharded, tmp_path, case):
    base, ft = pair
    if case == "weights_loop":
        _link_loop(ft, "model.safetensors")
        needles = ["model.safetensors", "link loop", "Replace the link with the real file"]
    elif case == "weights_dangling":
        (ft / "model.safetensors").unlink()
        os.symlink("../../blobs/0a1b2c", ft / "model.safetensors")
        needles = ["'../../blobs/0a1b2c', which does not exist", "Hugging Face cache", "download the model again"]
    elif case == "config_loop":
        _link_loop(ft, "config.json")
        needles = ["config.json: is a symbolic link", "link loop"]
    else:
        base, ft = sharded
        shard = _shards(ft)[1]
        (ft / shard).unlink()
        os.symlink(tmp_path / "gone.safetensors", ft / shard)
        needles = [shard, "dangling link"]
    _refused(ft, base, tmp_path, CheckpointError, *needles)


def test_working_links_like_a_hugging_face_cache_snapshot(pair, tmp_path):
    base, ft = pair
    protect(ft, base, tmp_path / "plain", progress=False)
    blobs, snap = tmp_path / "blobs", tmp_path / "snapshots" / "abc123"
    blobs.mkdir()
    snap.mkdir(parents=True)
    for i, p in enumerate(sorted(ft.iterdir())):
        shutil.copy2(p, blobs / f"blob{i}")
        os.symlink(os.path.relpath(blobs / f"blob{i}", snap), snap / p.name)
    protect(snap, base, tmp_path / "linked", progress=False)
    assert not any(p.is_symlink() for p in (tmp_path / "linked").iterdir())
    assert _snapshot(tmp_path / "linked").values() and list(_snapshot(tmp_path / "linked").values()) == list(
        _snapshot(tmp_path / "plain").values())


@pytest.mark.parametrize("case", ["empty_file", "directory", "fifo", "empty_shard"])
def test_weights_that_are_not_usable_files(pair, sharded, tmp_path, case):
    base, ft = pair
    weights = ft / "model.safetensors"
    if case == "empty_file":
        weights.write_bytes(b"")
        needles = ["is empty (0 bytes)", "download or save the model again"]
    elif case == "directory":
        weights.unlink()
        weights.mkdir()
        (weights / "x").write_text("x")
        needles = ["model.safetensors: is a folder, but it should be a file"]
    elif case == "fifo":  # opening a FIFO would block forever: it must be refused, not read
        weights.unlink()
        os.mkfifo(weights)
        needles = ["is not a regular file"]
    else:
        base, ft = sharded
        (ft / _shards(ft)[0]).write_bytes(b"")
        needles = [_shards(ft)[0], "is empty (0 bytes)"]
    _refused(ft, base, tmp_path, CheckpointError, *needles)


def test_a_dangling_link_among_the_files_copied_to_the_output(pair, tmp_path):
    base, ft = pair
    os.symlink("missing-tokenizer.json", ft / "tokenizer.json")
    _refused(ft, base, tmp_path, CheckpointError, "tokenizer.json", "dangling link", "would silently lack")


# ---- the shard index -------------------------------------------------------------------------------
INDEXES = {
    "not_json": ("{not json", ["not a valid shard index: not JSON", '"weight_map"']),
    "not_utf8": (b"\xff\xfe{}", ["not a valid shard index: not JSON"]),
    "no_weight_map": ('{"metadata": {"total_size": 1}}', ["has no 'weight_map'", "found ['metadata']"]),
    "weight_map_not_a_mapping": ('{"weight_map": ["model-00001-of-00002.safetensors"]}',
                                 ["'weight_map' should be a non-empty mapping"]),
    "empty_weight_map": ('{"weight_map": {}}', ["'weight_map' should be a non-empty mapping"]),
    "file_not_a_string": ('{"weight_map": {"wte.weight": ["a.safetensors"]}}',
                          ["maps 'wte.weight' to ['a.safetensors'], not a shard file name"]),
    "parent_folder": ('{"weight_map": {"wte.weight": "../x.safetensors"}}',
                      ["names shard '../x.safetensors', which is not a file inside the model folder",
                       "never reads files outside"]),
    "absolute_path": ('{"weight_map": {"wte.weight": "/etc/passwd"}}',
                      ["names shard '/etc/passwd', which is not a file inside the model folder"]),
    "wrong_suffix": ('{"weight_map": {"wte.weight": "config.json"}}',
                     ["names shard 'config.json'", "lists .safetensors files only"]),
}


@pytest.mark.parametrize("case", sorted(INDEXES))
def test_bad_shard_index(sharded, tmp_path, case):
    base, ft = sharded
    content, needles = INDEXES[case]
    index = ft / "model.safetensors.index.json"
    index.write_bytes(content if isinstance(content, bytes) else content.encode())
    save_file({"wte.weight": torch.zeros(1)}, ft.parent / "x.safetensors")  # a real file outside the folder
    _refused(ft, base, tmp_path, CheckpointError, str(index), *needles)


# ---- permissions -------------------------------------------------------------------------------
def _drop_dac_override() -> None:
    """preexec for root: without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH in the bounding set, the
    exec'd process gets no such capability, so permission bits apply to root as to anyone."""
    _default_sigint()
    if os.geteuid() == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
            if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
                raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def _unreadable_for_child(path: Path) -> bool:
    probe = "import os, sys; sys.exit(0 if os.access(sys.argv[1], os.R_OK) else 3)"
    try:
        res = subprocess.run([sys.executable, "-c", probe, str(path)], preexec_fn=_drop_dac_override,
                             timeout=60, check=False)
    except subprocess.SubprocessError:  # prctl refused (no CAP_SETPCAP)
        return False
    return res.returncode == 3


def test_unreadable_config_and_weights(pair, tmp_path):
    base, ft = pair
    folders = {victim: Path(shutil.copytree(ft, tmp_path / victim.split(".")[0])) for victim in
               ("config.json", "model.safetensors")}
    before = _snapshot(base, *folders.values())
    for victim, folder in folders.items():
        (folder / victim).chmod(0)
    try:
        if not _unreadable_for_child(folders["config.json"] / "config.json"):
            pytest.skip("permission bits are not enforced here (root whose CAP_DAC_OVERRIDE cannot be dropped)")
        results = _cli_many([["protect", str(folder), "--base", str(base), "--out", str(tmp_path / f"out-{victim}"),
                              "--quiet"] for victim, folder in folders.items()], preexec=_drop_dac_override)
    finally:
        for victim, folder in folders.items():
            (folder / victim).chmod(0o644)
    for (victim, folder), res in zip(folders.items(), results, strict=True):
        _assert_cli_refused(res, f"{folder / victim}: permission denied", "mode ----------", "chmod a+r")
        assert not (tmp_path / f"out-{victim}").exists()
    assert _leftovers(tmp_path) == [] and _snapshot(base, *folders.values()) == before


# ---- precision, buffers, ties --------------------------------------------------------------------
def test_float8_weights_are_refused_with_a_dequantise_hint(pair, tmp_path):
    base, ft = pair
    name = "model.layers.1.mlp.gate_proj.weight"
    _edit(ft / "model.safetensors", lambda t: t.__setitem__(name, t[name].to(torch.float8_e4m3fn)))
    _refused(ft, base, tmp_path, NumericError, name, "float8_e4m3fn", "Dequantise the checkpoint first")


@pytest.mark.parametrize("family,buffers", [
    ("bert", {"bert.embeddings.position_ids": torch.arange(64).unsqueeze(0),
              "bert.embeddings.token_type_ids": torch.zeros(1, 64, dtype=torch.int64)}),
    ("gpt2", {f"transformer.h.{i}.attn.bias": torch.tril(torch.ones(64, 64, dtype=torch.bool))[None, None]
              for i in range(2)} | {"transformer.h.0.attn.masked_bias": torch.tensor(-1e4)}),
], ids=["bert_int64_ids", "gpt2_bool_causal_mask"])
def test_integer_and_bool_buffers_are_copied_unchanged(tiny_pair, tmp_path, family, buffers):
    base, ft_src, _ = tiny_pair(family)
    ft = Path(shutil.copytree(ft_src, tmp_path / "ft"))
    weights = ft / "model.safetensors"
    _edit(weights, lambda t: t.update(buffers))
    protect(ft, base, tmp_path / "out", progress=False)
    out = load_file(tmp_path / "out" / "model.safetensors")
    for name, value in buffers.items():
        assert out[name].dtype == value.dtype and torch.equal(out[name], value), name


def test_tied_embeddings_stored_once_llama(tiny_pair, tmp_path):
    base, ft, _ = tiny_pair("llama")  # tie_word_embeddings: lm_head.weight is not in the file
    assert "lm_head.weight" not in load_file(Path(ft) / "model.safetensors")
    protect(ft, base, tmp_path / "out", progress=False)
    assert "lm_head.weight" not in load_file(tmp_path / "out" / "model.safetensors")
    assert verify(ft, tmp_path / "out", generate_tokens=4).equivalent


def test_tied_embeddings_stored_twice_gpt2(tiny_pair, tmp_path):
    base, ft_src, _ = tiny_pair("gpt2")
    ft = Path(shutil.copytree(ft_src, tmp_path / "ft"))
    _edit(ft / "model.safetensors", lambda t: t.__setitem__("lm_head.weight", t["transformer.wte.weight"].clone()))
    protect(ft, base, tmp_path / "out", progress=False)
    out = load_file(tmp_path / "out" / "model.safetensors")
    assert torch.equal(out["lm_head.weight"], out["transformer.wte.weight"])
    assert verify(ft, tmp_path / "out", generate_tokens=4).equivalent


# ---- bases that do not fit ------------------------------------------------------------------------
def test_base_with_another_vocabulary_lists_the_shapes(tiny_pair, tmp_path):
    import transformers as T

    _, ft, _ = tiny_pair("gpt2")
    cfg = TINY["gpt2"][2].to_dict() | {"vocab_size": 160}
    save(T.GPT2LMHeadModel(T.GPT2Config.from_dict(cfg)), tmp_path / "base")
    _refused(Path(ft), tmp_path / "base", tmp_path, BaseMismatchError,
             "transformer.wte.weight: model (128, 32) vs base (160, 32)", "vocabulary")


def test_config_head_count_disagreeing_with_the_weights(pair, tmp_path):
    base, ft = pair
    cfg = json.loads((ft / "config.json").read_text())
    assert cfg["head_dim"] == 16 and cfg["num_attention_heads"] == 4
    (ft / "config.json").write_text(json.dumps(cfg | {"num_attention_heads": 8}))
    _refused(ft, base, tmp_path, SpecError, "q_proj.weight has length 64", "the config implies 128",
             "config.json and the weights disagree")


def _regrouped_heads(folder: Path) -> None:
    # 8 heads of 8 dimensions (4 K/V heads) instead of 4 of 16 (2 K/V heads): every shape is equal
    cfg = json.loads((folder / "config.json").read_text())
    cfg.pop("head_dim", None)
    (folder / "config.json").write_text(json.dumps(cfg | {"num_attention_heads": 8, "num_key_value_heads": 4}))


def test_structural_differences_sees_a_head_count_the_shapes_cannot(pair):
    base, ft = pair
    _regrouped_heads(base)
    with Checkpoint(ft) as m, Checkpoint(base) as b:
        assert m.shapes() == b.shapes()
        assert structural_differences(m, b) == ["num_attention_heads: model 4 vs base 8",
                                                "num_key_value_heads: model 2 vs base 4"]
        assert structural_differences(m, m) == []


def test_base_with_another_head_count_but_equal_shapes_is_refused(pair, tmp_path):
    base, ft = pair
    _regrouped_heads(base)
    _refused(ft, base, tmp_path, BaseMismatchError, "num_attention_heads")


# ---- paths --------------------------------------------------------------------------------------
def test_model_given_as_a_file_and_a_base_that_does_not_exist(pair, tmp_path):
    base, ft = pair
    _refused(ft / "config.json", base, tmp_path, CheckpointError, "is a file, not a folder", f"probably {ft}")
    _refused(ft, tmp_path / "no-such-base", tmp_path, CheckpointError, "no-such-base: no such folder")


# ---- writing: real failures, atomicity, concurrency -------------------------------------------------
@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_a_real_full_disk_is_an_oserror_naming_the_file(pair, tmp_path, monkeypatch):
    import builtins

    import mergeshield.io.checkpoint as io

    def full(path: object, mode: str = "r") -> object:  # every shard lands on /dev/full: ENOSPC
        return builtins.open("/dev/full", mode)

    base, ft = pair
    monkeypatch.setattr(io, "open", full, raising=False)
    msg = _refused(ft, base, tmp_path, OSError, "No space left on device while writing", "model.safetensors",
                   "the disk is full")
    assert "[Errno 28]" in msg


def _free_space(monkeypatch: pytest.MonkeyPatch, free: int) -> None:
    """Make every file system report `free` bytes free (shutil.disk_usage)."""
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=free))


def _written(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@pytest.mark.parametrize("command", ["protect", "merge", "save_as_dtype"])
def test_an_output_that_cannot_fit_on_the_disk_is_refused_before_writing(pair, tmp_path, monkeypatch, command):
    from mergeshield import make_method, merge_checkpoints
    from mergeshield.io.checkpoint import output_bytes, save_as_dtype

    base, ft = pair
    with Checkpoint(ft) as ck:
        need = output_bytes(ck, (lambda n: torch.float16) if command == "save_as_dtype" else ck.dtype)
    run = {
        "protect": lambda out: protect(ft, base, out, key_out=tmp_path / "key", progress=False),
        "merge": lambda out: merge_checkpoints(base, [ft], out, make_method("task_arithmetic", lam=0.8), progress=False),
        "save_as_dtype": lambda out: save_as_dtype(ft, out, torch.float16),
    }[command]
    before = _snapshot(ft, base)
    _free_space(monkeypatch, need - 1)
    with pytest.raises(OSError) as info:
        run(tmp_path / "out")
    assert info.value.errno == errno.ENOSPC
    message = " ".join(str(info.value).split())
    for needle in (f"({need} bytes) and the disk has", f"({need - 1} bytes) free", "Nothing was written",
                   "choose an output on another disk"):
        assert needle in message, message
    assert not (tmp_path / "out").exists() and not (tmp_path / "key").exists() and _leftovers(tmp_path) == []
    assert _snapshot(ft, base) == before
    _free_space(monkeypatch, need)  # just enough: written, and the estimate is what it took (plus headers)
    run(tmp_path / "out")
    assert need <= _written(tmp_path / "out") <= need + 64 * 1024


def test_a_file_system_that_cannot_report_its_free_space_is_written_anyway(pair, tmp_path, monkeypatch):
    def unknown(path: object) -> object:
        raise OSError(errno.ENOSYS, "statvfs not supported")

    base, ft = pair
    monkeypatch.setattr(shutil, "disk_usage", unknown)
    protect(ft, base, tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_interrupted_block_removes_its_temporary_folder_and_new_parents(tmp_path):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "keep.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_output_dir(tmp_path / "new" / "deeper" / "out") as tmp:
        (tmp / "half.safetensors").write_bytes(b"x")
        raise KeyboardInterrupt
    assert not (tmp_path / "new").exists()
    with pytest.raises(KeyboardInterrupt), atomic_output_dir(tmp_path / "old", overwrite=True) as tmp:
        (tmp / "half.safetensors").write_bytes(b"x")
        raise KeyboardInterrupt
    assert [p.name for p in (tmp_path / "old").iterdir()] == ["keep.txt"] and _leftovers(tmp_path) == []


def test_temporary_names_never_collide_across_threads(tmp_path):
    n = 8
    barrier = threading.Barrier(n)
    names: list[str] = []

    def work(i: int) -> None:
        with atomic_output_dir(tmp_path / f"out{i}") as tmp:
            names.append(tmp.name)
            (tmp / "f").write_text(str(i))
            barrier.wait(timeout=30)  # every temporary folder exists at the same time

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(names)) == n and all(f"mergeshield-tmp-{os.getpid()}-" in x for x in names)
    assert [(tmp_path / f"out{i}" / "f").read_text() for i in range(n)] == [str(i) for i in range(n)]
    assert _leftovers(tmp_path) == []


def test_concurrent_runs_match_a_sequential_run(pair, tmp_path):
    base, ft = pair
    protect(ft, base, tmp_path / "seq", key_out=tmp_path / "seq.key", progress=False)
    n = 3
    barrier = threading.Barrier(n)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait(timeout=30)  # start together
            protect(ft, base, tmp_path / f"par{i}", key_out=tmp_path / f"par{i}.key", progress=False)
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    want = sorted((p.relative_to(tmp_path / "seq"), p.read_bytes()) for p in (tmp_path / "seq").rglob("*"))
    for i in range(n):
        got = sorted((p.relative_to(tmp_path / f"par{i}"), p.read_bytes()) for p in (tmp_path / f"par{i}").rglob("*"))
        assert got == want
        assert (tmp_path / f"par{i}.key").read_bytes() == (tmp_path / "seq.key").read_bytes()
    assert _leftovers(tmp_path) == []


# ---- signals -----------------------------------------------------------------------------------
def _write_llama(folder: Path, tensors: dict[str, torch.Tensor], config: object) -> None:
    folder.mkdir()
    config.save_pretrained(folder)  # type: ignore[attr-defined]
    weight_map: dict[str, str] = {}
    groups: dict[str, list[str]] = {}
    for name in tensors:
        groups.setdefault(name.split(".")[2] if name.startswith("model.layers.") else "rest", []).append(name)
    for k, (_, names) in enumerate(sorted(groups.items())):
        fname = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: tensors[n] for n in names}, folder / fname, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(names, fname)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> tuple[Path, Path]:
    """A Llama-shaped checkpoint (hidden 512, MLP 2048, 8 layers, 126 MB float32) in 9 shards."""
    import transformers as T

    root = tmp_path_factory.mktemp("big")
    h, inter, layers, kv_dim = 512, 2048, 8, 256
    cfg = T.LlamaConfig(hidden_size=h, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=8,
                        num_key_value_heads=4, vocab_size=256, tie_word_embeddings=True)
    shapes = {"model.embed_tokens.weight": (256, h), "model.norm.weight": (h,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv_dim, h),
                   p + "self_attn.v_proj.weight": (kv_dim, h), p + "self_attn.o_proj.weight": (h, h),
                   p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
                   p + "mlp.down_proj.weight": (h, inter), p + "input_layernorm.weight": (h,),
                   p + "post_attention_layernorm.weight": (h,)}
    gen = torch.Generator().manual_seed(0)
    pre = {n: torch.randn(s, generator=gen) * 0.02 if len(s) > 1 else torch.ones(s) for n, s in shapes.items()}
    _write_llama(root / "base", pre, cfg)
    _write_llama(root / "ft", {n: t * 1.01 for n, t in pre.items()}, cfg)
    return root / "base", root / "ft"


def test_sigint_and_sigterm_mid_write_leave_nothing(big, tmp_path):
    base, ft = big
    before = _snapshot(base, ft)
    procs = {}
    for sig in (signal.SIGINT, signal.SIGTERM):  # two separate runs, started together to save time
        parent = tmp_path / sig.name / "nested"  # created by the run, so it must go again
        procs[sig] = (parent, subprocess.Popen(
            [sys.executable, "-m", "mergeshield.cli", "protect", str(ft), "--base", str(base),
             "--out", str(parent / "out"), "--no-permute-mlp", "--quiet"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint))  # noqa: PLW1509
    deadline = time.monotonic() + 120
    pending = set(procs)
    while pending and time.monotonic() < deadline:
        for sig in list(pending):
            parent, proc = procs[sig]
            if proc.poll() is not None:
                pytest.fail(f"the {sig.name} run ended before it could be interrupted: {proc.communicate()}")
            if parent.exists() and any("mergeshield-tmp" in p.name for p in parent.iterdir()):
                proc.send_signal(sig)  # writing has begun
                pending.discard(sig)
        time.sleep(0.005)
    assert not pending, "the runs never started writing"
    for sig, (_, proc) in procs.items():
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 128 + sig, (sig.name, proc.returncode, err)
        assert f"interrupted ({sig.name})" in err and "Traceback" not in out + err, err
        assert not (tmp_path / sig.name).exists(), sig.name
    assert _snapshot(base, ft) == before


# ---- the CLI: one message, exit code 2, no traceback ----------------------------------------------
def _file_size_limit() -> None:
    """preexec: writes past 20 kB fail with EFBIG (a real failure inside safetensors' Rust writer)."""
    _default_sigint()
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))


def test_cli_exit_code_and_message_for_several_faults(pair, sharded, tmp_path):
    # (the permission, signal and concurrency tests run the CLI too)
    base, ft = pair
    shutil.copytree(ft, tmp_path / "fp8")
    up = "model.layers.0.mlp.up_proj.weight"
    _edit(tmp_path / "fp8" / "model.safetensors", lambda t: t.__setitem__(up, t[up].to(torch.float8_e5m2)))
    shutil.copytree(ft, tmp_path / "fifo")
    (tmp_path / "fifo" / "config.json").unlink()
    os.mkfifo(tmp_path / "fifo" / "config.json")
    g_base, g_ft = sharded
    (g_ft / "model.safetensors.index.json").write_text('{"weight_map": {"wte.weight": "../x.safetensors"}}')

    def run(model: Path, base_dir: Path = base) -> list[str]:
        return ["protect", str(model), "--base", str(base_dir), "--out", str(tmp_path / "out"), "--quiet"]

    cases = {
        "file size limit mid-write": (run(ft), ["File too large while writing", "model.safetensors",
                                                "partial output is removed"]),
        "missing base": (run(ft, tmp_path / "nope"), ["nope: no such folder"]),
        "float8": (run(tmp_path / "fp8"), ["float8_e5m2", "Dequantise"]),
        "fifo config": (run(tmp_path / "fifo"), ["config.json: is not a regular file"]),
        "index outside": (run(g_ft, g_base), ["'../x.safetensors', which is not a file inside the model folder"]),
    }
    before = _snapshot(ft, base)
    hooks = [_file_size_limit] + [_default_sigint] * (len(cases) - 1)
    results = _cli_many([args for args, _ in cases.values()], preexec=hooks)
    assert _snapshot(ft, base) == before
    for (label, (_, needles)), res in zip(cases.items(), results, strict=True):
        assert res.returncode == 2, label
        _assert_cli_refused(res, *needles)
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


# ---- fuzzing (brief here; see fuzz/README.md for a long run) --------------------------------------------
@pytest.mark.parametrize("target", ["safetensors", "header", "index", "family"])
def test_fuzz_brief(target):
    from fuzz_reader import TARGETS

    TARGETS[target](int(os.environ.get("FUZZ_EXAMPLES", "50")))


@pytest.mark.parametrize("text", ["name: 2001-13-45\n", "[" * 5000], ids=["bad_date", "deep_nesting"])
def test_family_loader_turns_every_yaml_failure_into_a_spec_error(text):
    from fuzz_reader import check_family

    check_family(text)


def test_a_signal_turned_into_another_error_by_native_code_still_exits_as_interrupted(monkeypatch):
    """A signal's exception raised inside safetensors/torch can come back as a different error (seen:
    a CheckpointError saying "corrupt"); the CLI must still report the interruption, 128+N."""
    import typer

    from mergeshield import cli

    def reads_a_tensor() -> None:
        raise CheckpointError("model.safetensors: tensor 'x' cannot be read (...); the file is corrupt")

    wrapped = cli._handled(reads_a_tensor)
    with pytest.raises(typer.Exit) as exc:
        wrapped()
    assert exc.value.exit_code == 2  # no signal: a real read error
    monkeypatch.setattr(cli, "_received", [signal.SIGTERM])
    with pytest.raises(typer.Exit) as exc:
        wrapped()
    assert exc.value.exit_code == 128 + signal.SIGTERM


def test_interrupt_while_waiting_for_the_writer_never_closes_a_file_under_a_running_write(tmp_path, monkeypatch):
    """Ctrl-C can land while the main thread waits for the writer thread (here: for the shard's
    last write): that write must finish before its file is closed and the folder removed."""
    from concurrent.futures import Future, ThreadPoolExecutor

    from mergeshield.io.checkpoint import ShardWriter

    base = build("llama", 0)
    ft = build("llama", 1, finetune_of=base)
    save(base, tmp_path / "base")
    save(ft, tmp_path / "ft")
    closed_under_write: list[str] = []
    real_write, real_result, real_submit = ShardWriter.write, Future.result, ThreadPoolExecutor.submit
    last: list[Future] = []

    def slow_write(self, name, tensor):
        if self._next == len(self.order) - 1:  # the shard's last write: still running when waited for
            time.sleep(0.3)
        if self._file.closed:
            closed_under_write.append(name)
            return
        real_write(self, name, tensor)

    def submit(self, fn, /, *args, **kwargs):
        last[:] = [real_submit(self, fn, *args, **kwargs)]
        return last[0]

    def interrupted_result(self, timeout=None):
        if last and self is last[0] and not self.done():
            raise KeyboardInterrupt  # as the signal handler raises it, mid-wait
        return real_result(self, timeout)

    monkeypatch.setattr(ShardWriter, "write", slow_write)
    monkeypatch.setattr(ThreadPoolExecutor, "submit", submit)
    monkeypatch.setattr(Future, "result", interrupted_result)
    with pytest.raises(KeyboardInterrupt):
        protect(tmp_path / "ft", tmp_path / "base", tmp_path / "out", progress=False)
    assert not closed_under_write
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "ft"]  # no temporary folder left
