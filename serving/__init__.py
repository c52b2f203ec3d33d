"""spatiAL serving: using a trained ensemble on screens.

- ``model.py``  the served model: resolved once from a directory or ``models:/NAME@ALIAS``, packing of outputs
- ``service/``  the BentoML HTTP service (``api``), request validation, uploads, response schemas
- ``batch/``    screen-wide batch scoring, resumable, local or on Ray Data
- ``screen/``   excision bins, simulated sequencing, count tables, gene hits with an NT-calibrated FDR
"""
