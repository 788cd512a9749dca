"""fakeapptainer: a stand-in for `apptainer exec --nv IMAGE.sif CMD...` (no real Apptainer).

It checks the image file exists, says which image it runs in (APPTAINER_CONTAINER,
as Apptainer does) and replaces itself with CMD as a host process.
"""

from __future__ import annotations

import os
import sys

USAGE = "usage: fakeapptainer exec [--nv] IMAGE.sif CMD [ARG...]"


def main(argv: list[str]) -> int:
    if not argv or argv[0] != "exec":
        print(USAGE, file=sys.stderr)
        return 255
    args = argv[1:]
    while args and args[0].startswith("--"):
        args = args[1:]  # --nv: GPUs are the host's own here
    if len(args) < 2:
        print(USAGE, file=sys.stderr)
        return 255
    image, command = args[0], args[1:]
    if not image.endswith(".sif") or not os.path.isfile(image):
        print(f"FATAL: could not open image {image}: no such file", file=sys.stderr)
        return 255
    os.environ["APPTAINER_CONTAINER"] = image
    os.environ["APPTAINER_NAME"] = os.path.basename(image)
    # It becomes the command, as a container runtime's init does.
    os.execvp(command[0], command)  # noqa: S606 - argv as given, never through a shell
    return 255  # not reached: execvp replaces this process or raises


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
