"""The ``spatial`` command. ``main`` is the console entry and wires in the command modules: ``data`` (synth,
inspect, index, split), ``train`` (train, evaluate, register), ``active`` (al), ``serving`` (score, serve),
``tuning`` (tune), ``screen`` (bins, sequence, hits), ``label`` (query, label, report). Shared options live in
``options``; library code never imports this package."""
