"""Screen-wide batch scoring: ``scoring.score_files`` (planned chunks, resumable parts, local or Ray)."""
