"""The screen report (``spatial report``): one self-contained HTML page built from the pipeline's outputs
(``build``: a section per input that exists; ``static/report.html``: the page template with its few lines of JS)."""
