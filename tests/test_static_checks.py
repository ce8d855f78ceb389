"""ruff and mypy (strict on rating, schemas, wallet_debiter, metering) are part of the suite, and
the READMEs name every METERING_* variable the code reads (and none it does not)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_is_clean() -> None:
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-1000:]


def test_mypy_strict_is_clean() -> None:
    proc = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-1000:]


def _env_names(paths: list[Path]) -> set[str]:
    return {name for path in paths for name in re.findall(r"METERING_[A-Z0-9_]+", path.read_text())}


def test_every_metering_variable_the_code_reads_is_documented_and_no_other() -> None:
    from metering.config import env_names

    code = [p for pkg in ("metering", "wallet_debiter", "rating", "schemas") for p in (ROOT / pkg).rglob("*.py")]
    code += [*(ROOT / "deploy/local").glob("*.sh"), *(ROOT / "deploy/local/kfake").glob("*.go")]
    read = _env_names(code) | set(env_names()) | {"METERING_TOPIC_PREFIX"}
    read_by_tests = _env_names([*(ROOT / "tests").glob("*.py")])
    documented = _env_names([ROOT / "README.md", ROOT / "deploy/local/README.md"])
    assert not read - documented, f"read by the code, in no README: {sorted(read - documented)}"
    unread = documented - read - read_by_tests
    assert not unread, f"named in a README, read by nothing: {sorted(unread)}"
