"""`metering rate` reads lines of bounded size: a line over the event limit is rejected for its
real length without being held whole (SPEC "Offline rating": a malformed line is a rejected
record, never a crash; the command streams in constant memory)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

from metering.offline import rate_stream
from rating.engine import MAX_EVENT_BYTES
from tests.helpers import NOW, account, make_rater, sms

ROOT = Path(__file__).resolve().parents[1]


def _padded(event: bytes, size: int) -> bytes:
    """The same JSON event, `size` bytes long (spaces before the closing brace)."""
    assert event.endswith(b"}")
    return event[:-1] + b" " * (size - len(event)) + b"}"


def test_lines_over_the_limit_are_rejected_for_their_real_length_in_order() -> None:
    limit = MAX_EVENT_BYTES
    at_limit = _padded(sms("s1", "+447700900123"), limit)
    over = _padded(sms("s2", "+447700900123"), limit + 1)
    source = io.BytesIO(at_limit + b"\r\n" + over + b"\n" + b"x" * 5_000_000 + b"\n"
                        + sms("s3", "+447700900123") + b"\n" + b"y" * 70_000)  # the last: no newline
    out = io.BytesIO()
    counts = rate_stream(make_rater([account()]), source, out, None, NOW, batch_lines=2)
    lines = [json.loads(x) for x in out.getvalue().splitlines()]
    assert [(x["event_id"], x["status"], x.get("detail")) for x in lines] == [
        ("s1", "rated", None),
        ("s2", "rejected", f"(event): oversize, {limit + 1} bytes > {limit}"),  # read whole: ids kept
        (None, "rejected", f"(event): oversize, 5000000 bytes > {limit}"),
        ("s3", "rated", None),
        (None, "rejected", f"(event): oversize, 70000 bytes > {limit}"),
    ]
    assert counts == {"rated": 2, "rejected": 3, "duplicate": 0}
    assert all(x["reason"] == "invalid_json" for x in lines if x["status"] == "rejected")


def test_a_huge_line_without_newlines_does_not_take_the_memory(tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    size = 300_000_000
    with events.open("wb") as f:
        chunk = b"z" * 10_000_000
        for _ in range(size // len(chunk)):
            f.write(chunk)
        f.write(b"\n")
    # measured by a parent of its own: this process's other children would count too
    measure = ("import resource, subprocess, sys; p = subprocess.run(sys.argv[1:]); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(p.returncode)")
    proc = subprocess.run(
        [sys.executable, "-c", measure, sys.executable, "-m", "metering.cli", "rate",
         "--catalog", str(ROOT / "deploy/examples/catalog.yaml"),
         "--accounts", str(ROOT / "deploy/examples/accounts.yaml"), "--events", str(events)],
        capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["detail"] == f"(event): oversize, {size} bytes > {MAX_EVENT_BYTES}"
    peak_mb = int(proc.stderr.split()[-1]) / 1024  # ru_maxrss is in kB on Linux
    assert peak_mb < 200, f"peak RSS {peak_mb:.0f} MB for a {size / 1e6:.0f} MB line"
