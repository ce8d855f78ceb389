"""The `metering` command line."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import IO, TYPE_CHECKING, Any, NoReturn, TypeVar

import click

from metering.gc_tuning import tune_for_batches
from rating.accounts import Account, AccountsError, load_accounts
from rating.catalog import Catalog, CatalogError, load_catalog, summarize

if TYPE_CHECKING:
    import threading

    from metering.config import Settings

T = TypeVar("T")


def _fail(message: str, code: int = 2) -> NoReturn:
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


def _service_error(exc: BaseException) -> str | None:
    """One line for a service that cannot be reached or is misconfigured; None for anything
    else (a bug keeps its traceback)."""
    import redis
    from clickhouse_connect.driver.exceptions import ClickHouseError
    from confluent_kafka import KafkaException

    from metering.local_services import endpoints
    from metering.storage.clickhouse_sink import ClickHouseConfigError
    from wallet_debiter.redis_store import RedisUrlError

    if isinstance(exc, (RedisUrlError, ClickHouseConfigError)):
        return f"error: {exc}"
    ep = endpoints(dict(os.environ))
    if isinstance(exc, (redis.RedisError, redis.exceptions.RedisClusterException)):
        return f"error: redis {ep.redis_url}: {exc}"
    if isinstance(exc, ClickHouseError):
        lines = str(exc).strip().splitlines()
        first = lines[0] if lines else type(exc).__name__
        hint = " (create it with `metering setup`)" if "UNKNOWN_DATABASE" in first or "UNKNOWN_TABLE" in first else ""
        return f"error: clickhouse {ep.clickhouse_dsn}: {first}{hint}"
    if isinstance(exc, KafkaException):
        return f"error: kafka {ep.kafka_bootstrap}: {_kafka_text(exc)}"
    return None


def _kafka_text(exc: BaseException) -> str:
    """librdkafka's own text of a KafkaException (`Broker: Unknown topic or partition`), with
    what to do when the topics are missing."""
    from confluent_kafka import KafkaError

    err = exc.args[0] if exc.args else None
    if not isinstance(err, KafkaError):
        return str(exc)
    if err.code() in (KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC):
        return f"{err.str()}: create the topics with `metering setup`"
    return err.str()


class _Main(click.Group):
    """Services down or misconfigured end a command with one line naming the service and
    exit code 1, not a traceback (METERING_DEBUG=1 keeps the traceback)."""

    def invoke(self, ctx: click.Context) -> Any:
        from metering.config import ConfigError

        try:
            return super().invoke(ctx)
        except (ConfigError, CatalogError, AccountsError) as exc:
            _fail(f"error: {exc}")
        except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:  # a file a setting names
            _fail(f"error: {exc.filename}: {exc.strerror}")
        except KeyboardInterrupt:  # Ctrl-C: 128 + SIGINT, as shells expect (click said "Aborted!", exit 1)
            _fail("interrupted", 130)
        except Exception as exc:
            message = _service_error(exc)
            if message is None or os.environ.get("METERING_DEBUG"):
                raise
            _fail(message, 1)


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
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
    from rating.engine import FUTURE_SLACK

    if value is None:
        return datetime.now(UTC)
    try:
        now = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"expected an RFC 3339 timestamp, got {value!r}", param_hint="'--now'") from None
    if now.tzinfo is None:
        raise click.BadParameter("the timestamp needs an offset, e.g. 2026-11-23T12:00:00Z", param_hint="'--now'")
    try:
        _ = now + FUTURE_SLACK  # the engine's future_timestamp limit (near the end of year 9999: none)
    except OverflowError:
        raise click.BadParameter(f"{value!r} is too late: 24 h after it (the future_timestamp limit) "
                                 "is past year 9999", param_hint="'--now'") from None
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
    tune_for_batches()
    if events_path == "-":
        if sys.stdin is None:
            _fail("error: --events -: stdin is closed: nothing to read")
        source: IO[bytes] = sys.stdin.buffer
        total = 0
    else:
        try:
            source = open(events_path, "rb")  # noqa: SIM115 - closed below
        except OSError as exc:
            _fail(f"error: {events_path}: cannot read: {exc.strerror}")
        total = os.fstat(source.fileno()).st_size
    if sys.stdout is None:
        _fail("error: stdout is closed: nowhere to write the rated lines")
    wallet_out = None
    if wallet_path:
        if events_path != "-" and os.path.exists(wallet_path) and os.path.samefile(events_path, wallet_path):
            _fail(f"error: --wallet-events {wallet_path} is the events file: it would be emptied before it is read")
        try:
            wallet_out = open(wallet_path, "wb")  # noqa: SIM115 - closed below
        except OSError as exc:
            _fail(f"error: --wallet-events {wallet_path}: cannot write: {exc.strerror}")
    out = sys.stdout.buffer
    try:
        if sys.stderr.isatty() and total > 0:
            with click.progressbar(length=total, label="rating", file=sys.stderr) as bar:
                counts = rate_stream(rater, source, out, wallet_out, now, on_batch=bar.update)
        elif sys.stderr.isatty():  # stdin (or an empty file): no length, so a running count
            read = [0]

            def show(n: int) -> None:
                read[0] += n
                click.echo(f"\rrating: {read[0] / 1e6:,.1f} MB read", err=True, nl=False)

            counts = rate_stream(rater, source, out, wallet_out, now, on_batch=show)
            click.echo("", err=True)
        else:
            counts = rate_stream(rater, source, out, wallet_out, now)
        out.flush()
        if wallet_out is not None:
            wallet_out.flush()  # here, where a full disk is reported, not in close() below
    except BrokenPipeError:  # the reader left (`| head`): stop quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except OSError as exc:  # a full disk, a closed descriptor...
        also = f" or --wallet-events {wallet_path}" if wallet_out is not None else ""
        _fail(f"error: writing the output{also}: {exc.strerror or exc}", 1)
    finally:
        if wallet_out is not None:
            with contextlib.suppress(OSError):  # a failed write: reported above
                wallet_out.close()
        if events_path != "-":
            source.close()
    click.echo(
        f"rated {counts['rated']}, rejected {counts['rejected']}, duplicate {counts['duplicate']}",
        err=True,
    )


# ---------------------------------------------------------------------------- live pipeline

# the option that overrides a setting, named when its value is refused
_OPTIONS = {"catalog_path": "--catalog", "accounts_path": "--accounts", "api_host": "--host", "api_port": "--port",
            "hold_ttl_s": "--hold-ttl", "metrics_port": "--metrics-port", "partitions": "--partitions"}


def _settings(**overrides: Any) -> Settings:
    from metering.config import Settings

    return Settings.from_env(None, options=_OPTIONS, **overrides)


@main.command("setup")
@click.option("--partitions", type=int, help="Partitions per topic (default METERING_PARTITIONS or 4).")
def setup(partitions: int | None) -> None:
    """Create the Kafka topics and the ClickHouse tables and views (idempotent)."""
    from metering import kafka_io
    from metering.storage.clickhouse_sink import ClickHouseSink

    settings = _settings(partitions=partitions)
    # a count asked for explicitly that existing topics do not have is refused (exit 2), not
    # ignored; with the default, existing topics keep theirs (added by hand, say) and are listed
    explicit = partitions is not None or "METERING_PARTITIONS" in os.environ
    try:
        created, counts = kafka_io.ensure_topics(settings, strict=explicit)
    except kafka_io.PartitionCountMismatch as exc:
        _fail(f"error: kafka {settings.kafka_bootstrap}: {exc}")
    click.echo(f"kafka {settings.kafka_bootstrap}: topics created: {', '.join(created) or 'none (all exist)'}")
    click.echo("kafka partitions: " + ", ".join(f"{name} {n}" for name, n in counts.items()))
    with ClickHouseSink(settings.clickhouse_dsn, settings.clickhouse_database) as sink:
        sink.ensure_schema()
    click.echo(f"clickhouse {settings.clickhouse_dsn}: schema {settings.clickhouse_database} ready")


@main.command("run")
@click.option("--catalog", "catalog_path", help="Catalog YAML (default METERING_CATALOG).")
@click.option("--until-idle", type=click.FloatRange(min=0, min_open=True),
              help="Exit once nothing arrived for this many seconds and lag is 0.")
@click.option("--metrics-port", type=int, help="Prometheus /metrics, /healthz, /readyz port (0: off).")
def run(catalog_path: str | None, until_idle: float | None, metrics_port: int | None) -> None:
    """Every stage in one process: usage.events -> rating -> Redis -> ClickHouse."""
    from metering import logs, metrics
    from metering.workers.pipeline import Pipeline

    logs.setup()
    settings = _settings(catalog_path=catalog_path, metrics_port=metrics_port)
    health = metrics.serve_metrics(settings.metrics_port)
    stop = _stop_on_signals()  # before the start: SIGTERM while waiting for Redis ends it
    pipeline = _start_or_fail(lambda: Pipeline(settings, stop=stop))
    metrics.set_ready(health, pipeline.readiness)
    tune_for_batches()
    _run_or_fail(lambda: pipeline.run(max_idle_s=until_idle))


def _start_or_fail(build: Callable[[], T]) -> T:
    from metering.workers.common import Stopping

    try:
        return build()
    except Stopping as exc:  # SIGTERM while the start waited for a service
        click.echo(f"stopped before starting: {exc}", err=True)
        sys.exit(0)


def _run_or_fail(run: Callable[[], object]) -> None:
    """A worker's loop; a wiped wallet store stops it with exit code 3 and one clear line
    (charging on would start every wallet from nothing)."""
    from metering.workers.common import NothingAssigned, RedisLostWrites

    try:
        run()
    except RedisLostWrites as exc:
        _fail(f"error: {exc}", code=3)
    except NothingAssigned as exc:  # --until-idle only
        _fail(f"error: {exc}", code=1)


def _stop_on_signals(*, once: bool = False) -> threading.Event:
    """An event SIGTERM and SIGINT set (the worker's stop). `once`: the first signal also puts
    the defaults back, so a second one ends the process even if it waits on a hung service."""
    import signal
    import threading

    event = threading.Event()

    def handler(signum: int, frame: object) -> None:  # noqa: ARG001
        event.set()
        if once:
            _default_signals()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return event


def _default_signals() -> None:
    """SIGTERM and SIGINT back to Python's defaults (after _stop_on_signals)."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)


@main.command("worker")
@click.argument("stage", type=click.Choice(["rating", "debit", "sink", "alerts"]))
@click.option("--until-idle", type=click.FloatRange(min=0, min_open=True),
              help="Exit once nothing arrived for this many seconds.")
@click.option("--metrics-port", type=int, help="Prometheus /metrics, /healthz, /readyz port (0: off).")
def worker(stage: str, until_idle: float | None, metrics_port: int | None) -> None:
    """One stage as its own process; scale out by running more (Kafka consumer groups)."""
    from metering import logs, metrics
    from metering.workers import split

    logs.setup()
    settings = _settings(metrics_port=metrics_port)
    if stage == "alerts":  # faust-streaming: wallet.events -> notifications (low volume, keyed state)
        from metering.workers.alerts import run_alerts_worker

        stats = run_alerts_worker(settings, until_idle_s=until_idle)  # serves /metrics, /readyz
        click.echo(f"alerts worker stopped: received {stats.received}, notified {stats.notified}, "
                   f"duplicates {stats.duplicates}, invalid {stats.invalid}")
        return
    cls = {"rating": split.RatingWorker, "debit": split.DebitWorker, "sink": split.SinkWorker}[stage]
    health = metrics.serve_metrics(settings.metrics_port)
    stop = _stop_on_signals()
    w = _start_or_fail(lambda: cls(settings, stop))
    metrics.set_ready(health, w.readiness)
    tune_for_batches()
    _run_or_fail(lambda: w.run(max_idle_s=until_idle))


@main.group()
def accounts() -> None:
    """Accounts and wallets in Redis."""


@accounts.command("import")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--catalog", "catalog_path", help="Catalog to check plans against (default METERING_CATALOG).")
def accounts_import(file: str, catalog_path: str | None) -> None:
    """Create or update wallets from an accounts YAML; live balances are never reset. An
    existing wallet's block flag follows its new billing / credit_limit (then `blocked` or
    `unblocked` goes to wallet.events). Each wallet's opening balance is (re-)sent to
    wallet.movements as an `adjustment` with reference `opening`."""
    import msgspec
    from confluent_kafka import KafkaException

    from metering import kafka_io
    from metering.wallet_ops import produce_openings
    from metering.workers.common import OPERATOR_HEADER
    from rating.money import format_micros
    from schemas.messages import WalletEventOut
    from wallet_debiter.redis_store import RedisWalletStore, connect

    settings = _settings(catalog_path=catalog_path)
    _, accs = _load(settings.catalog_path, file)
    store = RedisWalletStore(connect(settings.redis_url))
    result = store.import_wallets(accs.values())
    at = datetime.now(UTC)
    delivery = kafka_io.DeliveryCheck()
    producer = kafka_io.make_producer(settings, on_delivery=delivery)
    openings = produce_openings(settings, producer, result.openings)
    enc = msgspec.json.Encoder()
    for change in result.block_changes:  # new billing / credit_limit moved an existing wallet's block flag
        producer.produce(settings.topics.wallet_events, key=change.account_id.encode(), value=enc.encode(
            WalletEventOut(type=change.kind, account_id=change.account_id,
                           event_id=f"import:{change.account_id}:{at.isoformat()}",
                           balance=format_micros(change.balance), at=at)), headers=[OPERATOR_HEADER])
    try:
        kafka_io.flush(producer, delivery=delivery)
    except KafkaException as exc:
        # imported: a re-run sends the openings again (kept in Redis), but finds the flags set
        # and sends no block change
        changes = (f"; the wallet events of their block changes "
                   f"({', '.join(f'{c.account_id} {c.kind}' for c in result.block_changes)}) will not be "
                   f"sent again (the flags are already set)") if result.block_changes else ""
        _fail(f"error: accounts: {result.new} created, {result.updated} updated in Redis, but their "
              f"movements and wallet events were not all published to Kafka {settings.kafka_bootstrap} "
              f"({_kafka_text(exc)}); a re-run re-sends the {openings} opening balance movements{changes}", 1)
    changed = "".join(f", {c.account_id} {c.kind}" for c in result.block_changes)
    click.echo(f"accounts: {result.new} created, {result.updated} updated (balances of existing wallets "
               f"kept){changed}; {openings} opening balance movements sent")


@accounts.command("show")
@click.argument("account_id")
def accounts_show(account_id: str) -> None:
    """Live wallet, allowances used and holds of one account."""
    from rating.money import format_micros
    from wallet_debiter.redis_store import RedisWalletStore, connect

    store = RedisWalletStore(connect(_settings().redis_url))
    w = store.wallet(account_id)
    if w is None:
        _fail(f"error: account {account_id!r} is not in Redis (metering accounts import FILE)")
    assert w is not None
    for key in ("plan", "billing", "home_country", "period_anchor_day"):
        click.echo(f"{key}: {w[key]}")
    click.echo(f"balance: {format_micros(int(w['balance']))}")
    click.echo(f"blocked: {'yes' if w['blocked'] == '1' else 'no'}")
    click.echo(f"top-up requested, not settled: {'yes' if w['topup_pending'] == '1' else 'no'}")
    for key in ("topup_threshold", "topup_amount", "low_balance_alert", "credit_limit"):
        if w[key]:
            click.echo(f"{key}: {format_micros(int(w[key]))}")
    held_s: dict[str, int] = {}
    for field_name, seconds in sorted(store.allowance_used(account_id).items()):
        pkg, period = field_name.split("|")
        click.echo(f"package {pkg}, period from {period}: {seconds // 60} min {seconds % 60} s used")
    now_ms = int(datetime.now(UTC).timestamp() * 1000)
    holds = [h for h in store.holds(account_id).values() if h.expires_at_ms > now_ms]
    for hold in holds:
        if hold.field:
            held_s[hold.field] = held_s.get(hold.field, 0) + hold.seconds
    click.echo(f"holds (dialer reservations live now): {len(holds)}, money "
               f"{format_micros(sum(h.amount for h in holds))}")
    for field_name, seconds in sorted(held_s.items()):
        pkg, period = field_name.split("|")
        click.echo(f"package {pkg}, period from {period}: {seconds // 60} min {seconds % 60} s held")


@accounts.command("credit", context_settings={"ignore_unknown_options": True})  # "-0.03" is an amount
@click.argument("account_id")
@click.argument("amount", required=False)
@click.option("--type", "kind", type=click.Choice(["credit", "topup", "adjustment"]), default="credit")
@click.option("--reference", help="Idempotency key: the same reference is applied once (required with AMOUNT).")
@click.option("--topup-failed", is_flag=True, help="Settle an open top-up request as failed (no money, no AMOUNT).")
def accounts_credit(account_id: str, amount: str | None, kind: str, reference: str | None, topup_failed: bool) -> None:
    """Credit (or with a negative adjustment, debit) a wallet; a top-up settles the open request."""
    from confluent_kafka import KafkaException

    from metering import kafka_io
    from rating.money import MAX_CHARGE_MICROS, MoneyError, format_micros, parse_micros
    from rating.shown import shown
    from wallet_debiter.redis_store import RedisWalletStore, connect

    settings = _settings()
    store = RedisWalletStore(connect(settings.redis_url))
    if store.wallet(account_id) is None:
        _fail(f"error: account {account_id!r} is not in Redis (metering accounts import FILE)")
    if topup_failed:
        if amount is not None:
            _fail("error: amount: --topup-failed moves no money; give no AMOUNT")
        if store.settle_topup_failed(account_id):
            click.echo(f"{account_id}: open top-up request settled as failed (the next one may be requested)")
        else:
            click.echo(f"{account_id}: no open top-up request: nothing changed")
        return
    if amount is None or reference is None:
        _fail("error: AMOUNT and --reference are required (or --topup-failed)")
    assert amount is not None and reference is not None
    if not reference.strip():
        _fail("error: --reference: empty; give the payment's own id (it is the idempotency key)")
    try:
        micros = parse_micros(amount)
    except MoneyError as exc:
        _fail(f"error: amount: {exc}")
    if abs(micros) > MAX_CHARGE_MICROS:  # no wallet holds it (and hiredis crashes packing 4 300+ digits)
        _fail(f"error: amount: {shown(amount)} is beyond +-{format_micros(MAX_CHARGE_MICROS)}, the most a wallet "
              "holds exactly; nothing applied")
    if kind != "adjustment" and micros <= 0:
        _fail("error: amount: a credit or top-up must be > 0 (use --type adjustment to take money)")
    if micros == 0:
        _fail("error: amount: an adjustment of 0 changes nothing")
    delivery = kafka_io.DeliveryCheck()  # a message the broker refuses (no such topic) is not a success
    producer = kafka_io.make_producer(settings, on_delivery=delivery)
    from metering.wallet_ops import apply_credit
    from wallet_debiter.redis_store import BalanceOutOfRange

    try:
        balance, record_kind, record_micros, replayed, _ = apply_credit(settings, store, producer, account_id,
                                                                        micros, kind, reference)
    except BalanceOutOfRange as exc:
        _fail(f"error: amount: {exc}")
    try:
        kafka_io.flush(producer, delivery=delivery)
    except KafkaException as exc:
        _fail(f"error: {account_id}: the {record_kind} is applied in Redis (balance {format_micros(balance)}) but "
              f"its movement was not published to Kafka {settings.kafka_bootstrap} ({_kafka_text(exc)}): run the "
              f"same command again once Kafka is back; the reference keeps it from being applied twice", 1)
    if not replayed:
        click.echo(f"{account_id}: {kind} {format_micros(micros)}, balance {format_micros(balance)}")
    elif (record_kind, record_micros) == (kind, micros):
        click.echo(f"{account_id}: {kind} {format_micros(micros)} already applied earlier with this reference: "
                   f"nothing changed (balance after it {format_micros(balance)})")
    else:  # exit 2: a payment script must not take this for the credit it asked for
        _fail(f"error: {account_id}: reference {reference!r} was already used for a {record_kind} of "
              f"{format_micros(record_micros)}: nothing changed (not a {kind} of {format_micros(micros)})")


@main.group()
def fees() -> None:
    """Recurring charges: each plan's monthly_fee."""


@fees.command("charge")
@click.option("--on", "on", callback=lambda ctx, param, v: datetime.now(UTC) if v is None else _bound(ctx, param, v),
              metavar="YYYY-MM-DD", help="Charge the billing period holding this UTC day (default: today).")
@click.option("--catalog", "catalog_path", help="Catalog YAML (default METERING_CATALOG).")
def fees_charge(on: datetime, catalog_path: str | None) -> None:
    """Charge every imported account its plan's monthly_fee for the billing period holding
    --on (each account's own period, from its anchor day), once per period: the reference is
    `fee:<period start>:<plan>`, and any fee already recorded for that period (whatever the
    plan) makes a second run change nothing. The fee is an `adjustment` movement (negative),
    which the analyst views count as *recurring*; a prepaid wallet it takes to <= 0 (a
    postpaid one past its credit_limit) is blocked and `blocked` goes to wallet.events. Plans
    without a fee are skipped. A --on day after today warns: that period is charged ahead; one
    before 1970-01-28 is refused (a period before 1970 cannot be stored in ClickHouse)."""
    from confluent_kafka import KafkaException

    from metering import kafka_io
    from metering.wallet_ops import charge_fees
    from rating.money import format_micros
    from rating.periods import FIRST_PERIOD_START, earliest_period_start
    from wallet_debiter.redis_store import RedisWalletStore, connect

    day = on.astimezone(UTC).date()
    earliest = earliest_period_start(on)
    if earliest < FIRST_PERIOD_START:  # ClickHouse's Date would clamp the fee's period to 1970-01-01
        _fail(f"error: --on {day.isoformat()} is in billing periods starting as early as {earliest}, before "
              f"{FIRST_PERIOD_START}, the earliest period stored: nothing charged")
    if day > datetime.now(UTC).date():
        click.echo(f"warning: --on {day.isoformat()} is after today (UTC): the periods holding it are "
                   "charged ahead of time", err=True)
    settings = _settings(catalog_path=catalog_path)
    try:
        catalog = load_catalog(settings.catalog_path)
    except CatalogError as exc:
        _fail(f"error: {exc}")
    store = RedisWalletStore(connect(settings.redis_url))
    delivery = kafka_io.DeliveryCheck()
    producer = kafka_io.make_producer(settings, on_delivery=delivery)
    stop = _stop_on_signals(once=True)  # finish the account in hand, send what was charged; a 2nd: at once
    done = charge_fees(settings, store, producer, catalog, on, lambda text: click.echo(text, err=True), stop)
    _default_signals()  # a Ctrl-C while the flush waits for Kafka ends the wait
    try:
        kafka_io.flush(producer, delivery=delivery)
    except KafkaException as exc:  # the fees are charged: a re-run re-sends their movements, charges nothing
        _fail(f"error: fees: {done.charged} accounts charged {format_micros(done.total)} in Redis now "
              f"({done.replayed} earlier), but their movements were not all published to Kafka "
              f"{settings.kafka_bootstrap} ({_kafka_text(exc)}): run the same command (same --on) again once "
              f"Kafka is back; each period's fee is charged once and its movement sent again", 1)
    if done.stopped:
        _fail(f"error: fees: stopped by a signal after {done.charged} accounts charged {format_micros(done.total)} "
              f"({done.replayed} already charged, {done.skipped} without a fee); their movements are sent, the "
              f"other accounts are not charged: run the same command (same --on) again to finish", 1)
    click.echo(f"fees: {done.charged} accounts charged {format_micros(done.total)} in all, {done.replayed} already "
               f"charged for their period, {done.skipped} without a fee"
               + (f", {done.refused} refused (see above)" if done.refused else ""))
    if done.refused:
        sys.exit(1)


@main.command("serve-api")
@click.option("--host", help="Listen address (default METERING_API_HOST or 0.0.0.0).")
@click.option("--port", type=int, help="Port (default METERING_API_PORT or 8080).")
@click.option("--hold-ttl", type=int, help="Grace after a hold's longest call, s (default METERING_HOLD_TTL_S or 7200).")
def serve_api(host: str | None, port: int | None, hold_ttl: int | None) -> None:
    """The dialer authorization API (authorize, reservations, wallet) with /healthz, /readyz, /metrics."""
    from metering.config import ConfigError
    from wallet_debiter.api import serve

    settings = _settings(api_host=host, api_port=port, hold_ttl_s=hold_ttl)  # range-checked there
    try:
        serve(settings.api_host, settings.api_port, catalog_path=settings.catalog_path,
              redis_url=settings.redis_url, hold_ttl_s=settings.hold_ttl_s, metrics_port=settings.metrics_port)
    except OSError as exc:  # address in use, unknown host: before anything is served
        raise ConfigError(f"api {settings.api_host}:{settings.api_port} (metrics {settings.metrics_port}): "
                          f"{exc.strerror or exc}") from None


@main.command("report")
def report() -> None:
    """Operator and analyst summary queried from ClickHouse (the views analysts use)."""
    from metering.report import print_report

    settings = _settings()
    print_report(settings.clickhouse_dsn, settings.clickhouse_database, click.echo)


@main.group()
def movements() -> None:
    """Wallet movements (debit, credit, topup, adjustment) from ClickHouse."""


def _bound(ctx: click.Context, param: click.Parameter, value: str) -> datetime:  # noqa: ARG001
    from metering.storage.movements_csv import parse_bound

    try:
        return parse_bound(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@movements.command("export")
@click.argument("account_id")
@click.option("--from", "start", required=True, callback=_bound, metavar="DATE|TIMESTAMP",
              help="Start, inclusive: a date (00:00 UTC) or an ISO 8601 timestamp with offset.")
@click.option("--to", "end", required=True, callback=_bound, metavar="DATE|TIMESTAMP",
              help="End, exclusive: a date (00:00 UTC) or an ISO 8601 timestamp with offset.")
@click.option("--out", "out_path", type=click.Path(dir_okay=False, writable=True),
              help="Write the CSV here (replaced whole, only once complete); default: stdout.")
def movements_export(account_id: str, start: datetime, end: datetime, out_path: str | None) -> None:
    """Export ACCOUNT_ID's wallet movements with `at` in [--from, --to) as CSV.

    \b
    Columns: seq, movement_id, account_id, at, type, amount, balance_after, reference.
    `at` is ISO 8601 UTC with milliseconds; money is a 6-place decimal string
    (amount signed: debits negative). Read from wallet_movements FINAL, so a replayed
    movement is one line. Rows are ordered by seq, the wallet's balance-change number in the
    order Redis applied them: each balance_after is the previous line's plus its amount where
    seq has no gap, also after a CDR that arrived late; a range selects rows by `at`, so a
    movement applied in between with its `at` outside the range leaves a gap in seq, and the
    chain resumes there (seq 0 rows come first: the opening balance from `accounts import`,
    and rows written before seq existed).
    --from is inclusive and --to exclusive on `at`: --from 2026-11-01 --to 2026-12-01 is all
    of November (UTC). A debit's `at` is its usage event's own time, a credit's the time it
    was applied.
    An unknown account or an empty range gives the header line only (exit 0).
    ClickHouse: METERING_CLICKHOUSE_DSN and METERING_CLICKHOUSE_DATABASE. On chDB the data
    directory must not be held by another process (stop `metering run` / `worker sink`).
    Errors (bad option, ClickHouse unreachable) exit with code 2; a failure mid-stream can
    leave part of the CSV on stdout, while --out writes all or nothing. CSV is RFC 4180
    (UTF-8, CRLF, quoted fields where needed); the row count goes to stderr.
    """
    import tempfile

    from clickhouse_connect.driver.exceptions import ClickHouseError

    from metering.storage.clickhouse_sink import ClickHouseSink
    from metering.storage.movements_csv import export_movements

    if end < start:
        raise click.BadParameter(f"{end.isoformat()} is before --from ({start.isoformat()})", param_hint="'--to'")
    settings = _settings()
    where = f"clickhouse {settings.clickhouse_dsn} (METERING_CLICKHOUSE_DSN), database {settings.clickhouse_database}"
    try:
        sink = ClickHouseSink(settings.clickhouse_dsn, settings.clickhouse_database)
    except ValueError as exc:  # ClickHouseConfigError: a DSN scheme or database name that cannot work
        _fail(f"error: {exc}")
    except (ClickHouseError, OSError) as exc:
        _fail(f"error: {where}: cannot connect: {exc}")
    tmp_path: str | None = None
    try:
        if out_path is None:
            stdout = sys.stdout.buffer
            count = export_movements(sink.client, settings.clickhouse_database, account_id, start, end,
                                     _Utf8Writer(stdout))
            stdout.flush()
        else:  # a temporary file next to it, renamed over it once complete: never half a file
            fd, tmp_path = tempfile.mkstemp(prefix=".movements-", suffix=".tmp",
                                            dir=os.path.dirname(os.path.abspath(out_path)))
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes it 0600; an ordinary file instead
            with open(fd, "w", encoding="utf-8", newline="") as out:
                count = export_movements(sink.client, settings.clickhouse_database, account_id, start, end, out)
            os.replace(tmp_path, out_path)
            tmp_path = None
    except ClickHouseError as exc:
        _fail(f"error: {where}: export query failed: {exc}")
    except BrokenPipeError:  # the reader left (`| head`): stop quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except OSError as exc:
        _fail(f"error: --out {out_path}: {exc}" if out_path else f"error: stdout: {exc}")
    finally:
        sink.close()
        if tmp_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp_path)
    click.echo(f"{account_id}: {count} movements from {start.isoformat()} to {end.isoformat()} (exclusive)",
               err=True)


class _Utf8Writer:
    """What csv.writer needs (write) over a binary stream: UTF-8, line ends untouched."""

    def __init__(self, binary: IO[bytes]) -> None:
        self._binary = binary

    def write(self, text: str) -> int:
        return self._binary.write(text.encode("utf-8"))


@main.command("demo")
@click.option("--seconds", type=click.FloatRange(min=0, min_open=True), default=60, show_default=True,
              help="How long traffic streams.")
@click.option("--rate", type=click.FloatRange(min=0, min_open=True), default=3000, show_default=True,
              help="CDRs per second offered.")
@click.option("--seed", type=int, default=7, show_default=True)
@click.option("--metrics-port", type=int, help="Metrics/health port (default METERING_METRICS_PORT or 9100; 0: none).")
def demo(seconds: float, rate: float, seed: int, metrics_port: int | None) -> None:
    """Start the local stack, stream traffic through the whole pipeline, print the results."""
    from metering import logs
    from metering.demo import run_demo

    logs.setup("WARNING")  # the progress line and the summary say the rest
    sys.exit(run_demo(seconds=seconds, rate=rate, seed=seed, metrics_port=metrics_port, echo=click.echo))


@main.command("simulate")
@click.option("--count", type=click.IntRange(min=0), default=100_000, show_default=True, help="Events to produce.")
@click.option("--rate", "per_second", type=click.FloatRange(min=0), default=0,
              help="Events per second (0: as fast as possible).")
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--duplicates", type=click.FloatRange(0, 1), default=0.01, show_default=True, help="Share re-sent.")
@click.option("--malformed", type=click.FloatRange(0, 1), default=0.005, show_default=True,
              help="Share of bad input.")
@click.option("--accounts", "accounts_path", help="Accounts YAML (default METERING_ACCOUNTS).")
def simulate(count: int, per_second: float, seed: int, duplicates: float, malformed: float,
             accounts_path: str | None) -> None:
    """Produce realistic CDR traffic to usage.events."""
    from metering.simulate import produce_traffic

    settings = _settings(accounts_path=accounts_path)
    sent = produce_traffic(settings, count=count, per_second=per_second, seed=seed,
                           duplicate_rate=duplicates, malformed_rate=malformed,
                           progress=sys.stderr.isatty(),
                           progress_every_s=0 if sys.stderr.isatty() else settings.progress_s)
    click.echo(f"produced {sent} events to {settings.topics.events}")


if __name__ == "__main__":
    main()
