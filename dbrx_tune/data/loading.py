"""Load training and evaluation splits from local files, local directories, the bundled samples or the hub.

Recipes name data with one string, `dataset_name`, resolved in this order:

* `bundled://<name>`: data shipped inside this package (`dbrx_tune/data/samples/`). A file name
  (`bundled://sft_train.jsonl`) loads that file as the `train` split; a stem (`bundled://sft`) loads
  every `sft_<split>.jsonl` as split `<split>`, so `dataset_test_split: test` picks `sft_test.jsonl`.
  Recipes stay valid wherever the package is installed.
* a local `.jsonl`/`.json`/`.parquet` file: loaded as the split `train`.
* a local directory: a directory written by `Dataset.save_to_disk`, or one holding data files of one
  kind, whose splits `datasets` infers from the file names (`train.jsonl`, `test.jsonl`, ...).
* anything else is a hub dataset id, with an optional config name. A name that looks like a path
  (it has a data-file extension or starts with `/`, `./`, `../` or `~`) but does not exist is an error
  naming the path, never a hub lookup.

`load_splits` always returns a `DatasetDict` whose keys are `train` and, when an evaluation split was
asked for, `test`, whatever the source calls them, so stage scripts need not know the source's names.
"""

from __future__ import annotations

import json
import logging
from importlib import resources
from pathlib import Path

from datasets import Dataset, DatasetDict, load_dataset, load_from_disk
from datasets.exceptions import DatasetGenerationError

logger = logging.getLogger(__name__)

BUNDLED_PREFIX = "bundled://"
DATA_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def samples_dir() -> Path:
    """The directory of the data files shipped with the package."""
    return Path(str(resources.files("dbrx_tune.data") / "samples"))


def bundled_path(name: str) -> Path:
    """Path of a bundled data file, e.g. `bundled_path("sft_train.jsonl")`; the error lists what exists."""
    path = samples_dir() / name
    if not path.is_file():
        available = ", ".join(sorted(p.name for p in samples_dir().glob("*.jsonl")))
        raise FileNotFoundError(
            f"{BUNDLED_PREFIX}{name}: no such bundled file in {samples_dir()}; available: {available}"
        )
    return path


def _bundled_data_files(name: str) -> dict[str, str]:
    """Map split -> file for `bundled://<name>`: one file, or every `<name>_<split>.jsonl`."""
    if Path(name).suffix in DATA_FILE_BUILDERS:
        return {"train": str(bundled_path(name))}
    files = {p.name[len(name) + 1 : -len(".jsonl")]: str(p) for p in sorted(samples_dir().glob(f"{name}_*.jsonl"))}
    # `sft` must not pick up `sft_prompt_completion_train.jsonl` as a split called `prompt_completion_train`.
    files = {split: path for split, path in files.items() if "_" not in split}
    if not files:
        bundled_path(name)  # raises with the list of available files
    return files


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or Path(name).suffix in DATA_FILE_BUILDERS


def _first_bad_json_line(path: str) -> str | None:
    """Locate the first line of a JSON Lines file that is not a JSON object, for an error message."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                if not isinstance(json.loads(line), dict):
                    return f"line {lineno}: expected a JSON object per line"
            except json.JSONDecodeError as err:
                return f"line {lineno}: {err.msg} (column {err.colno})"
    return None


def check_text_data_file(path: str) -> None:
    """Refuse an empty JSON/JSONL file and one that is not UTF-8, naming the file and line (datasets would raise a
    bare StopIteration for the first and read the second as replacement characters)."""
    has_content = False
    with open(path, "rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(
                    f"{path}: line {lineno} is not UTF-8 (byte {err.start} of the line: {err.reason}); "
                    "re-encode the file as UTF-8"
                ) from None
            has_content = has_content or bool(line.strip())
    if not has_content:
        raise ValueError(f"{path}: the file is empty: no rows to train on")


def _load_data_files(data_files: dict[str, str | list[str]], source: str) -> DatasetDict:
    """Load local data files with the builder their extension names; unreadable lines are named."""
    paths = [p for files in data_files.values() for p in ([files] if isinstance(files, str) else files)]
    suffixes = {Path(p).suffix for p in paths}
    if len(suffixes) != 1 or next(iter(suffixes)) not in DATA_FILE_BUILDERS:
        raise ValueError(
            f"{source}: expected data files of one kind among {sorted(DATA_FILE_BUILDERS)}, got {sorted(suffixes)}"
        )
    builder = DATA_FILE_BUILDERS[suffixes.pop()]
    for path in paths:
        if Path(path).suffix in (".json", ".jsonl"):
            check_text_data_file(path)
    try:
        return load_dataset(builder, data_files=data_files)
    except DatasetGenerationError as err:
        where = next(
            (f"{p}: {bad}" for p in paths if p.endswith(".jsonl") and (bad := _first_bad_json_line(p))),
            f"{source}: {err.__cause__ or err}",
        )
        raise ValueError(f"could not read dataset: {where}") from err


def _load_directory(path: Path) -> DatasetDict:
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        loaded = load_from_disk(str(path))
        return loaded if isinstance(loaded, DatasetDict) else DatasetDict({"train": loaded})
    files = sorted(str(p) for p in path.rglob("*") if p.suffix in DATA_FILE_BUILDERS and p.is_file())
    if not files:
        raise FileNotFoundError(f"{path}: directory holds no {'/'.join(DATA_FILE_BUILDERS)} files and no saved dataset")
    suffixes = {Path(p).suffix for p in files}
    if len(suffixes) > 1:
        raise ValueError(f"{path}: directory mixes data file kinds {sorted(suffixes)}; keep one kind per dataset")
    # datasets infers splits from file names (train*.jsonl, test*.jsonl, ...) exactly as on the hub.
    try:
        return load_dataset(str(path))
    except DatasetGenerationError as err:
        bad = next((f"{p}: {b}" for p in files if p.endswith(".jsonl") and (b := _first_bad_json_line(p))), None)
        raise ValueError(f"could not read dataset: {bad or f'{path}: {err.__cause__ or err}'}") from err


def load_dataset_dict(dataset_name: str, config: str | None = None) -> DatasetDict:
    """Load every split of `dataset_name` (see the module docstring for what the name may be)."""
    if dataset_name.startswith(BUNDLED_PREFIX):
        return _load_data_files(_bundled_data_files(dataset_name[len(BUNDLED_PREFIX) :]), dataset_name)
    path = Path(dataset_name).expanduser()
    if path.is_file():
        return _load_data_files({"train": str(path)}, dataset_name)
    if path.is_dir():
        return _load_directory(path)
    if _looks_like_path(dataset_name):
        raise FileNotFoundError(f"dataset_name={dataset_name!r}: no such file or directory")
    try:
        loaded = load_dataset(dataset_name, config)
    except (FileNotFoundError, ConnectionError, OSError, ValueError) as err:
        raise FileNotFoundError(
            f"dataset_name={dataset_name!r}: not a local file or directory, and loading it as a hub dataset failed "
            f"({err.__class__.__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        ) from err
    return loaded if isinstance(loaded, DatasetDict) else DatasetDict({"train": loaded})


def _pick_split(splits: DatasetDict, split: str, source: str) -> Dataset:
    if split not in splits:
        raise ValueError(f"{source}: has no split {split!r}; available splits: {sorted(splits)}")
    return splits[split]


def _eval_split(
    splits: DatasetDict, test_split: str | None, source: str, *, separate: bool, require_test: bool
) -> Dataset | None:
    """The evaluation split: `test_split` when present; for a separate eval dataset, else its only split."""
    if test_split is not None and test_split in splits:
        return splits[test_split]
    if separate and len(splits) == 1:
        return next(iter(splits.values()))
    if require_test or (test_split is None and separate):
        raise ValueError(
            f"{source}: has no split {test_split!r}; available splits: {sorted(splits)}; "
            "set dataset_test_split to one of them"
        )
    if test_split is not None:
        logger.info("%s: no split %r; training without an evaluation split", source, test_split)
    return None


def _head(dataset: Dataset, n: int | None, key: str) -> Dataset:
    if n is None:
        return dataset
    if n < 1:
        raise ValueError(f"{key} must be >= 1, got {n}")
    return dataset.select(range(min(n, len(dataset))))


def load_splits(
    dataset_name: str,
    *,
    config: str | None = None,
    train_split: str = "train",
    test_split: str | None = None,
    eval_dataset_name: str | None = None,
    test_split_size: float | int | None = None,
    require_test: bool = False,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    seed: int = 42,
) -> DatasetDict:
    """Load the train split and, when there is one, an evaluation split, as a `DatasetDict` of `train`/`test`.

    The evaluation split comes from exactly one place:
    * `eval_dataset_name`: another dataset; its split `test_split` if it has one, else its only split;
    * `test_split_size`: a seeded random hold-out from the train split (fraction or row count);
    * otherwise the split `test_split` of `dataset_name`, when it has one. TRL's `ScriptArguments` default
      `dataset_test_split` to "test", so a missing split only means "no evaluation" unless `require_test`
      (pass it when the trainer will evaluate), which makes it an error listing the available splits.
    `max_train_samples` / `max_eval_samples` keep the first rows (after any hold-out), for quick runs.
    """
    if test_split_size is not None and eval_dataset_name is not None:
        raise ValueError(
            f"test_split_size carves a test split out of train; it cannot be combined with "
            f"eval_dataset_name={eval_dataset_name!r}"
        )
    splits = load_dataset_dict(dataset_name, config)
    train = _pick_split(splits, train_split, dataset_name)
    if eval_dataset_name is not None:
        test = _eval_split(
            load_dataset_dict(eval_dataset_name, config),
            test_split,
            eval_dataset_name,
            separate=True,
            require_test=require_test,
        )
    elif test_split_size is not None:
        held_out = train.train_test_split(test_size=test_split_size, seed=seed)
        train, test = held_out["train"], held_out["test"]
    else:
        test = _eval_split(splits, test_split, dataset_name, separate=False, require_test=require_test)
    result = DatasetDict({"train": _head(train, max_train_samples, "max_train_samples")})
    if test is not None:
        result["test"] = _head(test, max_eval_samples, "max_eval_samples")
    logger.info("dataset %s: %s", dataset_name, {name: len(ds) for name, ds in result.items()})
    return result
