"""Weight files checked before any load: truncated or corrupt safetensors named, pickle-only refused; a reward model
directory's own Python never runs (no trust_remote_code prompt)."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from dbrx_tune.modeling.weight_files import WeightFileError, check_weight_files
from dbrx_tune.rewards.loader import RewardModelError, check_reward_checkpoint


@pytest.fixture
def checkpoint(tmp_path):
    save_file({"a": torch.randn(64, 64), "b": torch.randn(128)}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{}")
    return tmp_path


def test_a_complete_checkpoint_passes(checkpoint):
    check_weight_files(str(checkpoint))


def test_a_truncated_shard_is_named_with_its_sizes(checkpoint):
    data = (checkpoint / "model.safetensors").read_bytes()
    (checkpoint / "model.safetensors").write_bytes(data[:-100])  # an interrupted copy
    with pytest.raises(WeightFileError, match=r"model\.safetensors: truncated: \d+ bytes, its header describes \d+"):
        check_weight_files(str(checkpoint))


def test_a_corrupt_header_is_named(checkpoint):
    data = bytearray((checkpoint / "model.safetensors").read_bytes())
    data[8:20] = b"\xff" * 12
    (checkpoint / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(WeightFileError, match="model.safetensors: corrupt safetensors header"):
        check_weight_files(str(checkpoint))


def test_a_shard_missing_from_the_index_is_named(checkpoint):
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(WeightFileError, match="model-00001-of-00002.safetensors, model-00002-of-00002.safetensors"):
        check_weight_files(str(checkpoint))


def test_pickle_only_weights_are_refused(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"a pickle is never opened")
    with pytest.raises(WeightFileError, match="only pickle weights.*pytorch_model.bin.*safetensors only"):
        check_weight_files(str(tmp_path))


def test_a_config_only_directory_and_hub_ids_are_left_to_the_loader(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    check_weight_files(str(tmp_path))
    check_weight_files("databricks/dbrx-base")


def test_a_reward_model_directorys_python_never_runs_and_nothing_asks(tmp_path):
    """A config with auto_map: left unset, trust_remote_code makes transformers ask on the terminal, and "y" runs it."""
    marker = tmp_path / "pwned"
    (tmp_path / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    config = {
        "model_type": "dbrx",
        "architectures": ["DbrxForSequenceClassification"],
        "num_labels": 1,
        "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForSequenceClassification": "evil.Evil"},
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    script = (
        "import sys\nfrom dbrx_tune.rewards.loader import check_reward_checkpoint\n"
        f"check_reward_checkpoint({str(tmp_path)!r})\nprint('checked')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], input="y\ny\n", capture_output=True, text=True, timeout=120
    )  # answers "y" if anything asked
    assert not marker.exists(), "the checkpoint's own Python ran"
    assert "trust_remote_code" not in done.stdout  # no prompt was shown
    assert done.returncode == 0 and "checked" in done.stdout, done.stderr[-2000:]


def test_a_missing_reward_model_directory_is_one_line(tmp_path):
    with pytest.raises(RewardModelError, match="cannot read its config.json"):
        check_reward_checkpoint(str(tmp_path / "missing"))
