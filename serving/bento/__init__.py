"""The champion as a self-contained Bento: ``store`` (the ensemble in the BentoML model store, with its registry
metadata; what a served Bento loads) and ``build`` (the Bento referencing it, with the locked requirements)."""
