"""Active learning: ``acquisition`` (strategies), ``campaign`` (rounds of train -> score pool -> query),
``oracle`` (who answers a query: simulator truth, manifest, a person's labels), ``report`` (curves, summary)."""
