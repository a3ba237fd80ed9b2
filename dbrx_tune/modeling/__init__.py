"""Everything DBRX-specific about building and loading models lives in this package.

Importing it registers `DbrxForSequenceClassification` with `AutoModelForSequenceClassification`.
"""

from dbrx_tune.modeling.config import fix_rope_parameters, load_dbrx_config, tiny_dbrx_config
from dbrx_tune.modeling.seq_cls import DbrxForSequenceClassification, register_dbrx_seq_cls, save_reward_model

__all__ = [
    "DbrxForSequenceClassification",
    "fix_rope_parameters",
    "load_dbrx_config",
    "register_dbrx_seq_cls",
    "save_reward_model",
    "tiny_dbrx_config",
]
