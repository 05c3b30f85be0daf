"""Typed daemon configuration: one schema per daemon, TOML files, errors that name the key path.

Defaults live here and only here; `lifeboat config-sample <daemon>` renders the schema into the
sample files under config/ (a test keeps them identical).
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
import typing
from dataclasses import MISSING, dataclass, field

from .errors import ConfigError

MiB = 1024 * 1024
GiB = 1024 * MiB


def opt(default, help: str, **kw):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


def req(help: str, example, **kw):
    return field(metadata={"help": help, "example": example, **kw})


@dataclass(kw_only=True)
class LogConfig:
    level: str = opt("info", "debug, info, warning or error", choices=("debug", "info", "warning", "error"))
    format: str = opt("auto", "auto (console on a TTY, else key=value), kv or json", choices=("auto", "kv", "json"))


@dataclass(kw_only=True)
class MetricsConfig:
    host: str = opt("127.0.0.1", "address of the /metrics and /healthz listener")
    port: int = opt(9461, "port of the /metrics and /healthz listener (0 = any free port)")


@dataclass(kw_only=True)
class RepositoryConfig:
    url: str = req("repository location: a directory path (local:/path or /path) or azure://<container>",
                   "local:/var/lib/lifeboat/repository")
    key_file: str = opt("", "key file that unlocks the repository (created by 'lifeboat init')")
    passphrase_file: str = opt("", "file holding a passphrase that unlocks the repository (instead of key_file)")
    azure_connection_string_file: str = opt("", "file holding the Azure Storage connection string (azure:// only)")


@dataclass(kw_only=True)
class IngestConfig:
    host: str = opt("0.0.0.0", "address of the HTTPS data listener")
    port: int = opt(9443, "HTTPS data port (agents send batches here)")
    tls_cert: str = req("server certificate (PEM), signed by the CA from 'lifeboat init'", "/etc/lifeboat/tls/server.pem")
    tls_key: str = req("server private key (PEM)", "/etc/lifeboat/tls/server.key")
    agent_token_file: str = req("file holding the bearer token agents present", "/etc/lifeboat/agent.token")
    max_batch_bytes: int = opt(64 * MiB, "largest batch body accepted; larger requests get 413")
    accept_shared_token: bool = opt(True, "accept agent_token_file's shared token from any agent; false = only "
                                    "per-machine credentials of the configuration server ('lifeboat register')")
    body_idle_timeout_seconds: float = opt(30.0, "a batch body that sends no byte for this long gets 408 "
                                           "(the sender retries); also the grace period of the rate floor below")
    body_min_bytes_per_second: int = opt(64 * 1024, "a batch body must arrive within body_idle_timeout_seconds + "
                                         "its length / this rate, else 408: a slow-drip (slowloris) body cannot "
                                         "hold a disk's receive slot")


@dataclass(kw_only=True)
class CacheConfig:
    dir: str = req("directory of the on-disk batch cache", "/var/lib/lifeboat/cache")
    max_bytes: int = opt(8 * GiB, "cache capacity in bytes")
    high_water_ratio: float = opt(0.8, "above this fill ratio senders get 503 + Retry-After (the reference throttles below 20% free)")
    retry_after_seconds: int = opt(5, "Retry-After value sent with 503")


@dataclass(kw_only=True)
class UploadConfig:
    threads: int = opt(2, "threads for zstd + AEAD work (zstandard and libsodium release the GIL)")
    retry_max_seconds: float = opt(60.0, "cap of the exponential backoff between failed uploads")


@dataclass(kw_only=True)
class ControlConfig:
    enabled: bool = opt(False, "run the configuration-server role (management API, registration, policies, "
                        "failover jobs) in this process server: the primary")
    host: str = opt("0.0.0.0", "address of the HTTPS management API listener")
    port: int = opt(443, "HTTPS management API port (0 = any free port)")
    tls_cert: str = opt("", "server certificate of the management API (PEM); empty = ingest.tls_cert")
    tls_key: str = opt("", "its private key; empty = ingest.tls_key")
    state_dir: str = opt("/var/lib/lifeboat/control", "configuration-server state (SQLite database)")
    registration_passphrase_file: str = opt("", "the one-time registration passphrase from 'lifeboat init'; its "
                                            "hash is stored at first start")
    operator_credential_file: str = opt("", "the operator credential from 'lifeboat init'; its hash is stored at "
                                        "first start (a revoked one stays revoked)")
    credential_ttl_seconds: float = opt(0.0, "agent and process-server credentials expire after this long; 0 = never")
    retention_interval_seconds: float = opt(3600.0, "seconds between retention passes over every protected machine")
    name: str = opt("primary", "this process server's name (machines are assigned to process servers by name)")
    public_url: str = opt("", "ingest URL agents reach this process server by; empty = https://<ingest.host>:<port>")
    primary_url: str = opt("", "scale-out process server: management API URL of the primary "
                           "(agent credentials are checked there); empty = not a scale-out")
    ca_cert: str = opt("", "scale-out: CA certificate that signed the primary's API certificate")
    credential_file: str = opt("", "scale-out: this process server's credential ('lifeboat register --process-server')")
    auth_cache_seconds: float = opt(10.0, "scale-out: how long an answer of the primary about a credential is reused "
                                    "(a revocation takes effect within this long)")


@dataclass(kw_only=True)
class ForwardConfig:
    master_target_url: str = opt("", "master target data URL (https://host:9444); empty: upload to the repository")
    ca_cert: str = opt("", "CA certificate that signed the master target's certificate")
    token_file: str = opt("", "file holding this process server's sender token, registered on the master target")
    timeout_seconds: float = opt(120.0, "per-request timeout")
    retry_max_seconds: float = opt(30.0, "cap of the exponential backoff between resends")


@dataclass(kw_only=True)
class ProcessServerConfig:
    ingest: IngestConfig = req("HTTPS data listener", None)
    cache: CacheConfig = req("on-disk batch cache", None)
    repository: RepositoryConfig = req("where segments and points are stored", None)
    upload: UploadConfig = opt(None, "upload pipeline")
    metrics: MetricsConfig = opt(None, "metrics listener", default_port=9462)
    log: LogConfig = opt(None, "logging")
    control: ControlConfig = opt(None, "configuration-server role (primary) or the link to it (scale-out)")
    forward: ForwardConfig = opt(None, "failback: forward cached batches to a master target instead of the repository")


@dataclass(kw_only=True)
class DiskConfig:
    id: str = req("disk name, unique on this machine ([a-z0-9._-])", "sda")
    path: str = req("block device or image file to protect", "/dev/sda")


@dataclass(kw_only=True)
class ProcessServerLink:
    url: str = req("process server data URL", "https://ps.example:9443")
    ca_cert: str = req("CA certificate that signed the process server's certificate", "/etc/lifeboat/tls/ca.pem")
    token_file: str = req("file holding the agent bearer token", "/etc/lifeboat/agent.token")
    timeout_seconds: float = opt(120.0, "per-request timeout")
    retry_max_seconds: float = opt(30.0, "cap of the exponential backoff between resends")


@dataclass(kw_only=True)
class ReplicationConfig:
    interval_seconds: float = opt(300.0, "seconds between cycles (the reference's crash-consistent interval is 5 min)")
    block_size: int = opt(64 * 1024, "digest tracker block size in bytes (power of two, 4 KiB .. 4 MiB)")
    batch_bytes: int = opt(16 * MiB, "payload bytes per batch")
    extent_max_bytes: int = opt(1 * MiB, "largest write frame (adjacent changed blocks are merged up to this)")


@dataclass(kw_only=True)
class ConsistencyConfig:
    pre_script: str = opt("", "app-consistent points: run before the freeze (e.g. flush and pause the application); "
                          "empty = none")
    post_script: str = opt("", "run after the thaw (with the 'none' snapshot provider: after the cycle's reads)")
    script_timeout_seconds: float = opt(60.0, "a script running longer is killed and the point is not app-consistent")
    app_interval_seconds: float = opt(3600.0, "run the scripts (an app-consistent point) at most this often; "
                                      "the reference uses 1-12 h; 0 = every cycle")
    freeze: bool = opt(True, "FIFREEZE the disks' mounted filesystems while the snapshot is taken")
    freeze_timeout_seconds: float = opt(10.0, "an external watchdog thaws the filesystems after this long, "
                                        "even if the agent dies")


@dataclass(kw_only=True)
class TrackingConfig:
    tracker: str = opt("auto", "auto (tracepoint for block devices when tracefs works, else digest), tracepoint "
                       "or digest (read and hash every block each cycle)", choices=("auto", "tracepoint", "digest"))
    trace_buffer_kb: int = opt(8192, "per-CPU ring buffer of the agent's private tracefs instance")
    drain_interval_seconds: float = opt(0.1, "how often the trace ring is read; too slow a reader overruns the ring "
                                        "and forces a digest resync")
    # The change log (.hrl) tiers: data kept → extents only → dirty bitmap → resync required.
    memory_pool_bytes: int = opt(64 * MiB, "change log: freeze-copied data kept in memory until acknowledged")
    spill_bytes: int = opt(1 * GiB, "change log: freeze-copied data spilled to the .hrl file beyond the pool; "
                           "above it only extents are kept (data re-read from the live disk: point not consistent)")
    extent_budget: int = opt(1_000_000, "change log: extents kept before falling back to a dirty bitmap")
    bitmap_budget_bytes: int = opt(4 * MiB, "change log: largest dirty bitmap (bytes); a smaller one is coarser and "
                                   "over-reports; 0 = no bitmap tier, straight to a digest resync")


SNAPSHOT_PROVIDERS = ("reflink", "lvm", "freeze-copy", "none")


@dataclass(kw_only=True)
class SnapshotConfig:
    providers: list[str] = opt(list(SNAPSHOT_PROVIDERS), choices=SNAPSHOT_PROVIDERS, help=
                               "tried in order each cycle: reflink (FICLONE of an image file or a loop device's "
                               "backing file), lvm, freeze-copy (copy the dirty blocks while frozen), none (read "
                               "the live disk: the point is not crash-consistent)")
    dir: str = opt("", "where reflink clones go (on the backing file's filesystem); empty = next to it")
    keep: int = opt(0, "reflink clones kept after their cycle, newest first (local quick-restore copies)")
    freeze_copy_max_bytes: int = opt(64 * MiB, "freeze-copy copies at most this much while frozen; above it the "
                                     "next provider is used")
    lvm_size: str = opt("10%ORIGIN", "size of a classic LVM snapshot (lvcreate --extents)")


@dataclass(kw_only=True)
class GroupMember:
    machine: str = req("member machine name (its certificate's common name)", "db01")
    address: str = req("host:port of its group listener", "10.0.0.12:20004")


@dataclass(kw_only=True)
class GroupConfig:
    name: str = opt("", "consistency group name ([a-z0-9_-]); empty = this machine is in no group")
    coordinator: str = opt("", "member that coordinates; empty = the first machine name in sorted order")
    listen_host: str = opt("0.0.0.0", "address of this member's group listener")
    port: int = opt(20004, "port of this member's group listener (TLS, member certificates)")
    cert: str = opt("", "this machine's member certificate ('lifeboat member-cert')")
    key: str = opt("", "its private key")
    ca_cert: str = opt("", "CA that signed every member's certificate")
    interval_seconds: float = opt(300.0, "coordinator: seconds between crash-consistent group points")
    app_interval_seconds: float = opt(3600.0, "coordinator: app-consistent group points (pre/post scripts on every "
                                      "member) at most this often; the reference uses 1-12 h; 0 = every time")
    hold_deadline_seconds: float = opt(10.0, "HOLD to MARK: a member not answering by then aborts the attempt and "
                                       "every member thaws")
    members: list[GroupMember] = opt([], "every member, this machine included (2-16)")


@dataclass(kw_only=True)
class AgentControlConfig:
    api_url: str = opt("", "management API of the primary process server (https://host:443); empty = no control "
                       "plane: no heartbeat, the process server is the configured one")
    ca_cert: str = opt("", "CA certificate of the management API; empty = process_server.ca_cert")
    credential_file: str = opt("", "this machine's credential ('lifeboat register --machine'); empty = "
                               "process_server.token_file")
    apply_policy: bool = opt(True, "take the crash- and app-consistent intervals from the machine's replication "
                             "policy (heartbeat answers), instead of replication.interval_seconds and "
                             "consistency.app_interval_seconds")
    timeout_seconds: float = opt(10.0, "per-call timeout; a failed heartbeat is logged and replication goes on")
    hold_max_seconds: float = opt(300.0, "a move between process servers pauses cycles until the old one has "
                                  "uploaded everything; past this long, cycles resume on the old one")


@dataclass(kw_only=True)
class MobilityConfig:
    machine: str = req("this machine's name ([a-z0-9._-])", "web01")
    state_dir: str = req("agent state (digest maps, sequence numbers)", "/var/lib/lifeboat/mobility")
    process_server: ProcessServerLink = req("where batches go", None)
    disks: list[DiskConfig] = req("disks to protect", None)
    replication: ReplicationConfig = opt(None, "cycles")
    consistency: ConsistencyConfig = opt(None, "quiescing: scripts, filesystem freeze")
    tracking: TrackingConfig = opt(None, "change tracking")
    snapshot: SnapshotConfig = opt(None, "point-in-time snapshots that each cycle reads from")
    group: GroupConfig = opt(None, "multi-machine consistency group: cycles are driven by the group's coordinator")
    control: AgentControlConfig = opt(None, "configuration server: heartbeats, policy, process-server assignment")
    metrics: MetricsConfig = opt(None, "metrics listener", default_port=9461)
    log: LogConfig = opt(None, "logging")


@dataclass(kw_only=True)
class MasterTargetIngestConfig:
    host: str = opt("0.0.0.0", "address of the HTTPS data listener")
    port: int = opt(9444, "HTTPS data port (failback batches from the reprotected machine or a process server)")
    tls_cert: str = req("server certificate (PEM), signed by the CA from 'lifeboat init'", "/etc/lifeboat/tls/server.pem")
    tls_key: str = req("server private key (PEM)", "/etc/lifeboat/tls/server.key")
    max_batch_bytes: int = opt(64 * MiB, "largest batch body accepted; larger requests get 413")
    journal_max_bytes: int = opt(4 * GiB, "journaled bytes not yet applied above which senders get 503 + Retry-After")
    retry_after_seconds: int = opt(5, "Retry-After value sent with 503")
    alternate_dir: str = opt("", "where alternate-location images are created (empty: <state_dir>/alternate)")
    body_idle_timeout_seconds: float = opt(30.0, "a batch body that sends no byte for this long gets 408 "
                                           "(the sender retries); also the grace period of the rate floor below")
    body_min_bytes_per_second: int = opt(64 * 1024, "a batch body must arrive within body_idle_timeout_seconds + "
                                         "its length / this rate, else 408: a slow-drip body cannot hold a disk")


@dataclass(kw_only=True)
class FailbackPolicyConfig:
    rpo_threshold_seconds: float = opt(900.0, "failback RPO threshold: /healthz reports a disk whose newest point is older")
    retention_seconds: float = opt(86400.0, "failback recovery points older than this are forgotten")
    app_consistent_interval_seconds: float = opt(3600.0, "expected interval of app-consistent failback points")


@dataclass(kw_only=True)
class MasterTargetConfig:
    state_dir: str = opt("/var/lib/lifeboat/master-target", "master target state")
    metrics: MetricsConfig = opt(None, "metrics listener", default_port=9463)
    log: LogConfig = opt(None, "logging")
    ingest: MasterTargetIngestConfig = req("HTTPS data listener (disks and senders: 'lifeboat master-target')", None)
    failback: FailbackPolicyConfig = opt(None, "failback policy (created with every replication policy)")


def _inner(tp):
    origin = typing.get_origin(tp)
    if origin in (list,):
        return list, typing.get_args(tp)[0]
    return tp, None


def build(cls, data: object, path: str = ""):
    """Build dataclass `cls` from parsed TOML, checking every key and type."""
    if not isinstance(data, dict):
        raise ConfigError(path or "<root>", f"expected a table, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            raise ConfigError(f"{path}.{key}".lstrip("."), f"unknown key (known: {', '.join(sorted(known))})")
    kwargs = {}
    for name, f in known.items():
        p = f"{path}.{name}".lstrip(".")
        tp, item = _inner(hints[name])
        if name not in data:
            if dataclasses.is_dataclass(tp) and f.default is None:
                obj = tp()
                if "default_port" in f.metadata:
                    obj.port = f.metadata["default_port"]
                kwargs[name] = obj
                continue
            if f.default is MISSING and f.default_factory is MISSING:
                raise ConfigError(p, f"required key is missing ({f.metadata.get('help', '')})")
            continue
        value = data[name]
        if dataclasses.is_dataclass(tp):
            obj = build(tp, value, p)
            if "default_port" in f.metadata and "port" not in value:
                obj.port = f.metadata["default_port"]
            kwargs[name] = obj
        elif tp is list and item is str:
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(p, f"expected an array of strings, got {value!r}")
            choices = f.metadata.get("choices")
            for i, v in enumerate(value):
                if choices and v not in choices:
                    raise ConfigError(f"{p}[{i}]", f"{v!r} is not one of {', '.join(choices)}")
            kwargs[name] = list(value)
        elif tp is list:
            if not isinstance(value, list) or not value:
                raise ConfigError(p, "expected a non-empty array of tables")
            kwargs[name] = [build(item, v, f"{p}[{i}]") for i, v in enumerate(value)]
        else:
            kwargs[name] = _scalar(tp, value, p, f.metadata.get("choices"))
    return cls(**kwargs)


def _scalar(tp, value, path, choices):
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        if abs(value) > 2**63:  # float() of a 400-digit integer raises OverflowError
            raise ConfigError(path, f"{value} is out of range")
        value = float(value)
    if tp in (int, float) and isinstance(value, bool) or not isinstance(value, tp):
        raise ConfigError(path, f"expected {tp.__name__}, got {type(value).__name__} {value!r}")
    if choices and value not in choices:
        raise ConfigError(path, f"{value!r} is not one of {', '.join(choices)}")
    if tp in (int, float) and value < 0:
        raise ConfigError(path, f"must not be negative, got {value}")
    # Found by tests/fuzz: inf/nan and integers beyond 64 bits passed here and crashed the daemon later
    # (asyncio.sleep(nan), OverflowError in size arithmetic, a bind() to port 70000).
    if tp is float and not math.isfinite(value):
        raise ConfigError(path, f"must be a finite number, got {value}")
    if tp is int and value >= 2**63:
        raise ConfigError(path, f"{value} is out of range (at most {2**63 - 1})")
    if tp is int and path.rsplit(".", 1)[-1] == "port" and value > 65535:
        raise ConfigError(path, f"{value} is not a TCP port (0-65535)")
    return value


def load(cls, path: str):
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(path, "configuration file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, f"not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:  # tomllib decodes the bytes itself and lets this through
        raise ConfigError(path, f"not UTF-8 text: {exc}") from None
    except OSError as exc:  # a directory, no permission, an I/O error
        raise ConfigError(path, f"cannot read the configuration file: {exc.strerror or exc}") from None
    cfg = build(cls, data)
    check = getattr(cfg, "validate", None) or _VALIDATORS.get(cls)
    if check:
        check(cfg)
    return cfg


def _validate_mobility(cfg: MobilityConfig) -> None:
    from .wire import DISK_ID_RE

    if not DISK_ID_RE.fullmatch(cfg.machine) or "." in cfg.machine or len(cfg.machine) > 32:
        raise ConfigError("machine", f"{cfg.machine!r} must be 1-32 lower-case letters, digits, '_' or '-'")
    seen = set()
    for i, d in enumerate(cfg.disks):
        if not d.id or not DISK_ID_RE.fullmatch(f"{cfg.machine}.{d.id}") or "." in d.id:  # "" gives "machine."
            raise ConfigError(f"disks[{i}].id", f"{d.id!r} must be lower-case letters, digits, '_' or '-'")
        if d.id in seen:
            raise ConfigError(f"disks[{i}].id", f"disk {d.id!r} is listed twice")
        seen.add(d.id)
    bs = cfg.replication.block_size
    if bs & (bs - 1) or not 4096 <= bs <= 4 * MiB:
        raise ConfigError("replication.block_size", f"{bs} is not a power of two between 4096 and 4194304")
    if cfg.replication.extent_max_bytes % bs or cfg.replication.extent_max_bytes > 4 * MiB:
        raise ConfigError("replication.extent_max_bytes", "must be a multiple of block_size and at most 4 MiB")
    if cfg.replication.batch_bytes < cfg.replication.extent_max_bytes:
        raise ConfigError("replication.batch_bytes", "must be at least extent_max_bytes")
    g = cfg.group
    if g.name:
        names = [m.machine for m in g.members]
        if not 2 <= len(names) <= 16 or len(set(names)) != len(names):
            raise ConfigError("group.members", f"a group has 2 to 16 distinct members, got {names}")
        if cfg.machine not in names:
            raise ConfigError("group.members", f"this machine ({cfg.machine}) must be listed among the members")
        if g.coordinator and g.coordinator not in names:
            raise ConfigError("group.coordinator", f"{g.coordinator!r} is not a member ({', '.join(names)})")
        for key in ("cert", "key", "ca_cert"):
            if not getattr(g, key):
                raise ConfigError(f"group.{key}", "required for a group member (mutual TLS on the group port)")
        for i, m in enumerate(g.members):
            host, _, port = m.address.rpartition(":")
            if not host or not (port.isascii() and port.isdigit() and len(port) <= 5) or not 0 < int(port) < 65536:
                raise ConfigError(f"group.members[{i}].address", f"{m.address!r} is not host:port")
    if cfg.tracking.bitmap_budget_bytes > 16 * MiB:
        raise ConfigError("tracking.bitmap_budget_bytes", "must be at most 16 MiB (16777216)")


def _validate_ps(cfg: ProcessServerConfig) -> None:
    c = cfg.control
    if c.enabled and c.primary_url:
        raise ConfigError("control.primary_url", "a primary (control.enabled = true) has no primary of its own: "
                          "set one of enabled or primary_url")
    if c.primary_url and not (c.ca_cert and c.credential_file):
        raise ConfigError("control.credential_file" if c.ca_cert else "control.ca_cert",
                          "a scale-out process server needs ca_cert and credential_file to reach the primary")
    if c.enabled:
        from ..control.auth import NAME_RE as _NAME_RE
        if not _NAME_RE.fullmatch(c.name):
            raise ConfigError("control.name", f"{c.name!r} must match {_NAME_RE.pattern}")
    if not 0 < cfg.cache.high_water_ratio <= 1:
        raise ConfigError("cache.high_water_ratio", f"{cfg.cache.high_water_ratio} is not in (0, 1]")
    if cfg.cache.max_bytes * cfg.cache.high_water_ratio < 2 * cfg.ingest.max_batch_bytes:
        # Otherwise a largest batch could never pass the high-water check: 503 forever.
        raise ConfigError("cache.max_bytes", "max_bytes × high_water_ratio must hold at least two batches of "
                          f"ingest.max_batch_bytes ({cfg.ingest.max_batch_bytes} bytes)")
    if cfg.forward.master_target_url:
        # Forward mode (failback): the repository is not opened, the master target must be reachable.
        for key in ("ca_cert", "token_file"):
            if not getattr(cfg.forward, key):
                raise ConfigError(f"forward.{key}", "required when forward.master_target_url is set")
    elif not (cfg.repository.key_file or cfg.repository.passphrase_file):
        raise ConfigError("repository.key_file", "set key_file or passphrase_file to unlock the repository")


_VALIDATORS = {MobilityConfig: _validate_mobility, ProcessServerConfig: _validate_ps}


def sample(cls, indent: str = "", prefix: str = "") -> str:
    """Render a commented sample TOML file from the schema."""
    lines: list[str] = []
    tables: list[str] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, item = _inner(hints[f.name])
        help_ = f.metadata.get("help", "")
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            body = sample(tp, prefix=f"{key}.")
            if "default_port" in f.metadata:
                body = body.replace(f"port = {MetricsConfig.port}", f"port = {f.metadata['default_port']}")
            tables.append(f"# {help_}\n[{key}]\n{body}")
        elif tp is list and dataclasses.is_dataclass(item):
            block = f"[[{key}]]\n{sample(item, prefix=f'{key}.')}"
            if f.default_factory is not MISSING:  # optional: an example entry, commented out (indented, so
                # it is not mistaken for a commented default)
                block = "\n".join(ln if ln.startswith("#") or not ln else f"#   {ln}" for ln in block.splitlines())
            tables.append(f"# {help_}\n{block}")
        else:
            required = f.default is MISSING and f.default_factory is MISSING
            value = f.metadata["example"] if required else (
                f.default_factory() if f.default_factory is not MISSING else f.default)
            lines.append(f"# {help_}{' (required)' if required else ''}")
            lines.append(f"{'' if required else '# '}{f.name} = {_toml(value)}")
    return "\n".join(lines + ([""] if lines and tables else []) + ["\n".join(tables)]).rstrip() + "\n"


def _toml(v) -> str:
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, bool):
        return "true" if v else "false"
    return repr(v)


SCHEMAS = {"process-server": ProcessServerConfig, "mobility": MobilityConfig, "master-target": MasterTargetConfig}


def resolve_credential(path: str) -> str:
    """'%d/name' means a file in systemd's $CREDENTIALS_DIRECTORY (LoadCredential=)."""
    if path.startswith("%d/"):
        base = os.environ.get("CREDENTIALS_DIRECTORY")
        if not base:
            raise ConfigError(path, "refers to $CREDENTIALS_DIRECTORY, which is not set (use LoadCredential=)")
        return os.path.join(base, path[3:])
    return path
