"""packaging/METRICS.md against what the daemons register and serve; promtool on the real output."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from lifeboat.control.auth import REFUSAL_REASONS
from lifeboat.control.metrics import ControlMetrics
from lifeboat.master_target.metrics import REJECTION_REASONS as MT_REJECTION_REASONS
from lifeboat.master_target.metrics import MasterTargetMetrics
from lifeboat.mobility.change_log import Tier
from lifeboat.mobility.group import REJECT_REASONS, GroupMetrics
from lifeboat.mobility.metrics import RESYNC_REASONS, SNAPSHOT_PROVIDERS, TIER_REASONS, MobilityMetrics
from lifeboat.process_server.metrics import REJECTION_REASONS, ProcessServerMetrics
from ops_helpers import REPO_ROOT, require_tool

sys.path.insert(0, str(REPO_ROOT / "demo"))
from lab import Lab, bin_path, free_port, to_toml  # noqa: E402

CATALOG = REPO_ROOT / "packaging" / "METRICS.md"
_ROW_RE = re.compile(r"^\| `(lifeboat_\w+)` \| (\w+) \| ([\w-]+) \| ([^|]+) \| [^|]+ \|$")
_VALUES_RE = re.compile(r"^- `(\w+)`(?: \(([^)]*)\))?: (.*)$")
# Unit column implied by the name's suffix (Prometheus naming: base units in the name).
_SUFFIX_UNITS = {"_seconds": "seconds", "_bytes": "bytes", "_ratio": "ratio"}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count", "_created")


def catalog() -> dict[str, dict[str, tuple[str, str, tuple[str, ...]]]]:
    """{daemon: {exposed name: (type, unit, labels)}} from the tables of METRICS.md."""
    out: dict[str, dict] = {}
    daemon = None
    for line in CATALOG.read_text().splitlines():
        if line.startswith("## lifeboat-"):
            daemon = line.split()[1]
            out[daemon] = {}
        elif (m := _ROW_RE.match(line)) and daemon:
            labels = tuple(re.findall(r"`(\w+)`", m.group(4)))
            assert m.group(1) not in out[daemon], f"{m.group(1)} listed twice"
            out[daemon][m.group(1)] = (m.group(2), m.group(3), labels)
    return out


def label_values() -> dict[tuple[str, str], list[str]]:
    """{(label, qualifier): values} from the "Label values" lists."""
    out = {}
    for line in CATALOG.read_text().splitlines():
        if m := _VALUES_RE.match(line):
            out[(m.group(1), m.group(2) or "")] = re.findall(r"`([\w-]+)`", m.group(3).split(" (")[0])
    return out


def registered(*metric_sets) -> dict[str, tuple[str, tuple[str, ...]]]:
    """{exposed name: (type, labels)} of the metric objects the daemons' metrics classes create."""
    out = {}
    for obj in metric_sets:
        for m in vars(obj).values():
            if isinstance(m, MetricWrapperBase):
                name = m._name + "_total" if m._type == "counter" else m._name
                out[name] = (m._type, tuple(m._labelnames))
    return out


def daemon_metrics() -> dict[str, dict[str, tuple[str, tuple[str, ...]]]]:
    r1, r2, r3 = CollectorRegistry(), CollectorRegistry(), CollectorRegistry()
    return {
        "lifeboat-mobility": registered(MobilityMetrics(r1), GroupMetrics(r1)),
        "lifeboat-process-server": registered(ProcessServerMetrics(r2), ControlMetrics(r2)),
        "lifeboat-master-target": registered(MasterTargetMetrics(r3)),
    }


def catalog_names() -> set[str]:
    return {name for metrics in catalog().values() for name in metrics}


def test_catalog_matches_registered_metrics():
    doc, code = catalog(), daemon_metrics()
    assert sorted(doc) == sorted(code)
    for daemon in code:
        assert {n: (t, labels) for n, (t, _, labels) in doc[daemon].items()} == code[daemon], daemon


def test_catalog_units_follow_the_names():
    for metrics in catalog().values():
        for name, (_, unit, _) in metrics.items():
            base = name.removesuffix("_total").removesuffix("_timestamp_seconds") + (
                "_seconds" if name.endswith("_timestamp_seconds") else "")
            implied = next((u for s, u in _SUFFIX_UNITS.items() if base.endswith(s)), None)
            if implied:
                assert unit == implied, f"{name}: unit {unit}, name says {implied}"
            else:
                assert unit not in _SUFFIX_UNITS.values(), f"{name}: unit {unit} belongs in the name"


def test_catalog_label_values_match_the_code():
    values = label_values()
    assert values[("reason", "resyncs")] == list(RESYNC_REASONS)
    assert values[("reason", "tier changes")] == list(TIER_REASONS)
    assert values[("provider", "")] == list(SNAPSHOT_PROVIDERS)
    assert values[("tier", "")] == [t.name.lower() for t in Tier]
    assert values[("reason", "rejections")] == list(REJECTION_REASONS)
    assert values[("reason", "group rejected")] == list(REJECT_REASONS)
    assert values[("reason", "control refusals")] == list(REFUSAL_REASONS)
    assert values[("reason", "mt rejections")] == list(MT_REJECTION_REASONS)


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return resp.read().decode()


def exposed_families(text: str) -> set[str]:
    return {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}


def promtool_check(text: str) -> None:
    promtool = require_tool("promtool")
    proc = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    # promtool prints lint problems and still exits 0 for some of them: any output is a failure.
    assert proc.returncode == 0 and not proc.stdout.strip() and not proc.stderr.strip(), proc.stdout + proc.stderr


def test_real_metrics_pass_promtool_and_are_catalogued(tmp_path: Path):
    """Each daemon's real /metrics after real work: promtool-clean, and only catalogued families."""
    require_tool("promtool")
    names = catalog_names()
    exposed: dict[str, str] = {}
    lab = Lab(tmp_path / "lab")
    mt = None
    try:
        lab.start_ps()
        disk = tmp_path / "disk0.img"
        disk.write_bytes(os.urandom(1 << 20))
        agent_port = free_port()
        agent = lab.start_agent("metrics", {"disk0": str(disk)}, extra={"metrics": {"host": "127.0.0.1",
                                                                                     "port": agent_port}})
        lab.wait_points(1, timeout=60)
        exposed["lifeboat-mobility"] = scrape(agent_port)
        exposed["lifeboat-process-server"] = scrape(lab.ps_metrics_port)
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(60) == 0

        mt_port = free_port()
        conf = tmp_path / "master-target.toml"
        conf.write_text(to_toml({"state_dir": str(tmp_path / "mt-state"),
                                 "ingest": {"host": "127.0.0.1", "port": 0, "tls_cert": lab.init["server_cert"],
                                            "tls_key": lab.init["server_key"]},
                                 "metrics": {"host": "127.0.0.1", "port": mt_port}, "log": {"format": "kv"}}))
        mt = subprocess.Popen([bin_path("lifeboat-master-target"), "-c", str(conf)], stderr=lab.log)
        deadline = time.monotonic() + 30
        while "lifeboat-master-target" not in exposed:
            try:
                exposed["lifeboat-master-target"] = scrape(mt_port)
            except OSError:
                assert time.monotonic() < deadline and mt.poll() is None, "master target did not serve /metrics"
                time.sleep(0.1)
    finally:
        if mt is not None:
            mt.send_signal(signal.SIGTERM)
            mt.wait(30)
        lab.close()
    for daemon, text in exposed.items():
        promtool_check(text)
        families = {f.removesuffix("_created") for f in exposed_families(text)}
        unknown = {f for f in families if f not in names and f + "_total" not in names}
        assert not unknown, f"{daemon} serves metrics missing from {CATALOG.name}: {sorted(unknown)}"


def metric_names_in(expr_text: str) -> set[str]:
    """lifeboat_* names an expression uses, with histogram/counter series suffixes mapped to the family."""
    out = set()
    for name in re.findall(r"\blifeboat_\w+", expr_text):
        for suffix in HISTOGRAM_SUFFIXES:
            if name.endswith(suffix) and name.removesuffix(suffix) in catalog_names():
                name = name.removesuffix(suffix)
        out.add(name)
    return out


ALERTS = REPO_ROOT / "packaging" / "prometheus" / "alerts.yml"
ALERT_TESTS = REPO_ROOT / "packaging" / "prometheus" / "alerts_test.yml"
DASHBOARD = REPO_ROOT / "packaging" / "grafana" / "lifeboat.json"


def dashboard_exprs() -> list[str]:
    import json

    doc = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in doc["templating"]["list"] if "definition" in v]
    return exprs


def alert_exprs() -> list[str]:
    return [line.split("expr:", 1)[1].strip() for line in ALERTS.read_text().splitlines()
            if line.strip().startswith("expr:")]


@pytest.mark.parametrize("source", ["alerts", "dashboard"])
def test_every_referenced_metric_is_catalogued(source):
    exprs = alert_exprs() if source == "alerts" else dashboard_exprs()
    assert exprs, f"no expressions found in the {source}"
    used = set().union(*map(metric_names_in, exprs))
    missing = used - catalog_names()
    assert not missing, f"the {source} use metrics that no daemon exports: {sorted(missing)}"


def test_alerts_cover_the_operations_list():
    names = set(re.findall(r"alert: (\w+)", ALERTS.read_text()))
    for needed in ("LifeboatRPOHigh", "LifeboatCacheFreeLow", "LifeboatCacheFreeCritical", "LifeboatNoHeartbeat",
                   "LifeboatResyncRequired", "LifeboatChurnTooHigh"):
        assert needed in names


def test_promtool_check_and_test_rules():
    promtool = require_tool("promtool")
    for args in (["check", "rules", str(ALERTS)], ["test", "rules", str(ALERT_TESTS)]):
        proc = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dashboard_queries_parse(tmp_path: Path):
    """promtool has no query linter: the dashboard's queries become recording rules it checks."""
    import json

    promtool = require_tool("promtool")
    doc = json.loads(DASHBOARD.read_text())
    assert len({p["id"] for p in doc["panels"]}) == len(doc["panels"])
    exprs = [e.replace("$instance", ".*") for e in dashboard_exprs() if not e.startswith("label_values(")]
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"lifeboat_dashboard:query{i}", "expr": e} for i, e in enumerate(exprs)]}]}
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(json.dumps(rules))  # JSON is YAML
    proc = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
