"""Table, plot and checks for an LLM energy sweep's results dir.

    python examples/llm_energy/report.py RESULTS_DIR [--monitor monitor.jsonl[.gz]]
        [--plot j_per_token.png] [--markdown table.md]

Reads RESULTS_DIR/records/*.json (what `llem-dispatch run` wrote) and prints one row
per experiment (model, dtype, batch, GPUs, prefill and decode time, tokens/s, energy,
J/token, peak memory). `--plot` draws joules per output token against batch size,
one line per model and dtype (needs matplotlib). Then it checks, from the records
alone, what the sweep must guarantee on real GPUs, and exits 1 if a check fails:

- every experiment saw exactly the GPUs it was assigned (NVML UUIDs of its host ids
  equal the UUIDs CUDA showed it), and a host id always means the same UUID;
- energy is read only on the experiment's own GPUs (its per-GPU energy keys are its
  UUIDs), so an idle GPU or another experiment's GPU is never counted;
- no GPU ran two experiments at once, and each GPU's cooldown gap (the study's
  `experiment_gap_s`) passed between one experiment's exit and the next one's start;
- with two or more GPUs, 1-GPU experiments ran on different GPUs at the same time.

With `--monitor` (the samples of monitor.py) it also compares each experiment's energy
with the counter the monitor saw on the same GPUs over the same window.
"""

from __future__ import annotations

import argparse
import bisect
import gzip
import itertools
import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

COLUMNS = [
    ("model", "model", "{}"),
    ("params (B)", "params_b", "{:.2f}"),
    ("dtype", "dtype", "{}"),
    ("batch", "batch_size", "{}"),
    ("GPUs", "gpu_ids", "{}"),
    ("prefill s", "prefill_s", "{:.3f}"),
    ("decode s", "decode_s", "{:.2f}"),
    ("tok/s", "tokens_per_s", "{:.0f}"),
    ("energy J", "energy_j", "{:.1f}"),
    ("J/token", "j_per_token", "{:.4f}"),
    ("decode J/token", "decode_j_per_token", "{:.4f}"),
    ("avg W", "avg_power_w", "{:.0f}"),
    ("peak GiB", "peak_memory_gib", "{:.1f}"),
]
MODEL_ORDER = {"tiny": 0, "llama-0.1b": 1, "llama-1b": 2, "llama-8b": 3}


def load(results_dir: Path) -> list[dict[str, Any]]:
    """Every record of the results dir, ordered by model, dtype and batch size."""
    records = [json.loads(p.read_text()) for p in sorted((results_dir / "records").glob("*.json"))]

    def key(r: dict[str, Any]) -> tuple[Any, ...]:
        c = r.get("config", {})
        return (MODEL_ORDER.get(c.get("model"), 9), c.get("dtype"), c.get("batch_size", 0))

    return sorted(records, key=key)


def data(record: dict[str, Any]) -> dict[str, Any]:
    """The experiment's own result dict (empty when it did not succeed)."""
    result = record.get("result") or {}
    return dict(result.get("data", result))


def rows(records: list[dict[str, Any]]) -> list[list[str]]:
    """The table's cells, one row per record."""
    out = []
    for record in records:
        values = {**record.get("config", {}), **data(record)}
        values["gpu_ids"] = ",".join(record.get("gpu_ids") or [])
        cells = []
        for _, key, fmt in COLUMNS:
            value = values.get(key)
            cells.append("-" if value is None else fmt.format(value))
        if record.get("status") != "succeeded":
            error = record.get("error") or record.get("failure") or {}
            cells[-1] += f" ({record.get('status')}: {error.get('type')})"
        out.append(cells)
    return out


def markdown(records: list[dict[str, Any]]) -> str:
    """The table as Markdown."""
    lines = ["| " + " | ".join(h for h, _, _ in COLUMNS) + " |"]
    lines.append("|" + "|".join("---" for _ in COLUMNS) + "|")
    lines += ["| " + " | ".join(r) + " |" for r in rows(records)]
    return "\n".join(lines)


def plot(records: list[dict[str, Any]], path: Path, title: str) -> None:
    """Joules per output token against batch size, one line per model and dtype."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for record in records:
        d = data(record)
        if d.get("j_per_token") is not None:
            series.setdefault((d["model"], d["dtype"]), []).append(
                (d["batch_size"], d["j_per_token"])
            )
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (model, dtype), points in sorted(series.items(), key=lambda s: MODEL_ORDER.get(s[0][0])):
        xs, ys = zip(*sorted(points), strict=True)
        style = "-" if dtype == "bf16" else "--"
        ax.plot(xs, ys, style, marker="o", label=f"{model} {dtype}")
    ax.set_xscale("log", base=2)
    batches = sorted({x for points in series.values() for x, _ in points})
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("joules per output token")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _when(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


def check_gpus(records: list[dict[str, Any]]) -> list[str]:
    """Each experiment saw exactly its GPUs, and read energy on those alone."""
    problems: list[str] = []
    uuid_of: dict[str, str] = {}
    for record in records:
        name, d = record["config_hash"], data(record)
        if record.get("status") != "succeeded":
            problems.append(f"{name}: {record.get('status')}")
            continue
        if d.get("gpu_name") == "cpu":
            continue  # virtual GPU ids (CI, laptops): there is no UUID to compare
        seen = sorted(u for u in d["gpu_uuids"].split(",") if u)
        if len(seen) != len(record["gpu_ids"]):
            problems.append(f"{name}: assigned {record['gpu_ids']}, CUDA saw {seen}")
        if d.get("assigned_uuids") is not None and sorted(d["assigned_uuids"]) != seen:
            problems.append(f"{name}: assigned UUIDs {d['assigned_uuids']}, CUDA saw {seen}")
        for gpu, uuid in zip(record["gpu_ids"], d.get("assigned_uuids") or [], strict=False):
            if uuid_of.setdefault(gpu, uuid) != uuid:
                problems.append(f"GPU {gpu} was {uuid_of[gpu]} and then {uuid}")
        for key in ("energy_j_per_gpu", "prefill_energy_j_per_gpu"):
            if d.get(key) is not None and sorted(d[key]) != seen:
                problems.append(f"{name}: {key} read on {sorted(d[key])}, its GPUs are {seen}")
    return problems


def check_intervals(records: list[dict[str, Any]], gap_s: float) -> list[str]:
    """No GPU shared; the cooldown gap per GPU; parallel work on different GPUs."""
    problems: list[str] = []
    spans: dict[str, list[tuple[float, float, str]]] = {}
    for record in records:
        if record.get("started_at") and record.get("exited_at"):
            span = (_when(record["started_at"]), _when(record["exited_at"]))
            for gpu in record.get("gpu_ids") or []:
                spans.setdefault(gpu, []).append((*span, record["config_hash"]))
    for gpu, items in sorted(spans.items()):
        items.sort()
        for (_, end1, h1), (start2, _, h2) in itertools.pairwise(items):
            if start2 < end1:
                problems.append(f"GPU {gpu}: {h1} and {h2} overlap")
            elif start2 - end1 < gap_s - 0.01:
                problems.append(f"GPU {gpu}: {start2 - end1:.2f}s between {h1} and {h2}")
    singles = [
        (s, e, g)
        for g, items in spans.items()
        for s, e, h in items
        if len(next(r for r in records if r["config_hash"] == h)["gpu_ids"]) == 1
    ]
    if len(spans) >= 2 and not any(
        a[2] != b[2] and a[0] < b[1] and b[0] < a[1] for a in singles for b in singles
    ):
        problems.append("no two 1-GPU experiments ran at the same time on different GPUs")
    return problems


def check_monitor(records: list[dict[str, Any]], samples: list[dict[str, Any]]) -> list[str]:
    """Each experiment's energy against the monitor's counter over the same window."""
    problems: list[str] = []
    by_uuid: dict[str, list[tuple[float, float]]] = {}
    for s in samples:
        by_uuid.setdefault(s["uuid"], []).append((s["t"], s["energy_mj"]))
    for record in records:
        d = data(record)
        window = (d.get("windows") or {}).get("full") or {}
        for uuid, joules in (window.get("energy_j") or {}).items():
            series = sorted(by_uuid.get(uuid, []))
            times = [t for t, _ in series]
            lo = bisect.bisect_right(times, window["start_wall"]) - 1
            hi = bisect.bisect_left(times, window["end_wall"])
            if lo < 0 or hi >= len(series):
                continue
            # Samples just outside the window bound its energy from above, the ones
            # just inside from below.
            outer = (series[hi][1] - series[lo][1]) / 1e3
            inner = (series[hi - 1][1] - series[lo + 1][1]) / 1e3 if hi - 1 > lo + 1 else 0.0
            if not inner - 1.0 <= joules <= outer + 1.0:
                problems.append(
                    f"{record['config_hash']}: {joules:.1f} J on {uuid}, "
                    f"monitor saw {inner:.1f}..{outer:.1f} J"
                )
    return problems


def energy_accounting(records: list[dict[str, Any]], samples: list[dict[str, Any]]) -> list[str]:
    """Per GPU: the counter over the whole sweep against what experiments were charged."""
    lines = []
    uuids = sorted({s["uuid"] for s in samples})
    for uuid in uuids:
        series = sorted((s["t"], s["energy_mj"]) for s in samples if s["uuid"] == uuid)
        total = (series[-1][1] - series[0][1]) / 1e3
        charged = sum(
            (window.get("energy_j") or {}).get(uuid, 0.0)
            for r in records
            for window in (data(r).get("windows") or {}).values()
        )
        lines.append(
            f"{uuid}: {total:.0f} J over {series[-1][0] - series[0][0]:.0f} s sampled; "
            f"{charged:.0f} J inside experiments' measured windows; the rest (model "
            "loading, warm-up, cooldown, idle) is charged to no experiment"
        )
    return lines


def _gap_s(results_dir: Path) -> float:
    """The study's experiment_gap_s, from the resolved study.yaml the run wrote."""
    import yaml

    path = results_dir / "study.yaml"
    study = yaml.safe_load(path.read_text()) if path.exists() else {}
    return float((study or {}).get("experiment_gap_s") or 0.0)


def main(argv: list[str] | None = None) -> int:
    """Print the table, write the plot and Markdown, run the checks; 1 if one fails."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results_dir", type=Path)
    parser.add_argument("--monitor", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None)
    parser.add_argument("--title", default="LLM inference energy (greedy decoding)")
    args = parser.parse_args(argv)
    records = load(args.results_dir)
    table = markdown(records)
    print(table)
    if args.markdown:
        args.markdown.write_text(table + "\n")
    if args.plot and any(data(r).get("j_per_token") is not None for r in records):
        plot(records, args.plot, args.title)
    elif args.plot:
        print("no energy readings (no NVML): no plot")
    problems = check_gpus(records) + check_intervals(records, _gap_s(args.results_dir))
    if args.monitor:
        opener = gzip.open if args.monitor.suffix == ".gz" else open
        with opener(args.monitor, "rt", encoding="utf-8") as handle:
            samples = [json.loads(line) for line in handle if line.strip()]
        problems += check_monitor(records, samples)
        for line in energy_accounting(records, samples):
            print(line)
    for problem in problems:
        print("CHECK FAILED:", problem)
    print(f"{len(records)} records; checks:", "all passed" if not problems else "failed")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
