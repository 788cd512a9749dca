"""`python -m llem_dispatch` runs the command-line tool."""

from llem_dispatch.cli import main

main()
