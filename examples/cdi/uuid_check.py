"""Check on a real GPU host: our UUID resolution against `nvidia-smi -L`, and the CDI
names a study would ask the engine for. Needs nvidia-ml-py and nvidia-smi; no engine.

    PYTHONPATH=src python3 examples/cdi/uuid_check.py

Prints one JSON object; exits 1 when any resolution disagrees with nvidia-smi.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

from llem_dispatch._cdi import DEFAULT_CDI_KIND, read_specs
from llem_dispatch.gpu import GpuPool
from llem_dispatch.runners.gpu_request import EngineGpuFacts, decide_mode, device_requests

_LINE = re.compile(r"^GPU (\d+): (.+?) \(UUID: (\S+)\)$")


def nvidia_smi() -> list[tuple[str, str, str]]:
    """(index, name, UUID) of each GPU as `nvidia-smi -L` lists it."""
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=True).stdout
    return [m.groups() for line in out.splitlines() if (m := _LINE.match(line.strip()))]  # type: ignore[misc]


def main() -> int:
    smi = nvidia_smi()
    expected = {index: uuid for index, _, uuid in smi}
    detected = GpuPool.detect()
    by_index = GpuPool.named(list(expected))
    by_uuid = GpuPool.named(list(expected.values()))
    first = smi[0][2]
    os.environ["CUDA_VISIBLE_DEVICES"] = first  # a UUID narrows detection as for CUDA
    narrowed = GpuPool.detect()
    del os.environ["CUDA_VISIBLE_DEVICES"]
    handed = list(by_index.handed(by_index.devices))
    specs = read_specs()
    facts = EngineGpuFacts("(no engine here)", True, ("/etc/cdi", "/var/run/cdi"), specs)
    mode, why = decide_mode("auto", DEFAULT_CDI_KIND, handed, facts)
    checks = {
        "detect == nvidia-smi": detected.uuids == expected,
        "named(indices) == nvidia-smi": by_index.uuids == expected,
        "named(UUIDs) keeps them": by_uuid.uuids == {u: u for u in expected.values()},
        "handed over by UUID": handed == [expected[i] for i in sorted(expected, key=int)],
        "CUDA_VISIBLE_DEVICES=<UUID> narrows to it": list(narrowed.uuids.values()) == [first],
        "names from NVML": set(by_uuid.names.values()) == {name for _, name, _ in smi},
    }
    print(
        json.dumps(
            {
                "nvidia_smi_L": smi,
                "detected": detected.uuids,
                "named_by_index": by_index.uuids,
                "named_by_uuid_names": by_uuid.names,
                "handed": handed,
                "cdi_request": device_requests("cdi", handed, DEFAULT_CDI_KIND),
                "cdi_specs_here": dict(specs.devices),
                "auto_would_take": [mode, why],
                "checks": checks,
            },
            indent=1,
        )
    )
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
