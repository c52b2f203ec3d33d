"""Active learning: ``acquisition`` (strategies), ``campaign`` (rounds of train -> score pool -> query),
``oracle`` (who answers a query: simulator truth, manifest, a person's labels), ``report`` (curves, summary),
``query`` (acquisition on the real unlabeled pool for a person to label: ``spatial query``)."""
