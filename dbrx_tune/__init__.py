"""dbrx_tune: the shared core of the DBRX fine-tuning and alignment toolkit.

Importing the package registers what transformers lacks for DBRX (for example the sequence-classification
head) so that `Auto*.from_pretrained` loads this project's checkpoints.
"""

__version__ = "0.1.0"

from dbrx_tune import modeling  # noqa: E402,F401  (registers the DBRX reward head with the Auto classes)
