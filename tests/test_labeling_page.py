"""The labeling page in a real headless Chromium against a real `spatial label` server on a free loopback port:
keyboard labeling, labels.csv, undo, two annotators at once, reload, new phenotype, sorting and contrast."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from browser_util import chromium, keep_figure, labeling_server, wait_until  # noqa: F401  (chromium is a fixture)

from training.data.labels import read_history, replay

N_QUERIED = 24


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_ensemble, tiny_manifest):
    from training.active.query import run_query
    from training.data.cellindex import build_index
    from training.uncertainty.ensemble import Ensemble

    d = tmp_path_factory.mktemp("label")
    q = run_query(Ensemble.load(tiny_ensemble), build_index(tiny_manifest, progress=False), "margin", N_QUERIED,
                  pool_subsample=200).queries
    q["slide_label"] = None  # as label_check writes it, on one cell, with markup that must show as text
    q.loc[3, "slide_label"] = "spotty <i>x</i>"
    q.to_parquet(d / "queries.parquet")
    labels = d / "labels.csv"
    with labeling_server(d, labels) as (url, _):
        yield {"url": url + "/", "labels": labels, "queries": q, "dir": d}


def open_page(browser, url: str, annotator: str):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(f"{url}?annotator={annotator}")
    page.wait_for_selector("body[data-ready='1']")
    return page


def badge(page, i: int) -> str:
    return page.locator(f"#cell-{i} .badge").text_content()


def rows_of(labels: Path, annotator: str) -> pd.DataFrame:
    h = read_history(labels)
    return h[h["annotator"] == annotator].reset_index(drop=True)


def test_keyboard_labels_undo_and_reload(chromium, server):  # noqa: F811
    q, labels = server["queries"], server["labels"]
    page = open_page(chromium, server["url"], "alice")
    assert page.locator(".cell").count() == N_QUERIED
    assert page.locator("#progress").text_content() == f"labeled 0 / {N_QUERIED}"
    assert "slide says spotty <i>x</i>" in page.locator("#cell-3 .meta").text_content()
    assert "slide says" not in page.locator("#cell-0 .meta").text_content()
    page.keyboard.press("1")            # cell 0 -> bright, moves on
    wait_until(page, "document.querySelector('#cell-0 .badge').textContent === 'bright'")
    page.keyboard.press("2")            # cell 1 -> spotty
    wait_until(page, "document.querySelector('#cell-1 .badge').textContent === 'spotty'")
    page.keyboard.press("u")            # cell 2 -> unsure
    wait_until(page, "document.querySelector('#cell-2 .badge').textContent === 'unsure'")
    a = rows_of(labels, "alice")
    assert a[["cell_id", "label"]].values.tolist() == [[int(q.cell_id[0]), "bright"], [int(q.cell_id[1]), "spotty"],
                                                       [int(q.cell_id[2]), "unsure"]]
    assert [os.path.abspath(f) for f in a["source_file"]] == [os.path.abspath(f) for f in q.source_file[:3]]
    page.keyboard.press("z")            # undo: cell 2 unlabeled again, the history keeps both rows
    wait_until(page, "document.querySelector('#cell-2 .badge').textContent === ''")
    assert rows_of(labels, "alice")["label"].tolist() == ["bright", "spotty", "unsure", "undo"]
    page.keyboard.press("ArrowLeft")    # back to cell 1 and re-label it: latest wins
    page.keyboard.press("1")
    wait_until(page, "document.querySelector('#cell-1 .badge').textContent === 'bright'")
    assert page.locator("#progress").text_content() == f"labeled 2 / {N_QUERIED}"
    cur = replay(read_history(labels))
    assert dict(zip(cur["cell_id"], cur["label"], strict=True)) == {int(q.cell_id[0]): "bright",
                                                                   int(q.cell_id[1]): "bright"}
    # mouse: click a cell, then a class button
    page.click("#cell-4")
    page.click("#keys span[data-l='spotty']")
    wait_until(page, "document.querySelector('#cell-4 .badge').textContent === 'spotty'")
    page.reload()
    page.wait_for_selector("body[data-ready='1']")
    assert [badge(page, i) for i in range(5)] == ["bright", "bright", "", "", "spotty"]
    assert page.locator("#progress").text_content() == f"labeled 3 / {N_QUERIED}"
    # every image on the page loaded (composite + one per channel)
    wait_until(page, "Array.from(document.images).every((im) => im.complete && im.naturalWidth > 0)")
    assert page.locator("#cell-0 .chans img").count() == 3
    assert page.locator("#cell-0 .chans img").nth(2).get_attribute("title") == "LC3B"
    shot = server["dir"] / "labeling.png"
    page.screenshot(path=str(shot))
    keep_figure(shot, "labeling_page.png")
    page.close()


def test_two_annotators_at_once_and_second_look(chromium, server):  # noqa: F811
    labels = server["labels"]
    a, b = open_page(chromium, server["url"], "carol"), open_page(chromium, server["url"], "dave")
    a.click("#cell-10")
    b.click("#cell-15")
    for _ in range(5):                   # interleaved keyboard labeling on two pages
        a.keyboard.press("1")
        b.keyboard.press("2")
    wait_until(a, "document.querySelector('#cell-14 .badge').textContent === 'bright'")
    wait_until(b, "document.querySelector('#cell-19 .badge').textContent === 'spotty'")
    burst = """(args) => { window.done = Promise.all(args.cells.map((i) => fetch('/api/label', {method: 'POST',
        headers: {'Content-Type': 'application/json'},
        body: JSON.stringify({i, label: args.label, annotator: args.who})}).then((r) => r.status))); }"""
    a.evaluate(burst, {"cells": list(range(10)), "label": "bright", "who": "carol"})   # both bursts in flight
    b.evaluate(burst, {"cells": list(range(10)), "label": "spotty", "who": "dave"})
    assert a.evaluate("() => window.done") == [200] * 10
    assert b.evaluate("() => window.done") == [200] * 10
    assert len(rows_of(labels, "carol")) == 15 and len(rows_of(labels, "dave")) == 15
    # the same cells, different labels: listed for a second look
    a.reload()
    a.wait_for_selector("body[data-ready='1']")
    review = a.locator("#review").text_content()
    assert "#1: annotators disagree" in review and "carol=bright" in review and "dave=spotty" in review
    a.close()
    b.close()


def test_new_phenotype_sort_and_contrast(chromium, server):  # noqa: F811
    q, labels = server["queries"], server["labels"]
    page = open_page(chromium, server["url"], "erin")
    page.click("#cell-22")
    page.once("dialog", lambda d: d.accept("vacuolated"))
    page.keyboard.press("n")
    wait_until(page, "document.querySelector('#cell-22 .badge').textContent === 'new:vacuolated'")
    assert rows_of(labels, "erin")["label"].tolist() == ["new:vacuolated"]
    page.select_option("#sort", "uncertainty")
    order = page.eval_on_selector_all("#gallery .cell", "els => els.map((e) => Number(e.dataset.i))")
    expected = sorted(range(len(q)), key=lambda i: (-q["epistemic"].iat[i], i))
    assert order == expected
    page.locator("#contrast").fill("4")
    page.locator("#contrast").dispatch_event("change")
    wait_until(page, "document.querySelector('#cell-0 img.main').src.endsWith('contrast=4')")
    wait_until(page, "Array.from(document.images).every((im) => im.complete && im.naturalWidth > 0)")
    # brighter at contrast 4 than at 1 (the composite is a screen blend of the channels)
    import io

    from PIL import Image

    def mean_of(contrast: str) -> float:
        r = page.request.get(f"{server['url']}thumb/0/composite?contrast={contrast}")
        return float(np.asarray(Image.open(io.BytesIO(r.body()))).mean())

    assert mean_of("4") > mean_of("1")
    page.close()


def test_markup_in_a_shared_labels_file_shows_as_text(chromium, server, tmp_path):  # noqa: F811
    """labels.csv is a shared file: the API checks names, but rows written by hand or another tool reach the review
    list as they are. An annotator or new-phenotype name with markup showed as HTML there (and ran its script)."""
    q = server["queries"]
    trap = '<img src=x onerror="window.pwned=1">'
    pd.DataFrame({"source_file": [q.source_file[0]] * 2, "cell_id": [int(q.cell_id[0])] * 2,
                  "label": ["bright", f"new:{trap}"], "annotator": ["bob", f"mallory{trap}"],
                  "time": ["2026-12-07T00:00:00.000Z"] * 2}).to_csv(tmp_path / "labels.csv", index=False)
    q.to_parquet(tmp_path / "queries.parquet")
    with labeling_server(tmp_path, tmp_path / "labels.csv") as (url, _):
        page = open_page(chromium, url + "/", "alice")
        review = page.locator("#review li").first.text_content()
        assert review.startswith(f"#1: annotators disagree: bob=bright, mallory{trap}=new:{trap}"), review
        assert page.locator("#review img").count() == 0 and page.evaluate("() => window.pwned") is None
        page.close()
