"""The labeling web app: one static page (``static/index.html``, vanilla JS) and a small JSON API.

``GET /`` the page; ``GET /api/session`` classes, channels, keys, progress; ``GET /api/cells`` the queried cells
with the model's outputs and their current labels; ``GET /thumb/{i}/{channel}?contrast=`` a PNG of query position
``i`` (``composite`` or an image-channel position); ``POST /api/label`` ``{i, label, annotator}``; ``POST /api/undo``
``{i, annotator}``; ``GET /api/review`` cells for a second look (annotators disagree, or the ensemble is confident
and the label says otherwise). Cells are only ever named by their query position. Requests from other machines, or
by another name than loopback, get 403 unless ``allow_remote``; a POST from another site's page 403, one that is not
JSON 415 (:class:`RequestGuard`).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pandas as pd
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from serving.labeling.store import LabelStore
from serving.labeling.thumbs import Thumbnails, locate
from serving.pages import content_policy
from training.data.labels import NEW_PREFIX, UNDO, UNSURE, abs_keys
from training.errors import DataError, SpatialError
from training.io.tables import cell_ids

STATIC = Path(__file__).parent / "static"
REQUIRED = ("source_file", "cell_id")
MAX_BODY = 64 * 1024  # bytes of a POST body
MODEL_FIELDS = ("predicted_class", "confidence", "entropy", "aleatoric", "epistemic", "novelty", "score", "slide_label")


def read_queries(path: str | os.PathLike) -> pd.DataFrame:
    """A ``spatial query`` output (or any table with ``source_file, cell_id``), in query order."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: queries file not found")
    try:
        q = pd.read_parquet(p) if p.suffix == ".parquet" else pd.read_csv(p)
    except Exception as exc:  # pyarrow / pandas raise many kinds
        raise DataError(f"{p}: not a readable queries table ({exc})") from None
    missing = [c for c in REQUIRED if c not in q.columns]
    if missing:
        raise DataError(f"{p}: missing column(s) {', '.join(missing)}")
    if q.empty:
        raise DataError(f"{p}: no cells to label")
    if "query_rank" in q.columns:
        q = q.sort_values("query_rank", kind="stable")
    q = q.reset_index(drop=True)
    q["source_file"] = q["source_file"].astype(str)
    ids, bad = cell_ids(q["cell_id"])
    if bad.any():
        i = int(bad.argmax())
        raise DataError(f"{p}: cell_id must be an integer, got '{q['cell_id'].iloc[i]}' (row {i + 1} of the queries)")
    q["cell_id"] = ids
    if q.duplicated(["source_file", "cell_id"]).any():
        raise DataError(f"{p}: a cell is queried twice")
    return q


def _is_loopback(host: str | None) -> bool:
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _host_name(authority: str) -> str | None:
    """The host of a ``Host`` header or an ``Origin``'s authority (``127.0.0.1:8000``, ``[::1]:8000``)."""
    try:
        return urlsplit(f"//{authority}").hostname
    except ValueError:
        return None


def _authority(origin: str) -> str | None:
    """``host:port`` of an ``Origin`` header (``None`` for ``null`` or one that does not parse)."""
    try:
        return urlsplit(origin).netloc.lower() or None
    except ValueError:
        return None


class RequestGuard:
    """Pure ASGI middleware (a ``BaseHTTPMiddleware`` would turn an exception raised while a route reads the body
    into a plain-text 500) that keeps other machines and other web sites out of the labels:

    - without ``allow_remote``, a client that is not this machine gets 403, and so does a ``Host`` header that does
      not name loopback (a web site whose name resolves to 127.0.0.1, DNS rebinding, would pass the client check);
    - a POST whose ``Origin`` is not the page's own (another site's script in the annotator's browser) gets 403
      (the page's own: its ``Host``, or the ``X-Forwarded-Host`` of a reverse proxy in front of it);
    - a POST body that is not ``application/json`` gets 415: a browser sends JSON across sites only after a CORS
      preflight, which this server never grants, where a form or a ``text/plain`` fetch needs none;
    - every response forbids framing (another site could show the page invisibly and catch the annotator's keys)
      and content sniffing, and carries the page's Content-Security-Policy (``policy``).
    """

    def __init__(self, app, policy: str, allow_remote: bool = False) -> None:
        self.app = app
        self.allow_remote = allow_remote
        self.headers = [(b"x-frame-options", b"DENY"), (b"x-content-type-options", b"nosniff"),
                        (b"content-security-policy", policy.encode())]

    def refusal(self, scope) -> tuple[int, str] | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = headers.get("host", "")
        if not self.allow_remote:
            client = scope.get("client")
            if not _is_loopback(client[0] if client else None):
                return 403, "labeling is served to this machine only (start with --allow-remote)"
            if not _is_loopback(_host_name(host)):
                return 403, f"Host {host[:80]!r} is not this machine; open the page at http://127.0.0.1:<port>/"
        if scope["method"] != "POST":
            return None
        origin = headers.get("origin")
        # the page's own names: the Host it was asked by, and behind a reverse proxy the one the proxy forwards (a
        # browser sends X-Forwarded-Host across sites only after a preflight, which is never granted)
        own = {host.lower(), headers.get("x-forwarded-host", "").split(",")[0].strip().lower()} - {""}
        if origin is not None and _authority(origin) not in own:
            return 403, f"a request from another site ({origin[:80]}) may not write labels"
        if headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
            return 415, "the body must be JSON (Content-Type: application/json)"
        return None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *self.headers]
            await send(message)

        refused = self.refusal(scope)
        if refused is not None:
            return await JSONResponse({"error": refused[1]}, status_code=refused[0])(scope, receive, send_with_headers)
        await self.app(scope, receive, send_with_headers)


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        return -1


class TooLarge(Exception):
    """A request body over ``MAX_BODY`` (413)."""


def _text(d: dict, field: str) -> str:
    """``d[field]`` as a string, refused (400 naming the field) unless it encodes as UTF-8 (a lone surrogate such as
    ``"\\ud800"`` in the JSON does not: labels.csv and the response could not hold it)."""
    value = str(d.get(field, ""))
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(f"{field} {ascii(value)[:80]} is not valid text (it holds a lone surrogate)") from None
    return value


class Session:
    """The queried cells, their thumbnails and the labels store of one ``spatial label`` run."""

    def __init__(self, queries: pd.DataFrame, labels: str | os.PathLike, classes: list[str], px: int = 96,
                 cache: int = 4096, confident: float = 0.9, annotator: str = ""):
        self.cells, layouts = locate(queries)
        self.thumbs = Thumbnails(self.cells, layouts, px, cache)
        model = [c[len("prob_"):] for c in self.cells.columns if c.startswith("prob_")]
        predicted = [str(c) for c in self.cells.get("predicted_class", pd.Series(dtype=str)).dropna().unique()]
        self.classes = list(dict.fromkeys([*classes, *model, *predicted]))
        self.store = LabelStore(labels, self.classes)
        self.confident, self.annotator = confident, annotator
        self.keys = abs_keys(self.cells["source_file"], self.cells["cell_id"])

    def position(self, labels: pd.DataFrame) -> np.ndarray:
        return self.keys.get_indexer(abs_keys(labels["source_file"], labels["cell_id"])) if len(labels) else \
            np.zeros(0, np.int64)

    def current(self) -> dict[int, dict]:
        cur = self.store.current()
        pos = self.position(cur)
        return {int(p): {"label": r.label, "annotator": r.annotator, "time": r.time}
                for p, r in zip(pos, cur.itertuples(), strict=True) if p >= 0}

    def progress(self, current: dict | None = None) -> dict:
        current = self.current() if current is None else current
        return {"labeled": len(current), "queried": len(self.cells)}

    def review(self) -> list[dict]:
        per = self.store.per_annotator()
        pos = self.position(per)
        per = per.assign(i=pos)[pos >= 0]
        per = per[per["label"] != UNSURE]
        out: dict[int, list[str]] = {}
        for i, grp in per.groupby("i"):
            if grp["label"].nunique() > 1:
                out.setdefault(int(i), []).append(
                    "annotators disagree: " + ", ".join(f"{a}={lab}" for a, lab in zip(grp["annotator"], grp["label"],
                                                                                     strict=True)))
        if "predicted_class" in self.cells and "confidence" in self.cells:
            for i, cur in self.current().items():
                pred, conf = self.cells["predicted_class"].iat[i], float(self.cells["confidence"].iat[i])
                if cur["label"] not in (UNSURE, pred) and conf >= self.confident:
                    out.setdefault(i, []).append(f"model says {pred} with confidence {conf:.3f}, label {cur['label']}")
        return [{"i": i, "reasons": r} for i, r in sorted(out.items())]


def _cell_json(cells: pd.DataFrame, i: int) -> dict:
    row = cells.iloc[i]
    d = {"i": i, "source_file": os.path.basename(str(row["source_file"])), "cell_id": int(row["cell_id"])}
    for f in MODEL_FIELDS:
        if f in cells.columns and pd.notna(row[f]):
            if isinstance(row[f], str):
                d[f] = row[f]
            elif np.isfinite(float(row[f])):  # JSON has no inf: such a value is left out, as NaN is
                d[f] = float(row[f])
    return d


def create_app(session: Session, allow_remote: bool = False) -> Starlette:
    cells_json = [_cell_json(session.cells, i) for i in range(len(session.cells))]

    def error(status: int, msg: str) -> JSONResponse:  # a message quoting a client's string always encodes
        return JSONResponse({"error": msg.encode("utf-8", "backslashreplace").decode("utf-8")}, status_code=status)

    async def page(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    async def meta(request: Request) -> Response:
        return JSONResponse({"classes": session.classes, "unsure": UNSURE, "new_prefix": NEW_PREFIX,
                             "channels": session.thumbs.channels(0), "progress": session.progress(),
                             "annotator": session.annotator, "confident": session.confident})

    def cells(request: Request) -> Response:
        cur = session.current()
        return JSONResponse({"cells": [{**c, **({"label": cur[c["i"]]["label"], "labeled_by":
                                                  cur[c["i"]]["annotator"]} if c["i"] in cur else {})}
                                       for c in cells_json], "progress": session.progress(cur)})

    def thumb(request: Request) -> Response:
        text, channel = request.path_params["i"], request.path_params["channel"]
        i = int(text) if text.isdigit() and len(text) <= 12 else -1  # a route's {i:int} fails with 500 past 4,300 digits
        try:
            contrast = float(request.query_params.get("contrast", "1"))
        except ValueError:
            return error(400, "contrast must be a number")
        if not 0.1 <= contrast <= 20:
            return error(400, "contrast must be between 0.1 and 20")
        try:
            data = session.thumbs.png(i, channel, round(contrast, 2))
        except IndexError:
            return error(404, f"cell {text[:20]} is not in the queries (0..{len(session.cells) - 1})")
        except ValueError as exc:
            return error(400, str(exc))
        return Response(data, media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    async def read(request: Request) -> bytes:
        """The body, at most ``MAX_BODY`` bytes: a larger Content-Length is refused before anything is read."""
        length = request.headers.get("content-length")
        if length is not None and not 0 <= _int(length) <= MAX_BODY:
            raise TooLarge(f"request body of {length.strip()[:20]!r} bytes; at most {MAX_BODY} bytes")
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > MAX_BODY:
                raise TooLarge(f"request body over {MAX_BODY} bytes")
        return bytes(data)

    async def body(request: Request) -> dict:
        try:
            d = json.loads(await read(request))
        except (ValueError, RecursionError):  # not JSON or not UTF-8, an integer of over 4,300 digits, deep nesting
            raise DataError("request body is not JSON") from None
        if not isinstance(d, dict) or not isinstance(d.get("i"), int) or isinstance(d.get("i"), bool):
            raise DataError("request needs an integer 'i' (the cell's query position)")
        if not 0 <= d["i"] < len(session.cells):
            raise LookupError(f"cell {d['i']} is not in the queries (0..{len(session.cells) - 1})")
        return d

    def write(i: int, label: str, annotator: str) -> dict:
        session.store.append([{"source_file": session.cells["source_file"].iat[i],
                               "cell_id": int(session.cells["cell_id"].iat[i]), "label": label,
                               "annotator": annotator}])
        cur = session.current()
        return {"i": i, "label": cur.get(i, {}).get("label"), "progress": session.progress(cur)}

    async def answer(request: Request, act: Callable[[dict], dict]) -> Response:
        """``act`` on the request's JSON body, its errors as 413 / 404 / 400 with their message."""
        try:
            return JSONResponse(act(await body(request)))
        except TooLarge as exc:
            return error(413, str(exc))
        except LookupError as exc:
            return error(404, str(exc))
        except SpatialError as exc:
            return error(400, str(exc))

    def write_label(d: dict) -> dict:
        lab, annotator = _text(d, "label"), _text(d, "annotator")
        if lab == UNDO:
            raise DataError("use /api/undo to take a label back")
        return write(d["i"], lab, annotator)

    async def label(request: Request) -> Response:
        return await answer(request, write_label)

    async def undo(request: Request) -> Response:
        return await answer(request, lambda d: write(d["i"], UNDO, _text(d, "annotator")))

    def review(request: Request) -> Response:
        return JSONResponse({"cells": session.review()})

    routes = [Route("/", page), Route("/api/session", meta), Route("/api/cells", cells),
              Route("/thumb/{i:str}/{channel:str}", thumb), Route("/api/label", label, methods=["POST"]),
              Route("/api/undo", undo, methods=["POST"]), Route("/api/review", review)]
    policy = content_policy((STATIC / "index.html").read_text(), "img-src 'self'", "connect-src 'self'",
                            "frame-ancestors 'none'")
    middleware = [Middleware(RequestGuard, allow_remote=allow_remote, policy=policy)]
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        yield
        session.thumbs.close()

    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan)  # bodies: at most MAX_BODY (read)
    app.state.session = session
    return app


def check_host(host: str, allow_remote: bool = False) -> None:
    """Refuse a bind address other machines could reach unless ``allow_remote``."""
    if not allow_remote and not _is_loopback(host):
        raise DataError(f"--host {host} is not a loopback address; pass --allow-remote to serve other machines")


def serve(app: Starlette, host: str, port: int, allow_remote: bool = False) -> None:
    """Run ``app`` with uvicorn (blocking)."""
    import uvicorn

    check_host(host, allow_remote)
    uvicorn.run(app, host=host, port=port, log_level="warning")
