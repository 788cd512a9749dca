"""llem-sif-runner: an image runner kind from outside llem-dispatch, on .sif file images.

`runner: sif` with `image: images/bench.sif` runs each experiment as
`fakeapptainer exec --nv IMAGE.sif CMD...` (Apptainer's form, through the stand-in
shipped beside this module): the host-process lifecycle of the local runner, with
the image in front. The kind owns its images: a reference is a path ending in
`.sif` (relative paths are taken from the study's folder), an image is present
when its file exists, and doctor's lines are its own. Nothing here asks Docker.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llem_dispatch.errors import ConfigError, LlemError
from llem_dispatch.runners import DoctorCheck, LocalRunner, LocalRunnerKind, RunnerOptions

__all__ = ["FAKEAPPTAINER", "SifRunner", "SifRunnerKind"]

#: The stand-in container CLI (`apptainer exec --nv IMAGE CMD...`).
FAKEAPPTAINER = Path(__file__).with_name("fakeapptainer.py")


class SifRunner(LocalRunner):
    """The local runner's host process, run inside IMAGE.sif by the container CLI."""

    runner_type = "sif"

    def __init__(self, image: str, command: Sequence[str] | None = None, **kwargs: Any) -> None:
        super().__init__(command, **kwargs)
        self.image = image
        self.command = [sys.executable, str(FAKEAPPTAINER), "exec", "--nv", image, *self.command]


class SifRunnerKind(LocalRunnerKind):
    """The `sif` kind: each experiment through `fakeapptainer exec --nv IMAGE.sif`."""

    needs_image = True
    summary = "Apptainer-style .sif images (fakeapptainer)"

    def check_image(self, reference: str) -> str:
        """A path to a `.sif` file (relative paths are taken from the study's folder)."""
        if not reference.endswith(".sif") or reference.strip() != reference:
            raise ValueError(
                f"{reference!r} is not a .sif image file: give a path ending in .sif "
                "(e.g. 'images/bench.sif', relative to the study's folder, or an absolute path)"
            )
        return reference

    def resolve_image(self, reference: str, study_dir: Path) -> str:
        """The file it names: absolute as given, else under the study's folder."""
        path = Path(reference).expanduser()
        return str(path if path.is_absolute() else (study_dir / path).resolve())

    async def missing_images(
        self, images: Sequence[str], *, study_dir: Path | None = None
    ) -> list[str]:
        """Those of `images` whose file does not exist."""
        base = study_dir or Path.cwd()
        return [i for i in images if not Path(self.resolve_image(i, base)).is_file()]

    def missing_image_error(self, image: str) -> LlemError:
        """No such .sif file: nothing runs until it is there."""
        return ConfigError(
            f"image {image!r}: no such .sif file; nothing was run",
            fix_suggestion="Build or copy it there (`apptainer build bench.sif docker://...`), "
            "or correct the path (relative paths are taken from the study's folder).",
        )

    async def check_study(self, options: RunnerOptions, images: Sequence[str]) -> None:
        """Before anything runs (library use too): every image file is there."""
        for image in await self.missing_images(images, study_dir=options.study_dir):
            raise self.missing_image_error(image)

    def build(self, options: RunnerOptions, image: str | None = None) -> SifRunner:
        """A `SifRunner` for the image file, running the study's command or function."""
        if image is None:
            raise ConfigError(
                "the study names no image and the runner is sif",
                fix_suggestion="Add `image: path/to/bench.sif` to the study.",
            )
        if options.command is None and options.function is None:
            raise ConfigError(
                "the sif runner needs `command:` or `function:` in the study",
                fix_suggestion="Add `function: module:function` to the study.",
            )
        return SifRunner(
            self.resolve_image(image, options.study_dir),
            options.command,
            function=options.function,
            timeout=options.timeout_s,
            source=options.source,
            env=options.env,
            cwd=options.cwd,
            silence_timeout=options.silence_timeout_s,
            exchange_base=options.exchange_base,
            stop_grace_s=options.stop_grace_s,
        )

    async def doctor_checks(
        self, images: Sequence[str] = (), *, required: bool = True, buildable: bool = False
    ) -> list[DoctorCheck]:
        """Its container CLI, then each image file."""
        cli = FAKEAPPTAINER if FAKEAPPTAINER.is_file() else None
        checks = [
            DoctorCheck(
                f"runner {self.name}",
                cli is not None,
                f"fakeapptainer at {cli} (stands in for `apptainer exec --nv`)"
                if cli
                else "fakeapptainer is missing from llem-sif-runner",
                "" if cli else "Reinstall llem-sif-runner.",
                optional=not required,
            ),
            DoctorCheck(
                "apptainer",
                True,
                f"real one at {found}, not used by this stand-in"
                if (found := shutil.which("apptainer"))
                else "not installed (not needed: fakeapptainer stands in)",
            ),
        ]
        for image in images:
            present = Path(image).is_file()
            checks.append(
                DoctorCheck(
                    f"image {image}",
                    present,
                    "present (.sif file)" if present else "no such .sif file",
                    "" if present else "Build or copy the .sif file there.",
                    optional=not required,
                )
            )
        return checks
