"""What int8 activations would cost in accuracy: the numbers behind keeping decode GEMMs in bf16.

    python -m bench.act_quant_numerics [--out bench/results]

At 32 or more streams a decode step is bound by its GEMMs' multiply rate. An int8 product (vpdpbusd) does
twice the multiply-adds of a bf16 one (vdpbf16ps) per instruction, so a GEMM on int8 weights and int8
activations could run up to twice as fast, but only if each activation row is one int8 term with one scale
for the whole row: a scale per group of 32 inputs costs a float epilogue every 8 products, and a second
int8 term for the remainder (what our int4 and int8 kernels do) doubles the products again.

This runs the real model teacher-forced over a few texts with every layer linear (q, k, v, o, gate, up,
down) replaced by a simulation of each scheme in float32 (weights as symmetric int8 per output channel,
activations quantized as the scheme says), and compares the logits with the float32 model's: the largest
difference over all positions and the share of positions whose top token agrees. bf16 (what the server
computes) is the yardstick. The last column is the scheme's vector instructions per 16 outputs x 32 inputs x
one row (int8 products, and the float epilogue a scale per group needs: a convert and an FMA per group and
term) over bf16's 16 vdpbf16ps for the same work: 1.0 is no faster than bf16 where the multiplies bound.
"""

from __future__ import annotations

import argparse
import datetime as dt
import types
from collections.abc import Callable
from pathlib import Path

import torch

from bench.report import save_table
from model import Tokenizer
from model.defaults import require_default_model
from model.modeling import SmolLM2ForCausalLM
from model.weights import load_model

TEXTS = [
    "The capital of France is Paris. It is known for the Eiffel Tower, which was built in 1889 for the "
    "World's Fair. Many tourists visit the city every year to see its museums, its cafes and the river.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n\n"
    "for i in range(10):\n    print(i, fibonacci(i))\n",
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nWrite a short poem about the sea.<|im_end|>\n<|im_start|>assistant\nThe sea",
    "Photosynthesis is the process by which green plants and some other organisms use sunlight to "
    "synthesize foods from carbon dioxide and water. The process generally involves the green pigment",
    "Shopping list: 2 eggs, 1 litre of milk, 500 g of flour, 3 apples, a loaf of bread, 250 g of butter, "
    "olive oil, salt, pepper, 6 tomatoes, 1 onion, 2 cloves of garlic, basil, and a bottle of red wine.",
]
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GROUP = 32
OUTLIERS = 16  # input channels per linear kept in float32 by the outlier scheme, the largest |x| seen


def int8_per_channel(w: torch.Tensor) -> torch.Tensor:
    scale = w.abs().amax(1, keepdim=True).clamp(min=1e-30) / 127
    return (w / scale).round().clamp(-127, 127) * scale


def one_term(x: torch.Tensor, width: int) -> torch.Tensor:
    """x as int8 with one scale per `width` inputs (max |x| / 127), dequantized."""
    g = x.reshape(*x.shape[:-1], -1, width)
    scale = g.abs().amax(-1, keepdim=True).clamp(min=1e-30) / 127
    return ((g / scale).round() * scale).reshape(x.shape)


def two_terms(x: torch.Tensor, width: int) -> torch.Tensor:
    """x ~ scale * (q + r / 254), q and r int8, one scale per `width` inputs (our int4 kernel's scheme)."""
    g = x.reshape(*x.shape[:-1], -1, width)
    scale = g.abs().amax(-1, keepdim=True).clamp(min=1e-30) / 127
    q = (g / scale).round()
    r = ((g - q * scale) / (scale / 254)).round().clamp(-127, 127)
    return (q * scale + r * scale / 254).reshape(x.shape)


# name -> (activation transform, keeps outlier channels in float32, multiply instructions per bf16's)
SCHEMES: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor] | None, bool, float]] = {
    "int8 weights, float activations": (None, False, float("nan")),
    "int8 x int8, one scale per row": (lambda x: one_term(x, x.shape[-1]), False, 8 / 16),
    f"int8 x int8 per row, {OUTLIERS} outlier channels in float": (
        lambda x: one_term(x, x.shape[-1]),
        True,
        8 / 16,
    ),
    "int8 x int8, one scale per 32 (llama.cpp's Q8_1)": (lambda x: one_term(x, GROUP), False, 10 / 16),
    "int8 x two int8 terms per row": (lambda x: two_terms(x, x.shape[-1]), False, 16 / 16),
    "int8 x two int8 terms per 32 (our int4/int8 kernels)": (lambda x: two_terms(x, GROUP), False, 20 / 16),
}


def simulate(model: SmolLM2ForCausalLM, act: Callable[[torch.Tensor], torch.Tensor] | None,
             outliers: dict[str, torch.Tensor] | None) -> None:  # fmt: skip
    for name, mod in model.named_modules():
        if name.rsplit(".", 1)[-1] not in LINEARS:
            continue
        w = mod.weight.detach().float()
        wq = int8_per_channel(w)
        keep = None if outliers is None else outliers[name]

        def forward(self: torch.nn.Module, x: torch.Tensor, w: torch.Tensor = w, wq: torch.Tensor = wq,
                    keep: torch.Tensor | None = keep) -> torch.Tensor:  # fmt: skip
            xf = x.float()
            extra: torch.Tensor | float = 0.0
            if keep is not None:
                extra = xf[..., keep] @ w[:, keep].t()
                xf = xf.clone()
                xf[..., keep] = 0
            xq = xf if act is None else act(xf)
            return (xq @ wq.t() + extra).to(x.dtype)

        mod.forward = types.MethodType(forward, mod)


def logits(model: SmolLM2ForCausalLM, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].float()


def outlier_channels(model: SmolLM2ForCausalLM, texts: list[list[int]]) -> dict[str, torch.Tensor]:
    """Per linear (by module name), the OUTLIERS input channels of largest |x| over the texts."""
    peak: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Callable[..., None]:
        def note(_mod: torch.nn.Module, inp: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
            a = inp[0].detach().float().abs().reshape(-1, inp[0].shape[-1]).amax(0)
            peak[name] = torch.maximum(peak[name], a) if name in peak else a

        return note

    hooks = [
        m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in LINEARS
    ]
    for ids in texts:
        logits(model, ids)
    for h in hooks:
        h.remove()
    return {n: p.topk(OUTLIERS).indices for n, p in peak.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="folder for the saved table")
    args = ap.parse_args(argv)
    path = require_default_model()
    tok = Tokenizer.from_file(path)
    texts = [tok.encode(t) for t in TEXTS]
    reference = load_model(path, dtype=torch.float32).eval()
    ref = [logits(reference, ids) for ids in texts]
    outliers = outlier_channels(reference, texts)

    def row(name: str, model: SmolLM2ForCausalLM, cost: float) -> str:
        got = [logits(model, ids) for ids in texts]
        worst = max((g - r).abs().max().item() for g, r in zip(got, ref, strict=True))
        agree = [(g.argmax(-1) == r.argmax(-1)).float().mean().item() for g, r in zip(got, ref, strict=True)]
        cost_s = "-" if cost != cost else f"{cost:.2f}"
        return f"| {name} | {worst:.2f} | {min(agree):.3f} | {sum(agree) / len(agree):.3f} | {cost_s} |"

    lines = [
        f"# int8 activations against float32 logits ({dt.datetime.now():%Y-%m-%d %H:%M})",
        "",
        f"`python -m bench.act_quant_numerics`; the default model teacher-forced over {len(texts)} texts "
        f"({sum(map(len, texts))} positions); logits reach ~{max(r.abs().max().item() for r in ref):.0f}.",
        "",
        "| scheme | max abs logit difference | top-1 agreement, worst text | mean | instructions per bf16's |",
        "|---|---|---|---|---|",
        row("bf16 (served)", load_model(path, dtype=torch.bfloat16).eval(), 1.0),
    ]
    for name, (act, keep, cost) in SCHEMES.items():
        model = load_model(path, dtype=torch.float32).eval()
        simulate(model, act, outliers if keep else None)
        lines.append(row(name, model, cost))
        print(lines[-1], flush=True)
    out = None if args.out is None else args.out / f"act-quant-{dt.datetime.now():%Y-%m-%d-%H%M}.md"
    if out is None:
        print("\n".join(lines))
    else:
        save_table(lines, out)


if __name__ == "__main__":
    main()
