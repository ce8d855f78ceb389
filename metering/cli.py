"""The `metering` command line."""

from __future__ import annotations

import os
import sys
from datetime import UTC, datetime
from typing import IO

import click

from rating.accounts import Account, AccountsError, load_accounts
from rating.catalog import Catalog, CatalogError, load_catalog, summarize


def _fail(message: str, code: int = 2) -> None:
    click.echo(message, err=True)
    sys.exit(code)


def _load(catalog_path: str, accounts_path: str | None) -> tuple[Catalog, dict[str, Account]]:
    try:
        catalog = load_catalog(catalog_path)
    except CatalogError as exc:
        _fail(f"error: {exc}")
    accounts: dict[str, Account] = {}
    if accounts_path is not None:
        try:
            accounts = load_accounts(accounts_path, catalog)
        except AccountsError as exc:
            _fail(f"error: {exc}")
    return catalog, accounts


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Usage metering, rating and prepaid wallets for telephony and voice-AI platforms."""


@main.group()
def catalog() -> None:
    """Tariff catalog tools."""


@catalog.command("check")
@click.argument("file", type=click.Path(dir_okay=False))
def catalog_check(file: str) -> None:
    """Validate a catalog and print what it holds; exit 2 with every error when it is bad."""
    cat, _ = _load(file, None)
    for line in summarize(cat):
        click.echo(line)
    click.echo("ok")


def _parse_now(value: str | None) -> datetime:
    if value is None:
        return datetime.now(UTC)
    try:
        now = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"expected an RFC 3339 timestamp, got {value!r}") from None
    if now.tzinfo is None:
        raise click.BadParameter("the timestamp needs an offset, e.g. 2026-11-23T12:00:00Z")
    return now


@main.command("rate")
@click.option("--catalog", "catalog_path", required=True, type=click.Path(dir_okay=False), help="Catalog YAML.")
@click.option("--accounts", "accounts_path", required=True, type=click.Path(dir_okay=False), help="Accounts YAML.")
@click.option("--events", "events_path", required=True, help="JSON-lines events file, or - for stdin.")
@click.option("--wallet-events", "wallet_path", type=click.Path(dir_okay=False), help="Write wallet events (JSON lines) here.")
@click.option("--now", "now_text", help="Wall clock for future_timestamp (default: now).")
def rate(catalog_path: str, accounts_path: str, events_path: str, wallet_path: str | None, now_text: str | None) -> None:
    """Rate events offline: one JSON line per input event on stdout, in input order."""
    from metering.offline import rate_stream
    from rating.engine import Rater
    from rating.wallet import MemoryWalletStore

    cat, accounts = _load(catalog_path, accounts_path)
    now = _parse_now(now_text)
    rater = Rater(cat, accounts, MemoryWalletStore(accounts))
    if events_path == "-":
        source: IO[bytes] = sys.stdin.buffer
        total = 0
    else:
        try:
            source = open(events_path, "rb")  # noqa: SIM115 - closed below
        except OSError as exc:
            _fail(f"error: {events_path}: cannot read: {exc.strerror}")
        total = os.fstat(source.fileno()).st_size
    wallet_out = open(wallet_path, "wb") if wallet_path else None  # noqa: SIM115
    out = sys.stdout.buffer
    show = sys.stderr.isatty() and total > 0
    try:
        if show:
            with click.progressbar(length=total, label="rating", file=sys.stderr) as bar:
                counts = rate_stream(rater, source, out, wallet_out, now, on_batch=bar.update)
        else:
            counts = rate_stream(rater, source, out, wallet_out, now)
    finally:
        out.flush()
        if wallet_out is not None:
            wallet_out.close()
        if source is not sys.stdin.buffer:
            source.close()
    click.echo(
        f"rated {counts['rated']}, rejected {counts['rejected']}, duplicate {counts['duplicate']}",
        err=True,
    )


if __name__ == "__main__":
    main()
