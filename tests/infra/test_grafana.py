"""The Grafana dashboard (infra/grafana/): a panel per metric runq exposes, each querying
Prometheus per function, each query valid PromQL."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from tests.infra.helpers import (
    DASHBOARD,
    METRIC_NAME,
    metric_families,
    promtool,
)


def dashboard() -> dict[str, Any]:
    board: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return board


def dashboard_exprs() -> list[str]:
    return [target["expr"] for panel in dashboard()["panels"] for target in panel["targets"]]


def test_dashboard_panels_query_prometheus_for_each_function() -> None:
    board = dashboard()
    assert 36 <= board["schemaVersion"] <= 41
    variables = {variable["name"]: variable for variable in board["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    function = variables["function"]
    assert function["definition"] == "label_values(runq_queue_depth, function)"
    assert function["query"]["query"] == function["definition"]
    panels = board["panels"]
    assert len({panel["id"] for panel in panels}) == len(panels)
    for panel in panels:
        datasources = [panel["datasource"], *(t["datasource"] for t in panel["targets"])]
        assert all(ds == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"} for ds in datasources)
        assert panel["targets"], panel["title"]
        assert all(target["expr"].strip() for target in panel["targets"]), panel["title"]
        assert all('function=~"$function"' in t["expr"] for t in panel["targets"]), panel["title"]
    queried = {name for expr in dashboard_exprs() for name in METRIC_NAME.findall(expr)}
    # Every metric runq exposes has a panel.
    for family in metric_families():
        series = {family, *(f"{family}_{suffix}" for suffix in ("bucket", "count", "total"))}
        assert series & queried, f"no panel shows {family}"


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses each query, Grafana's variables filled in, as a recording rule."""
    rules = [
        {
            "record": f"dashboard:query_{i}",
            "expr": expr.replace("$__rate_interval", "1m").replace("$function", ".*"),
        }
        for i, expr in enumerate(dashboard_exprs())
    ]
    assert rules
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
