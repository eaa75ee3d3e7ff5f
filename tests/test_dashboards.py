"""deploy/grafana/mirror.json and deploy/prometheus/alerts.yml against a running node.

Every metric a panel or a rule names must be one the node exports (a renamed
metric would leave a silent empty panel or an alert that never fires), the
rules must pass `promtool check rules`, and so must every dashboard query,
checked the same way as recording rules once Grafana's variables are filled in.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml
from aiohttp import web

from mirror.api.debug import create_debug_app

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "mirror.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (scripts/test installs it)")

#: What a family of each type exposes, by sample-name suffix.
SUFFIXES = {"counter": ("", "_total"),  # 0.0.4 text names counters with their _total
            "gauge": ("",), "histogram": ("_bucket", "_sum", "_count", "_created"),
            "summary": ("", "_sum", "_count", "_created"), "untyped": ("",)}
#: Alerts the issue asks for, by what they watch.
REQUIRED_ALERTS = {"MirrorUpstreamUnreachable", "MirrorHitRatioCollapse", "MirrorStoreAboveHighWatermark",
                   "MirrorFillFailures", "MirrorServingStaleTags", "MirrorPullEventsDropped"}
#: Grafana's variables, with values a plain PromQL parser accepts.
GRAFANA_VARIABLES = {"$__range": "1h", "$__rate_interval": "5m", "$__interval": "1m", "$instance": ".*"}


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return exprs


def rule_exprs() -> list[str]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\bmirror_[a-z0-9_]+\b", expr))


def exposed(text: str) -> set[str]:
    """Every sample name `/metrics` can carry, from its `# TYPE` lines."""
    names = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE):
        names.update(name + suffix for suffix in SUFFIXES[kind])
    return names


@pytest.fixture
async def scrape(make_mirror, relay) -> str:
    node = await make_mirror(relay.url, cache={"max_size": "1GiB"})
    runner = web.AppRunner(create_debug_app(node.node))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        async with httpx.AsyncClient() as client:
            response = await client.get(f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/metrics")
    finally:
        await runner.cleanup()
    assert response.status_code == 200
    return response.text


@pytest.mark.parametrize("source", ["dashboard", "alerts"])
async def test_every_metric_used_exists_on_a_running_node(scrape, source) -> None:
    exprs = dashboard_exprs() if source == "dashboard" else rule_exprs()
    used = set().union(*map(metric_names, exprs))
    assert len(used) >= (15 if source == "dashboard" else 6)
    assert sorted(used - exposed(scrape)) == []
    # The gauges the store panels and the watermark alert compare are filled in at scrape time.
    gauges = ('mirror_store_limit_bytes{level="high"}', 'mirror_disk_bytes{kind="free"}', "mirror_upstream_up ")
    for sample in gauges:
        assert sample in scrape


def test_dashboard_is_import_ready() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 30
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert {"x", "y", "w", "h"} <= grid.keys() and grid["x"] + grid["w"] <= 24
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}" and panel["targets"], panel["title"]


@needs_promtool
def test_alert_rules_pass_promtool() -> None:
    names = {rule["alert"] for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]}
    assert REQUIRED_ALERTS <= names
    result = subprocess.run([PROMTOOL, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_dashboard_queries_parse(tmp_path: Path) -> None:
    """Each panel query, variables filled in, checked by promtool as a recording rule."""
    rules = []
    for number, expr in enumerate(dashboard_exprs()):
        if expr.startswith("label_values("):  # Grafana's own function, not PromQL
            expr = expr[len("label_values("):].split(",")[0]
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        rules.append({"record": f"dashboard:query_{number}", "expr": expr})
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
