"""The engine on CUDA: decode steps replayed from CUDA graphs give the same tokens as generate().

Runs only where CUDA is present (`pytest -m gpu`, bench/gpu_check.sh); CPU CI skips it.
"""

from __future__ import annotations

import pytest
import torch

from server.engine.engine import LLMEngine
from server.engine.request import SamplingParams
from server.engine.runner import ModelRunner
from server.engine.scheduler import Scheduler, SchedulerConfig

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run bench/gpu_check.sh on a GPU)"),
]


def _engine(model, cuda_graphs: bool) -> LLMEngine:  # type: ignore[no-untyped-def]
    cfg = SchedulerConfig(
        max_num_seqs=16, max_num_batched_tokens=512, max_model_len=1024, block_size=16, num_blocks=512
    )
    runner = ModelRunner(
        model,
        cfg.num_blocks,
        cfg.block_size,
        cuda_graphs=cuda_graphs,
        max_num_seqs=16,
        max_model_len=cfg.max_model_len,
    )
    return LLMEngine(runner, Scheduler(cfg))


def _run(engine: LLMEngine, prompts: list[list[int]], max_tokens: int) -> dict[str, list[int]]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"g{i}", p, params)
    out: dict[str, list[int]] = {f"g{i}": [] for i in range(len(prompts))}
    while engine.has_unfinished():
        for o in engine.step():
            for c in o.outputs:
                out[o.request_id].extend(c.new_token_ids)
    engine.scheduler.allocator.check_integrity()
    return out


@pytest.mark.real_model
@pytest.mark.parametrize("n", [1, 8, 5])
def test_cuda_graph_decode_equals_generate(n: int) -> None:
    from model.weights import load_model

    model = load_model(None, dtype=torch.float32, device="cuda")
    g = torch.Generator().manual_seed(n)
    prompts = [
        torch.randint(100, 49152, (int(torch.randint(3, 60, (1,), generator=g)),), generator=g).tolist()
        for _ in range(n)
    ]
    want = {
        f"g{i}": model.generate(torch.tensor([p], device="cuda"), 24, temperature=0.0)[0, len(p) :].tolist()
        for i, p in enumerate(prompts)
    }
    engine = _engine(model, cuda_graphs=True)
    assert _run(engine, prompts, 24) == want
    assert engine.runner.graphs is not None and engine.runner.graphs.graphs, "decode should replay graphs"


@pytest.mark.real_model
def test_cuda_bf16_graphs_close_to_eager() -> None:
    from model.weights import load_model

    model = load_model(None, dtype=torch.bfloat16, device="cuda")
    prompts = [list(range(200 + i, 240 + i)) for i in range(8)]
    graphed = _run(_engine(model, cuda_graphs=True), prompts, 32)
    eager = _run(
        _engine(load_model(None, dtype=torch.bfloat16, device="cuda"), cuda_graphs=False), prompts, 32
    )
    same = sum(a == b for a, b in zip(graphed.values(), eager.values(), strict=True))
    assert same >= 6, f"only {same}/8 bf16 sequences agree between graphs and eager"
