"""The ``spatial`` command, every group of it. ``main`` is the console entry and wires in the command modules:
``data`` (synth, inspect, index, split), ``train`` (train, pretrain, evaluate, register, refit-novelty), ``active``
(al), ``serving`` (score, serve), ``package``, ``tuning`` (tune), ``screen`` (bins, sequence, hits), ``discover``
(discover, genotypes), ``studies`` (seeds, summary), ``label`` (query, label, recalibrate, report). Shared options
live in ``options``. The command line imports ``training``, ``tuning`` and the rest of ``serving`` alike, so it sits
here, at the top of the import graph; library code never imports it."""
