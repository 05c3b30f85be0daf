"""`lifeboat doctor` against real daemons: a healthy deployment passes, a broken one names each problem and its fix.

The broken setup is the one of issue 7: the process server stopped, the cache on a nearly full
filesystem (a small tmpfs), the server certificate expired.
"""

from __future__ import annotations

import datetime
import json
import subprocess
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from disk_images import make_image
from lab import bin_path, free_port
from needs_root import require_root

AGENT_READY_TIMEOUT_SECONDS = 60.0


@contextmanager
def tmpfs(path: Path, size: str):
    """A small filesystem of its own (tmpfs needs no loop device), unmounted afterwards."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def doctor(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([bin_path("lifeboat"), "doctor", *args], capture_output=True, text=True, timeout=180)


def lines_of(out: str, status: str) -> list[str]:
    return [ln for ln in out.splitlines() if ln.startswith(status + " ")]


def fix_after(out: str, line: str) -> str:
    rows = out.splitlines()
    nxt = rows[rows.index(line) + 1]
    assert nxt.startswith("  fix: "), f"no fix after {line!r}:\n{out}"
    return nxt[len("  fix: "):]


def wait_healthz(port: int, disk_id: str) -> dict:
    deadline = time.monotonic() + AGENT_READY_TIMEOUT_SECONDS
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as resp:
                body = json.loads(resp.read())
            if disk_id in body.get("disks", {}):
                return body
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"agent /healthz on port {port} never reported {disk_id}")
        time.sleep(0.2)


def expired_cert(lab, directory: Path) -> tuple[Path, Path, datetime.datetime]:
    """A server certificate signed by the lab's CA whose validity ended two days ago."""
    tls_dir = Path(lab.init["ca_cert"]).parent
    ca_cert = x509.load_pem_x509_certificate((tls_dir / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((tls_dir / "ca.key").read_bytes(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    expiry = now - datetime.timedelta(days=2)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=400)).not_valid_after(expiry)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    pem, keyp = directory / "expired.pem", directory / "expired.key"
    pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keyp.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return pem, keyp, expiry


def test_healthy_deployment_passes(lab, tmp_path):
    require_root()
    disk = make_image(tmp_path / "sda.img", 4)
    metrics_port = free_port()
    with tmpfs(tmp_path / "cachefs", "64m") as cache:
        lab.start_ps({"cache": {"dir": str(cache / "cache"), "max_bytes": 1 << 30}})
        agent = lab.start_agent("web01", {"sda": disk}, extra={"metrics": {"host": "127.0.0.1", "port": metrics_port}})
        try:
            wait_healthz(metrics_port, "web01.sda")
            ps_conf, agent_conf = lab.work / "process-server.toml", lab.work / "mobility-web01.toml"
            res = doctor("-c", str(ps_conf), "-c", str(agent_conf))
            assert res.returncode == 0, res.stdout + res.stderr
            out = res.stdout
            assert not lines_of(out, "FAIL"), out
            ok = "\n".join(lines_of(out, "OK"))
            for expected in (f"OK port {lab.ps_port} (ingest): 127.0.0.1:{lab.ps_port} accepts",
                             f"OK process server 127.0.0.1:{lab.ps_port}", "OK certificate server:",
                             "signed by the CA", "OK certificate CA:", "OK cache writable:", "OK cache free space:",
                             "OK repository access:", "OK repository write: wrote, read back and deleted doctor/probe-",
                             "OK clock skew:", "OK process server TLS:", "OK tracking tier sda: digest tracker",
                             "OK agent token:"):
                assert expected in ok, f"{expected!r} missing:\n{out}"
            token = Path(lab.init["agent_token"]).read_text().strip()
            assert token not in out
            # Schema flags and --json give the same verdict; the probe object is gone.
            res = doctor("--process-server", str(ps_conf), "--mobility", str(agent_conf), "--json")
            assert res.returncode == 0, res.stdout + res.stderr
            doc = json.loads(res.stdout)
            assert doc["ok"] is True
            assert {c["daemon"] for c in doc["checks"]} == {"process-server", "mobility"}
            assert all(c["status"] in ("OK", "WARN", "SKIP") for c in doc["checks"]), doc
            repo_root = Path(lab.init["repository"].removeprefix("local:"))
            assert not (repo_root / "doctor").exists()
        finally:
            agent.terminate()
            agent.wait(40)
            lab.stop_ps()
    assert lab.cli("verify", "-q").returncode == 0


def test_broken_deployment_names_each_problem_and_fix(lab, tmp_path):
    require_root()
    disk = make_image(tmp_path / "sda.img", 4)
    lab.start_ps()
    assert lab.run_agent("web01", {"sda": disk}, cycles=1,
                         extra={"metrics": {"host": "127.0.0.1", "port": free_port()}}) == 0
    lab.stop_ps()  # 1. the process server is stopped
    agent_conf = lab.work / "mobility-web01.toml"
    pem, key, expiry = expired_cert(lab, tmp_path)
    with tmpfs(tmp_path / "smallfs", "4m") as small:
        # 2. the cache is on a nearly full filesystem (over 75% used)
        (small / "filler").write_bytes(b"\xa5" * (3400 * 1024))
        # 3. the server certificate has expired
        ps_conf = lab.ps_config({"cache": {"dir": str(small / "cache"), "max_bytes": 1 << 30},
                                 "ingest": {"tls_cert": str(pem), "tls_key": str(key)}})
        res = doctor("-c", str(ps_conf), "-c", str(agent_conf))
        out = res.stdout
        assert res.returncode == 1, out + res.stderr
        fails = lines_of(out, "FAIL")
        hostport = f"127.0.0.1:{lab.ps_port}"

        [agent_link] = [ln for ln in fails if ln.startswith(f"FAIL process server {hostport}")]
        assert "connection refused" in agent_link
        assert "start the process server" in fix_after(out, agent_link)
        [ingest] = [ln for ln in fails if ln.startswith(f"FAIL port {lab.ps_port} (ingest)")]
        assert hostport in ingest and "systemctl start lifeboat-process-server" in fix_after(out, ingest)

        [cache] = [ln for ln in fails if ln.startswith("FAIL cache free space")]
        assert str(small) in cache and "below 25%" in cache
        assert "free space on" in fix_after(out, cache) and "cache.dir" in fix_after(out, cache)

        [cert] = [ln for ln in fails if ln.startswith("FAIL certificate server")]
        assert str(pem) in cert and f"expired on {expiry:%Y-%m-%d %H:%M:%S} UTC" in cert
        assert "new server certificate" in fix_after(out, cert)

        # Every FAIL has its fix; nothing else fails (the repository is still fine).
        assert len(fails) == 4, out
        assert out.count("\n  fix: ") >= len(fails)
        assert "OK repository write" in out
        # The agent is not running: said, as a warning.
        [tier] = [ln for ln in lines_of(out, "WARN") if ln.startswith("WARN tracking tier:")]
        assert "agent is not running" in tier

        doc = json.loads(doctor("-c", str(ps_conf), "-c", str(agent_conf), "--json").stdout)
        assert doc["ok"] is False
        assert sorted(c["check"] for c in doc["checks"] if c["status"] == "FAIL") == sorted(
            ["port %d (ingest)" % lab.ps_port, "certificate server", "cache free space",
             f"process server {hostport}"])
        assert all(c["fix"] for c in doc["checks"] if c["status"] == "FAIL")


def test_unreadable_config_is_a_failure_with_a_fix(tmp_path):
    bad = tmp_path / "what.toml"
    bad.write_text('[ingest]\nport = "x"\n')
    res = doctor("-c", str(bad))
    assert res.returncode == 1
    [line] = lines_of(res.stdout, "FAIL")
    assert line.startswith(f"FAIL config: {bad}") and "as process-server" in line
    assert "config-sample" in fix_after(res.stdout, line)
    res = doctor("-c", str(tmp_path / "missing.toml"))
    assert res.returncode == 1 and "configuration file not found" in res.stdout
