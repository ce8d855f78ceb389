"""A ClickHouse HTTP front over chDB, for tests of the `http://` DSN path: the real ClickHouse
engine (chDB, one folder) behind the subset of ClickHouse's HTTP interface that
clickhouse-connect speaks, in a process of its own that a test can kill and start again
(a server outage). Not the official server: this machine has none recent enough (Debian's
18.16 is from 2018); chdb-server does the same for chDB.

    python -m tests.chdb_http --path DIR --port PORT

What it serves: `GET /ping`; a statement in the `query` parameter or the body; `param_*`
query parameters (`{name:Type}`); `INSERT ... FORMAT F` with the data in the body (any
format chDB reads, Native for clickhouse-connect); results in the statement's `FORMAT` or
`default_format`. Errors answer 500 with ClickHouse's `Code: N. DB::Exception: ...` text and
the `X-ClickHouse-Exception-Code` header, as the server does. Other settings are ignored.
Statements run one at a time (one chDB session).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from aiohttp import web

_INSERT = re.compile(r"^\s*INSERT\s+INTO\s+(.+?)\s+FORMAT\s+(\w+)\s*$", re.IGNORECASE | re.DOTALL)
_FORMAT = re.compile(r"\sFORMAT\s+(\w+)\s*;?\s*$", re.IGNORECASE)
_CODE = re.compile(r"Code:\s*(\d+)")
_INSERT_HEAD = re.compile(rb"\s*(INSERT\s+INTO\s+.+?\s+FORMAT\s+\w+)[ \t]*\r?\n?", re.IGNORECASE | re.DOTALL)


def _decoded(body: bytes, encoding: str) -> bytes:
    """The request body without its Content-Encoding. Only lz4 is handled: what
    clickhouse-connect sends here (it would use zstd if `zstandard` were installed)."""
    if encoding == "lz4":
        import lz4.frame

        return bytes(lz4.frame.decompress(body))
    return body


class ChdbFront:
    """Runs statements on one chDB session, one at a time."""

    def __init__(self, path: str) -> None:
        from chdb import session as chs  # imported here: chDB loads the whole engine

        self._session = chs.Session(path)
        self._lock = threading.Lock()
        self._spool = Path(path) / "http-inserts"
        self._spool.mkdir(parents=True, exist_ok=True)

    def run(self, query: str, data: bytes | None, default_format: str,
            params: dict[str, str]) -> tuple[bytes, str]:
        with self._lock:
            if data is not None:
                insert = _INSERT.match(query)
                if insert is None:
                    raise RuntimeError("Code: 62. DB::Exception: chdb_http: a body with a `query` "
                                       "parameter must be the data of an INSERT ... FORMAT statement")
                # chDB reads the data through the file() table function (it has no stdin here)
                spool = self._spool / f"{uuid.uuid4().hex}.{insert.group(2).lower()}"
                spool.write_bytes(data)
                try:
                    self._session.query(f"INSERT INTO {insert.group(1)} SELECT * FROM "
                                        f"file('{spool}', '{insert.group(2)}')", "TabSeparated")
                finally:
                    spool.unlink(missing_ok=True)
                return b"", default_format
            fmt_clause = _FORMAT.search(query)
            fmt = fmt_clause.group(1) if fmt_clause else default_format
            if fmt_clause:
                query = query[:fmt_clause.start()]
            result = self._session.query(query, fmt, params=params or None)
            return (result.bytes() if result is not None else b""), fmt


def make_app(front: ChdbFront) -> web.Application:
    async def handle(request: web.Request) -> web.StreamResponse:
        if request.path == "/ping":
            return web.Response(text="Ok.\n")
        args = dict(request.query)
        body = _decoded(await request.read(), request.headers.get("Content-Encoding", ""))
        if "query" in args:
            query, data = args["query"], (body or None)
            if data is not None and not _INSERT.match(query):  # the rest of the statement
                query, data = query + " " + data.decode(), None
        elif (head := _INSERT_HEAD.match(body)) is not None:  # the statement, then its data
            query, data = head.group(1).decode(), body[head.end():]
        else:
            query, data = body.decode(), None
        params = {k.removeprefix("param_"): v for k, v in args.items() if k.startswith("param_")}
        query_id = args.get("query_id") or str(uuid.uuid4())
        try:
            out, fmt = await asyncio.get_running_loop().run_in_executor(
                None, front.run, query, data, args.get("default_format", "TabSeparated"), params)
        except Exception as exc:  # noqa: BLE001 - every engine error goes back as the server's would
            text = str(exc)
            print(f"chdb_http: {text.strip()} in: {query[:500]!r}", file=sys.stderr, flush=True)
            code = _CODE.search(text)
            if code is None:
                text = f"Code: 1000. DB::Exception: {text}"
            return web.Response(status=500, text=text + "\n", headers={
                "X-ClickHouse-Exception-Code": code.group(1) if code else "1000",
                "X-ClickHouse-Query-Id": query_id})
        headers: dict[str, Any] = {
            "X-ClickHouse-Format": fmt, "X-ClickHouse-Timezone": "UTC", "X-ClickHouse-Query-Id": query_id,
            "X-ClickHouse-Summary": json.dumps({"read_rows": "0", "written_rows": "0"})}
        return web.Response(body=out, headers=headers, content_type="application/octet-stream")

    app = web.Application(client_max_size=1 << 30)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


@contextlib.contextmanager
def serving(folder: Path, port: int) -> Iterator[subprocess.Popen[bytes]]:
    """This front on `port` over chDB in `folder`, in a process of its own, answering /ping;
    killed with SIGKILL (as a crashed server) at the end of the block. Its errors are logged
    to `folder`.log."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{folder}.log", "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "tests.chdb_http", "--path", str(folder), "--port", str(port)],
                                cwd=Path(__file__).resolve().parents[1], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=1) as answer:
                    if answer.read() == b"Ok.\n":
                        break
            except OSError:
                pass
            if proc.poll() is not None:
                raise RuntimeError(f"chdb_http exited {proc.returncode}: {Path(f'{folder}.log').read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"chdb_http did not answer /ping on port {port} in 60 s")
            time.sleep(0.2)
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


@contextlib.contextmanager
def clickhouse_dsn(kind: str, tmp_path: Path) -> Iterator[str]:
    """A DSN for a test: "chdb" (embedded, in `tmp_path`/ch) or "http" (this front serving
    `tmp_path`/ch-server on a free port, for the block)."""
    if kind == "chdb":
        yield f"chdb://{tmp_path / 'ch'}"
        return
    from tests.helpers import free_port

    port = free_port()
    with serving(tmp_path / "ch-server", port):
        yield f"http://127.0.0.1:{port}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--path", required=True, help="chDB data folder")
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args()
    os.makedirs(args.path, exist_ok=True)
    front = ChdbFront(args.path)
    web.run_app(make_app(front), host="127.0.0.1", port=args.port, print=None,
                handle_signals=True)


if __name__ == "__main__":
    main()
