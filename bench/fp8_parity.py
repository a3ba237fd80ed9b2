"""FP8 quality, measured: the same DBRX-width model trained on the same data with bf16 and with FP8 expert GEMMs.

Model: DBRX's full width (d_model 6144, 16 experts top-4, ffn 10752, vocab 100352) with `--layers` layers, random
init from one seed, bf16 weights, fused AdamW, the router load-balancing loss on, gradient checkpointing. Data: token
sequences from a fixed noisy affine Markov chain (next = a * prev + b mod 2048, 10% uniform noise), so the loss has
somewhere to go. Both runs see the same batches in the same order. The final loss is the mean of the last 10 steps;
`final_loss_rel_diff` = |fp8 - bf16| / bf16. The JSON keeps both curves, and `--mermaid` prints them as a chart for
bench/RESULTS.md.

    python bench/fp8_parity.py [--steps 200] [--layers 2] [--output bench/results/fp8_parity.json]
    python bench/fp8_parity.py --mermaid bench/results/fp8_parity.json
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import torch
from provenance import provenance, write_result
from transformers import DbrxForCausalLM

from dbrx_tune.modeling.config import dbrx_base_config
from dbrx_tune.modeling.experts import set_experts_implementation, set_experts_precision
from dbrx_tune.modeling.fp8 import fp8_unsupported_reason
from dbrx_tune.modeling.moe_loss import sync_moe_config

TAIL = 10


def markov_batches(steps: int, batch: int, seq_len: int, seed: int, states: int = 2048) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(steps):
        tokens = torch.empty(batch, seq_len, dtype=torch.long)
        tokens[:, 0] = torch.randint(0, states, (batch,), generator=generator)
        noise = torch.rand(batch, seq_len, generator=generator) < 0.1
        random_tokens = torch.randint(0, states, (batch, seq_len), generator=generator)
        for position in range(1, seq_len):
            following = (5 * tokens[:, position - 1] + 17) % states
            tokens[:, position] = torch.where(noise[:, position], random_tokens[:, position], following)
        batches.append(tokens)
    return batches


def train(precision: str, batches: list[torch.Tensor], args) -> dict:
    config = sync_moe_config(dbrx_base_config(args.layers, max_seq_len=max(args.seq_len, 4096)))
    torch.manual_seed(args.seed)
    with torch.device("cuda"):
        model = DbrxForCausalLM._from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    set_experts_implementation(model, "grouped")
    set_experts_precision(model, precision)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, fused=True)
    losses = []
    torch.cuda.synchronize()
    began = time.perf_counter()
    for input_ids in batches:
        input_ids = input_ids.cuda(non_blocking=True)
        loss = model(input_ids=input_ids, labels=input_ids, output_router_logits=True).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    torch.cuda.synchronize()
    seconds = time.perf_counter() - began
    losses = [round(float(loss), 5) for loss in losses]
    del model, optimizer
    gc.collect()
    torch.cuda.empty_cache()
    return {"losses": losses, "final_loss": round(sum(losses[-TAIL:]) / TAIL, 5), "seconds": round(seconds, 1)}


def mermaid(result: dict, every: int = 10) -> str:
    """Both loss curves as a mermaid xychart (GitHub renders it in RESULTS.md)."""
    bf16, fp8 = result["curve_bf16"], result["curve_fp8"]
    steps = list(range(0, len(bf16), every))
    return "\n".join(
        [
            "```mermaid",
            "xychart-beta",
            f'    title "Training loss, bf16 vs fp8 experts ({result["shape"]["layers"]} DBRX-width layers)"',
            f'    x-axis "step" [{", ".join(str(step + 1) for step in steps)}]',
            '    y-axis "loss"',
            f"    line [{', '.join(f'{bf16[step]:.3f}' for step in steps)}]",
            f"    line [{', '.join(f'{fp8[step]:.3f}' for step in steps)}]",
            "```",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="bench/results/fp8_parity.json")
    parser.add_argument("--mermaid", metavar="JSON", help="print the curves of a recorded result as a mermaid chart")
    args = parser.parse_args()
    if args.mermaid:
        with open(args.mermaid) as handle:
            print(mermaid(json.load(handle)))
        return
    if not torch.cuda.is_available():
        raise SystemExit("bench/fp8_parity.py needs a CUDA GPU")
    reason = fp8_unsupported_reason(torch.device("cuda"))
    if reason is not None:
        raise SystemExit(f"bench/fp8_parity.py needs FP8 expert GEMMs: {reason}")
    batches = markov_batches(args.steps, args.batch, args.seq_len, args.seed)
    runs = {precision: train(precision, batches, args) for precision in ("bf16", "fp8")}
    final_bf16, final_fp8 = runs["bf16"]["final_loss"], runs["fp8"]["final_loss"]
    result = {
        "steps": args.steps,
        "final_loss_bf16": final_bf16,
        "final_loss_fp8": final_fp8,
        "final_loss_rel_diff": round(abs(final_fp8 - final_bf16) / final_bf16, 5),
        "first_loss_bf16": runs["bf16"]["losses"][0],
        "first_loss_fp8": runs["fp8"]["losses"][0],
        "seconds_bf16": runs["bf16"]["seconds"],
        "seconds_fp8": runs["fp8"]["seconds"],
        "curve_bf16": runs["bf16"]["losses"],
        "curve_fp8": runs["fp8"]["losses"],
        "final_loss_definition": f"mean of the last {TAIL} steps",
        "shape": {
            "layers": args.layers,
            "batch": args.batch,
            "seq_len": args.seq_len,
            "lr": args.lr,
            "optimizer": "torch AdamW (fused), grad clip 1.0",
            "data": "noisy affine Markov chain over 2048 tokens",
        },
        **provenance(torch.cuda.get_device_name()),
    }
    write_result(args.output, result)
    print({key: value for key, value in result.items() if not key.startswith("curve")})


if __name__ == "__main__":
    main()
