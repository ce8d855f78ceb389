"""`metering rate` reads lines of bounded size: a line over the event limit is rejected for its
real length without being held whole (SPEC "Offline rating": a malformed line is a rejected
record, never a crash; the command streams in constant memory)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from metering.offline import rate_stream
from rating.engine import MAX_EVENT_BYTES
from tests.helpers import NOW, account, catalog_dict, make_rater, sms

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


def test_a_byte_order_mark_and_blank_lines_do_not_hide_events() -> None:
    """A UTF-8 BOM before the first line (Windows editors write one) was read as part of the
    first event, which was rejected "JSON is malformed: invalid character (byte 0)"; a line of
    spaces said "Input data was truncated"."""
    source = io.BytesIO(b"\xef\xbb\xbf" + sms("s1", "+447700900123") + b"\r\n   \t\r\n"
                        + b"\xef\xbb\xbf" + sms("s2", "+447700900123") + b"\n")
    out = io.BytesIO()
    counts = rate_stream(make_rater([account()]), source, out, None, NOW)
    lines = [json.loads(x) for x in out.getvalue().splitlines()]
    assert [(x["event_id"], x["status"], x.get("detail")) for x in lines] == [
        ("s1", "rated", None),
        (None, "rejected", "empty message"),
        # a BOM inside the file is not a file's mark: that line is bad input, as before
        (None, "rejected", "JSON is malformed: invalid character (byte 0)"),
    ]
    assert counts == {"rated": 1, "rejected": 2, "duplicate": 0}


def test_a_now_at_the_end_of_time_is_refused_without_a_traceback(tmp_path: Path) -> None:
    """`--now 9999-12-31T23:59:59Z` ended in an OverflowError traceback (exit 1) from the
    engine's future_timestamp limit, now + 24 h."""
    events = tmp_path / "events.jsonl"
    events.write_bytes(sms("s1", "+447700900123", account_id="acc-000001") + b"\n")
    rate = [sys.executable, "-m", "metering.cli", "rate", "--catalog", str(ROOT / "deploy/examples/catalog.yaml"),
            "--accounts", str(ROOT / "deploy/examples/accounts.yaml"), "--events", str(events)]
    proc = subprocess.run([*rate, "--now", "9999-12-31T23:59:59Z"], capture_output=True, text=True, cwd=ROOT,
                          timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert "Invalid value for '--now': '9999-12-31T23:59:59Z' is too late" in proc.stderr
    proc = subprocess.run([*rate, "--now", "9999-12-30T00:00:00Z"], capture_output=True, text=True, cwd=ROOT,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["status"] == "rated"


def _rate_cli(tmp_path: Path, events: bytes, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    """`metering rate` on the test catalog and one prepaid account with 0.05 left."""
    (tmp_path / "catalog.yaml").write_text(yaml.safe_dump(catalog_dict()))
    (tmp_path / "accounts.yaml").write_text(yaml.safe_dump({"accounts": [account(plan="payg", balance="0.05")]}))
    (tmp_path / "events.jsonl").write_bytes(events)
    return subprocess.run(
        [sys.executable, "-m", "metering.cli", "rate", "--catalog", str(tmp_path / "catalog.yaml"),
         "--accounts", str(tmp_path / "accounts.yaml"), *args], capture_output=True, text=True, cwd=ROOT,
        timeout=60, **kw)


def test_a_full_disk_for_wallet_events_and_a_closed_stdin_are_one_line_errors(tmp_path: Path) -> None:
    """--wallet-events on a full disk ended in an OSError traceback from close(); a closed stdin
    (a daemon's) in an AttributeError traceback, with `--events -` or even with a file."""
    events = sms("s1", "+447700900123", 10) + b"\n"  # 10 * 0.01 takes 0.05 below 0: `blocked`
    ok = _rate_cli(tmp_path, events, "--events", str(tmp_path / "events.jsonl"),
                   "--wallet-events", str(tmp_path / "wallet.jsonl"))
    assert ok.returncode == 0, ok.stderr
    assert json.loads((tmp_path / "wallet.jsonl").read_text())["type"] == "blocked"

    full = _rate_cli(tmp_path, events, "--events", str(tmp_path / "events.jsonl"), "--wallet-events", "/dev/full")
    assert full.returncode == 1 and "Traceback" not in full.stderr, full.stderr
    assert full.stderr.strip().splitlines()[-1] == \
        "error: writing the output or --wallet-events /dev/full: No space left on device"

    def close_stdin() -> None:
        os.close(0)

    closed = _rate_cli(tmp_path, events, "--events", str(tmp_path / "events.jsonl"), stdin=None,
                       preexec_fn=close_stdin)
    assert closed.returncode == 0 and "Traceback" not in closed.stderr, closed.stderr
    assert json.loads(closed.stdout)["status"] == "rated"
    closed = _rate_cli(tmp_path, events, "--events", "-", stdin=None, preexec_fn=close_stdin)
    assert closed.returncode == 2, closed.stderr
    assert closed.stderr.strip() == "error: --events -: stdin is closed: nothing to read"
