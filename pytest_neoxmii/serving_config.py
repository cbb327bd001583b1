"""Users' serving configs: --neox-ds-config FILE (the `config` of deepspeed.init_inference) and
--neox-mii-config FILE (the `mii_config` of mii.legacy.deploy). JSON, or YAML (.yaml/.yml; PyYAML already comes
with transformers). The file's keys are merged over the plugin's defaults and deployed as they are; they show
in the report header, the JSON report and the baseline key (backend `ds-config-<digest>`), so a baseline
recorded under one config is never compared under another.

Keys are checked against the engine's own pydantic schema at configure time: a missing or malformed file, a
key the engine does not accept, a bad value, or a key the plugin must own (the model under test, MII's
deployment plumbing, a dtype or tp that contradicts --neox-dtype / --neox-tp) is a one-line usage error
naming the file and the key. A case the config does not fit (max_tokens smaller than its prompt plus output)
is never quietly enlarged: it runs, and the verdict says so (see `misfit`)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from pytest_neoxmii.errors import NeoxUsageError

FLAGS = {"ds": "--neox-ds-config", "mii": "--neox-mii-config"}
# Spellings DeepSpeed accepts as aliases, turned into the ones the plugin's defaults use.
_DS_ALIASES = {"kernel_inject": "replace_with_kernel_inject", "tp": "tensor_parallel",
               "max_out_tokens": "max_tokens"}
# MII keys that are the plugin's business: which model is deployed, and the deployment's plumbing.
_MII_OWNED = ("model", "task", "model_path", "deployment_name", "deployment_type", "model_conf", "port_number",
              "restful_api_port", "enable_restful_api", "hostfile", "version", "instance_type", "deploy_rank",
              "torch_dist_port", "replica_num", "replica_configs")


@dataclass(frozen=True)
class ServingConfig:
    engine: str                  # "ds" or "mii"
    path: Path
    values: dict                 # the user's keys (aliases normalised), merged over the defaults at deploy
    checked: str = "checked against the engine's schema"
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def digest(self) -> str:
        """Identifies the config's content (not its file name) in baseline keys."""
        return hashlib.sha256(json.dumps(self.values, sort_keys=True, default=str).encode()).hexdigest()[:10]

    @property
    def max_tokens(self) -> int | None:
        value = self.values.get("max_tokens")
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    def as_json(self) -> dict:
        return {"file": str(self.path), "digest": self.digest, "values": self.values, "keys": self.checked}

    def describe(self) -> str:
        return (f"{self.engine} config {self.path} (digest {self.digest}, {self.checked}): "
                f"{json.dumps(self.values, sort_keys=True, default=str)} merged over the plugin's defaults")


def merged(defaults: dict, user: dict | None) -> dict:
    """The user's keys over the plugin's defaults; nested dicts (DeepSpeed's tensor_parallel) key by key."""
    out = dict(defaults)
    for key, value in (user or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def load(engine: str, path: Path, *, dtype: str, tp: int) -> ServingConfig:
    where = f"{FLAGS[engine]} {path}"
    values = _read(Path(path), where)
    if engine == "ds":
        values = {_DS_ALIASES.get(k, k): v for k, v in values.items()}
        checked = _check_ds(values, where, dtype, tp)
    else:
        checked = _check_mii(values, where, dtype, tp)
    return ServingConfig(engine, Path(path), values, checked)


def _read(path: Path, where: str) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise NeoxUsageError(f"{where}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise NeoxUsageError(f"{where}: cannot be read ({exc})") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            at = f" at line {mark.line + 1}" if mark is not None else ""
            raise NeoxUsageError(f"{where}: not valid YAML{at} ({getattr(exc, 'problem', None) or exc})") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise NeoxUsageError(f"{where}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") \
                from None
    if not isinstance(data, dict):
        raise NeoxUsageError(f"{where}: expected an object of config keys, got {type(data).__name__}")
    return data


def _disagree(where: str, key: str, got, flag: str) -> NeoxUsageError:
    return NeoxUsageError(f"{where}: key '{key}' asks for {got} but the session runs {flag}: set it with "
                          f"{flag.split('=')[0]} instead (the HF reference and the noise floor follow it)")


def _torch_dtype(dtype: str) -> str:
    from pytest_neoxmii.dtypes import TORCH_NAMES
    return f"torch.{TORCH_NAMES[dtype]}"


# The engines' own pydantic configs parse the user's keys, in a child process: the test process never imports
# deepspeed or mii (they run in worker processes, backends/isolated.py).
_PARSE_IN_CHILD = ("import json, sys; from pytest_neoxmii.serving_config import parse_with_engine; "
                   "print(json.dumps(parse_with_engine(sys.argv[1], json.load(sys.stdin))))")


def parse_with_engine(engine: str, values: dict) -> dict:
    """Run in the child: the engine's config class over the values. {"unavailable": why} when the engine's
    package is missing, {"error": [key, message]} for the first invalid key, else what was parsed."""
    try:
        import pydantic
        if engine == "ds":
            from deepspeed.inference.config import DeepSpeedInferenceConfig as Config
        else:
            from mii.legacy.config import ModelConfig as Config
    except ImportError as exc:
        return {"unavailable": f"{'deepspeed' if engine == 'ds' else 'deepspeed-mii'} is not importable ({exc})"}
    if engine == "mii":    # a placeholder model and no hub look-up: only the user's keys are being checked
        values = {**values, "model": "model-under-test", "task": "text-generation", "skip_model_check": True}
    try:
        parsed = Config(**values)
    except pydantic.ValidationError as exc:
        err = exc.errors()[0]
        return {"error": [".".join(str(p) for p in err.get("loc", ())) or "?", err.get("msg", "invalid")]}
    tp = parsed.tensor_parallel.tp_size if engine == "ds" else parsed.tensor_parallel
    return {"dtype": str(parsed.dtype), "tp": tp}


def _parse_in_child(engine: str, values: dict) -> dict:
    import subprocess
    import sys
    try:
        out = subprocess.run([sys.executable, "-c", _PARSE_IN_CHILD, engine], input=json.dumps(values),
                             capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"unavailable": f"the check did not run ({exc})"}
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        return {"unavailable": f"the check failed ({last})"}
    return json.loads(lines[-1])


def _check(engine: str, values: dict, where: str, dtype: str, tp: int, tp_keys: tuple[str, ...]) -> str:
    parsed = _parse_in_child(engine, values)
    if "unavailable" in parsed:
        return f"keys not checked: {parsed['unavailable']}"
    if "error" in parsed:
        key, message = parsed["error"]
        raise NeoxUsageError(f"{where}: key '{key}': {message}")
    if "dtype" in values and parsed["dtype"] != _torch_dtype(dtype):
        raise _disagree(where, "dtype", values["dtype"], f"--neox-dtype={dtype}")
    given = next((k for k in tp_keys if k in values), None)
    if given is not None and parsed["tp"] != tp:
        raise _disagree(where, given, parsed["tp"], f"--neox-tp={tp}")
    return ("checked against deepspeed.inference.config.DeepSpeedInferenceConfig" if engine == "ds"
            else "checked against mii.legacy.config.ModelConfig")


def _check_ds(values: dict, where: str, dtype: str, tp: int) -> str:
    return _check("ds", values, where, dtype, tp, ("tensor_parallel", "mp_size"))


def _check_mii(values: dict, where: str, dtype: str, tp: int) -> str:
    owned = next((k for k in values if k in _MII_OWNED), None)
    if owned is not None:
        raise NeoxUsageError(f"{where}: key '{owned}' is set by the plugin (the model under test and the "
                             "deployment's plumbing), not by the config file")
    return _check("mii", values, where, dtype, tp, ("tensor_parallel",))


def misfit(config: ServingConfig | None, plan, check: str) -> str | None:
    """Why the user's config cannot hold this case (None when it can, or no config/max_tokens is given).
    Greedy generation needs prompt + output tokens; teacher-forced scoring the prompt alone."""
    if config is None or config.max_tokens is None:
        return None
    prompt = max(plan.lengths)
    generating = check != "teacher-forced" and plan.generate
    needed = prompt + (plan.max_new_tokens if generating else 0)
    if needed <= config.max_tokens:
        return None
    what = f"prompt {prompt} + {plan.max_new_tokens} new = {needed}" if generating else f"prompt {prompt}"
    return (f"the {config.engine} config does not fit this case: max_tokens {config.max_tokens} < {what} tokens "
            f"({config.path}); run anyway, as deployed")
