"""The LM head + loss over DBRX's 100,352-token vocabulary, forward + backward: full logits vs the fused paths.

Shape: 8192 tokens x d_model 6144 x vocab 100352, bf16 hidden states and head weight, 10% of labels ignored (-100).
Variants, timed interleaved in one process (`--repeats` runs of `--iters` steps, medians):
    model_head   what a model's own forward does: `lm_head` -> bf16 logits -> fp32 cross-entropy (transformers'
                 ForCausalLMLoss)
    trl_fused    TRL's fused LM head, the kernel of `trl.trainer.utils.add_fused_lm_head` that TRL 1.16's SFT, DPO,
                 GRPO and RLOO trainers patch every model with (chunked log-probabilities; Triton on CUDA): what the
                 toolkit's stages run
    liger_flce   liger-kernel's fused linear cross-entropy (if installed)
    cce          Apple's cut-cross-entropy `linear_cross_entropy` (if installed)
"Extra peak" is `max_memory_allocated` during the step minus the memory held before it (inputs, weight, gradients).

    python bench/lm_loss.py [--tokens 8192] [--output bench/results/lm_loss.json]
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F
from provenance import provenance, write_result
from timing import time_ms
from trl.trainer.utils import _ChunkedLogProbFunction

TRL_CHUNK = 32768  # what add_fused_lm_head passes (trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE)


def model_head(hidden, weight, labels):
    logits = hidden @ weight.T
    return F.cross_entropy(logits.float(), labels, ignore_index=-100)


def trl_fused(hidden, weight, labels):
    mask = labels != -100
    (log_probs, *_) = _ChunkedLogProbFunction.apply(
        hidden[mask], weight, None, labels[mask], 1.0, TRL_CHUNK, None, 1.0, ("log_probs",)
    )
    return -log_probs.sum() / mask.sum()


def optional_variants() -> dict:
    found = {}
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        found["liger_flce"] = lambda h, w, y: liger_fused_linear_cross_entropy(h, w, y, ignore_index=-100)
    except ImportError:
        pass
    try:
        from cut_cross_entropy import linear_cross_entropy

        found["cce"] = lambda h, w, y: linear_cross_entropy(h, w, y, ignore_index=-100)
    except ImportError:
        pass
    return found


def step(fn, hidden, weight, labels):
    hidden.grad = weight.grad = None
    loss = fn(hidden, weight, labels)
    loss.backward()
    return loss.detach()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--d-model", type=int, default=6144)
    parser.add_argument("--vocab", type=int, default=100352)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default="bench/results/lm_loss.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/lm_loss.py needs a CUDA GPU")
    torch.manual_seed(0)
    hidden = torch.randn(args.tokens, args.d_model, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(args.vocab, args.d_model, device="cuda") * 0.02).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, args.vocab, (args.tokens,), device="cuda")
    labels[torch.rand(args.tokens, device="cuda") < 0.1] = -100
    variants = {"model_head": model_head, "trl_fused": trl_fused, **optional_variants()}

    losses, peaks, errors = {}, {}, {}
    for name, fn in list(variants.items()):
        try:
            step(fn, hidden, weight, labels)  # compile / autotune outside the measured peak
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            losses[name] = float(step(fn, hidden, weight, labels))
            torch.cuda.synchronize()
            peaks[name] = round((torch.cuda.max_memory_allocated() - base) / 1e9, 3)
        except Exception as err:  # a library that cannot run here is recorded, not fatal
            errors[name] = f"{type(err).__name__}: {err}"[:300]
            del variants[name]
    runs: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            runs[name].append(time_ms(lambda f=fn: step(f, hidden, weight, labels), warmup=2, iters=args.iters))
    ms = {name: statistics.median(values) for name, values in runs.items()}
    result = {
        "ms": {name: round(value, 2) for name, value in ms.items()},
        "extra_peak_gb": peaks,
        "loss": losses,
        "loss_abs_diff_vs_model_head": {name: abs(value - losses["model_head"]) for name, value in losses.items()},
        "speedup_trl_fused_vs_model_head": round(ms["model_head"] / ms["trl_fused"], 3),
        "memory_saved_gb_trl_fused": round(peaks["model_head"] - peaks["trl_fused"], 3),
        "runs": {name: [round(v, 2) for v in values] for name, values in runs.items()},
        "errors": errors,
        "shape": {"tokens": args.tokens, "d_model": args.d_model, "vocab": args.vocab, "dtype": "bfloat16"},
        **provenance(torch.cuda.get_device_name()),
    }
    write_result(args.output, result)
    print(f"{'variant':12} {'ms':>8} {'extra peak GB':>14} {'loss':>12}")
    for name in variants:
        print(f"{name:12} {ms[name]:8.2f} {peaks[name]:14.3f} {losses[name]:12.6f}")
    print(f"errors: {errors}")


if __name__ == "__main__":
    main()
