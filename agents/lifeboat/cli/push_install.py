"""`lifeboat machine add --ssh` / `machine discover --ssh`: push-install the mobility agent over SSH."""

from __future__ import annotations

import glob
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile

from ..core.errors import LifeboatError
from ..mobility.group_wire import NAME_RE
from .control_args import add_api_args, api_settings, client_from_args

# Where the agent's files go on the target host: the paths the lifeboat-mobility unit reads
# (ExecStart= -c, LoadCredential=agent.token:...). The config names the credential as "%d/agent.token".
REMOTE_ETC = "/etc/lifeboat"
REMOTE_CONFIG = f"{REMOTE_ETC}/mobility.toml"
REMOTE_CREDENTIAL = f"{REMOTE_ETC}/agent.token"
REMOTE_CA = f"{REMOTE_ETC}/tls/ca.pem"
REMOTE_AGENT = "/opt/lifeboat/bin/lifeboat-mobility"
UNIT = "lifeboat-mobility"
PACKAGES = ("lifeboat", "lifeboat-mobility")   # the agent package depends on the runtime package
PACKAGE_DIR_ENV = "LIFEBOAT_PACKAGE_DIR"
DEFAULT_PACKAGE_DIR = "packaging/dist"         # where packaging/build-debs writes by default
SSH_CONNECT_TIMEOUT_SECONDS = 15
SSH_COMMAND_TIMEOUT_SECONDS = 300               # dpkg -i of the runtime package compiles bytecode
MAX_REMOTE_OUTPUT_BYTES = 1 << 20               # what we read back from the host: bounded
EXIT_NOT_STARTED = 3                            # installed and registered, but the agent is not running
DISK_ID_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")  # disk ids as the agent config takes them


class PushInstallError(LifeboatError):
    """machine add: step '{}' failed: {}"""

    exit_code = 5


def step(name: str, text: str) -> None:
    print(f"[{name}] {text}", flush=True)


class Remote:
    """The system ssh/scp client against one host: BatchMode, and never an unchecked host key."""

    def __init__(self, target: str, port: int, identity: str | None, known_hosts: str | None,
                 accept_new_host_key: bool) -> None:
        if not target or target.startswith("-") or any(c.isspace() for c in target):
            raise LifeboatError(f"--ssh {target!r} is not a user@host (or host) destination")
        self.target = target
        opts = ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={SSH_CONNECT_TIMEOUT_SECONDS}",
                # accept-new trusts a host seen for the first time and refuses a changed key;
                # "no" (any key) would let anyone on the path receive the agent's credential.
                "-o", "StrictHostKeyChecking=" + ("accept-new" if accept_new_host_key else "yes")]
        if known_hosts:
            opts += ["-o", f"UserKnownHostsFile={known_hosts}"]
        if identity:
            opts += ["-i", identity, "-o", "IdentitiesOnly=yes"]
        self.ssh_cmd = ["ssh", *opts, "-p", str(port)]
        self.scp_cmd = ["scp", "-q", *opts, "-P", str(port)]
        self.sudo = ""

    def _capped(self, cmd: list[str], stdin: bytes | None, what: str) -> tuple[int, str]:
        # Output goes to a file, not a pipe read whole: a hostile host cannot make us buffer gigabytes.
        with tempfile.TemporaryFile() as out:
            try:
                proc = subprocess.run(cmd, input=stdin if stdin is not None else b"", stdout=out,
                                      stderr=subprocess.STDOUT, timeout=SSH_COMMAND_TIMEOUT_SECONDS)
            except FileNotFoundError:
                raise PushInstallError(what, f"{cmd[0]} is not installed here: apt-get install openssh-client")
            except subprocess.TimeoutExpired:
                raise PushInstallError(what, f"no answer from {self.target} within {SSH_COMMAND_TIMEOUT_SECONDS} s")
            size = out.tell()
            out.seek(0)
            text = out.read(MAX_REMOTE_OUTPUT_BYTES).decode(errors="replace")
            if size > MAX_REMOTE_OUTPUT_BYTES:
                text += f"\n[... {size - MAX_REMOTE_OUTPUT_BYTES} more bytes not read]"
        return proc.returncode, text

    def run(self, what: str, script: str, stdin: bytes | None = None, check: bool = True,
            sudo: bool = True) -> tuple[int, str]:
        """Run a shell script on the host (secrets go in stdin, never in the script)."""
        remote = f"{self.sudo} sh -c {shlex.quote(script)}" if sudo and self.sudo else f"sh -c {shlex.quote(script)}"
        rc, text = self._capped([*self.ssh_cmd, "--", self.target, remote], stdin, what)
        if check and rc != 0:
            hint = ""
            if rc == 255:
                hint = (" (ssh could not connect or authenticate: check --ssh, --port, --identity; a new host needs "
                        "--known-hosts FILE holding its key, or --accept-new-host-key)")
            raise PushInstallError(what, f"exit {rc} on {self.target}{hint}: {text.strip()[-2000:]}")
        return rc, text

    def copy(self, what: str, local: str, remote_path: str) -> None:
        host = self.target
        rc, text = self._capped([*self.scp_cmd, "--", local, f"{host}:{remote_path}"], None, what)
        if rc != 0:
            raise PushInstallError(what, f"scp of {local} to {host}:{remote_path} exited {rc}: {text.strip()[-2000:]}")


def remote_from_args(args) -> Remote:
    return Remote(args.ssh, args.port, args.identity, args.known_hosts, args.accept_new_host_key)


def find_packages(given: list[str] | None) -> dict[str, str]:
    """{package name: .deb path} for lifeboat and lifeboat-mobility, from --package or the package dir."""
    candidates: list[str] = []
    sources = given or [os.environ.get(PACKAGE_DIR_ENV) or DEFAULT_PACKAGE_DIR]
    for src in sources:
        candidates += sorted(glob.glob(os.path.join(src, "*.deb"))) if os.path.isdir(src) else [src]
    found: dict[str, str] = {}
    for path in candidates:
        name = os.path.basename(path).split("_", 1)[0]
        if not path.endswith(".deb") or not os.path.isfile(path):
            raise PushInstallError("package", f"{path} is not a .deb file")
        if name in PACKAGES:
            found[name] = path
    missing = [p for p in PACKAGES if p not in found]
    if missing:
        raise PushInstallError("package", f"no {', '.join(missing)} .deb in {', '.join(sources)}: build them with "
                               f"packaging/build-debs (writes {DEFAULT_PACKAGE_DIR}/), then pass --package FILE "
                               f"(twice) or a directory, or set ${PACKAGE_DIR_ENV}")
    return found


def toml_str(s: str) -> str:
    return json.dumps(s)   # a JSON string is a valid TOML basic string (same escapes)


def agent_config(machine: str, disks: list[tuple[str, str]], ps_url: str, api_url: str,
                 metrics_port: int | None) -> str:
    lines = [
        f"# Written by 'lifeboat machine add {machine}'. Every option: /opt/lifeboat/share/config/mobility.toml",
        "# The credential is a systemd credential (LoadCredential=agent.token in lifeboat-mobility.service).",
        f"machine = {toml_str(machine)}",
        'state_dir = "/var/lib/lifeboat/mobility"',
        "",
        "[process_server]",
        f"url = {toml_str(ps_url)}",
        f"ca_cert = {toml_str(REMOTE_CA)}",
        'token_file = "%d/agent.token"',
        "",
        "[control]",
        f"api_url = {toml_str(api_url)}",
        "",
    ]
    for disk_id, path in disks:
        lines += ["[[disks]]", f"id = {toml_str(disk_id)}", f"path = {toml_str(path)}", ""]
    if metrics_port is not None:
        lines += ["[metrics]", f"port = {metrics_port}", ""]
    return "\n".join(lines)


def parse_disks(values: list[str]) -> list[tuple[str, str]]:
    disks = []
    for v in values:
        disk_id, sep, path = v.partition("=")
        if not sep or not DISK_ID_RE.fullmatch(disk_id) or not path.startswith("/"):
            raise LifeboatError(f"--disk {v!r}: give ID=/path/of/device (ID in [a-z0-9._-], e.g. sda=/dev/sda); "
                                "'lifeboat machine discover --ssh' lists the host's disks")
        disks.append((disk_id, path))
    if len({d for d, _ in disks}) != len(disks):
        raise LifeboatError("--disk ids must be distinct")
    return disks


async def protect_and_issue(args, disks: list[tuple[str, str]]) -> tuple[str, str, str]:
    """(process server URL, agent credential token, credential id), through the management API."""
    from ..control.client import ApiCallFailed

    async with client_from_args(args) as api:
        try:
            machine = await api.call("GET", f"/machines/{args.machine}")
            if sorted(machine["disks"]) != sorted(d for d, _ in disks):
                raise PushInstallError("protect", f"{args.machine} is already protected with disks "
                                       f"{', '.join(machine['disks'])}, not {', '.join(d for d, _ in disks)}: pass "
                                       "those --disk ids, or change them first with 'lifeboat protect'")
            step("protect", f"{args.machine} is already protected (disks {', '.join(machine['disks'])}); kept as is")
        except ApiCallFailed as exc:
            if exc.status != 404:
                raise PushInstallError("protect", str(exc)) from None
            body = {"disks": [d for d, _ in disks], "policy": args.policy}
            if args.process_server:
                body["process_server"] = args.process_server
            machine = await api.call("PUT", f"/machines/{args.machine}", body)
            step("protect", f"{args.machine} protected: disks {', '.join(machine['disks'])}, policy "
                 f"{machine['policy']}, process server {machine['process_server']}")
        servers = {p["name"]: p for p in (await api.call("GET", "/process-servers"))["process_servers"]}
        ps = servers.get(machine["process_server"])
        if ps is None or not ps.get("url"):
            raise PushInstallError("process server", f"the control plane has no URL for process server "
                                   f"{machine['process_server']!r}: register it ('lifeboat register --process-server')")
        # The credential is created here, on the operator's side, and reaches the host only through
        # the SSH channel's stdin: the registration passphrase never leaves the control plane.
        reply = await api.call("POST", "/credentials", {"kind": "agent", "name": args.machine})
        step("register", f"agent credential {reply['credential_id']} issued for {reply['principal']}")
        return ps["url"], reply["token"], reply["credential_id"]


async def revoke_replaced(args, keep: str) -> None:
    """A re-run installs a new credential: the machine's older ones stop working (one live credential each)."""
    async with client_from_args(args) as api:
        for c in (await api.call("GET", "/credentials"))["credentials"]:
            if c["kind"] == "agent" and c["name"] == args.machine and c["id"] != keep and not c["revoked"]:
                await api.call("POST", f"/credentials/{c['id']}/revoke", {"reason": "replaced by lifeboat machine add"})
                step("register", f"older agent credential {c['id']} revoked (replaced)")


async def cmd_machine_add(args) -> int:
    if not NAME_RE.fullmatch(args.machine):
        raise LifeboatError(f"machine name {args.machine!r} must match [a-z0-9._-] (1-64 characters)")
    disks = parse_disks(args.disk)
    debs = find_packages(args.package)
    settings = api_settings(args)
    ca_path = settings["ca_cert"]
    try:
        with open(ca_path, "rb") as f:
            ca_pem = f.read(1 << 20)
    except OSError as exc:
        raise PushInstallError("ca", f"cannot read the CA certificate {ca_path!r}: {exc.strerror}; pass --ca") from None
    remote = remote_from_args(args)

    _, text = remote.run("connect", "id -u; command -v dpkg >/dev/null && echo dpkg=yes; "
                         "[ -d /run/systemd/system ] && echo systemd=yes; true", sudo=False)
    facts = text.split()
    if not facts or not facts[0].isdigit():
        raise PushInstallError("connect", f"unexpected answer from {args.ssh}: {text.strip()[:200]!r}")
    if "dpkg=yes" not in facts:
        raise PushInstallError("connect", f"{args.ssh} has no dpkg: the push install supports Debian/Ubuntu hosts")
    if facts[0] != "0":
        remote.sudo = "sudo -n"   # -n: fail at once instead of prompting for a password we cannot give
        remote.run("sudo", "true")
    step("connect", f"{args.ssh}: connected as {'root' if facts[0] == '0' else 'uid ' + facts[0] + ' (sudo)'}")

    from ..control.client import ApiCallFailed

    try:
        ps_url, token, credential_id = await protect_and_issue(args, disks)
    except ApiCallFailed as exc:
        raise PushInstallError("protect/register", f"{exc}; nothing was installed on {args.ssh}") from None
    step("process server", f"the agent will send to {ps_url}")

    _, tmpdir = remote.run("copy", "mktemp -d /tmp/lifeboat-push.XXXXXX", sudo=False)
    tmpdir = tmpdir.strip().splitlines()[-1] if tmpdir.strip() else ""
    if not tmpdir.startswith("/tmp/lifeboat-push."):
        raise PushInstallError("copy", f"mktemp on {args.ssh} answered {tmpdir!r}")
    try:
        for name in PACKAGES:
            remote.copy("copy", debs[name], f"{tmpdir}/{name}.deb")
        step("copy", f"{', '.join(os.path.basename(debs[n]) for n in PACKAGES)} -> {args.ssh}:{tmpdir}")
        rc, text = remote.run("install", " ".join(["dpkg", "-i", *(f"{tmpdir}/{n}.deb" for n in PACKAGES)]),
                              check=False)
        if rc != 0:
            raise PushInstallError("install", f"dpkg -i exited {rc} on {args.ssh}: {text.strip()[-1500:]} -- the "
                                   "packages need python3.11 and passwd there: 'apt-get install python3.11', then "
                                   "run 'lifeboat machine add' again")
    finally:
        remote.run("copy", f"rm -rf {shlex.quote(tmpdir)}", check=False, sudo=False)
    step("install", f"{' '.join(PACKAGES)} installed with dpkg -i")

    remote.run("credential", f"umask 077; install -d -m 0750 {REMOTE_ETC} && cat > {REMOTE_CREDENTIAL}.new && "
               f"chmod 0600 {REMOTE_CREDENTIAL}.new && mv -f {REMOTE_CREDENTIAL}.new {REMOTE_CREDENTIAL}",
               stdin=token.encode() + b"\n")
    step("credential", f"{args.ssh}:{REMOTE_CREDENTIAL} written (0600, sent over the SSH channel)")
    await revoke_replaced(args, credential_id)
    remote.run("config", f"install -d -m 0755 {os.path.dirname(REMOTE_CA)} && cat > {REMOTE_CA}.new && "
               f"chmod 0644 {REMOTE_CA}.new && mv -f {REMOTE_CA}.new {REMOTE_CA}", stdin=ca_pem)
    config = agent_config(args.machine, disks, ps_url, settings["api"], args.metrics_port)
    remote.run("config", f"umask 077; cat > {REMOTE_CONFIG}.new && chmod 0600 {REMOTE_CONFIG}.new && "
               f"mv -f {REMOTE_CONFIG}.new {REMOTE_CONFIG} && "
               f"CREDENTIALS_DIRECTORY={REMOTE_ETC} {REMOTE_AGENT} --check-config -c {REMOTE_CONFIG}",
               stdin=config.encode())
    step("config", f"{args.ssh}:{REMOTE_CONFIG} written (0600) and checked")

    if "systemd=yes" not in facts:
        step("start", f"NOT STARTED: systemd is not PID 1 on {args.ssh}; start the agent there with "
             f"'{REMOTE_AGENT} -c {REMOTE_CONFIG}' and CREDENTIALS_DIRECTORY={REMOTE_ETC}, or boot with systemd "
             f"and run 'systemctl enable --now {UNIT}'")
        return EXIT_NOT_STARTED
    rc, text = remote.run("start", f"systemctl enable --now {UNIT}", check=False)
    if rc != 0:
        step("start", f"NOT STARTED: systemctl enable --now {UNIT} exited {rc}: {text.strip()[-500:]}; see "
             f"'journalctl -u {UNIT}' on {args.ssh}")
        return EXIT_NOT_STARTED
    step("start", f"{UNIT} enabled and started on {args.ssh}")
    return 0


async def cmd_machine_discover(args) -> int:
    remote = remote_from_args(args)
    _, text = remote.run("discover", "lsblk --json --bytes --output NAME,PATH,SIZE,TYPE,MOUNTPOINT,MODEL",
                         sudo=False)
    try:
        devices = json.loads(text)["blockdevices"]
    except (ValueError, KeyError, TypeError):
        raise PushInstallError("discover", f"lsblk on {args.ssh} did not answer JSON: {text.strip()[:300]!r} "
                               "(util-linux 2.27 or later has lsblk --json)") from None
    rows = []

    def walk(devs, depth):
        for d in devs if isinstance(devs, list) else []:
            if isinstance(d, dict):
                rows.append((depth, d))
                walk(d.get("children"), depth + 1)

    walk(devices, 0)
    if args.json:
        print(json.dumps([d | {"children": None} if "children" in d else d for _, d in rows], indent=2))
        return 0
    print(f"{'PATH':<24} {'TYPE':<6} {'SIZE':>16} {'MOUNTPOINT':<20} MODEL")
    for depth, d in rows:
        path = "  " * depth + str(d.get("path") or d.get("name"))
        print(f"{path:<24} {str(d.get('type')):<6} {str(d.get('size')):>16} {str(d.get('mountpoint') or ''):<20} "
              f"{str(d.get('model') or '').strip()}")
    print("protect a disk with: lifeboat machine add NAME --ssh ... --disk ID=PATH", file=sys.stderr)
    return 0


def _ssh_args(p) -> None:
    p.add_argument("--ssh", required=True, metavar="USER@HOST", help="the host, as for ssh (root, or a user with "
                                                                     "passwordless sudo)")
    p.add_argument("--port", type=int, default=22, help="SSH port")
    p.add_argument("--identity", help="private key file (ssh -i)")
    p.add_argument("--known-hosts", help="known_hosts file holding the host's key (default: ssh's own)")
    p.add_argument("--accept-new-host-key", action="store_true",
                   help="trust the host key on first contact (StrictHostKeyChecking=accept-new; a changed key "
                        "is still refused)")


def add_parser(sub) -> None:
    p = sub.add_parser("machine", help="add a machine over SSH (install, register and start its agent), or "
                                       "discover its disks")
    msub = p.add_subparsers(dest="machine_action", required=True)
    a = msub.add_parser("add", help="push-install the mobility agent over SSH, protect and register the machine")
    add_api_args(a)
    a.add_argument("machine", help="the machine's name ([a-z0-9._-])")
    _ssh_args(a)
    a.add_argument("--disk", action="append", required=True, metavar="ID=PATH",
                   help="a disk to protect, e.g. sda=/dev/sda (repeat)")
    a.add_argument("--package", action="append", metavar="DEB|DIR",
                   help=f"the lifeboat and lifeboat-mobility .debs, or a directory holding them (default: "
                        f"${PACKAGE_DIR_ENV}, else ./{DEFAULT_PACKAGE_DIR}, where packaging/build-debs writes)")
    a.add_argument("--policy", default="default", help="replication policy when the machine is not yet protected")
    a.add_argument("--process-server", help="process server to assign (default: the primary)")
    a.add_argument("--metrics-port", type=int, help="the agent's /metrics port (default 9461)")
    a.set_defaults(fn=cmd_machine_add)
    d = msub.add_parser("discover", help="list a host's block devices over SSH (lsblk)")
    _ssh_args(d)
    d.add_argument("--json", action="store_true")
    d.set_defaults(fn=cmd_machine_discover)
