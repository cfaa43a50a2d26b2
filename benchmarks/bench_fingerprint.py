"""What tying a store to its images by content costs: per image, the content fingerprint a store records (first and
last 4 KiB plus the size, hashed; for a Chinese-CLIP TSV row, of its base64 text) next to what the job does with the
image anyway (a `stat` for the size, a decode). Photo-sized JPEGs (500×375), as files and as the rows of a TSV.

    python bench_fingerprint.py [--images 2000]
"""

from __future__ import annotations

import argparse
import base64
import os
import time
from pathlib import Path

from common import make_jpegs, report, table


def per_item_us(fn, items) -> float:
    t = time.perf_counter()
    for x in items:
        fn(x)
    return (time.perf_counter() - t) / len(items) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--root", default=".data/fingerprint")
    ap.add_argument("--out", default="results/fingerprint.md")
    a = ap.parse_args()
    from clipkd.data.images import TsvImages, load_rgb
    from clipkd.data.tars import content_fingerprint

    root = Path(a.root)
    files = sorted(make_jpegs(root / "jpegs", a.images).rglob("*.jpg"))
    tsv = root / "pool_imgs.tsv"
    if not tsv.is_file():
        tsv.write_text("".join(f"{i}\t{base64.b64encode(p.read_bytes()).decode()}\n" for i, p in enumerate(files)))
    rows = TsvImages(tsv)
    ids = list(rows.offsets)
    decode = files[: min(300, len(files))]
    cases = [("JPEG files", "size (`stat`)", os.stat, files),
             ("JPEG files", "content fingerprint", content_fingerprint, files),
             ("JPEG files", "decode (what the loader does)", load_rgb, decode),
             ("TSV rows", "content fingerprint (base64 text)", rows.fingerprint, ids),
             ("TSV rows", "decode (what the loader does)", rows.open, ids[:300])]
    rows_out = [{"images": kind, "what": what, "µs per image": f"{per_item_us(fn, items):.1f}"}
                for kind, what, fn, items in cases]
    size = sum(p.stat().st_size for p in files) / len(files) / 1024
    body = table(rows_out, ["images", "what", "µs per image"]) + (
        f"\n\n{len(files)} JPEGs of 500×375 ({size:.0f} KiB each on average), read warm from the page cache; the "
        "fingerprint is computed once per image when it is embedded, and compared on up to 256 images when a store "
        "is used.\n")
    report(f"Content fingerprints ({time.strftime('%Y-%m-%d')})", body, Path(a.out))


if __name__ == "__main__":
    main()
