"""Where a served request's time goes, from tritonserver's own trace (``--trace-config level=TIMESTAMPS``).

``server_args(path)`` asks the server to trace every request into ``path.0``, ``path.1``, ... (``LOG_EVERY`` traces a
file, each written as it fills: a server stopped hard may never write the rest); ``summary(path, model)`` reads them
back and gives, for the requests of ``model`` in the order they arrived, the median (min, max) of each phase in
milliseconds:

- ``http_recv``: reading the request (HTTP_RECV_START to _END); ``queue``: from the scheduler's queue to the
  backend's execute (QUEUE_START to COMPUTE_START); ``compute``: the execute, responses sent (COMPUTE_START to _END);
  ``request``: REQUEST_START to REQUEST_END; ``http_send``: writing the answer (HTTP_SEND_START to _END);
- between consecutive requests: ``client``, from one answer's last byte sent to the next request's first byte read
  (the client's own time, wire included); ``instance_idle``, from one execute's end to the next one's start; and
  ``queued_after_end``, from one execute's end to the next request reaching the queue (negative: it was queued while
  the last execute still ran, so its queue time holds the end of that execute).

Timestamps are the server's steady clock, so differences between requests are comparable. A BLS or ensemble child
request has no HTTP phases; its ``client`` gap is then left out.
"""

from __future__ import annotations

import itertools
import json
import statistics
from collections import defaultdict
from pathlib import Path

SPANS = {
    "http_recv": ("HTTP_RECV_START", "HTTP_RECV_END"),
    "queue": ("QUEUE_START", "COMPUTE_START"),
    "compute": ("COMPUTE_START", "COMPUTE_END"),
    "request": ("REQUEST_START", "REQUEST_END"),
    "http_send": ("HTTP_SEND_START", "HTTP_SEND_END"),
}
GAPS = {  # (the earlier request's timestamp, the later one's)
    "client": ("HTTP_SEND_END", "HTTP_RECV_START"),
    "instance_idle": ("COMPUTE_END", "COMPUTE_START"),
    "queued_after_end": ("COMPUTE_END", "QUEUE_START"),
}
LOG_EVERY = 16  # traces a file: files fill as the run goes, so a server stopped hard loses at most this many


def server_args(path: Path) -> list[str]:
    """tritonserver's options that trace every request's timestamps into ``path.N``."""
    return ["--trace-config", f"triton,file={path}", "--trace-config", "level=TIMESTAMPS", "--trace-config", "rate=1",
            "--trace-config", "count=-1", "--trace-config", f"triton,log-frequency={LOG_EVERY}"]  # fmt: skip


def requests(path: Path, model: str, window: tuple[int, int] | None = None) -> list[dict[str, int]]:
    """Each traced request of ``model`` (that began within ``window``, ``time.monotonic_ns()`` values: the server's
    steady clock is the same one on Linux): its timestamps by name (ns), in the order they reached the server."""
    merged: dict[int, dict] = defaultdict(lambda: {"timestamps": {}})
    entries = [entry for file in path.parent.glob(f"{path.name}*") for entry in json.loads(file.read_text())]
    for entry in entries:
        record = merged[entry["id"]]
        record.update({key: value for key, value in entry.items() if key != "timestamps"})
        record["timestamps"].update({stamp["name"]: stamp["ns"] for stamp in entry.get("timestamps", [])})
    first, last = window or (0, 2**63)
    found = [stamps for record in merged.values() if record.get("model_name") == model
             for stamps in [record["timestamps"]] if first <= stamps.get("REQUEST_START", -1) <= last]  # fmt: skip
    return sorted(found, key=lambda stamps: stamps["REQUEST_START"])


def _summary(values_ns: list[int]) -> dict[str, float] | None:
    if not values_ns:
        return None
    values = [value / 1e6 for value in values_ns]
    return {"median_ms": statistics.median(values), "min_ms": min(values), "max_ms": max(values), "n": len(values)}


def summary(path: Path, model: str, window: tuple[int, int] | None = None, skip: int = 0) -> dict[str, dict | None]:
    """The phases of ``model``'s traced requests (``requests``) after the first ``skip``, as the docstring lists."""
    found = requests(path, model, window)[skip:]
    spans = {name: [stamps[end] - stamps[start] for stamps in found if start in stamps and end in stamps]
             for name, (start, end) in SPANS.items()}  # fmt: skip
    pairs = list(itertools.pairwise(found))
    gaps = {name: [later[end] - earlier[start] for earlier, later in pairs if start in earlier and end in later]
            for name, (start, end) in GAPS.items()}  # fmt: skip
    return {name: _summary(values) for name, values in {**spans, **gaps}.items()}


def table(phases: dict[str, dict[str, float] | None]) -> str:
    """One line per phase: median (min-max) ms."""
    return "\n".join(f"  {name:<20} {row['median_ms']:8.2f} ms ({row['min_ms']:.2f}-{row['max_ms']:.2f}, n={row['n']})"
                     for name, row in phases.items() if row)  # fmt: skip
