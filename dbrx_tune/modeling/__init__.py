"""Everything DBRX-specific about building and loading models lives in this package."""

from dbrx_tune.modeling.config import fix_rope_parameters, load_dbrx_config, tiny_dbrx_config

__all__ = ["fix_rope_parameters", "load_dbrx_config", "tiny_dbrx_config"]
