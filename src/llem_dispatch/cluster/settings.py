"""The Ray placement's settings: the study file's `ray:` block, checked at load.

Plain pydantic, no Ray: the study schema imports it to validate the block (and
name each problem's line) without importing Ray or connecting to anything.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["RaySettings"]


class RaySettings(BaseModel):
    """Where and how a study runs on a Ray cluster (`placement: ray`, `ray: {...}`)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    address: str = Field(
        default="auto",
        min_length=1,
        description="The cluster's address: auto | HOST:6379 | ray://HOST:10001.",
    )
    placement_timeout_s: float = Field(
        default=300.0,
        gt=0,
        description="How long an experiment no alive node can hold waits for the cluster "
        "to grow back before it ends as a ClusterError (--resume runs it later).",
    )
    cancel_timeout_s: float | None = Field(
        default=None,
        gt=0,
        description="How long a cancelled task may take to remove its container before it "
        "is killed (default: the study's stop_grace_s + 30).",
    )
    num_cpus: float = Field(default=1.0, gt=0, description="CPUs each experiment's task asks for.")
    runtime_env: dict[str, Any] | None = Field(
        default=None, description="Ray's runtime_env for every task (env vars, working dir)."
    )
    init_options: dict[str, Any] = Field(
        default_factory=dict, description="Extra keyword arguments for `ray.init`."
    )
