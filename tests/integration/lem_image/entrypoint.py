"""A stand-in for llenergymeasure's container entrypoint, following its rules exactly.

(`src/llenergymeasure/infra/container_entrypoint.py` in its public repository.)
Stdlib only. Like the real one it validates the config into its own model,
which fills defaults, names the result by ITS OWN hash of that model
(`sha256(json.dumps(config.model_dump(), sort_keys=True))[:16]`, default
separators) beside the config file, and on failure writes `{stem}_error.json`
(the config file's stem with `_config` replaced by `_error`) and re-raises.
"""

from __future__ import annotations

import hashlib
import json
import os
import traceback
from pathlib import Path

#: What the real ExperimentConfig fills in when a field is absent.
DEFAULTS = {"backend": "pytorch", "precision": "bf16", "n": 100, "max_new_tokens": 32}


def run_container_experiment(config_path: Path, result_dir: Path) -> Path:
    raw = json.loads(config_path.read_text(encoding="utf-8"))
    config = {**DEFAULTS, **raw}  # "ExperimentConfig.model_validate(raw).model_dump()"
    if config.get("fail"):
        raise ValueError(f"backend {config['backend']} rejected the config: fail={config['fail']}")
    config_hash = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    result = {"config_hash": config_hash, "tokens_per_s": 1234.5, "energy_j": 42.0, **config}
    result_dir.mkdir(parents=True, exist_ok=True)
    result_path = result_dir / f"{config_hash}_result.json"
    result_path.write_text(json.dumps(result), encoding="utf-8")
    return result_path


def main() -> None:
    config_path = Path(os.environ["LLEM_CONFIG_PATH"])
    result_dir = config_path.parent
    try:
        result_path = run_container_experiment(config_path, result_dir)
        print(f"[llem] Experiment complete. Result written to {result_path}")
    except Exception as exc:
        stem = config_path.stem
        error_stem = (
            stem[: -len("_config")] + "_error" if stem.endswith("_config") else stem + "_error"
        )
        payload = {
            "type": type(exc).__name__,
            "message": str(exc),
            "traceback": traceback.format_exc(),
        }
        (result_dir / f"{error_stem}.json").write_text(
            json.dumps(payload, indent=2), encoding="utf-8"
        )
        print(f"[llem] Experiment failed. Error written to {result_dir / error_stem}.json")
        raise


if __name__ == "__main__":
    main()
