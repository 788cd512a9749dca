"""`python -m llem_dispatch.cli`: the same as the `llem-dispatch` command."""

from llem_dispatch.cli.app import main

main()
