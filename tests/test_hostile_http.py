"""Hostile HTTP requests against the real servers (`spatial serve`, `spatial label` on free loopback ports): each gets
a 4xx with a JSON body naming what was wrong, never a 500, and changes nothing on the server.

* ``POST /score_file`` with ``file`` sent as a text field (``curl -F file=abc``): BentoML would take the string as a
  URL to download, so it is refused with 400 before BentoML parses the form (and a non-multipart body, which
  BentoML would also take as a URL, with 415).
* ``POST /api/label`` with a body over 64 KB, or a ``Content-Length`` over it: 413 with the page's JSON error.
* ``POST /api/label`` / ``/api/undo`` with a lone surrogate in the label or annotator: 400 naming the field.
"""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import httpx
import pytest
from browser_util import labeling_server
from test_serving import assert_good, screen, server  # noqa: F401  (fixtures: `spatial serve` on the tiny ensemble)


# -- the scoring service: a `file` field that is not a file upload ----------------------------------------------------
@pytest.fixture()
def url_trap():
    """A loopback HTTP server counting the requests it gets: the scoring service must never call it."""
    hits: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            hits.append(self.path)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"\x93NUMPY")

        def log_message(self, *args):
            pass

    srv = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}/cells.npy", hits
    finally:
        srv.shutdown()
        srv.server_close()


def assert_refused(r: httpx.Response, status: int, loc: str, *words: str) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json", r.text
    body = r.json()
    assert body["detail"][0]["loc"] == [loc], r.text
    assert all(w in body["error"] for w in words), r.text


@pytest.mark.parametrize("value", [b"abc", b"http://127.0.0.1:1/x.npy", b""])
def test_score_file_with_a_text_file_field_is_a_400(server, screen, value):  # noqa: F811
    r = server.post("/score_file", files={"file": (None, value)})
    assert_refused(r, 400, "file", "file", "not a file upload", "expected a file upload")
    assert_good(server, screen)


def test_score_file_text_field_next_to_a_real_upload_is_a_400(server, screen):  # noqa: F811
    path, _, _ = screen
    with open(path, "rb") as fh:
        r = server.post("/score_file", files=[("file", (None, b"abc")), ("file", ("s.h5sc", fh))])
    assert_refused(r, 400, "file", "not a file upload")
    assert_good(server, screen)


def test_score_file_never_fetches_a_url(server, screen, url_trap):  # noqa: F811
    """The URL a client names is not requested, whichever way it is sent (a multipart text field, a form-encoded
    field, or a raw body that is the URL, which BentoML's JSON reader downloads)."""
    url, hits = url_trap
    r = server.post("/score_file", files={"file": (None, url.encode())})
    assert_refused(r, 400, "file", "not a file upload")
    r = server.post("/score_file", data={"file": url})
    assert_refused(r, 415, "content-type", "multipart/form-data")
    for ctype in ("application/json", "text/plain"):
        r = server.post("/score_file", content=url.encode(), headers={"content-type": ctype})
        assert_refused(r, 415, "content-type", "multipart/form-data")
    assert hits == []
    assert_good(server, screen)


def test_score_takes_only_json_bodies(server, screen):  # noqa: F811
    """BentoML parsed any body as JSON: a page of another web site could make its visitor's browser send cells to a
    service on their machine as text/plain (no CORS preflight) and use its CPU."""
    body = json.dumps({"images": screen[1][:2].tolist()}).encode()
    for headers in ({"content-type": "text/plain", "origin": "https://elsewhere.example"},
                    {"content-type": "application/x-www-form-urlencoded"}, {}):  # the last: curl -d, no header
        r = server.post("/score", content=body, headers=headers)
        assert_refused(r, 415, "content-type", "application/json")
    r = server.post("/score", content=body, headers={"content-type": "application/json; charset=utf-8"})
    assert r.status_code == 200 and len(r.json()["cells"]) == 2, r.text


def test_score_file_real_uploads_still_work(server, screen):  # noqa: F811
    path, _, ids = screen
    with open(path, "rb") as fh:
        r = server.post("/score_file", files={"file": ("s.h5sc", fh)})
    assert r.status_code == 200, r.text
    assert [c["cell_id"] for c in r.json()["cells"]] == ids.tolist()


# -- the labeling page ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def label_server(tmp_path_factory, tiny_ensemble, tiny_manifest):
    """`spatial label` on 6 queried cells (as tests/test_labeling_page.py starts it), one label already written."""
    from training.active.query import run_query
    from training.data.cellindex import build_index
    from training.uncertainty.ensemble import Ensemble

    d = tmp_path_factory.mktemp("label_hostile")
    q = run_query(Ensemble.load(tiny_ensemble), build_index(tiny_manifest, progress=False), "margin", 6,
                  pool_subsample=60).queries
    q.to_parquet(d / "queries.parquet")
    labels = d / "labels.csv"
    with labeling_server(d, labels) as (url, port), httpx.Client(base_url=url, timeout=60) as client:
        r = client.post("/api/label", json={"i": 0, "label": "bright", "annotator": "ann"})
        assert r.status_code == 200, r.text
        yield {"client": client, "labels": labels, "port": port}


def assert_json_error(r: httpx.Response, status: int, *words: str) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json", r.text
    assert all(w in r.json()["error"] for w in words), r.text


def raw_post(port: int, path: str, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str], bytes]:
    """An HTTP/1.1 request sent as is (a Content-Length that does not match the body, another Host), and its
    response."""
    headers = {"Host": f"127.0.0.1:{port}", **headers}
    head = f"POST {path} HTTP/1.1\r\nConnection: close\r\n" + "".join(
        f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(head.encode() + body)
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    status_line, _, rest = data.partition(b"\r\n")
    raw_headers, _, payload = rest.partition(b"\r\n\r\n")
    hdrs = dict(line.decode("latin-1").split(": ", 1) for line in raw_headers.split(b"\r\n") if b": " in line)
    return int(status_line.split()[1]), {k.lower(): v for k, v in hdrs.items()}, payload


def test_label_body_over_64kb_is_a_413(label_server):
    c, labels = label_server["client"], label_server["labels"]
    before = labels.read_bytes()
    big = json.dumps({"i": 1, "label": "bright", "annotator": "ann", "pad": "x" * 70_000}).encode()
    assert len(big) > 64 * 1024
    for path in ("/api/label", "/api/undo"):
        r = c.post(path, content=big, headers={"content-type": "application/json"})
        assert_json_error(r, 413, "request body", str(64 * 1024))

    def chunks():  # no Content-Length: the limit holds as the body streams
        yield big[:40_000]
        yield big[40_000:]

    r = c.post("/api/label", content=chunks(), headers={"content-type": "application/json"})
    assert_json_error(r, 413, "request body over")
    assert labels.read_bytes() == before
    assert c.get("/api/session").status_code == 200


def test_label_with_a_huge_content_length_and_a_tiny_body_is_a_413(label_server):
    labels, port = label_server["labels"], label_server["port"]
    before = labels.read_bytes()
    body = json.dumps({"i": 1, "label": "bright", "annotator": "ann"}).encode()
    status, headers, payload = raw_post(port, "/api/label", {"Content-Type": "application/json",
                                                             "Content-Length": "9999999"}, body)
    assert status == 413, payload
    assert headers["content-type"] == "application/json" and "9999999" in json.loads(payload)["error"], payload
    assert labels.read_bytes() == before


def test_another_sites_page_cannot_write_labels(label_server):
    """What a page on another site can make the annotator's browser send (a no-preflight ``text/plain`` POST with
    its Origin; its own name resolving to 127.0.0.1), against the real server: 403, ``labels.csv`` untouched."""
    c, labels, port = label_server["client"], label_server["labels"], label_server["port"]
    before = labels.read_bytes()
    body = json.dumps({"i": 2, "label": "spotty", "annotator": "csrf"})
    r = c.post("/api/label", content=body, headers={"Content-Type": "text/plain", "Origin": "http://evil.example.com"})
    assert_json_error(r, 403, "another site (http://evil.example.com)")
    r = c.post("/api/undo", content=body, headers={"Content-Type": "application/json", "Origin": "null"})
    assert_json_error(r, 403, "another site (null)")
    r = c.post("/api/label", content=body, headers={"Content-Type": "text/plain"})
    assert_json_error(r, 415, "Content-Type: application/json")
    status, _, payload = raw_post(port, "/api/label", {"Content-Type": "application/json", "Host":
                                                       f"evil.example.com:{port}", "Content-Length": str(len(body))},
                                  body.encode())
    assert status == 403 and b"is not this machine" in payload, payload
    assert labels.read_bytes() == before
    r = c.post("/api/label", content=body, headers={"Content-Type": "application/json",
                                                    "Origin": f"http://127.0.0.1:{port}"})
    assert r.status_code == 200 and "csrf" in labels.read_text()  # the page's own request
    assert c.post("/api/undo", json={"i": 2, "annotator": "csrf"}).status_code == 200


@pytest.mark.parametrize("path,field,body", [
    ("/api/label", "label", {"i": 1, "label": "new:\ud800", "annotator": "ann"}),
    ("/api/label", "label", {"i": 1, "label": "\udc80", "annotator": "ann"}),
    ("/api/label", "annotator", {"i": 1, "label": "bright", "annotator": "\udc80"}),
    ("/api/label", "annotator", {"i": 1, "label": "bright", "annotator": "a\ud800b"}),
    ("/api/undo", "annotator", {"i": 0, "annotator": "\ud800"}),
])
def test_lone_surrogates_are_a_400_naming_the_field(label_server, path, field, body):
    c, labels = label_server["client"], label_server["labels"]
    before = labels.read_bytes()
    raw = json.dumps(body).encode()  # "\ud800" as a JSON escape: valid JSON, not valid UTF-8 text
    assert b"\\ud" in raw or b"\\udc" in raw
    r = c.post(path, content=raw, headers={"content-type": "application/json"})
    assert_json_error(r, 400, field, "not valid text")
    assert labels.read_bytes() == before
    ok = c.post("/api/label", json={"i": 2, "label": "spotty", "annotator": "ann"})  # the page still works
    assert ok.status_code == 200, ok.text
    assert c.post("/api/undo", json={"i": 2, "annotator": "ann"}).status_code == 200
