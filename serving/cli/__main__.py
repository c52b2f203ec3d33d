"""``python -m serving.cli``: the ``spatial`` command."""

from serving.cli.main import main

main()
