"""``clipkd download``: images from a URL list into WebDataset shards, by img2dataset.

img2dataset does the work (parallel fetches, resizing, tar shards with ``.jpg``/``.txt``/``.json`` members, a
``NNNNN_stats.json`` per shard, resuming by shard with ``incremental_mode``); clipkd checks the inputs before it
starts, sums the per-shard statistics into one report (successes, failures by kind), and names the shard pattern
that ``embed-images``, ``distill``, ``clip-train``, ``eval`` and ``index build`` take as ``--images``.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ClipkdError
from ..fileio import check_out_dir, write_json

FORMATS = {".txt": "txt", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet", ".json": "json"}
RESIZE_MODES = ("border", "keep_ratio", "keep_ratio_largest", "center_crop", "no")


@dataclass
class DownloadReport:
    """What a download produced: per-shard counts summed, failures by their message."""

    out: Path
    urls: int = 0
    successes: int = 0
    failed_to_download: int = 0
    failed_to_resize: int = 0
    shards: list[str] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)

    @property
    def pattern(self) -> str:
        """The shards as one brace pattern (``out/{00000..00003}.tar``) for ``--images``."""
        if not self.shards:
            return ""
        stems = sorted(Path(s).stem for s in self.shards)
        if len(stems) == 1:
            return str(self.out / f"{stems[0]}.tar")
        numbers = [int(s) for s in stems] if all(s.isdigit() for s in stems) else []
        if numbers and numbers == list(range(numbers[0], numbers[0] + len(numbers))):
            return str(self.out / f"{{{stems[0]}..{stems[-1]}}}.tar")
        return str(self.out / f"{{{','.join(stems)}}}.tar")  # a shard is missing: list the others

    def to_dict(self) -> dict[str, Any]:
        return {"out": str(self.out), "urls": self.urls, "successes": self.successes,
                "failed_to_download": self.failed_to_download, "failed_to_resize": self.failed_to_resize,
                "errors": self.errors, "shards": self.shards, "images": self.pattern}


def _check_urls(urls: Path, url_col: str, caption_col: str | None) -> str:
    """The input format of ``urls``, with its columns checked (one-line errors before any download)."""
    if not urls.is_file():
        raise ClipkdError(f"URL list not found: {urls}")
    fmt = FORMATS.get(urls.suffix.lower())
    if fmt is None:
        raise ClipkdError(f"URL list {urls}: unknown format '{urls.suffix}' (use {', '.join(FORMATS)})")
    if fmt in ("csv", "tsv"):
        with urls.open(encoding="utf-8", newline="") as f:
            header = next(csv.reader(f, delimiter="," if fmt == "csv" else "\t"), [])
        columns = header
    elif fmt == "parquet":
        import pyarrow.parquet as pq

        columns = pq.read_schema(urls).names
    elif fmt == "json":
        rows = json.loads(urls.read_text(encoding="utf-8"))
        columns = list(rows[0]) if isinstance(rows, list) and rows and isinstance(rows[0], dict) else []
    else:
        if not any(line.strip() for line in urls.open(encoding="utf-8")):
            raise ClipkdError(f"URL list {urls} is empty")
        return fmt
    for col in (url_col, caption_col):
        if col is not None and col not in columns:
            raise ClipkdError(f"URL list {urls} has no column '{col}' (columns: {', '.join(columns[:10])})")
    return fmt


def _read_urls(urls: Path, fmt: str, url_col: str) -> list[str]:
    """Every URL of the list (its ``url_col`` for tables)."""
    if fmt == "txt":
        return [line.strip() for line in urls.open(encoding="utf-8") if line.strip()]
    if fmt in ("csv", "tsv"):
        with urls.open(encoding="utf-8", newline="") as f:
            return [str(r.get(url_col) or "") for r in csv.DictReader(f, delimiter="," if fmt == "csv" else "\t")]
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return [str(u) for u in pq.read_table(urls, columns=[url_col]).column(0).to_pylist()]
    rows = json.loads(urls.read_text(encoding="utf-8"))
    return [str(r.get(url_col) or "") for r in rows if isinstance(r, dict)]


def _check_schemes(urls: Path, fmt: str, url_col: str) -> None:
    """Only ``http``/``https`` URLs are fetched: a ``file://`` (or ``ftp://``, ``data:``) entry of an untrusted list
    would read this machine's files or other services into the shards."""
    bad = [u for u in _read_urls(urls, fmt, url_col) if u.split("://", 1)[0].lower() not in ("http", "https")]
    if bad:
        raise ClipkdError(f"{len(bad)} URL(s) of {urls} are not http(s), e.g. {bad[:2]}: clipkd download fetches "
                          "only http:// and https:// URLs")


def download(urls: str | Path, out: str | Path, image_size: int = 256, resize_mode: str = "border",
             url_col: str = "url", caption_col: str | None = None, per_shard: int = 10000, processes: int = 1,
             threads: int = 32, timeout: int = 10, retries: int = 0) -> DownloadReport:
    """Download the images of ``urls`` (txt: one URL per line; csv/tsv/parquet/json with ``url_col`` and optionally
    ``caption_col``) into WebDataset shards in ``out``, resized to ``image_size`` (``resize_mode``; ``no`` keeps
    them). Re-running the same command resumes: finished shards are kept. Failures are counted by kind; a run that
    saved no image at all is an error. The summary is also written to ``out/_clipkd/download.json``."""
    urls, out = Path(urls), Path(out)
    fmt = _check_urls(urls, url_col, caption_col)
    _check_schemes(urls, fmt, url_col)
    if resize_mode not in RESIZE_MODES:
        raise ClipkdError(f"unknown `resize_mode` '{resize_mode}' (choose from {', '.join(RESIZE_MODES)})")
    for name, value in (("image_size", image_size), ("per_shard", per_shard), ("processes", processes),
                        ("threads", threads), ("timeout", timeout)):
        if value < 1:
            raise ClipkdError(f"`{name}` must be ≥ 1, got {value}")
    check_out_dir(out, "download folder")
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no update check over the network on import
    try:
        from img2dataset import download as img2dataset_download
    except ImportError:
        raise ClipkdError("clipkd download needs img2dataset: pip install 'clipkd[download]'") from None
    img2dataset_download(url_list=str(urls), output_folder=str(out), output_format="webdataset",
                         input_format=fmt, url_col=url_col, caption_col=caption_col, image_size=image_size,
                         resize_mode=resize_mode, number_sample_per_shard=per_shard, processes_count=processes,
                         thread_count=threads, timeout=timeout, retries=retries, enable_wandb=False,
                         incremental_mode="incremental")
    report = DownloadReport(out.resolve())
    for stats in sorted(out.glob("*_stats.json")):
        s = json.loads(stats.read_text(encoding="utf-8"))
        report.urls += int(s.get("count", 0))
        report.successes += int(s.get("successes", 0))
        report.failed_to_download += int(s.get("failed_to_download", 0))
        report.failed_to_resize += int(s.get("failed_to_resize", 0))
        for message, n in s.get("status_dict", {}).items():
            if message != "success":
                report.errors[message] = report.errors.get(message, 0) + int(n)
        tar = stats.with_name(stats.name.replace("_stats.json", ".tar"))
        if tar.is_file():
            report.shards.append(tar.name)
    write_json(out / "_clipkd" / "download.json", report.to_dict())  # img2dataset reads every *.json in out as a shard
    if report.successes == 0:
        raise ClipkdError(f"no image of {urls} could be downloaded ({report.urls} tried; "
                          f"{dict(list(report.errors.items())[:3])}); see {out / '_clipkd' / 'download.json'}")
    return report
