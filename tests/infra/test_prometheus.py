"""infra/prometheus/: the scrape config, the alert rules and their promtool unit tests, and no
metric name that runq/metrics.py does not expose."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import yaml

from tests.infra.helpers import (
    ALERT_RULES,
    ALERT_RULES_TEST,
    DASHBOARD,
    METRIC_NAME,
    PROMETHEUS,
    compose,
    exposed_metric_names,
    promtool,
)

# prometheus.yml -------------------------------------------------------------------------------


def test_prometheus_scrapes_the_gateway_metrics() -> None:
    prometheus = compose()["services"]["prometheus"]
    assert prometheus["image"].startswith("prom/prometheus:")
    mounts = [volume.split(":") for volume in prometheus["volumes"]]
    assert ["./infra/prometheus/prometheus.yml", "/etc/prometheus/prometheus.yml", "ro"] in mounts
    config = yaml.safe_load(PROMETHEUS.read_text())
    jobs = config["scrape_configs"]
    gateway = next(job for job in jobs if "gateway:8000" in job["static_configs"][0]["targets"])
    assert gateway.get("metrics_path", "/metrics") == "/metrics"


def test_prometheus_loads_the_alert_rules_mounted_next_to_its_config() -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    assert config["rule_files"] == [ALERT_RULES.name]
    # prometheus.yml's rule_files are relative to it: the rules are mounted beside it.
    mounts = [volume.split(":") for volume in compose()["services"]["prometheus"]["volumes"]]
    assert ["./infra/prometheus/rules.yml", "/etc/prometheus/rules.yml", "ro"] in mounts


def test_promtool_accepts_the_alert_rules_and_the_config() -> None:
    rules = promtool("check", "rules", str(ALERT_RULES))
    assert rules.returncode == 0, rules.stdout + rules.stderr
    # Also loads rule_files, relative to the config file.
    config = promtool("check", "config", str(PROMETHEUS))
    assert config.returncode == 0, config.stdout + config.stderr
    assert "1 rule files found" in config.stdout + config.stderr


# the alert rules ------------------------------------------------------------------------------


ALERTS = (
    "RunqQueueBackingUp",
    "RunqQueueWaitHigh",
    "RunqHighErrorRate",
    "RunqHighServerErrorRate",
    "RunqNoWorkersWhileTasksWait",
    "RunqTasksWaitNothingEnds",
    "RunqShedding",
)


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERT_RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def test_alert_rules_fire_when_they_should_and_not_otherwise() -> None:
    tested = {
        case["alertname"]
        for test in yaml.safe_load(ALERT_RULES_TEST.read_text())["tests"]
        for case in test["alert_rule_test"]
    }
    assert tested == set(ALERTS)
    result = promtool("test", "rules", ALERT_RULES_TEST.name, cwd=ALERT_RULES_TEST.parent)
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_wait_and_carry_a_severity_and_a_summary() -> None:
    rules = alert_rules()
    assert sorted(rule["alert"] for rule in rules) == sorted(ALERTS)
    for rule in rules:
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]
        # An alert per function: every rule keeps the function label.
        assert "$labels.function" in rule["annotations"]["summary"], rule["alert"]
    waits = {rule["alert"]: rule["for"] for rule in rules}
    assert waits["RunqNoWorkersWhileTasksWait"] == "2m"


def test_rules_and_dashboard_name_only_metrics_runq_exposes() -> None:
    for path in (ALERT_RULES, ALERT_RULES_TEST, DASHBOARD):
        referenced = set(METRIC_NAME.findall(path.read_text()))
        assert referenced, path
        unknown = referenced - exposed_metric_names()
        assert not unknown, f"{path.name} names {sorted(unknown)}, not in runq/metrics.py"


def test_promtool_checks_are_not_vacuous(tmp_path: Path) -> None:
    rules = yaml.safe_load(ALERT_RULES.read_text())
    rule = rules["groups"][0]["rules"][0]
    rule["exp"] = rule.pop("expr")
    broken = tmp_path / "rules.yml"
    broken.write_text(yaml.safe_dump(rules))
    assert promtool("check", "rules", str(broken)).returncode != 0

    # An alert that no longer fires fails its unit test.
    rules = yaml.safe_load(ALERT_RULES.read_text())
    for rule in rules["groups"][0]["rules"]:
        if rule["alert"] == "RunqNoWorkersWhileTasksWait":
            rule["for"] = "5m"
    broken.write_text(yaml.safe_dump(rules))
    shutil.copy(ALERT_RULES_TEST, tmp_path / ALERT_RULES_TEST.name)
    result = promtool("test", "rules", ALERT_RULES_TEST.name, cwd=tmp_path)
    assert result.returncode != 0
    assert "RunqNoWorkersWhileTasksWait" in result.stdout + result.stderr
