"""`lifeboat doctor`: the checks operators otherwise do by hand, each with a fix.

It reads daemon configs (the schema is detected, or named with --process-server / --mobility /
--master-target) and checks, from the machine it runs on: reachability of the ports the config
names (9443 ingest, the process server URL, 20004 group members, 443 for an Azure repository,
9444 once the master target has a data port), certificates (readable, valid, expiry, signed by
the CA, matching key), clock skew against the process server, cache free space and
writability, repository unlock and write permission (a probe object written and deleted), and
each disk's tracking tier from a running agent's /healthz.

One line per check, `OK|WARN|FAIL|SKIP <check>: <finding>`, and `  fix: <what to do>` after
every WARN and FAIL. Exit status 0 without FAIL, 1 with any. Secrets (token, key, passphrase,
connection string) are read only to be used, never printed.
"""

from __future__ import annotations

import asyncio
import datetime
import email.utils
import http.client
import json
import os
import secrets
import socket
import ssl
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass, field

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cryptography import x509

from ..core import config as cfgmod
from ..core import tls
from ..core.errors import ConfigError, LifeboatError
from ..repository.backend import check_name
from ..repository.local import LocalBackend

DEFAULT_CONFIGS = ("/etc/lifeboat/process-server.toml", "/etc/lifeboat/mobility.toml",
                   "/etc/lifeboat/master-target.toml")
DETECT_ORDER = ("process-server", "mobility", "master-target")  # master-target's keys are all optional: last
UNIT = {"process-server": "lifeboat-process-server", "mobility": "lifeboat-mobility",
        "master-target": "lifeboat-master-target"}

CERT_WARN_DAYS = 30
SKEW_WARN_SECONDS = 30.0
SKEW_FAIL_SECONDS = 300.0
CACHE_FREE_WARN = 0.30   # the reference's warning / critical cache free-space thresholds
CACHE_FREE_FAIL = 0.25
REPOSITORY_TIMEOUT_SECONDS = 60.0
PROBE_PREFIX = "doctor/probe-"

STATUSES = ("OK", "WARN", "FAIL", "SKIP")


@dataclass
class Check:
    status: str
    check: str
    finding: str
    fix: str = ""
    config: str = ""
    daemon: str = ""


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)
    config: str = ""
    daemon: str = ""

    def add(self, status: str, check: str, finding: str, fix: str = "") -> Check:
        assert status in STATUSES
        c = Check(status, check, finding, fix if status in ("WARN", "FAIL") else "", self.config, self.daemon)
        self.checks.append(c)
        return c


# --- helpers --------------------------------------------------------------------------------

def _connect_host(host: str) -> str:
    """A listener bound to the wildcard address is checked on loopback."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def tcp_probe(host: str, port: int, timeout: float) -> str | None:
    """None if a TCP connection to host:port succeeds, else why not."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except socket.timeout:
        return f"no answer within {timeout:g} s (filtered by a firewall, or the host is down)"
    except socket.gaierror as exc:
        return f"cannot resolve {host}: {exc.strerror}"
    except ConnectionRefusedError:
        return "connection refused (nothing is listening)"
    except OSError as exc:
        return exc.strerror or str(exc)


def _fmt_date(d: datetime.datetime) -> str:
    return d.strftime("%Y-%m-%d %H:%M:%S UTC")


def _load_cert(path: str) -> x509.Certificate:
    # Imported here: every `lifeboat` command loads this module to build its parser, and
    # cryptography.x509 alone is ~30 ms of start-up (a failover's RTO counts it).
    from cryptography import x509

    with open(cfgmod.resolve_credential(path), "rb") as f:
        return x509.load_pem_x509_certificate(f.read())


def check_cert(rep: Report, label: str, path: str, fix_renew: str, ca_path: str | None = None,
               key_path: str | None = None, now: datetime.datetime | None = None) -> bool:
    """Readable, valid now, not expiring within CERT_WARN_DAYS, signed by the CA, matching its key."""
    name = f"certificate {label}"
    now = now or datetime.datetime.now(datetime.timezone.utc)
    try:
        cert = _load_cert(path)
    except (OSError, ConfigError) as exc:
        rep.add("FAIL", name, f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}",
                f"check the path in the config and that the daemon's user can read it; {fix_renew}")
        return False
    except ValueError as exc:
        rep.add("FAIL", name, f"{path} is not a PEM certificate: {exc}", fix_renew)
        return False
    after, before = cert.not_valid_after_utc, cert.not_valid_before_utc
    if after < now:
        rep.add("FAIL", name, f"{path} expired on {_fmt_date(after)}", fix_renew)
        return False
    if before > now:
        rep.add("FAIL", name, f"{path} is not valid before {_fmt_date(before)} (is this machine's clock behind?)",
                f"check the clock (timedatectl; NTP), or {fix_renew}")
        return False
    problems = []
    if ca_path:
        try:
            ca = _load_cert(ca_path)
            cert.verify_directly_issued_by(ca)
        except (OSError, ConfigError) as exc:
            rep.add("FAIL", name, f"cannot read its CA {ca_path}: {getattr(exc, 'strerror', None) or exc}",
                    "check the CA path in the config (the tls/ca.pem of 'lifeboat init')")
            return False
        except Exception as exc:  # InvalidSignature (no message), or a CA key type that cannot sign
            problems.append(f"not signed by the CA {ca_path} ({type(exc).__name__}{': ' + str(exc) if str(exc) else ''})")
    if key_path:
        from cryptography.hazmat.primitives import serialization

        try:
            with open(cfgmod.resolve_credential(key_path), "rb") as f:
                key = serialization.load_pem_private_key(f.read(), None)
            pub = serialization.PublicFormat.SubjectPublicKeyInfo
            if key.public_key().public_bytes(serialization.Encoding.DER, pub) != \
                    cert.public_key().public_bytes(serialization.Encoding.DER, pub):
                problems.append(f"its key {key_path} does not belong to it")
        except (OSError, ConfigError) as exc:
            problems.append(f"cannot read its key {key_path}: {getattr(exc, 'strerror', None) or exc}")
        except (ValueError, TypeError) as exc:
            problems.append(f"its key {key_path} is not an unencrypted PEM private key ({exc})")
    if problems:
        rep.add("FAIL", name, f"{path}: {'; '.join(problems)}", fix_renew)
        return False
    days = (after - now).total_seconds() / 86400
    if days < CERT_WARN_DAYS:
        rep.add("WARN", name, f"{path} expires on {_fmt_date(after)} (in {days:.0f} days)", fix_renew)
        return True
    rep.add("OK", name, f"{path} valid until {_fmt_date(after)}" + (", signed by the CA" if ca_path else ""))
    return True


def check_secret_file(rep: Report, label: str, path: str, key: str) -> None:
    """Readable and non-empty; the content is never shown."""
    try:
        with open(cfgmod.resolve_credential(path), "rb") as f:
            data = f.read().strip()
    except (OSError, ConfigError) as exc:
        rep.add("FAIL", label, f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}",
                f"check {key} and that the daemon's user can read the file")
        return
    if not data:
        rep.add("FAIL", label, f"{path} is empty", f"put the secret in {path} (or fix {key})")
        return
    rep.add("OK", label, f"{path} readable")


def check_port(rep: Report, label: str, host: str, port: int, timeout: float, fix: str,
               status_if_closed: str = "FAIL") -> bool:
    host = _connect_host(host)
    why = tcp_probe(host, port, timeout)
    if why is None:
        rep.add("OK", label, f"{_hostport(host, port)} accepts TCP connections")
        return True
    rep.add(status_if_closed, label, f"{_hostport(host, port)}: {why}", fix)
    return False


def free_ratio(path: str) -> tuple[float, int, int]:
    st = os.statvfs(path)
    total = st.f_blocks * st.f_frsize
    avail = st.f_bavail * st.f_frsize
    return (avail / total if total else 0.0), avail, total


def _existing_parent(path: str) -> str:
    p = os.path.abspath(path)
    while not os.path.exists(p):
        p = os.path.dirname(p)
    return p


def _mount_point(path: str) -> str:
    p = os.path.realpath(path)
    while not os.path.ismount(p):
        p = os.path.dirname(p)
    return p


def check_dir(rep: Report, label: str, path: str, key: str, space: bool) -> None:
    """Writable (a probe file created and removed) and, for the cache, free space against the thresholds."""
    where = path if os.path.isdir(path) else _existing_parent(path)
    if where != path and not os.path.exists(path):
        note = f" ({path} does not exist yet; the daemon creates it under {where})"
    else:
        note = ""
    try:
        fd, probe = tempfile.mkstemp(prefix=".lifeboat-doctor-", dir=where)
        os.close(fd)
        os.unlink(probe)
        rep.add("OK", f"{label} writable", f"{where} is writable{note}")
    except OSError as exc:
        rep.add("FAIL", f"{label} writable", f"cannot create a file in {where}: {exc.strerror}{note}",
                f"make {path} writable by the daemon's user (the packages' units use StateDirectory=), "
                f"or set {key} to a writable directory")
    if not space:
        return
    try:
        ratio, avail, total = free_ratio(where)
    except OSError as exc:
        rep.add("FAIL", f"{label} free space", f"statvfs({where}): {exc.strerror}", f"check {key}")
        return
    mount = _mount_point(where)
    finding = (f"{ratio:.0%} free on {mount} ({avail / 2**20:.0f} of {total / 2**20:.0f} MiB) holding {path}")
    fix = (f"free space on {mount} or move {key} to a larger filesystem (the process server throttles agents "
           f"when the cache fills; below {CACHE_FREE_FAIL:.0%} free is critical)")
    if ratio < CACHE_FREE_FAIL:
        rep.add("FAIL", f"{label} free space", f"{finding}: below {CACHE_FREE_FAIL:.0%}", fix)
    elif ratio < CACHE_FREE_WARN:
        rep.add("WARN", f"{label} free space", f"{finding}: below {CACHE_FREE_WARN:.0%}", fix)
    else:
        rep.add("OK", f"{label} free space", finding)


def azure_endpoint(conn: str) -> tuple[str, int] | None:
    """(host, port) of the blob endpoint of an Azure Storage connection string."""
    parts = dict(p.split("=", 1) for p in conn.split(";") if "=" in p)
    url = parts.get("BlobEndpoint")
    if not url and parts.get("AccountName"):
        proto = parts.get("DefaultEndpointsProtocol", "https")
        url = f"{proto}://{parts['AccountName']}.blob.{parts.get('EndpointSuffix', 'core.windows.net')}"
    if not url:
        return None
    u = urllib.parse.urlsplit(url)
    if not u.hostname:
        return None
    return u.hostname, u.port or (443 if u.scheme == "https" else 80)


async def check_repository(rep: Report, rcfg: cfgmod.RepositoryConfig, timeout: float) -> None:
    from ..repository.open import backend_from_config, unlocker_from_config
    from ..repository.repo import Repository

    name = "repository access"
    fix_unlock = ("repository.key_file / passphrase_file must be the key 'lifeboat init' wrote for this repository "
                  "(readable by the daemon's user)")
    if rcfg.url.startswith("azure://"):
        conn = None
        if rcfg.azure_connection_string_file:
            try:
                with open(cfgmod.resolve_credential(rcfg.azure_connection_string_file)) as f:
                    conn = f.read().strip()
            except (OSError, ConfigError):
                conn = None
        ep = azure_endpoint(conn) if conn else None
        if ep:
            check_port(rep, f"port {ep[1]} (Azure blob endpoint)", ep[0], ep[1], timeout,
                       f"allow outbound TCP {ep[1]} to {ep[0]} (firewall, proxy), or fix the connection string")
        else:
            rep.add("FAIL", "port 443 (Azure blob endpoint)",
                    f"no blob endpoint in {rcfg.azure_connection_string_file or '(no connection string file)'}",
                    "set repository.azure_connection_string_file to a file holding the storage account's "
                    "connection string")
    else:
        rep.add("SKIP", "port 443 (Azure blob endpoint)", f"repository {rcfg.url} is local: no Azure endpoint")
    try:
        backend = backend_from_config(rcfg)
    except LifeboatError as exc:
        rep.add("FAIL", name, str(exc), "fix the [repository] section")
        return
    try:
        try:
            repo = await asyncio.wait_for(Repository.open(backend, unlocker_from_config(rcfg)),
                                          REPOSITORY_TIMEOUT_SECONDS)
        except asyncio.TimeoutError:
            rep.add("FAIL", name, f"{backend.location}: no answer in {REPOSITORY_TIMEOUT_SECONDS:.0f} s",
                    "check the network path to the repository")
            return
        except LifeboatError as exc:
            rep.add("FAIL", name, f"cannot open {backend.location}: {exc}",
                    fix_unlock if "key" in type(exc).__name__.lower() or "unlock" in str(exc).lower()
                    else "check repository.url and that the repository was created ('lifeboat init')")
            return
        rep.add("OK", name, f"{backend.location} opened and unlocked (repository {repo.id})")
        probe = check_name(f"{PROBE_PREFIX}{secrets.token_hex(8)}")
        payload = secrets.token_bytes(32)
        try:
            await asyncio.wait_for(backend.put(probe, payload), REPOSITORY_TIMEOUT_SECONDS)
            back = await asyncio.wait_for(backend.get(probe), REPOSITORY_TIMEOUT_SECONDS)
            await asyncio.wait_for(backend.delete(probe), REPOSITORY_TIMEOUT_SECONDS)
        except (LifeboatError, asyncio.TimeoutError) as exc:
            rep.add("FAIL", "repository write", f"writing, reading back and deleting {probe} in {backend.location}: "
                    f"{str(exc) or type(exc).__name__}",
                    "give the daemon's user write permission on the repository directory, or a connection string "
                    "whose key/SAS allows write and delete")
            return
        if back != payload:
            rep.add("FAIL", "repository write", f"{probe} read back different bytes", "check the storage backend")
            return
        rep.add("OK", "repository write", f"wrote, read back and deleted {probe}")
        if isinstance(backend, LocalBackend):  # leave no empty doctor/ folder behind
            try:
                os.rmdir(os.path.join(backend.root, PROBE_PREFIX.split("/")[0]))
            except OSError:
                pass
    finally:
        await backend.close()


def https_date(url: str, ca_path: str, timeout: float) -> tuple[float, float]:
    """(server Date, local midpoint) of one HTTPS request, verified against the CA."""
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPSConnection(u.hostname, u.port or 443, timeout=timeout,
                                       context=tls.client_context(cfgmod.resolve_credential(ca_path)))
    try:
        t0 = time.time()
        conn.request("GET", "/")
        resp = conn.getresponse()
        t1 = time.time()
        resp.read()
        date = resp.getheader("Date")
    finally:
        conn.close()
    if not date:
        raise ValueError("the response has no Date header")
    return email.utils.parsedate_to_datetime(date).timestamp(), (t0 + t1) / 2


def check_clock(rep: Report, url: str, ca_path: str, timeout: float) -> None:
    try:
        server, local = https_date(url, ca_path, timeout)
    except ssl.SSLCertVerificationError as exc:
        rep.add("FAIL", "process server TLS", f"{url}: {exc.verify_message or exc}",
                "the process server's certificate must be signed by process_server.ca_cert and name the URL's "
                "host (lifeboat init --hosts)")
        return
    except (OSError, ssl.SSLError, ValueError, http.client.HTTPException, ConfigError) as exc:
        rep.add("FAIL", "process server TLS", f"{url}: HTTPS request failed: {exc}",
                "check that the URL is the process server's ingest port (https) and its TLS settings")
        return
    rep.add("OK", "process server TLS", f"{url} presented a certificate signed by {ca_path}")
    skew = server - local
    finding = f"this machine's clock is {abs(skew):.0f} s {'behind' if skew > 0 else 'ahead of'} the process server's"
    fix = "synchronise both clocks with NTP (timedatectl set-ntp true, or chrony)"
    if abs(skew) > SKEW_FAIL_SECONDS:
        rep.add("FAIL", "clock skew", finding, fix)
    elif abs(skew) > SKEW_WARN_SECONDS:
        rep.add("WARN", "clock skew", finding, fix)
    else:
        rep.add("OK", "clock skew", f"{abs(skew):.0f} s against the process server (Date header, 1 s resolution)")


def check_tiers(rep: Report, cfg: cfgmod.MobilityConfig, timeout: float) -> None:
    m = cfg.metrics
    if not m.port:
        rep.add("WARN", "tracking tier", "metrics.port = 0 (any free port): the agent's /healthz cannot be found",
                "set metrics.port to a fixed port to let doctor and Prometheus reach the agent")
        return
    host = _connect_host(m.host)
    url = f"http://{_hostport(host, m.port)}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            body = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        try:
            body = json.loads(exc.read())
        except ValueError:
            rep.add("WARN", "tracking tier", f"{url} answered {exc.code}", "see journalctl -u lifeboat-mobility")
            return
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        rep.add("WARN", "tracking tier", f"the agent is not running (no /healthz at {url}: {reason})",
                "start it: systemctl start lifeboat-mobility (journalctl -u lifeboat-mobility tells why it stopped)")
        return
    disks = body.get("disks") or {}
    for d in cfg.disks:
        info = disks.get(f"{cfg.machine}.{d.id}", disks.get(d.id))  # the agent names disks <machine>.<id>
        label = f"tracking tier {d.id}"
        if info is None:
            rep.add("WARN", label, "the running agent does not report this disk (started with another config?)",
                    "restart the agent: systemctl restart lifeboat-mobility")
            continue
        tracker, tier, reason = info.get("tracker"), info.get("tier"), info.get("tier_reason")
        why = f" ({reason})" if reason else ""
        if tracker != "tracepoint" or tier is None:
            rep.add("OK", label, f"{tracker} tracker: every cycle reads and hashes every block")
        elif tier == "data":
            rep.add("OK", label, "tracepoint tracker, tier data (changes and their data kept)")
        elif tier in ("extents", "bitmap"):
            rep.add("WARN", label, f"tracepoint tracker, tier {tier}{why}: changed data is re-read from the live "
                    "disk, points are not crash-consistent until the backlog drains",
                    "let the agent catch up (check the process server link and upload throughput), or raise "
                    "tracking.memory_pool_bytes / spill_bytes / extent_budget")
        else:
            rep.add("FAIL", label, f"tracepoint tracker, tier {tier}{why}: the next cycle resyncs the disk",
                    "let the resync finish (it reads the whole disk); if it recurs, raise the tracking budgets "
                    "or tracking.trace_buffer_kb")


# --- per daemon -----------------------------------------------------------------------------

def check_ps_config(rep: Report, cfg: cfgmod.ProcessServerConfig, timeout: float) -> list:
    i = cfg.ingest
    check_port(rep, f"port {i.port} (ingest)", i.host, i.port, timeout,
               "start the process server (systemctl start lifeboat-process-server; journalctl -u "
               "lifeboat-process-server tells why it stopped)")
    tls_dir = os.path.dirname(cfgmod.resolve_credential(i.tls_cert)) if not i.tls_cert.startswith("%d/") else ""
    ca = os.path.join(tls_dir, "ca.pem") if tls_dir else ""
    check_cert(rep, "server", i.tls_cert,
               "issue a new server certificate from the CA of 'lifeboat init', point ingest.tls_cert/tls_key at it "
               "and restart the process server",
               ca_path=ca if ca and os.path.isfile(ca) else None, key_path=i.tls_key)
    if not (ca and os.path.isfile(ca)):
        rep.add("SKIP", "certificate server CA", f"no ca.pem next to {i.tls_cert}: signature not checked "
                "(the agents' check covers it)")
    else:
        check_cert(rep, "CA", ca, "create a new CA and certificates with 'lifeboat init', then reissue member "
                   "certificates and hand the new ca.pem to every agent")
    check_secret_file(rep, "agent token", i.agent_token_file, "ingest.agent_token_file")
    check_dir(rep, "cache", cfg.cache.dir, "cache.dir", space=True)
    rep.add("SKIP", "clock skew", "checked from each agent (run doctor with the mobility config there)")
    return [check_repository(rep, cfg.repository, timeout)]


def check_mobility_config(rep: Report, cfg: cfgmod.MobilityConfig, timeout: float) -> list:
    link = cfg.process_server
    u = urllib.parse.urlsplit(link.url)
    host, port = u.hostname or "", u.port or (443 if u.scheme == "https" else 80)
    if u.scheme != "https" or not host:
        rep.add("FAIL", "process server", f"process_server.url {link.url!r} is not an https:// URL",
                "set process_server.url to https://<process server>:9443")
        reachable = False
    else:
        reachable = check_port(rep, f"process server {_hostport(host, port)}", host, port, timeout,
                               f"start the process server at {_hostport(host, port)} (systemctl start "
                               f"lifeboat-process-server there), or correct process_server.url; allow TCP {port} "
                               "through firewalls")
    ca_ok = check_cert(rep, "CA", link.ca_cert, "copy the tls/ca.pem of 'lifeboat init' (the process server's CA) "
                       "to process_server.ca_cert")
    check_secret_file(rep, "agent token", link.token_file, "process_server.token_file")
    if reachable and ca_ok:
        check_clock(rep, link.url, link.ca_cert, timeout)
    else:
        rep.add("SKIP", "clock skew", "process server unreachable or CA unusable: not measured")
    for d in cfg.disks:
        if not os.path.exists(d.path):
            rep.add("FAIL", f"disk {d.id}", f"{d.path} does not exist", f"fix the path of disk {d.id}")
        elif not os.access(d.path, os.R_OK):
            rep.add("FAIL", f"disk {d.id}", f"{d.path} is not readable", "run the agent as root (it reads block devices)")
        else:
            rep.add("OK", f"disk {d.id}", f"{d.path} readable")
    check_dir(rep, "state dir", cfg.state_dir, "state_dir", space=False)
    g = cfg.group
    if g.name:
        check_cert(rep, f"member {cfg.machine}", g.cert,
                   f"issue it again: lifeboat member-cert --dir <init dir> --machine {cfg.machine} --overwrite, then "
                   "restart the agent", ca_path=g.ca_cert, key_path=g.key)
        for m in g.members:
            h, _, p = m.address.rpartition(":")
            h = h.strip("[]")
            if m.machine == cfg.machine:
                check_port(rep, f"group port {m.address} ({m.machine}, this machine)", h, int(p), timeout,
                           "start the agent (systemctl start lifeboat-mobility); its group listener serves this port",
                           status_if_closed="WARN")
            else:
                check_port(rep, f"group port {m.address} ({m.machine})", h, int(p), timeout,
                           f"start lifeboat-mobility on {m.machine}, check group.members' address and allow TCP {p} "
                           "between members")
    else:
        rep.add("SKIP", "group port", "this machine is in no consistency group (group.name is empty)")
    check_tiers(rep, cfg, timeout)
    return []


def check_mt_config(rep: Report, cfg: cfgmod.MasterTargetConfig, timeout: float) -> list:
    i = cfg.ingest
    check_port(rep, f"port {i.port} (master target data)", i.host, i.port, timeout,
               "start it: systemctl start lifeboat-master-target (journalctl -u lifeboat-master-target tells why "
               "it stopped)", status_if_closed="WARN")
    check_cert(rep, "server", i.tls_cert, "issue a new server certificate from the CA of 'lifeboat init', point "
               "ingest.tls_cert/tls_key at it and restart the master target", key_path=i.tls_key)
    check_port(rep, f"port {cfg.metrics.port} (metrics)", cfg.metrics.host, cfg.metrics.port, timeout,
               "start it: systemctl start lifeboat-master-target", status_if_closed="WARN")
    check_dir(rep, "state dir", cfg.state_dir, "state_dir", space=False)
    return []


CHECKERS = {"process-server": check_ps_config, "mobility": check_mobility_config, "master-target": check_mt_config}


def detect(path: str) -> tuple[str | None, object, str]:
    """(daemon, config, error) trying each schema; the error explains why none fits."""
    errors = []
    for daemon in DETECT_ORDER:
        try:
            return daemon, cfgmod.load(cfgmod.SCHEMAS[daemon], path), ""
        except ConfigError as exc:
            if "configuration file not found" in str(exc) or "not valid TOML" in str(exc):
                return None, None, str(exc)
            errors.append(f"as {daemon}: {exc}")
    return None, None, "; ".join(errors)


async def run_checks(targets: list[tuple[str | None, str]], timeout: float) -> list[Report]:
    reports = []
    for daemon, path in targets:
        rep = Report(config=path, daemon=daemon or "?")
        reports.append(rep)
        if daemon:
            try:
                cfg, err = cfgmod.load(cfgmod.SCHEMAS[daemon], path), ""
            except ConfigError as exc:
                cfg, err = None, str(exc)
        else:
            daemon, cfg, err = detect(path)
            rep.daemon = daemon or "?"
        if cfg is None:
            rep.add("FAIL", "config", f"{path}: {err}",
                    "fix the file (lifeboat config-sample <daemon> prints a commented sample)"
                    + ("; or name its daemon with --process-server/--mobility/--master-target" if not daemon else ""))
            continue
        rep.add("OK", "config", f"{path} is a valid {daemon} config")
        for coro in CHECKERS[daemon](rep, cfg, timeout):
            await coro
    return reports


async def cmd_doctor(args) -> int:
    targets: list[tuple[str | None, str]] = [(None, p) for p in args.config or []]
    targets += [("process-server", p) for p in args.process_server or []]
    targets += [("mobility", p) for p in args.mobility or []]
    targets += [("master-target", p) for p in args.master_target or []]
    if not targets:
        targets = [(None, p) for p in DEFAULT_CONFIGS if os.path.exists(p)]
        if not targets:
            raise LifeboatError(f"no config to check: pass -c FILE (none of {', '.join(DEFAULT_CONFIGS)} exists)")
    reports = await run_checks(targets, args.timeout)
    checks = [c for r in reports for c in r.checks]
    failed = any(c.status == "FAIL" for c in checks)
    if args.json:
        print(json.dumps({"ok": not failed, "checks": [asdict(c) for c in checks]}, indent=2))
    else:
        for r in reports:
            print(f"# {r.config} ({r.daemon})")
            for c in r.checks:
                print(f"{c.status} {c.check}: {c.finding}")
                if c.fix:
                    print(f"  fix: {c.fix}")
        counts = {s: sum(c.status == s for c in checks) for s in STATUSES}
        print(f"# {', '.join(f'{n} {s}' for s, n in counts.items())}", file=sys.stdout)
    sys.stdout.flush()
    return 1 if failed else 0


def add_parser(sub) -> None:
    p = sub.add_parser("doctor", help="check ports, certificates, clock, cache space, repository and tracking tiers")
    p.add_argument("-c", "--config", action="append", metavar="FILE",
                   help="a daemon config (its schema is detected); repeatable. Default: the configs in /etc/lifeboat")
    p.add_argument("--process-server", action="append", metavar="FILE", help="a process-server config")
    p.add_argument("--mobility", action="append", metavar="FILE", help="a mobility agent config")
    p.add_argument("--master-target", action="append", metavar="FILE", help="a master-target config")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds per network check (default 3)")
    p.add_argument("--json", action="store_true", help="one JSON document: {ok, checks: [...]}")
    p.set_defaults(fn=cmd_doctor)
