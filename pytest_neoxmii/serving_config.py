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

    @property
    def injects(self) -> bool | None:
        """The file's replace_with_kernel_inject (None: left to the plugin, or not checked by the engine)."""
        value = self.values.get("replace_with_kernel_inject")
        return value if isinstance(value, bool) else None

    def cpu_refusal(self) -> str | None:
        """Why this config cannot deploy on the CPU: it asks for DeepSpeed's inference kernels, which are CUDA
        ops (on the CPU, DeepSpeed fails in init_inference: "This op had not been implemented on CPU backend")."""
        if not self.injects:
            return None
        return (f"{FLAGS[self.engine]} {self.path} sets replace_with_kernel_inject: DeepSpeed's inference kernels "
                "need a CUDA GPU, and this session runs on the CPU")


def merged(defaults: dict, user: dict | None) -> dict:
    """The user's keys over the plugin's defaults; nested dicts (DeepSpeed's tensor_parallel) key by key."""
    out = dict(defaults)
    for key, value in (user or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def load(engine: str, path: Path, *, dtype: str, tp: int, cache_dir: Path | None = None) -> ServingConfig:
    """Read and check the file. The engine's answer for the same keys under the same installed versions is
    kept in memory and, given a cache_dir, on disk (ParseCache): the check's child process imports DeepSpeed
    or MII, 1.8 s and 4.4 s on a 2-core CPU, at every session otherwise."""
    where = f"{FLAGS[engine]} {path}"
    values = _read(Path(path), where)
    if engine == "ds":
        values = {_DS_ALIASES.get(k, k): v for k, v in values.items()}
        checked, parsed = _check_ds(values, where, dtype, tp, cache_dir)
    else:
        checked, parsed = _check_mii(values, where, dtype, tp, cache_dir)
    if parsed.get("inject") is not None:
        # the engine's reading of the user's spelling ("yes", 0, ...), as the aliases above: the same content,
        # one digest, and the backends (which expect kernels where it is on) read a bool
        values["replace_with_kernel_inject"] = parsed["inject"]
    return ServingConfig(engine, Path(path), values, checked)


def _read(path: Path, where: str) -> dict:
    try:
        text = path.read_text(encoding="utf-8-sig")     # (a Windows editor's byte order mark, if any, dropped)
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
# deepspeed or mii (they run in worker processes, backends/isolated.py). One child answers every check of the
# process (_Checker): it imports DeepSpeed (1.8 s on a 2-core CPU) or MII (4.4 s) once, not for each file.
_CHECKER_LOOP = ("import json, sys\n"
                 "from pytest_neoxmii.serving_config import parse_with_engine, ANSWER\n"
                 "for line in sys.stdin:\n"
                 "    engine, values = json.loads(line)\n"
                 "    print(ANSWER + json.dumps(parse_with_engine(engine, values)), flush=True)\n")
ANSWER = "neoxmii-config-check: "     # marks the answer among what the engines' imports print
CHECK_TIMEOUT_S = 300.0


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
        if engine == "mii":
            _deepspeed_reads_what_mii_forwards(parsed, values)
    except pydantic.ValidationError as exc:
        err = exc.errors()[0]
        return {"error": [".".join(str(p) for p in err.get("loc", ())) or "?", err.get("msg", "invalid")]}
    tp = parsed.tensor_parallel.tp_size if engine == "ds" else parsed.tensor_parallel
    # kernel injection as the engine reads the user's key ("yes", 1, ...); None where the file leaves it to the
    # plugin (MII's own default is on, DeepSpeed's off: the plugin sets it by device, backends/)
    asked = "replace_with_kernel_inject" in values or "kernel_inject" in values
    return {"dtype": str(parsed.dtype), "tp": tp, "inject": bool(parsed.replace_with_kernel_inject) if asked else None}


# The user's MII keys that MII hands on to deepspeed.init_inference (mii/legacy/models/load_models.py), which
# checks them again with bounds of its own: {"max_tokens": -5} passes MII's ModelConfig and failed the deploy.
FORWARDED_TO_DEEPSPEED = ("max_tokens", "enable_cuda_graph", "replace_with_kernel_inject")


def _deepspeed_reads_what_mii_forwards(parsed, values: dict) -> None:
    from deepspeed.inference.config import DeepSpeedInferenceConfig
    forwarded = {key: getattr(parsed, key) for key in FORWARDED_TO_DEEPSPEED if key in values}
    if "max_tokens" in forwarded:
        forwarded["min_tokens"] = forwarded["max_tokens"]      # MII passes it as both
    DeepSpeedInferenceConfig(**forwarded)


class ParseCache:
    """The engine's answer for a config, by engine, keys and what decides the answer: the installed
    deepspeed, deepspeed-mii and pydantic, and this module's own code. In memory for the process; on disk
    under cache_dir/serving-config-checks/ when given, written whole (renamed into place) so that a killed
    session never leaves half an answer. An answer that the check could not be run is never kept."""
    _memory: dict[str, dict] = {}

    @staticmethod
    def key(engine: str, values: dict) -> str:
        from importlib import metadata
        versions = []
        for dist in ("deepspeed", "deepspeed-mii", "pydantic"):
            try:
                versions.append(metadata.version(dist))
            except metadata.PackageNotFoundError:
                versions.append(None)
        code = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()
        blob = json.dumps([engine, values, versions, code], sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:32]

    @classmethod
    def parse(cls, engine: str, values: dict, cache_dir: Path | None = None) -> dict:
        key = cls.key(engine, values)
        if key in cls._memory:
            return cls._memory[key]
        path = None if cache_dir is None else Path(cache_dir) / "serving-config-checks" / f"{key}.json"
        parsed = None
        if path is not None and path.is_file():
            try:
                parsed = json.loads(path.read_text())
            except (OSError, ValueError):
                parsed = None                   # unreadable: asked again, and written again
        if not isinstance(parsed, dict) or not ({"error", "dtype"} & set(parsed)):
            parsed = _parse_in_child(engine, values)
            if "unavailable" in parsed:
                return parsed
            if path is not None:
                _write_whole(path, json.dumps(parsed))
        cls._memory[key] = parsed
        return parsed


def _write_whole(path: Path, text: str) -> None:
    from pytest_neoxmii.files import write_whole
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_whole(path, text)
    except OSError:                     # a read-only cache only costs the next session the check
        pass


class _Checker:
    """The child that parses configs with the engines' classes, started at the first check and kept for the
    process's later ones. It ends when this process closes its stdin: at exit, or when this process dies."""
    _proc = None
    _stderr = None
    _closes_at_exit = False

    @classmethod
    def ask(cls, engine: str, values: dict) -> dict:
        import os
        import select
        import time
        try:
            proc = cls._proc if cls._proc is not None and cls._proc.poll() is None else cls._start()
            proc.stdin.write((json.dumps([engine, values], default=str) + "\n").encode())
            proc.stdin.flush()
            deadline, pending = time.monotonic() + CHECK_TIMEOUT_S, b""
            # Raw reads, lines split here: a buffered reader could hold the answer while select waits on the pipe.
            while True:
                while b"\n" in pending:
                    line, pending = pending.split(b"\n", 1)
                    text = line.decode(errors="replace")
                    if text.startswith(ANSWER):
                        return json.loads(text[len(ANSWER):])
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([proc.stdout], [], [], left)[0]:
                    cls.close(kill=True)
                    return {"unavailable": f"the check did not answer in {CHECK_TIMEOUT_S:.0f} s"}
                chunk = os.read(proc.stdout.fileno(), 1 << 16)
                if not chunk:                                 # the child ended without an answer
                    cls._stderr.seek(0)
                    last = (cls._stderr.read().decode(errors="replace").strip().splitlines() or ["no output"])[-1]
                    cls.close()
                    return {"unavailable": f"the check failed ({last})"}
                pending += chunk
        except (OSError, ValueError) as exc:
            cls.close(kill=True)
            return {"unavailable": f"the check did not run ({exc})"}

    @classmethod
    def _start(cls):
        import subprocess
        import sys
        import tempfile
        cls.close()
        cls._stderr = tempfile.TemporaryFile()    # not a pipe: the engines' warnings could fill one unread
        cls._proc = subprocess.Popen([sys.executable, "-c", _CHECKER_LOOP], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=cls._stderr)
        if not cls._closes_at_exit:
            import atexit
            atexit.register(cls.close)
            cls._closes_at_exit = True
        return cls._proc

    @classmethod
    def close(cls, kill: bool = False) -> None:
        proc, cls._proc = cls._proc, None
        if proc is not None:
            try:
                proc.stdin.close()
                if kill:
                    raise TimeoutError
                proc.wait(timeout=10)
            except Exception:
                proc.kill()
                proc.wait()
            proc.stdout.close()
        if cls._stderr is not None:
            cls._stderr.close()
            cls._stderr = None


def _parse_in_child(engine: str, values: dict) -> dict:
    return _Checker.ask(engine, values)


def _check(engine: str, values: dict, where: str, dtype: str, tp: int, tp_keys: tuple[str, ...],
           cache_dir: Path | None = None) -> tuple[str, dict]:
    """(what was checked, the engine's reading of the keys); a bad key is a usage error."""
    parsed = ParseCache.parse(engine, values, cache_dir)
    if "unavailable" in parsed:
        return f"keys not checked: {parsed['unavailable']}", {}
    if "error" in parsed:
        key, message = parsed["error"]
        raise NeoxUsageError(f"{where}: key '{key}': {message}")
    if "dtype" in values and parsed["dtype"] != _torch_dtype(dtype):
        raise _disagree(where, "dtype", values["dtype"], f"--neox-dtype={dtype}")
    given = next((k for k in tp_keys if k in values), None)
    if given is not None and parsed["tp"] != tp:
        raise _disagree(where, given, parsed["tp"], f"--neox-tp={tp}")
    return ("checked against deepspeed.inference.config.DeepSpeedInferenceConfig" if engine == "ds"
            else "checked against mii.legacy.config.ModelConfig, and the keys MII hands to "
                 "deepspeed.init_inference against DeepSpeedInferenceConfig"), parsed


def _check_ds(values: dict, where: str, dtype: str, tp: int, cache_dir: Path | None = None) -> tuple[str, dict]:
    return _check("ds", values, where, dtype, tp, ("tensor_parallel", "mp_size"), cache_dir)


def _check_mii(values: dict, where: str, dtype: str, tp: int, cache_dir: Path | None = None) -> tuple[str, dict]:
    owned = next((k for k in values if k in _MII_OWNED), None)
    if owned is not None:
        raise NeoxUsageError(f"{where}: key '{owned}' is set by the plugin (the model under test and the "
                             "deployment's plumbing), not by the config file")
    return _check("mii", values, where, dtype, tp, ("tensor_parallel",), cache_dir)


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
