"""dbrx_tune: the shared core of the DBRX fine-tuning and alignment toolkit.

Importing the package registers what transformers lacks for DBRX (for example the sequence-classification
head) so that `Auto*.from_pretrained` loads this project's checkpoints.
"""

__version__ = "0.1.0"
