"""llem-echo-runner: a runner kind from outside llem-dispatch, found by its entry point.

It runs each experiment as the local subprocess runner does, and records
`runner_type: echo`; `runner: echo` in a study (or `--runner echo`) selects it.
"""

from __future__ import annotations

from collections.abc import Sequence

from llem_dispatch.runners import DoctorCheck, LocalRunner, LocalRunnerKind

__all__ = ["EchoRunner", "EchoRunnerKind"]


class EchoRunner(LocalRunner):
    """The local subprocess runner under another name."""

    runner_type = "echo"


class EchoRunnerKind(LocalRunnerKind):
    """The `echo` kind: host processes (no image, no engine), built as `EchoRunner`."""

    runner_class = EchoRunner
    summary = "the echo runner (host processes)"

    async def doctor_checks(
        self, images: Sequence[str] = (), *, required: bool = True, buildable: bool = False
    ) -> list[DoctorCheck]:
        """Its own line in `llem-dispatch doctor`."""
        return [
            DoctorCheck(
                f"runner {self.name}",
                True,
                "runs experiments as host processes (llem-echo-runner)",
                optional=not required,
            )
        ]
