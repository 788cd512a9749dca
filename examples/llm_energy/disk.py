"""Entry points of study-disk.yaml and study-disk-prepare.yaml.

torch and transformers are imported at import time, before the gate (prestart hides
imports either way); `run` then reads the weights from disk after the gate, and
`prepared` (a generator) before it, into host memory.
"""

import torch  # noqa: F401 - imported before the gate, on purpose
import transformers  # noqa: F401 - likewise
from experiment import prepared, run

__all__ = ["prepared", "run"]
