"""The GPU-never-waits check (issue 34) from one adaptive sweep's results dir.

    python examples/llm_energy/adaptive_summary.py RESULTS_DIR [--cooldown 2]

Per GPU, in gate order, each gap between one experiment's `done` mark and the
next one being both handed the GPU and prepared (its `ready` mark):

    waited = max(gate opened, ready) - (previous done + cooldown)

the seconds the GPU waited for the dispatcher or for a preparation beyond the
cooldown the study asked for (a run that was not prestarted: its start plus its
whole preparation). After that point the GPU is the experiment's own (weights to
the GPU, warm-up), so it is not counted here; with the study's telemetry, the
seconds NVML saw the SMs idle from `done` to the next `work` mark are shown beside.
Also: how many experiments were prestarted, each config's cycles, J/token (mean,
cv, relative 95% interval) and the journal's decisions.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from pathlib import Path
from typing import Any

# The same record times and NVML samples as idle_gaps.py (this folder).
from idle_gaps import _sm_samples, _t

# Student's t at 97.5% by degrees of freedom (n - 1), for the relative 95% interval.
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306}


def _sm_idle_s(samples: list[tuple[float, float]], start: float, end: float) -> float | None:
    inside = [u for t, u in samples if start <= t < end]
    if not inside or end <= start:
        return None
    return (end - start) * sum(1 for u in inside if u == 0) / len(inside)


def _ready_at(record: dict[str, Any]) -> float | None:
    """When the GPU had both: the gate (prestarted) or the start, and the `ready` mark."""
    gate = _t(record.get("gate_opened_at"))
    if gate is not None:
        return gate + float(record.get("gate_late_s") or 0.0)
    start = _t(record.get("started_at"))
    return start + float(record.get("prepare_s") or 0.0) if start is not None else None


def _gaps(
    records: list[dict[str, Any]], cooldown: float, samples: list[Any]
) -> list[dict[str, Any]]:
    by_gpu: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        by_gpu.setdefault(",".join(record.get("gpu_ids") or []), []).append(record)
    gaps = []
    for gpu, runs in by_gpu.items():
        runs.sort(key=lambda r: _ready_at(r) or 0.0)
        for before, after in itertools.pairwise(runs):
            done = _t(before.get("work_ended_at"))
            ready = _ready_at(after)
            if done is None or ready is None:
                continue
            work = _t(after.get("work_started_at"))
            sm_idle = _sm_idle_s(samples, done, work) if work is not None else None
            gaps.append(
                {
                    "gpu": gpu,
                    "before": before["key"],
                    "after": after["key"],
                    "prestarted": bool(after.get("prestarted")),
                    "prepare_s": after.get("prepare_s"),
                    "gate_late_s": after.get("gate_late_s"),
                    "waited_s": ready - (done + cooldown),
                    "gate_after_done_s": (_t(after.get("gate_opened_at")) or ready) - done,
                    "sm_idle_beyond_s": None if sm_idle is None else sm_idle - cooldown,
                    "queued_to_start_s": (_t(after.get("started_at")) or 0.0)
                    - (_t(after.get("queued_at")) or 0.0),
                }
            )
    return gaps


def _spread(values: list[float]) -> tuple[float, float, float]:
    mean = statistics.mean(values)
    if len(values) < 2 or mean == 0:
        return mean, 0.0, 0.0
    sd = statistics.stdev(values)
    t = _T975.get(len(values) - 1, 1.96)
    return mean, sd / mean, t * sd / len(values) ** 0.5 / mean


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--cooldown", type=float, default=2.0)
    args = parser.parse_args(argv)
    records = [json.loads(p.read_text()) for p in sorted((args.results / "records").glob("*.json"))]
    records = [r for r in records if r.get("status") == "succeeded"]
    records.sort(key=lambda r: _ready_at(r) or 0.0)
    gaps = _gaps(records, args.cooldown, _sm_samples(args.results))

    def f(v: float | None) -> str:
        return "" if v is None else f"{v:.2f}"

    print(
        "| # | before | after | prestarted | prepare s | gate late s | waited beyond "
        "cooldown s | SMs idle beyond cooldown s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for i, gap in enumerate(gaps, 1):
        print(
            f"| {i} | {gap['before']} | {gap['after']} | {gap['prestarted']} | "
            f"{f(gap['prepare_s'])} | {f(gap['gate_late_s'])} | {f(gap['waited_s'])} | "
            f"{f(gap['sm_idle_beyond_s'])} |"
        )
    first = records[0]["key"] if records else None
    later = list(records[1:])
    prestarted = sum(1 for r in later if r.get("prestarted"))
    print(
        f"\n{len(records)} experiments; after the first ({first}), {prestarted} of "
        f"{len(later)} prestarted"
        + "".join(
            f"; not prestarted: {r['key']} ({r.get('prestart_held') or 'no reason recorded'})"
            for r in later
            if not r.get("prestarted")
        )
    )
    if gaps:
        waited = [g["waited_s"] for g in gaps]
        worst = max(gaps, key=lambda g: g["waited_s"])
        print(
            f"GPU waited beyond the {args.cooldown:g} s cooldown: "
            f"median {statistics.median(waited):.3f} s, "
            f"mean {statistics.mean(waited):.3f} s, max {max(waited):.3f} s over {len(gaps)} gaps; "
            f"{sum(1 for w in waited if w > 0.3)} over 0.3 s"
        )
        print(
            f"worst gap: {worst['before']} -> {worst['after']}: waited {worst['waited_s']:.2f} s "
            f"(prestarted {worst['prestarted']}, prepare {f(worst['prepare_s'])} s, gate late "
            f"{f(worst['gate_late_s'])} s, gate {worst['gate_after_done_s']:.2f} s after done, "
            f"queued to start {worst['queued_to_start_s']:.2f} s)"
        )
        sm = [g["sm_idle_beyond_s"] for g in gaps if g["sm_idle_beyond_s"] is not None]
        if sm:
            print(
                f"SMs idle beyond the cooldown, done to next work (NVML, 0.1 s): median "
                f"{statistics.median(sm):.2f} s, max {max(sm):.2f} s"
            )
    if all("j_per_token" in (r.get("result") or {}).get("data", {}) for r in records):
        print(
            "\n| config | batch | cycles | J/token mean | cv | rel. 95% CI | tokens/s mean | cv |"
        )
        print("|---|---|---|---|---|---|---|---|")
        by_config: dict[str, list[dict[str, Any]]] = {}
        for record in records:
            by_config.setdefault(record["config_hash"], []).append(record)
        for config_hash, runs in sorted(
            by_config.items(), key=lambda kv: kv[1][0]["config"]["batch_size"]
        ):
            data = [r["result"]["data"] for r in runs]
            j_mean, j_cv, j_ci = _spread([float(d["j_per_token"]) for d in data])
            s_mean, s_cv, _ = _spread([float(d["tokens_per_s"]) for d in data])
            print(
                f"| {config_hash} | {runs[0]['config']['batch_size']} | {len(runs)} "
                f"| {j_mean:.4f} | "
                f"{j_cv:.3f} | {j_ci:.3f} | {s_mean:.1f} | {s_cv:.3f} |"
            )
    journal = args.results / "journal.jsonl"
    if journal.exists():
        for line in journal.read_text().splitlines():
            event = json.loads(line)
            if event.get("event") in ("cycle_decided", "cycle_ahead", "study_finished"):
                shown = {k: v for k, v in event.items() if k != "ts"}
                print(f"journal: {json.dumps(shown, sort_keys=True)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
