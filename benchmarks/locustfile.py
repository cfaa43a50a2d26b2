"""The load of `bench_search_load.py`: closed-loop clients (no wait between queries) posting real JPEG uploads
(multipart, as a shop's app sends a photo) and text queries to `clipkd serve`'s `/search`.

Settings come from the environment (`bench_search_load.py` sets them): ``CLIPKD_LOAD_QUERY`` (``image``, ``text``
or ``mixed``: three image queries to one text query), ``CLIPKD_LOAD_JPEGS`` (a folder of JPEGs),
``CLIPKD_LOAD_TEXTS`` (a file of query texts, one a line; a popular few repeat, as in a shop's log),
``CLIPKD_LOAD_UNIQUE`` (1: the texts in order, each once), ``CLIPKD_LOAD_K``.
Every answer is checked: status 200 and k results, else the request counts as failed.

    locust -f locustfile.py --headless -u 16 -r 16 -t 30s --host http://127.0.0.1:8000 --csv out
"""

import itertools
import json
import os
import random
import uuid
from pathlib import Path

from locust import FastHttpUser, task

QUERY = os.environ.get("CLIPKD_LOAD_QUERY", "mixed")
K = int(os.environ.get("CLIPKD_LOAD_K", "10"))
JPEGS = sorted(Path(os.environ.get("CLIPKD_LOAD_JPEGS", ".data/search-load/queries")).rglob("*.jpg"))
TEXTS = Path(os.environ.get("CLIPKD_LOAD_TEXTS", ".data/search-load/texts.txt")).read_text("utf-8").splitlines()
UNIQUE = os.environ.get("CLIPKD_LOAD_UNIQUE") == "1"  # the texts in order, each once: every one new to the server
NEXT_TEXT = itertools.cycle(TEXTS)


def multipart(image: bytes) -> tuple[bytes, str]:
    """A multipart/form-data body with the image and k, and its content type (built once per file)."""
    b = uuid.uuid4().hex
    body = (f"--{b}\r\nContent-Disposition: form-data; name=\"k\"\r\n\r\n{K}\r\n"
            f"--{b}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"q.jpg\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode() + image + f"\r\n--{b}--\r\n".encode()
    return body, f"multipart/form-data; boundary={b}"


BODIES = [multipart(p.read_bytes()) for p in JPEGS]


class Shopper(FastHttpUser):
    """One client: a query, its answer checked, the next query."""

    def _check(self, r) -> None:
        try:
            ok = r.status_code == 200 and len(json.loads(r.content)["results"]) == K
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            r.failure(f"status {r.status_code}")

    def _image(self) -> None:
        body, ctype = random.choice(BODIES)
        with self.client.post("/search", data=body, headers={"content-type": ctype}, name="image",
                              catch_response=True) as r:
            self._check(r)

    def _text(self) -> None:
        body = json.dumps({"text": next(NEXT_TEXT) if UNIQUE else random.choice(TEXTS), "k": K})
        with self.client.post("/search", data=body, headers={"content-type": "application/json"}, name="text",
                              catch_response=True) as r:
            self._check(r)

    @task
    def query(self) -> None:
        if QUERY == "text" or (QUERY == "mixed" and random.random() < 0.25):
            self._text()
        else:
            self._image()
