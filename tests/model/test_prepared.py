"""The prepared-model disk cache: a second load (in a fresh process, as an engine restart is) reads the
cache, serves the same tokens, and a change of the source or of the options is a new entry."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from model.kernels import Kernels, has_bf16_gemm
from model.prepared import load_prepared, prepared_path
from model.quant import ALL_ROWS
from model.weights import save_hf_folder
from tests.tiny import make_tiny_model

ROOT = Path(__file__).resolve().parents[2]
GREEDY = """
import logging, sys
logging.basicConfig(level="INFO")
from model.prepared import load_prepared
from server.engine.core import EngineConfig
from server.engine.engine import LLMEngine
from server.engine.request import SamplingParams
from server.engine.runner import ModelRunner
from server.engine.scheduler import Scheduler, SchedulerConfig

model = load_prepared(sys.argv[1], "bfloat16", "cpu", "auto", "auto")
cfg = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64, block_size=16, num_blocks=16)
engine = LLMEngine(ModelRunner(model, 16, 16), Scheduler(cfg), EngineConfig(cfg))
engine.add_request("a", [1, 2, 3, 4, 5], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
tokens = []
while engine.has_unfinished():
    tokens += [t for out in engine.step() for c in out.outputs for t in c.new_token_ids]
print(" ".join(map(str, tokens)))
"""


def greedy_in_a_new_process(folder: Path, home: Path) -> tuple[list[int], str]:
    # A fresh home for the cache, the usual one for the kernels (built once, not per test).
    env = {**os.environ, "SMOLLM2_HOME": str(home), "PYTHONPATH": str(ROOT)}
    env["SMOLLM2_KERNEL_CACHE"] = os.environ.get("SMOLLM2_KERNEL_CACHE") or str(_kernel_root())
    done = subprocess.run([sys.executable, "-c", GREEDY, str(folder)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return [int(t) for t in done.stdout.split()], done.stderr


def _kernel_root() -> Path:
    from model import paged_kernel

    return paged_kernel._kernel_root()


@pytest.mark.slow
def test_a_fresh_process_reads_the_cache_and_serves_the_same_tokens(tmp_path: Path) -> None:
    folder = save_hf_folder(make_tiny_model(), tmp_path / "tiny")
    home = tmp_path / "home"
    first, log1 = greedy_in_a_new_process(folder, home)
    entries = list((home / "prepared").glob("*.pt"))
    assert len(entries) == 1 and "cached as" in log1
    stamp = entries[0].stat().st_mtime_ns
    second, log2 = greedy_in_a_new_process(folder, home)
    assert "read from the cache" in log2 and entries[0].stat().st_mtime_ns == stamp
    assert second == first and len(first) == 12


def test_the_cache_key_follows_the_source_and_the_options(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SMOLLM2_HOME", str(tmp_path / "home"))
    folder = save_hf_folder(make_tiny_model(), tmp_path / "tiny")
    key = prepared_path(str(folder), "bfloat16", "auto", "auto")
    assert key == prepared_path(str(folder), "bfloat16", "auto", "auto")
    assert key != prepared_path(str(folder), "float32", "auto", "auto")
    assert key != prepared_path(str(folder), "bfloat16", "off", "auto")
    invariant = prepared_path(str(folder), "bfloat16", "auto", "auto", batch_invariant=True)
    assert invariant != key and invariant.name.split("-")[0] != key.name.split("-")[0]  # both files kept
    save_hf_folder(make_tiny_model(seed=1), folder)  # new weights in the same place
    assert key != prepared_path(str(folder), "bfloat16", "auto", "auto")


def test_a_damaged_entry_is_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMOLLM2_HOME", str(tmp_path / "home"))
    folder = save_hf_folder(make_tiny_model(), tmp_path / "tiny")
    path = prepared_path(str(folder), "float32", "off", "off")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a checkpoint")
    model = load_prepared(str(folder), "float32", "cpu", "off", "off")
    ids = torch.tensor([[1, 2, 3]])
    expected = make_tiny_model()(ids).logits
    assert torch.allclose(model(ids).logits, expected, atol=1e-5)
    assert path.stat().st_size > 1000  # rewritten


def test_dropping_the_unpacked_weights_keeps_the_serving_path_bit_identical() -> None:
    """The served model keeps only what serving reads (packed, int4 and int8 copies, the embedding); its
    hidden states and logits do not change, and the training path refuses to run."""
    from model.attention import PrefillSeq, allocate_kv_cache, step_metadata

    model = make_tiny_model(dtype=torch.bfloat16)
    model.prepare_for_serving(int4_small_batch="on", int8_lm_head="on")
    assert model.kernels is not None
    cfg, bs = model.config, 16
    ids = torch.randint(0, cfg.vocab_size, (12,))

    def step() -> list[torch.Tensor]:
        out = []
        for n in (12, 3):  # the bf16 GEMM, and the int4 one (at most INT4_MAX_ROWS rows)
            caches = allocate_kv_cache(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, 4, bs,
                                       torch.bfloat16, "cpu")  # fmt: skip
            prefill = [PrefillSeq(0, n, n, torch.tensor([0]))]
            meta = step_metadata(torch.arange(n), prefill, bs, model.kernels.cpp)
            hidden = model.forward_paged(ids[:n], torch.arange(n), meta, caches)
            out += [hidden, model.compute_logits(hidden[-1:]), model.compute_logits(hidden)]
        return out

    before = step()
    freed = model.drop_unpacked_weights()
    if not model.kernels.bf16_gemm:  # without our GEMM oneDNN may still pack them; or a plain mm keeps them
        assert freed >= 0
    else:
        dropped = [
            p for n, p in model.named_parameters() if "embed" in n or ("layers." in n and "norm" not in n)
        ]
        # where the int4 copies take every step (our int4 GEMM on AMX) the layers' bf16 tiles go too
        every = model.int4_rows >= ALL_ROWS
        tiles = sum(2 * p.numel() for p in dropped if p.shape[0] != cfg.vocab_size) if every else 0
        assert freed == sum(2 * p.numel() for p in dropped) + tiles and all(p.is_meta for p in dropped)
        assert all((lin.tiles is None) == every for lin in model._layer_linears())
    after = step()
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    if freed:
        with pytest.raises(RuntimeError, match="serving weights"):
            model(ids[None])
        with pytest.raises(ValueError, match="int4_small_batch"):
            model.prepare_for_serving(int4_small_batch="off")


@pytest.mark.parametrize("bf16_gemm", [True, False])
def test_a_prepared_model_survives_save_and_load_whichever_gemm_packed_it(bf16_gemm: bool) -> None:
    """CPUs without our bf16 GEMM (no AVX512-BF16) or preferring oneDNN's (AMX) pack the linears in
    oneDNN's opaque layout: the prepared model must still be written to the cache and serve the same
    hidden states when read back."""
    import io

    from model.attention import PrefillSeq, allocate_kv_cache, step_metadata

    detected = Kernels.detect(torch.device("cpu"))
    if bf16_gemm and not has_bf16_gemm():
        pytest.skip("this CPU has no AVX512-BF16 GEMM")
    model = make_tiny_model(dtype=torch.bfloat16)
    model.prepare_for_serving(kernels=Kernels(cpp=detected.cpp, bf16_gemm=bf16_gemm))
    model.drop_unpacked_weights()
    cfg, bs, n = model.config, 16, 9
    ids = torch.randint(0, cfg.vocab_size, (n,))

    def hidden(m: torch.nn.Module) -> torch.Tensor:
        caches = allocate_kv_cache(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, 4, bs,
                                   torch.bfloat16, "cpu")  # fmt: skip
        meta = step_metadata(torch.arange(n), [PrefillSeq(0, n, n, torch.tensor([0]))], bs, detected.cpp)
        return m.forward_paged(ids, torch.arange(n), meta, caches)

    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert torch.equal(hidden(model), hidden(loaded))


@pytest.mark.skipif(not has_bf16_gemm(), reason="needs the C++ kernels with AVX512-BF16")
def test_batch_invariant_has_its_own_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model prepared with --batch-invariant is cached beside the default one, never served in its place."""
    monkeypatch.setenv("SMOLLM2_HOME", str(tmp_path / "home"))
    folder = save_hf_folder(make_tiny_model(), tmp_path / "tiny")
    with pytest.raises(ValueError, match="bfloat16"):
        load_prepared(str(folder), "float32", "cpu", "auto", "auto", batch_invariant=True)
    default = load_prepared(str(folder), "bfloat16", "cpu", "auto", "auto")
    invariant = load_prepared(str(folder), "bfloat16", "cpu", "auto", "auto", batch_invariant=True)
    assert default.kernels is not None and not default.kernels.batch_invariant
    assert invariant.kernels is not None and invariant.kernels.batch_invariant
    assert len(list((tmp_path / "home" / "prepared").glob("*.pt"))) == 2
    again = load_prepared(str(folder), "bfloat16", "cpu", "auto", "auto", batch_invariant=True)
    assert again.kernels == invariant.kernels
    plain = load_prepared(str(folder), "bfloat16", "cpu", "auto", "auto")
    assert plain.kernels is not None and not plain.kernels.batch_invariant


def test_the_cache_keeps_only_the_most_recently_used_entries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One entry per model path and option set (~370 MB each for the default model) must not pile up: a
    new entry removes the least recently used beyond KEEP_ENTRIES, and a model read from a removed entry
    goes on serving."""
    from model import prepared

    monkeypatch.setenv("SMOLLM2_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(prepared, "KEEP_ENTRIES", 2)
    folders = [save_hf_folder(make_tiny_model(seed=i), tmp_path / f"tiny{i}") for i in range(3)]
    paths = [prepared_path(str(f), "float32", "off", "off") for f in folders]
    cache = paths[0].parent
    stale = cache / "dead-write.tmp"  # a write killed half-way, long ago
    cache.mkdir(parents=True)
    stale.write_bytes(b"partial")
    os.utime(stale, (0, 0))
    load_prepared(str(folders[0]), "float32", "cpu", "off", "off")
    load_prepared(str(folders[1]), "float32", "cpu", "off", "off")
    time.sleep(0.01)
    first = load_prepared(str(folders[0]), "float32", "cpu", "off", "off")  # a cache hit: now the newest use
    assert sorted(cache.glob("*.pt")) == sorted(paths[:2])
    time.sleep(0.01)
    load_prepared(str(folders[2]), "float32", "cpu", "off", "off")
    assert sorted(cache.glob("*.pt")) == sorted([paths[0], paths[2]])  # tiny1, least recently used, went
    assert not stale.exists()
    paths[0].unlink()  # as another server's eviction would
    ids = torch.tensor([[1, 2, 3]])
    assert torch.allclose(first(ids).logits, make_tiny_model(seed=0)(ids).logits, atol=1e-5)


def test_a_cache_write_that_fills_the_disk_is_a_warning_and_leaves_no_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A small cache volume: torch.save reports the full disk as a RuntimeError of its zip writer. The
    server starts anyway, and the partial file does not stay to fill the volume for good."""
    monkeypatch.setenv("SMOLLM2_HOME", str(tmp_path / "home"))
    folder = save_hf_folder(make_tiny_model(), tmp_path / "tiny")

    def full_disk(obj: object, f: object) -> None:
        f.write(b"x" * 1000)  # type: ignore[attr-defined]
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 50055488 vs 50055376")

    monkeypatch.setattr(torch, "save", full_disk)
    model = load_prepared(str(folder), "bfloat16", "cpu", "auto", "auto")
    assert model.prepared_for_serving
    assert "could not cache the prepared model" in caplog.text
    assert list((tmp_path / "home" / "prepared").glob("*")) == []
