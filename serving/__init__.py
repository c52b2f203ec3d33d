"""spatiAL serving: using a trained ensemble on screens.

- ``model.py``  the served model: resolved once from a directory or ``models:/NAME@ALIAS``, packing of outputs
- ``service/``  the BentoML HTTP service (``api``), request validation, uploads, response schemas
- ``batch/``    screen-wide batch scoring, resumable, local or on Ray Data
- ``discovery/`` the discovery queue: novel cells clustered into candidate phenotypes, enriched genes per cluster
"""
