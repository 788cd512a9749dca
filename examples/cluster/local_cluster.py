"""Try the quickstart sweep on a Ray cluster, without having one.

Starts a 3-node Ray cluster on this machine (a head without GPUs and two worker
nodes with 2 logical GPUs each), runs `examples/quickstart/study.yaml` on it,
and prints where each experiment ran. On a real cluster you would instead run
`llem-dispatch run study.yaml --ray HEAD:6379` (see the README, "Several hosts").

    pip install -e '.[ray]' && python examples/cluster/local_cluster.py
"""

from __future__ import annotations

import functools
import sys
from collections import Counter
from pathlib import Path

import anyio

from llem_dispatch import load_study, run_study
from llem_dispatch.study import docker_available, ensure_image

QUICKSTART = Path(__file__).resolve().parent.parent / "quickstart"
RESULTS = Path("llem-results") / "cluster-quickstart"


def main() -> int:
    try:
        import ray
        from ray.cluster_utils import Cluster
    except ImportError:
        print("this example needs Ray: pip install -e '.[ray]'", file=sys.stderr)
        return 2
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "num_gpus": 0, "include_dashboard": False},
    )
    for _ in range(2):
        cluster.add_node(num_cpus=2, num_gpus=2)
    cluster.wait_for_nodes()
    try:
        study = load_study(QUICKSTART / "study.yaml")
        if docker_available():
            assert study.image is not None
            ensure_image(study, study.image, study_dir=QUICKSTART)
        summary = anyio.run(
            functools.partial(
                run_study,
                study,
                RESULTS,
                cluster=cluster.address,
                study_dir=QUICKSTART,
                resume=True,
            )
        )
    finally:
        ray.shutdown()
        cluster.shutdown()
    per_gpu = Counter(
        f"{r.node.label} GPU {','.join(r.gpu_ids)}" for r in summary.records if r.node
    )
    for where, count in sorted(per_gpu.items()):
        print(f"{where}: {count} experiment(s)")
    print(
        f"{summary.succeeded} succeeded, {summary.failed + summary.errored} failed, "
        f"{summary.skipped} skipped (done before) on runner {summary.runner!r} -> {RESULTS}"
    )
    return summary.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
