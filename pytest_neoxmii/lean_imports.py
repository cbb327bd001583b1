"""What the plugin's own processes (engine workers, the fork server, DeepSpeed's ranks, MII's servers) leave
unimported: transformers' optional paths into TensorFlow, JAX/Flax and scikit-learn, which no engine here uses.

Why: transformers imports whichever of them is installed at its own import. On the lent H200 machines
(scikit-learn, jax and flax installed), every worker imported scikit-learn's metrics with scipy and pandas
(`transformers.generation.candidate_generator`, 1.1-1.7 s) and jax.numpy (`transformers.image_transforms`,
0.6 s) before it could load: a quarter of its imports (docs/SPEED.md, the thirtieth round). The session's own
process, where the user's tests run, is left as it is.

- TensorFlow and JAX/Flax: transformers' own switches, USE_TF=0 and USE_FLAX=0, in the processes'
  environment, where the user has not set them (child_env).
- scikit-learn has no switch: transformers decides once, when `transformers.utils.import_utils` executes
  (`_sklearn_available`), and is told "not available" right after (install).

NEOXMII_LEAN_IMPORTS=0 in the session's environment leaves all three as transformers finds them (an engine
of the user's that needs them)."""
from __future__ import annotations

import os

from pytest_neoxmii import after_import

SWITCH_ENV = "NEOXMII_LEAN_IMPORTS"
TRANSFORMERS_SWITCHES = {"USE_TF": "0", "USE_FLAX": "0"}
IMPORT_UTILS = "transformers.utils.import_utils"


def enabled(env: dict[str, str] | None = None) -> bool:
    return (os.environ if env is None else env).get(SWITCH_ENV, "1").strip() != "0"


def child_env(env: dict[str, str]) -> dict[str, str]:
    """`env` with transformers' switches off where the user has not set them (unless NEOXMII_LEAN_IMPORTS=0)."""
    env = dict(env)
    if enabled(env):
        for key, value in TRANSFORMERS_SWITCHES.items():
            env.setdefault(key, value)
    return env


def _without_sklearn(module) -> None:
    if hasattr(module, "_sklearn_available"):     # another transformers may decide elsewhere: then nothing
        module._sklearn_available = False


def install() -> None:
    """In a process of the plugin's own (never the session's): transformers finds no scikit-learn. Cheap,
    idempotent; a no-op with NEOXMII_LEAN_IMPORTS=0."""
    if enabled():
        after_import.arm(IMPORT_UTILS, _without_sklearn)
