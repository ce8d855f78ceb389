"""Workers reload the catalog file when it changes (pure file logic, no services)."""

from __future__ import annotations

from pathlib import Path

import yaml
from prometheus_client import REGISTRY

from metering.workers.common import CatalogWatcher
from tests.helpers import catalog_dict


def _info() -> dict[str, float]:
    return {s.labels["version"]: s.value for m in REGISTRY.collect() if m.name == "metering_catalog_info"
            for s in m.samples}


def test_the_catalog_info_metric_shows_the_version_in_force_only(tmp_path: Path) -> None:
    path = tmp_path / "catalog.yaml"
    data = catalog_dict()
    data["version"] = "w-1"
    path.write_text(yaml.safe_dump(data))
    watcher = CatalogWatcher(str(path), every_s=0)
    assert _info().get("w-1") == 1
    data["version"] = "w-2"
    path.write_text(yaml.safe_dump(data))
    assert watcher.changed() is not None and watcher.catalog.version == "w-2"
    info = _info()
    assert info.get("w-2") == 1 and "w-1" not in info  # no series left behind per old version
    path.write_text("version: [broken")  # refused: the running version stays the one shown
    assert watcher.changed() is None and _info().get("w-2") == 1
