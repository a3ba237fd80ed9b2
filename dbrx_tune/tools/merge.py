"""Merge a DBRX LoRA adapter into its base model and write a full Hugging Face checkpoint: the path to serving.

    python -m dbrx_tune.tools.merge --base PATH --adapter PATH --output PATH [--dtype auto] [--no-verify]

The output has DBRX's original parameter names and shapes (`ffn.experts.mlp.w1/v1/w2` as (n_experts * ffn,
d_model)), so stock `DbrxForCausalLM.from_pretrained` and the serving engines that load DBRX checkpoints (vLLM, TGI,
SGLang) take it without this package. Adapters trained on 4-bit experts (QLoRA) merge into the bf16 base here.

Nothing existing is touched: the output must be a new or empty directory outside the base and the adapter, the
merged model is written to a hidden sibling directory and renamed into place only once written and verified (its
logits on a few tokens against the adapter model's, before merging), and weights are read from safetensors only.
The base's dtype is kept unless `--dtype` says otherwise; the tokenizer (with its chat template) and generation
config travel with the model, and a model card (`README.md`) carries the adapter run's recipe, data and metrics.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile

import torch
from transformers import AutoTokenizer, DbrxForCausalLM

from dbrx_tune.modeling.config import load_dbrx_config
from dbrx_tune.modeling.experts import set_experts_implementation
from dbrx_tune.modeling.lora import load_expert_adapter, merge_expert_adapter
from dbrx_tune.modeling.weight_files import WeightFileError, check_weight_files
from dbrx_tune.tokenizer import build_dbrx_tokenizer, ensure_chat_template, ensure_pad_token
from dbrx_tune.training.model_card import build_model_card, write_model_card

logger = logging.getLogger(__name__)

DTYPES = {"auto": "auto", "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
VERIFY_TOKENS = 16


class MergeError(ValueError):
    """The merge cannot run or did not verify; the message names the path or the numbers."""


def _inside(path: str, directory: str) -> bool:
    path, directory = os.path.realpath(path), os.path.realpath(directory)
    return path == directory or path.startswith(directory + os.sep)


def check_merge_paths(base: str, adapter: str, output: str) -> None:
    """Refuse, before loading anything, every output that could overwrite or delete existing files."""
    if not os.path.isdir(adapter):
        raise MergeError(f"--adapter {adapter}: not a directory (a PEFT adapter saved by training)")
    if not os.path.isfile(os.path.join(adapter, "adapter_config.json")):
        raise MergeError(f"--adapter {adapter}: has no adapter_config.json, so it is not a PEFT adapter")
    if os.path.exists(base) and not os.path.isdir(base):
        raise MergeError(f"--base {base}: not a directory (a DBRX checkpoint directory or a hub id)")
    if os.path.exists(output) and not os.path.isdir(output):
        raise MergeError(f"--output {output}: exists and is a file; give a new directory")
    for flag, source in (("--base", base), ("--adapter", adapter)):
        if os.path.isdir(source) and (_inside(output, source) or _inside(source, output)):
            raise MergeError(f"--output {output}: is, holds or lies inside {flag} {source}; give a new directory")
    if os.path.isdir(output) and os.listdir(output):
        raise MergeError(f"--output {output}: exists and is not empty; give a new directory (nothing is overwritten)")
    for path in (base, adapter):
        try:
            check_weight_files(path)
        except WeightFileError as err:
            raise MergeError(str(err)) from None
    if os.path.isdir(base) and not any(name.endswith(".safetensors") for name in os.listdir(base)):
        raise MergeError(
            f"--base {base}: holds no weights (a config-only directory?); a random_init LoRA run saves its base "
            "in OUTPUT_DIR/base, the adapter's base_model_name_or_path"
        )


def load_merge_tokenizer(adapter: str, base: str):
    """The tokenizer the adapter was trained with (saved beside it), else the base's, else the offline DBRX one."""
    for source in (adapter, base):
        if os.path.isdir(source) and not any(
            os.path.exists(os.path.join(source, name)) for name in ("tokenizer.json", "tokenizer_config.json")
        ):
            continue  # AutoTokenizer would invent one for a directory without tokenizer files (a GPT-2 fallback)
        try:
            return AutoTokenizer.from_pretrained(source, trust_remote_code=False)
        except (OSError, ValueError):
            continue
    logger.info("neither %s nor %s ships a tokenizer: writing the offline DBRX tokenizer", adapter, base)
    tokenizer = build_dbrx_tokenizer()
    ensure_pad_token(tokenizer)
    ensure_chat_template(tokenizer)  # the template the toolkit's stages train with
    return tokenizer


def _probe_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits.float()


def merge(base: str, adapter: str, output: str, dtype: torch.dtype | str = "auto", verify: bool = True) -> None:
    """Load `base` (local path or hub id), apply and fold `adapter`, write the merged model to `output`."""
    check_merge_paths(base, adapter, output)
    config = load_dbrx_config(base)
    model = DbrxForCausalLM.from_pretrained(base, config=config, dtype=dtype, use_safetensors=True)
    set_experts_implementation(model, "grouped")
    peft_model = load_expert_adapter(model, adapter).eval()
    probe = torch.randint(
        0, min(config.vocab_size, 1000), (1, VERIFY_TOKENS), generator=torch.Generator().manual_seed(0)
    )
    expected = _probe_logits(peft_model, probe) if verify else None
    merged = merge_expert_adapter(peft_model)
    if verify:
        got = _probe_logits(merged, probe)
        error = ((got - expected).norm() / expected.norm()).item()
        # fp32: the same sums in another order; bf16/fp16: the merged weights are rounded once to the base's dtype
        tolerance = 1e-4 if merged.dtype == torch.float32 else 2e-2
        if not error <= tolerance:
            raise MergeError(
                f"merged logits differ from the adapter model's by {error:.2e} (relative; tolerance {tolerance:.0e} "
                f"for {merged.dtype}): nothing written to {output}"
            )
        logger.info("verified: merged logits match the adapter model's (relative error %.2e)", error)
    merged.config.output_router_logits = False
    parent = os.path.dirname(os.path.abspath(output))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(output))}.merging-", dir=parent)
    try:
        merged.save_pretrained(staging)
        load_merge_tokenizer(adapter, base).save_pretrained(staging)
        card = build_model_card(
            adapter, dbrx=True, merged_base=base, output_dir=staging, title=os.path.basename(os.path.abspath(output))
        )
        write_model_card(card, staging)  # the adapter run's recipe, data and metrics, loading as a full model
        if os.path.isdir(output):
            os.rmdir(output)  # checked empty above; rename needs it gone
        os.rename(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("merged %s into %s -> %s (%s)", adapter, base, output, merged.dtype)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="base DBRX checkpoint: local directory or hub id")
    parser.add_argument("--adapter", required=True, help="PEFT adapter directory saved by training")
    parser.add_argument("--output", required=True, help="new directory for the merged checkpoint")
    parser.add_argument("--dtype", default="auto", choices=sorted(DTYPES), help="default: the base checkpoint's")
    parser.add_argument("--no-verify", action="store_true", help="skip the logits check against the adapter model")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        merge(args.base, args.adapter, args.output, DTYPES[args.dtype], verify=not args.no_verify)
    except (MergeError, OSError) as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
