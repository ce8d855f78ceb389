"""Start-up misconfiguration and unreachable services end a command with one line that names
the setting or the service (exit 2: configuration, 1: a service), never a traceback or a
half-started process. None of these needs a running service: every target is refused or
unreachable on purpose."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import astuple
from pathlib import Path

import pytest
from confluent_kafka import KafkaError, KafkaException

from metering.cli import _service_error
from metering.config import ConfigError, Settings, Topics
from metering.local_services import endpoints

ROOT = Path(__file__).resolve().parents[1]
CATALOG = ROOT / "deploy/examples/catalog.yaml"


def _cli(*args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("METERING_")}
    full = {**base, "METERING_METRICS_PORT": "0", "METERING_REDIS_URL": "redis://127.0.0.1:1/0",
            "METERING_KAFKA_BOOTSTRAP": "127.0.0.1:1", **env}
    return subprocess.run([sys.executable, "-m", "metering.cli", *args], env=full, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def _one_line_error(proc: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), proc.stderr[-2000:]
    for needle in needles:
        assert needle in last, (needle, last)


def test_numeric_settings_out_of_range_are_refused_with_every_name() -> None:
    with pytest.raises(ConfigError) as exc:
        Settings.from_env({"METERING_BATCH_SIZE": "0", "METERING_BATCH_TIMEOUT_S": "-1",
                           "METERING_PARTITIONS": "0", "METERING_MAX_MESSAGE_BYTES": "0",
                           "METERING_METRICS_PORT": "70000", "METERING_CATALOG_CHECK_S": "nan"})
    text = str(exc.value)
    for name in ("METERING_BATCH_SIZE", "METERING_BATCH_TIMEOUT_S", "METERING_PARTITIONS",
                 "METERING_MAX_MESSAGE_BYTES", "METERING_METRICS_PORT", "METERING_CATALOG_CHECK_S"):
        assert name in text, (name, text)
    with pytest.raises(ConfigError, match="METERING_BATCH_SIZE='5k': expected a whole number"):
        Settings.from_env({"METERING_BATCH_SIZE": "5k"})
    assert Settings.from_env({"METERING_BATCH_SIZE": "1", "METERING_METRICS_PORT": "0"}).batch_size == 1


def test_topics_come_from_the_prefix_only_not_from_a_metering_topics_variable() -> None:
    """`topics` is a field of Settings but no variable: METERING_TOPICS was read as a plain
    string in its place, and every command then died with a traceback
    (`AttributeError: 'str' object has no attribute 'events'` in `metering setup`)."""
    settings = Settings.from_env({"METERING_TOPICS": "usage", "METERING_TOPIC_PREFIX": "t1."})
    assert settings.topics == Topics(*(f"t1.{name}" for name in astuple(Topics())))
    assert Settings.from_env({"METERING_TOPICS": "usage"}).topics == Topics()


def test_unreadable_and_out_of_range_settings_are_named_together() -> None:
    """A setting that is not a number and one out of range, given together, are both named
    in the one error (before, the unreadable one stopped the check: fix one, run again, then
    hear about the next)."""
    proc = _cli("run", METERING_BATCH_SIZE="5k", METERING_METRICS_PORT="-1", METERING_PROGRESS_S="soon")
    _one_line_error(proc, 2, "METERING_BATCH_SIZE='5k': expected a whole number",
                    "metrics_port=-1 (METERING_METRICS_PORT): expected 0 to 65,535",
                    "METERING_PROGRESS_S='soon': expected a number")


def test_bad_settings_end_the_command_with_exit_2() -> None:
    _one_line_error(_cli("run", METERING_BATCH_TIMEOUT_S="0"), 2, "METERING_BATCH_TIMEOUT_S")
    _one_line_error(_cli("setup", "--partitions", "0"), 2, "partitions=0 (--partitions)")


def test_a_bad_option_value_is_named_by_its_option_not_by_a_variable_never_set() -> None:
    """`serve-api --port 0` said `api_port=0 (METERING_API_PORT)`, `run --metrics-port 70000`
    `(METERING_METRICS_PORT)`: the operator typed an option and was sent to a variable they
    never set. A bad value is named by where it came from; `rate --now` names its option too."""
    proc = _cli("serve-api", "--port", "0", "--hold-ttl", "0")
    _one_line_error(proc, 2, "api_port=0 (--port): expected 1 to 65,535", "hold_ttl_s=0 (--hold-ttl)")
    assert "METERING_API_PORT" not in proc.stderr and "METERING_HOLD_TTL_S" not in proc.stderr
    proc = _cli("run", "--metrics-port", "70000", METERING_BATCH_SIZE="0")  # the variable's is named as such
    _one_line_error(proc, 2, "metrics_port=70000 (--metrics-port)", "batch_size=0 (METERING_BATCH_SIZE)")
    _one_line_error(_cli("serve-api", METERING_API_PORT="0"), 2, "api_port=0 (METERING_API_PORT)")
    proc = _cli("rate", "--catalog", str(CATALOG), "--accounts", str(ROOT / "deploy/examples/accounts.yaml"),
                "--events", "-", "--now", "yesterday")
    assert proc.returncode == 2 and "Invalid value for '--now'" in proc.stderr, proc.stderr


def test_a_missing_catalog_file_is_a_catalog_error_not_a_traceback() -> None:
    proc = _cli("run", METERING_CATALOG="/nonexistent/catalog.yaml")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "/nonexistent/catalog.yaml" in proc.stderr and "cannot read" in proc.stderr


def test_bad_service_urls_are_refused_before_anything_connects() -> None:
    _one_line_error(_cli("run", METERING_CATALOG=str(CATALOG), METERING_REDIS_URL="foo://x"), 1,
                    "Redis URL 'foo://x'")
    _one_line_error(_cli("accounts", "show", "a", METERING_REDIS_URL="redis+cluster://h:port/"), 1, "port")
    # clickhouse-connect would take any other scheme for http
    _one_line_error(_cli("report", METERING_CLICKHOUSE_DSN="ftp://x"), 1, "ClickHouse DSN 'ftp://x'")
    _one_line_error(_cli("report", METERING_CLICKHOUSE_DSN="chdb:///tmp/x", METERING_CLICKHOUSE_DATABASE="a-b"),
                    1, "'a-b'")


def test_unreachable_services_are_named_in_one_line() -> None:
    _one_line_error(_cli("accounts", "show", "acc-1"), 1, "redis redis://127.0.0.1:1/0", "Connection refused")
    _one_line_error(_cli("accounts", "import", str(ROOT / "deploy/examples/accounts.yaml")), 1,
                    "redis redis://127.0.0.1:1/0")
    _one_line_error(_cli("report", METERING_CLICKHOUSE_DSN="http://127.0.0.1:1"), 1, "clickhouse http://127.0.0.1:1")
    # Kafka down: librdkafka's own timeout (30 s for setup) ends in a KafkaException
    err = KafkaException(KafkaError(KafkaError._TRANSPORT, "Failed to get metadata: Local: Broker transport failure"))
    assert _service_error(err) == (f"error: kafka {endpoints().kafka_bootstrap}: "
                                   "Failed to get metadata: Local: Broker transport failure")
    assert _service_error(KeyError("a bug")) is None  # anything else keeps its traceback
    # `simulate` before `setup` (topics missing): says what to run
    missing = _service_error(KafkaException(KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART)))
    assert missing is not None and missing.endswith("create the topics with `metering setup`"), missing


def test_report_on_a_database_never_set_up_says_so(tmp_path: Path) -> None:
    _one_line_error(_cli("report", METERING_CLICKHOUSE_DSN=f"chdb://{tmp_path}/ch"), 1, "UNKNOWN_DATABASE",
                    "metering setup")


def test_a_metrics_port_in_use_stops_the_worker_at_once() -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # before the fix: a traceback from the metrics thread and a process that never exits
        proc = _cli("run", timeout=30, METERING_METRICS_PORT=str(port), METERING_CATALOG=str(CATALOG))
        _one_line_error(proc, 2, f"metrics port {port}", "METERING_METRICS_PORT")
        proc = _cli("worker", "rating", timeout=30, METERING_METRICS_PORT=str(port), METERING_CATALOG=str(CATALOG))
        _one_line_error(proc, 2, f"metrics port {port}")


def test_the_demo_uses_a_redis_database_of_its_own() -> None:
    from metering.demo import DEMO_REDIS_DB, demo_redis_url

    assert demo_redis_url("redis://127.0.0.1:16379/0") == f"redis://127.0.0.1:16379/{DEMO_REDIS_DB}"
    assert demo_redis_url("rediss://:pw@h:1") == f"rediss://:pw@h:1/{DEMO_REDIS_DB}"
    # redis-py takes ?db= over the path: it must not survive (it emptied database 0)
    assert demo_redis_url("redis://h:1?db=0&socket_timeout=5") == f"redis://h:1/{DEMO_REDIS_DB}?socket_timeout=5"
    import redis as redis_py
    assert redis_py.Redis.from_url(demo_redis_url("redis://h:1/0?db=0")).connection_pool.connection_kwargs["db"] \
        == DEMO_REDIS_DB
    with pytest.raises(ConfigError, match="standalone"):  # it empties the database: never a cluster
        demo_redis_url("redis+cluster://127.0.0.1:17001/")


def test_movements_export_names_a_bad_dsn_as_such() -> None:
    proc = _cli("movements", "export", "acc-1", "--from", "2026-11-01", "--to", "2026-12-01",
                METERING_CLICKHOUSE_DSN="ftp://x")
    _one_line_error(proc, 2, "ClickHouse DSN 'ftp://x'")  # before: "METERING_CLICKHOUSE_DATABASE: ..."
    assert "METERING_CLICKHOUSE_DATABASE" not in proc.stderr


def test_sigterm_while_a_starting_worker_waits_for_redis_ends_it() -> None:
    """Before: the signal handler came after the start, so SIGTERM during the (10 min) wait
    for Redis killed the process without a word; now the wait ends cleanly. Without SIGTERM
    the start gives up after STARTUP_WAIT_S with one line (exit 1)."""
    import signal
    import time

    base = {k: v for k, v in os.environ.items() if not k.startswith("METERING_")}
    env = {**base, "METERING_METRICS_PORT": "0", "METERING_REDIS_URL": "redis://127.0.0.1:1/0",
           "METERING_KAFKA_BOOTSTRAP": "127.0.0.1:1", "METERING_CATALOG": str(CATALOG)}
    for args in (["run"], ["worker", "rating"]):
        proc = subprocess.Popen([sys.executable, "-m", "metering.cli", *args], env=env, cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(4)  # importing, then retrying the accounts read
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err[-2000:]
        assert "stopped before starting" in err and "Traceback" not in err


def test_more_settings_refused_in_one_line(tmp_path: Path) -> None:
    # redis-py would silently use database 0 for a path that is not a number
    _one_line_error(_cli("accounts", "show", "a", METERING_REDIS_URL="redis://127.0.0.1:1/abc"), 1, "'abc'")
    # chDB without a folder is in memory: rows would be lost at exit
    _one_line_error(_cli("report", METERING_CLICKHOUSE_DSN="chdb://"), 1, "needs a data folder")
    _one_line_error(_cli("report", METERING_CLICKHOUSE_DSN="http://127.0.0.1:notaport"), 1, "port")
    _one_line_error(_cli("accounts", "show", "a", METERING_REDIS_URL="redis+cluster://127.0.0.1:1/"), 1, "redis")
    for var, value in (("METERING_API_PORT", "abc"), ("METERING_API_PORT", "99999"), ("METERING_HOLD_TTL_S", "-5")):
        _one_line_error(_cli("serve-api", **{var: value}), 2, var)
    proc = _cli("demo", "--seconds", "1", METERING_CATALOG=str(tmp_path / "nope.yaml"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "starting local services" not in proc.stdout
    assert "nope.yaml: catalog refused" in proc.stderr
    _one_line_error(_cli("simulate", "--count", "1", METERING_ACCOUNTS=str(tmp_path / "nope.yaml")), 2, "nope.yaml")


def test_demo_refuses_a_rate_or_duration_that_is_not_positive_before_starting_anything() -> None:
    """`metering demo --rate -5` started the services, created topics, printed `streaming -10
    call/SMS/meter attempts at -5/s`, died in its producer thread with a traceback
    (`ValueError: count must be >= 0`) and still exit 0 with an empty summary."""
    for args in (("--rate", "-5"), ("--rate", "0"), ("--seconds", "-1"), ("--seconds", "0")):
        proc = _cli("demo", *args, timeout=30)
        assert proc.returncode == 2 and f"Invalid value for '{args[0]}'" in proc.stderr, (args, proc.stderr)
        assert "starting local services" not in proc.stdout and "Traceback" not in proc.stderr, args


def test_worker_alerts_names_a_state_dir_it_cannot_use(tmp_path: Path) -> None:
    """Faust makes its data folder at start with mkdir (no parents) inside the event loop: a
    METERING_STATE_DIR it cannot use ended `worker alerts` with exit 1 and no `error:` line, the
    reason only inside a JSON log line's traceback. Refused before the start now (exit 2)."""
    (tmp_path / "a-file").write_text("")
    proc = _cli("worker", "alerts", METERING_STATE_DIR=str(tmp_path / "a-file" / "state"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last == (f"error: worker alerts: cannot create its Faust data folder {tmp_path}/a-file/state/faust "
                    "(METERING_STATE_DIR): Not a directory"), last


def test_ctrl_c_stops_setup_at_once_while_kafka_is_unreachable() -> None:
    """`metering setup` with the broker down waits 30 s for metadata in one librdkafka call,
    where Ctrl-C is not seen: it took ~27 s to stop. The wait is asked in 1 s slices now."""
    import signal
    import time

    base = {k: v for k, v in os.environ.items() if not k.startswith("METERING_")}
    env = {**base, "METERING_METRICS_PORT": "0", "METERING_KAFKA_BOOTSTRAP": "127.0.0.1:1"}
    # Ctrl-C as at a terminal: a suite started in the background (`nohup .ci/run &`) inherits
    # SIGINT ignored, and Python then installs no KeyboardInterrupt handler in the child.
    proc = subprocess.Popen([sys.executable, "-m", "metering.cli", "setup"], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(6)  # importing (slower on a loaded box), then waiting for the broker
    assert proc.poll() is None
    proc.send_signal(signal.SIGINT)
    sent = time.monotonic()
    _, err = proc.communicate(timeout=40)
    assert time.monotonic() - sent < 5, (time.monotonic() - sent, err[-2000:])
    # 128 + SIGINT, what a shell reports for Ctrl-C (click's "Aborted!" was exit 1)
    assert proc.returncode == 130 and "Traceback" not in err, (proc.returncode, err[-2000:])
    assert err.strip().splitlines()[-1] == "interrupted", err[-2000:]


def test_until_idle_gives_up_when_no_partition_is_ever_assigned(tmp_path: Path) -> None:
    """`--until-idle` is for scripts and jobs: with Kafka unreachable no partition is ever
    assigned, so the lag is never known to be 0, and the command used to wait forever. It
    now ends with one line after the idle time + UNASSIGNED_GIVE_UP_S (exit 1). Both split
    workers that start without Redis, side by side (`run` on the live stack: test_pipeline_live)."""
    import time

    from metering.workers.common import UNASSIGNED_GIVE_UP_S

    base = {k: v for k, v in os.environ.items() if not k.startswith("METERING_")}
    env = {**base, "METERING_METRICS_PORT": "0", "METERING_REDIS_URL": "redis://127.0.0.1:1/0",
           "METERING_KAFKA_BOOTSTRAP": "127.0.0.1:1", "METERING_CATALOG": str(CATALOG),
           "METERING_CLICKHOUSE_DSN": f"chdb://{tmp_path}/ch", "METERING_TOPIC_PREFIX": "gone."}
    started = time.monotonic()
    procs = {stage: subprocess.Popen([sys.executable, "-m", "metering.cli", "worker", stage, "--until-idle", "1"],
                                     env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for stage in ("debit", "sink")}
    for stage, proc in procs.items():
        _, err = proc.communicate(timeout=UNASSIGNED_GIVE_UP_S + 60)
        done = subprocess.CompletedProcess(proc.args, proc.returncode, "", err)
        topic = "gone.usage.priced" if stage == "debit" else "gone.usage.rated"
        _one_line_error(done, 1, "kafka 127.0.0.1:1", f"no partition of {topic}", f"group metering-{stage}",
                        "--until-idle gives up")
    assert time.monotonic() - started >= UNASSIGNED_GIVE_UP_S  # not before the grace
