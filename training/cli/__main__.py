"""``python -m training.cli``: the ``spatial`` command."""

from training.cli.main import main

main()
