"""The alert rules and the Grafana dashboard in docs/ name only series we export."""

from __future__ import annotations

import json
import re

import yaml

from coordinator.ops.metrics import Metrics
from tests.support import ROOT

SERIES = re.compile(r"\b((?:dtm|coordinator)_[a-z_]+)")


def exported() -> set[str]:
    names: set[str] = set()
    for family in Metrics().registry.collect():
        names.add(family.name)
        for suffix in ("_total", "_bucket", "_count", "_sum"):
            names.add(family.name + suffix)
    return names


def test_alert_rules_use_exported_series() -> None:
    rules = yaml.safe_load((ROOT / "docs" / "prometheus-alerts.yml").read_text())
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    used = {m for e in exprs for m in SERIES.findall(str(e))}
    assert {"coordinator_oldest_due_age_seconds", "dtm_transaction_process_total",
            "coordinator_due_backlog"} <= used
    assert used <= exported(), used - exported()


def test_grafana_dashboard_uses_exported_series() -> None:
    dash = json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in SERIES.findall(e)}
    assert len(used) >= 10
    assert used <= exported(), used - exported()
