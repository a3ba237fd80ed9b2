"""Dataset loading, schema and length checks, and the bundled sample data.

Stage scripts load with `load_splits`, then validate before building a model:

    splits = load_splits("bundled://sft", test_split="test")
    validate_sft_dataset(splits, source="bundled://sft")
    check_lengths(splits["train"], tokenizer, max_length=128, source="bundled://sft [split train]")
"""

from dbrx_tune.data.loading import BUNDLED_PREFIX, bundled_path, load_dataset_dict, load_splits, samples_dir
from dbrx_tune.data.validation import (
    DatasetValidationError,
    check_lengths,
    detect_format,
    validate_preference_dataset,
    validate_prompt_dataset,
    validate_sft_dataset,
)

__all__ = [
    "BUNDLED_PREFIX",
    "DatasetValidationError",
    "bundled_path",
    "check_lengths",
    "detect_format",
    "load_dataset_dict",
    "load_splits",
    "samples_dir",
    "validate_preference_dataset",
    "validate_prompt_dataset",
    "validate_sft_dataset",
]
