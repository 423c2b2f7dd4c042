"""Training tests on a tiny model (hidden 32, 2 layers) with a tiny byte-level BPE tokenizer trained here,
so they need no model file; one test uses the default GGUF's real tokenizer when it is present."""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from model import train as trainmod
from model.defaults import DefaultModelMissing, require_default_model
from model.tokenizer import Tokenizer
from model.train import BlockSampler, TrainConfig, TrainError, build_dataset, lr_factor, make_optimizer, train
from model.weights import load_model

REPO = Path(__file__).resolve().parents[2]
TEXT = (
    "The scheduler returns a plan: for each request, the number of tokens to compute in this step. "
    "The block manager deals only in integers, with a free list and reference counts. "
    "Each request owns its state: token ids, the number of computed tokens, its block table and status. "
    "Rotary embeddings rotate half of each head's dimensions by an angle that grows with the position. "
    "RMS normalization divides by the root mean square of the hidden state and scales by a weight. "
    "The gated MLP multiplies the SiLU of one projection by another and projects back down. "
    "A paged cache stores keys and values in fixed-size blocks that many sequences can share. "
) * 2
EOS = "<|endoftext|>"
TINY = {
    "vocab_size": 320,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    # Tiny ops on 2 busy cores: a second OpenMP thread only adds spin-waiting (10x slower measured).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("train_inputs")
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator([TEXT], trainer)
    tok_dir = root / "tok"
    tok_dir.mkdir()
    backend.save(str(tok_dir / "tokenizer.json"))
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOS}))
    (root / "tiny.json").write_text(json.dumps(TINY))
    (root / "data.txt").write_text(TEXT)
    return {"tokenizer": tok_dir, "config": root / "tiny.json", "data": root / "data.txt", "root": root}


def tiny_cfg(files: dict[str, Path], out_dir: Path, **overrides: object) -> TrainConfig:
    base: dict[str, object] = dict(
        data=[str(files["data"])],
        out_dir=str(out_dir),
        config=str(files["config"]),
        tokenizer=str(files["tokenizer"]),
        block_size=32,
        batch_size=4,
        max_steps=12,
        lr=3e-3,
        warmup_steps=3,
        dtype="fp32",
        device="cpu",
        seed=7,
        save_every=100,
        log_every=100,
        eval_every=4,
        val_fraction=0.1,
    )
    base.update(overrides)
    return TrainConfig(**base)  # type: ignore[arg-type]


def losses(history: list[dict[str, float]]) -> list[float]:
    return [row["loss"] for row in history]


# ---- learning --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_loss_falls_well_below_its_start_when_overfitting(files: dict[str, Path], tmp_path: Path) -> None:
    result = train(tiny_cfg(files, tmp_path, max_steps=80, val_fraction=0.0, eval_every=0, lr=1e-2))
    curve = losses(result.history)
    assert curve[0] > 5.0  # about ln(320) at the spec's init
    assert sum(curve[-5:]) / 5 < 0.5 * curve[0]
    rows = list(csv.DictReader(open(tmp_path / "log.csv")))
    assert [int(r["step"]) for r in rows] == list(range(1, 81))
    assert float(rows[-1]["tokens_per_s"]) > 0 and float(rows[0]["lr"]) == pytest.approx(1e-2 / 3)


def test_data_is_tokenized_with_eos_between_documents_and_packed(
    files: dict[str, Path], tmp_path: Path
) -> None:
    docs = ["first document here", "second one", "", "third and last document"]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("\n".join(json.dumps({"body": d, "id": i}) for i, d in enumerate(docs)) + "\n\n")
    tok = Tokenizer.from_file(files["tokenizer"])
    eos = tok.eos_token_id
    cfg = tiny_cfg(files, tmp_path, data=[str(jsonl)], text_field="body", block_size=4, val_fraction=0.0)
    data = build_dataset(cfg, tok, eos)
    expected = [i for d in docs if d for i in [*tok.encode(d), eos]]
    n = len(expected) // 4 * 4
    assert data.train.shape == (n // 4, 4)
    assert data.train.flatten().tolist() == expected[:n]


def test_data_order_is_a_per_epoch_permutation_fixed_by_the_seed() -> None:
    a, b, c = BlockSampler(10, seed=1), BlockSampler(10, seed=1), BlockSampler(10, seed=2)
    seq_a = [a.take(3).tolist() for _ in range(10)]  # 30 indices = 3 epochs
    assert seq_a == [b.take(3).tolist() for _ in range(10)]
    assert seq_a != [c.take(3).tolist() for _ in range(10)]
    flat = [i for chunk in seq_a for i in chunk]
    assert all(sorted(flat[e * 10 : (e + 1) * 10]) == list(range(10)) for e in range(3))
    assert flat[:10] != flat[10:20]  # a new permutation each epoch


def test_lr_schedule_and_weight_decay_groups(files: dict[str, Path], tmp_path: Path) -> None:
    factors = [lr_factor(s, warmup=4, total=20, min_ratio=0.1) for s in range(20)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(x >= y for x, y in zip(factors[3:], factors[4:], strict=False))
    assert lr_factor(20, 4, 20, 0.1) == pytest.approx(0.1)
    model = trainmod.build_model(tiny_cfg(files, tmp_path), torch.device("cpu"))
    decay, no_decay = make_optimizer(model, TrainConfig(weight_decay=0.1), torch.device("cpu")).param_groups
    assert decay["weight_decay"] == 0.1 and all(p.dim() == 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


# ---- resuming --------------------------------------------------------------------------------------------
def interrupt_at(step: int):  # type: ignore[no-untyped-def]
    def hook(s: int, _loss: float) -> None:
        if s == step:
            os.kill(os.getpid(), signal.SIGINT)  # the real handler: checkpoint after this step, then stop

    return hook


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize(
    ("device", "dtype"),
    [("cpu", "fp32"), ("cpu", "bf16"), pytest.param("cuda", "bf16", marks=[pytest.mark.gpu, CUDA])],
)
def test_resume_after_interrupt_matches_an_uninterrupted_run(
    files: dict[str, Path], tmp_path: Path, device: str, dtype: str
) -> None:
    # sample_every: generations in between must not disturb the run (they use their own generator)
    kw = dict(device=device, dtype=dtype, grad_accum=2, max_steps=12, sample_every=4, sample_tokens=4)
    straight = train(tiny_cfg(files, tmp_path / "a", **kw))
    first = train(tiny_cfg(files, tmp_path / "b", **kw), on_step=interrupt_at(5))
    assert first.interrupted and first.step == 5 and first.final_dir is None
    assert (tmp_path / "b" / "latest").read_text().strip() == "checkpoints/step_00000005"
    second = train(tiny_cfg(files, tmp_path / "b", **kw))  # resumes from out_dir/latest
    assert not second.interrupted and [r["step"] for r in second.history] == list(range(6, 13))
    assert losses(first.history + second.history) == pytest.approx(losses(straight.history), abs=1e-6)
    logged = {p: list(csv.DictReader(open(tmp_path / p / "log.csv"))) for p in ("a", "b")}
    assert [(r["step"], r["val_loss"]) for r in logged["a"]] == [
        (r["step"], r["val_loss"]) for r in logged["b"]
    ]
    wa, wb = (load_model(tmp_path / p / "final").state_dict() for p in ("a", "b"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_drops_log_rows_written_after_the_checkpoint(files: dict[str, Path], tmp_path: Path) -> None:
    train(tiny_cfg(files, tmp_path, max_steps=6, save_every=4))  # saves at 4 and at the end (6)
    (tmp_path / "latest").write_text("checkpoints/step_00000004\n")  # as if it died before saving step 6
    train(tiny_cfg(files, tmp_path, max_steps=8, save_every=4))
    steps = [int(r["step"]) for r in csv.DictReader(open(tmp_path / "log.csv"))]
    assert steps == list(range(1, 9))


def test_rng_states_round_trip() -> None:
    state = trainmod.capture_rng()
    draws = (random.random(), np.random.rand(), torch.rand(1).item())
    trainmod.restore_rng(torch.load(_saved(state), weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == draws


def _saved(obj: object) -> object:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def test_a_crash_while_writing_a_checkpoint_leaves_latest_intact(
    files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_save, calls = torch.save, []

    def dying_save(obj: object, f: object, *a: object, **k: object) -> None:
        calls.append(f)
        if len(calls) == 2:
            raise OSError("disk full")  # mid-write of the second checkpoint
        real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError, match="disk full"):
        train(tiny_cfg(files, tmp_path, max_steps=8, save_every=3))
    monkeypatch.setattr(torch, "save", real_save)
    assert (tmp_path / "latest").read_text().strip() == "checkpoints/step_00000003"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        ".tmp-step_00000006-" + str(os.getpid()),
        "step_00000003",
    ]
    result = train(tiny_cfg(files, tmp_path, max_steps=8, save_every=3))
    assert result.history[0]["step"] == 4 and result.step == 8
    assert not any(p.name.startswith(".tmp") for p in (tmp_path / "checkpoints").iterdir())


def test_keeps_only_the_last_k_checkpoints(files: dict[str, Path], tmp_path: Path) -> None:
    train(tiny_cfg(files, tmp_path, max_steps=10, save_every=2, keep_last=2))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000008", "step_00000010"]


# ---- the result serves -----------------------------------------------------------------------------------
def test_final_folder_loads_generates_and_fine_tunes(files: dict[str, Path], tmp_path: Path) -> None:
    result = train(tiny_cfg(files, tmp_path / "run", max_steps=4, export_every=2))
    final = result.final_dir
    assert final is not None
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in final.iterdir()
    }
    assert (tmp_path / "run" / "exports" / "step_00000002" / "model.safetensors").is_file()
    model, tok = load_model(final), Tokenizer.from_file(final)
    ids = torch.tensor([tok.encode("The block manager")])
    out = model.generate(ids, max_new_tokens=5, temperature=0)
    assert out.shape == (1, ids.shape[1] + 5)
    assert isinstance(tok.decode(out[0].tolist()), str)
    ft_cfg = tiny_cfg(files, tmp_path / "ft", init=str(final), config=None, tokenizer=None, max_steps=2)
    tuned = train(ft_cfg)
    # Fine-tuning starts from the exported weights: its first loss is the final model's on that batch.
    data = build_dataset(ft_cfg, tok, tok.eos_token_id)
    batch = data.train[BlockSampler(len(data.train), ft_cfg.seed).take(ft_cfg.batch_size)].long()
    with torch.no_grad():
        expected = model(batch, labels=batch).loss.item()
    assert tuned.history[0]["loss"] == pytest.approx(expected, abs=1e-5)


# ---- bad input -------------------------------------------------------------------------------------------
def test_bad_inputs_give_clear_errors(files: dict[str, Path], tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(TrainError, match="fewer than one block"):
        train(tiny_cfg(files, tmp_path / "e", data=[str(empty)]))
    with pytest.raises(TrainError, match="max_position_embeddings"):
        train(tiny_cfg(files, tmp_path / "b", block_size=65))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(TrainError, match=r"bad.jsonl:2: no string field 'text'"):
        train(tiny_cfg(files, tmp_path / "j", data=[str(bad)]))
    with pytest.raises(TrainError, match="data path not found"):
        train(tiny_cfg(files, tmp_path / "m", data=[str(tmp_path / "missing.txt")]))


def test_corrupt_checkpoint_is_reported_not_unpickled(files: dict[str, Path], tmp_path: Path) -> None:
    train(tiny_cfg(files, tmp_path, max_steps=2, save_every=2))
    state = tmp_path / "checkpoints" / "step_00000002" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(TrainError, match="corrupt"):
        train(tiny_cfg(files, tmp_path, max_steps=4))


def test_resume_refuses_changed_data_order_options(files: dict[str, Path], tmp_path: Path) -> None:
    train(tiny_cfg(files, tmp_path, max_steps=2))
    with pytest.raises(TrainError, match="batch_size: 4 -> 2"):
        train(tiny_cfg(files, tmp_path, max_steps=4, batch_size=2))


def test_cli_reports_errors_without_a_traceback(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = trainmod.main(["--data", str(tmp_path / "nope.txt"), "--out-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "error: data path not found" in err and "Traceback" not in err


@pytest.mark.slow
def test_cli_sigterm_checkpoints_and_rerun_resumes(files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "model.train", "--data", str(files["data"]), "--out-dir", str(out),
           "--config", str(files["config"]), "--tokenizer", str(files["tokenizer"]), "--block-size", "32",
           "--batch-size", "4", "--max-steps", "100000", "--dtype", "fp32", "--device", "cpu",
           "--log-every", "1", "--save-every", "0"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(_csv_steps(out)) < 3:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    stopped = (out / "latest").read_text().strip()
    assert "Run the same command to resume" in err
    rerun = subprocess.run(
        [*cmd[: cmd.index("--max-steps") + 1], str(int(stopped.rsplit("_", 1)[1]) + 2), *cmd[cmd.index("--dtype") :]],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr
    assert "resumed at step" in rerun.stderr and (out / "final" / "model.safetensors").is_file()


def _csv_steps(out: Path) -> list[str]:
    log = out / "log.csv"
    return log.read_text().splitlines()[1:] if log.is_file() else []


@pytest.mark.real_model
def test_default_tokenizer_is_the_real_one(files: dict[str, Path], tmp_path: Path) -> None:
    try:
        require_default_model()
    except DefaultModelMissing as e:
        pytest.skip(str(e))
    cfg_path = tmp_path / "vocab49152.json"
    cfg_path.write_text(json.dumps({**TINY, "vocab_size": 49152}))
    result = train(tiny_cfg(files, tmp_path, config=str(cfg_path), tokenizer=None, max_steps=2))
    assert Tokenizer.from_file(result.final_dir).vocab_size == 49152  # type: ignore[arg-type]
