"""spatiAL serving: using a trained ensemble on screens, and the ``spatial`` command line over the whole project.

- ``model.py``  the served model: resolved once from a directory or ``models:/NAME@ALIAS``, packing of outputs
- ``service/``  the BentoML HTTP service (``api``), request validation, uploads, response schemas, OpenAPI document
- ``bento/``    the champion in the BentoML model store and the self-contained Bento (``spatial package``)
- ``batch/``    screen-wide batch scoring, resumable, local or on Ray Data
- ``discovery/`` the discovery queue: novel cells clustered into candidate phenotypes, enriched genes per cluster
- ``labeling/`` the labeling page (``spatial label``): Starlette app, labels history store, thumbnails
- ``report/``   the self-contained HTML screen report (``spatial report``)
- ``pages.py``  the two pages' Content-Security-Policy (no script runs but the page's own)
- ``screen/``   excision bins, simulated sequencing, count tables, gene hits with an NT-calibrated FDR
- ``cli/``      the ``spatial`` command, every group of it (thin shells over ``training``, ``tuning`` and the above):
                it imports all three packages, so it sits here, on top, and imports run one way
"""
