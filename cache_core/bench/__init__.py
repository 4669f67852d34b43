"""The built-in bench: synthetic tasks, pretraining of the built-in model, the policy benchmark, experiment tracking
and the typed configs of these groups.

Apart from the engine (`cache_core`), which never imports it: these modules may use Lightning, omegaconf, W&B, rich
and matplotlib. Each decodes through the engine's one generate loop.
"""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]  # the repository: conf/, checkpoints/
BUILTIN_MODEL = REPO_ROOT / "checkpoints" / "builtin"
