"""What the two pages spatiAL makes (the labeling page it serves, the screen report it writes) share: a
Content-Security-Policy that lets no script run but the page's own inline one, named by its hash, so markup that
reaches a page through a data file (a gene, class or annotator name) can show but never run."""

from __future__ import annotations

import base64
import hashlib


def content_policy(page: str, *sources: str) -> str:
    """The policy for ``page`` (HTML with one inline ``<script>``): its script by hash, inline styles, and
    ``sources`` (e.g. ``"img-src data:"``, ``"connect-src 'self'"``); everything else refused."""
    script = page.split("<script>", 1)[1].split("</script>", 1)[0]
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    return "; ".join(["default-src 'none'", f"script-src 'sha256-{digest}'", "style-src 'unsafe-inline'",
                      "base-uri 'none'", "form-action 'none'", *sources])
