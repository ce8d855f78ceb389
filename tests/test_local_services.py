"""Local Kafka/Redis from deploy/local/services.sh. A service that cannot start fails the test."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
import redis
from confluent_kafka import Consumer, KafkaError, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from metering import local_services
from metering.local_services import Endpoints


def test_endpoints_defaults() -> None:
    eps = local_services.endpoints({"METERING_STATE_DIR": "/tmp/st"})
    assert eps == Endpoints(
        kafka_bootstrap="127.0.0.1:19092",
        redis_url="redis://127.0.0.1:16379/0",
        clickhouse_dsn="chdb:///tmp/st/clickhouse",
    )


def test_endpoints_ports_and_overrides() -> None:
    eps = local_services.endpoints(
        {
            "METERING_KAFKA_PORT": "29092",
            "METERING_REDIS_PORT": "26379",
            "METERING_CLICKHOUSE_DSN": "http://default:@ch:8123/default",
        }
    )
    assert eps.kafka_bootstrap == "127.0.0.1:29092"
    assert eps.redis_url == "redis://127.0.0.1:26379/0"
    assert eps.as_env()["METERING_CLICKHOUSE_DSN"] == "http://default:@ch:8123/default"
    assert (
        local_services.endpoints({"METERING_KAFKA_BOOTSTRAP": "k:9092"}).kafka_bootstrap == "k:9092"
    )
    assert (
        local_services.state_dir({})
        == Path(local_services.__file__).resolve().parents[1] / ".state"
    )


def test_unknown_service_is_refused() -> None:
    with pytest.raises(ValueError):
        local_services.ensure_started(("kafka", "zookeeper"))


@pytest.mark.integration
def test_kafka_produce_consume() -> None:
    eps = local_services.ensure_started(("kafka",))
    topic = f"test.local-services.{uuid.uuid4().hex[:12]}"
    admin = AdminClient({"bootstrap.servers": eps.kafka_bootstrap})
    admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])[topic].result(
        timeout=60
    )
    try:
        payload = b'{"event_id": "e-1", "account_id": "acct-1"}'
        delivered: list[KafkaError | None] = []
        producer = Producer(
            {"bootstrap.servers": eps.kafka_bootstrap, "acks": "all", "enable.idempotence": True}
        )
        producer.produce(
            topic, key=b"acct-1", value=payload, on_delivery=lambda e, _m: delivered.append(e)
        )
        assert producer.flush(30) == 0
        assert delivered == [None]

        consumer = Consumer(
            {
                "bootstrap.servers": eps.kafka_bootstrap,
                "group.id": f"test-{uuid.uuid4().hex[:8]}",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
            }
        )
        try:
            consumer.subscribe([topic])
            msg = None
            deadline = time.monotonic() + 60
            while msg is None and time.monotonic() < deadline:
                polled = consumer.poll(1.0)
                if polled is not None:
                    assert polled.error() is None, polled.error()
                    msg = polled
            assert msg is not None, "no message consumed within 60 s"
            assert (msg.key(), msg.value()) == (b"acct-1", payload)
            consumer.commit(message=msg, asynchronous=False)  # exercises __consumer_offsets
        finally:
            consumer.close()
    finally:
        admin.delete_topics([topic])[topic].result(timeout=30)


@pytest.mark.integration
def test_redis_set_get_and_aof() -> None:
    eps = local_services.ensure_started(("redis",))
    client = redis.Redis.from_url(eps.redis_url, socket_timeout=5, decode_responses=True)
    key = f"test:local-services:{uuid.uuid4().hex}"
    try:
        assert client.set(key, "42", ex=60)
        assert client.get(key) == "42"
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("appendfsync") == {"appendfsync": "everysec"}
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
    finally:
        client.delete(key)
        client.close()


def test_stop_without_names_stops_the_cluster_a_test_started(tmp_path: Path) -> None:
    """`services.sh stop` (= `stop all`) must also stop the Redis Cluster and kfake when they
    run: tests start them by name, and `all` used to mean Kafka + Redis only (left running)."""
    import os
    import socket
    import subprocess

    def free(port: int) -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) != 0

    base = 41000 + uuid.uuid4().int % 3000 * 3
    ports = [base, base + 1, base + 2]
    assert all(free(p) and free(p + 10000) for p in ports)
    env = {**os.environ, "METERING_STATE_DIR": str(tmp_path / "state"),
           "METERING_REDIS_CLUSTER_PORTS": " ".join(map(str, ports)),
           "METERING_KAFKA_PORT": str(base + 5), "METERING_REDIS_PORT": str(base + 6)}
    script = str(Path(__file__).resolve().parents[1] / "deploy/local/services.sh")
    try:
        subprocess.run(["bash", script, "start", "redis-cluster"], env=env, check=True, capture_output=True, timeout=120)
        assert not any(free(p) for p in ports)
        out = subprocess.run(["bash", script, "stop"], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert all(free(p) for p in ports), out.stderr
    finally:
        subprocess.run(["bash", script, "stop", "redis-cluster"], env=env, capture_output=True, timeout=120)


def test_wipe_deletes_every_folder_the_project_writes_and_nothing_else(tmp_path: Path) -> None:
    """`services.sh wipe` ("delete state: topics, Redis data, chDB, logs") also deletes the demo's
    chDB folders (`clickhouse-demo-<stamp>`, one per `metering demo`) and `worker alerts`'
    Faust tables (`faust/`); it left both behind, so a wiped machine kept every demo's data."""
    import os
    import subprocess

    state = tmp_path / "state"
    ours = ["kafka", "redis", "redis-cluster", "kfake", "logs", "clickhouse",
            "clickhouse-demo-20261124120000", "clickhouse-demo-20261124130000", "faust"]
    for name in ours:
        (state / name).mkdir(parents=True)
        (state / name / "data").write_text("x")
    (state / "notes.txt").write_text("the operator's own file")
    (state / "clickhouse-old").mkdir()  # not a name the project writes: kept
    # no service runs in this state folder (stop reads the pid files there); unused ports anyway
    base = 44000 + uuid.uuid4().int % 3000 * 3
    env = {**os.environ, "METERING_STATE_DIR": str(state), "METERING_KAFKA_PORT": str(base),
           "METERING_REDIS_PORT": str(base + 1), "METERING_KFAKE_PORT": str(base + 2),
           "METERING_REDIS_CLUSTER_PORTS": f"{base + 3} {base + 4} {base + 5}"}
    script = str(Path(__file__).resolve().parents[1] / "deploy/local/services.sh")
    out = subprocess.run(["bash", script, "wipe"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert sorted(p.name for p in state.iterdir()) == ["clickhouse-old", "notes.txt"], out.stdout


def test_usage_mistakes_exit_2_and_do_nothing_and_help_is_not_an_error(tmp_path: Path) -> None:
    """`services.sh wipe kafka` (meaning: Kafka's state) deleted every state, the Redis wallets
    and chDB included, and exit 0: wipe ignored the names after it. A name given to a command
    that takes none, an unknown command or service is now a usage error (exit 2, saying what is
    wrong) that touches nothing; `--help` prints the usage on stdout with exit 0 (was exit 1)."""
    import os
    import subprocess

    state = tmp_path / "state"
    (state / "redis").mkdir(parents=True)
    (state / "redis" / "appendonly.aof").write_text("the wallets")
    base = 47000 + uuid.uuid4().int % 3000 * 3
    env = {**os.environ, "METERING_STATE_DIR": str(state), "METERING_KAFKA_PORT": str(base),
           "METERING_REDIS_PORT": str(base + 1), "METERING_KFAKE_PORT": str(base + 2),
           "METERING_REDIS_CLUSTER_PORTS": f"{base + 3} {base + 4} {base + 5}"}
    script = str(Path(__file__).resolve().parents[1] / "deploy/local/services.sh")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", script, *args], env=env, capture_output=True, text=True, timeout=60)

    for args, needle in ((("wipe", "kafka"), "wipe takes no service name (got: kafka)"),
                         (("wipe-redis-cluster", "redis"), "takes no service name"),
                         (("env", "kafka"), "env takes no service name"),
                         (("status", "zookeeper"), "unknown service 'zookeeper'"),
                         (("strat", "kafka"), "unknown command 'strat'"),
                         ((), "no command given")):
        out = run(*args)
        assert out.returncode == 2 and needle in out.stderr and out.stdout == "", (args, out)
        assert (state / "redis" / "appendonly.aof").read_text() == "the wallets", args
    for flag in ("--help", "-h", "help"):
        out = run(flag)
        assert out.returncode == 0 and out.stdout.startswith("usage: "), (flag, out)


def test_logs_prints_the_tail_of_each_named_services_logs(tmp_path: Path) -> None:
    """`services.sh logs [service ...]`: "logs in one place" had no command to show them. It
    prints the last METERING_LOG_LINES lines of each service's files, each headed by its path,
    and says which services have none; a bad line count is a usage error."""
    import os
    import subprocess

    logs = tmp_path / "state" / "logs"
    (logs / "kafka").mkdir(parents=True)
    (logs / "kafka" / "server.log").write_text("".join(f"kafka line {n}\n" for n in range(100)))
    (logs / "redis.log").write_text("redis line 1\nredis line 2\n")
    base = 50000 + uuid.uuid4().int % 3000 * 3
    env = {**os.environ, "METERING_STATE_DIR": str(tmp_path / "state"), "METERING_KAFKA_PORT": str(base),
           "METERING_REDIS_PORT": str(base + 1), "METERING_KFAKE_PORT": str(base + 2),
           "METERING_REDIS_CLUSTER_PORTS": f"{base + 3} {base + 4} {base + 5}", "METERING_LOG_LINES": "3"}
    script = str(Path(__file__).resolve().parents[1] / "deploy/local/services.sh")

    def run(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", script, "logs", *args], env={**env, **extra}, capture_output=True,
                              text=True, timeout=60)

    every = run()
    assert every.returncode == 0, every.stderr
    assert every.stdout.splitlines() == [
        f"==> {logs}/kafka/server.log <==", "kafka line 97", "kafka line 98", "kafka line 99",
        f"==> {logs}/redis.log <==", "redis line 1", "redis line 2",
        f"redis-cluster: no log in {logs} (never started with this METERING_STATE_DIR)",
        f"kfake: no log in {logs} (never started with this METERING_STATE_DIR)"]
    assert run("redis").stdout.splitlines() == [f"==> {logs}/redis.log <==", "redis line 1", "redis line 2"]
    bad = run("redis", METERING_LOG_LINES="all")
    assert bad.returncode == 2 and "METERING_LOG_LINES must be a number" in bad.stderr and bad.stdout == ""
