"""`lifeboat member-cert`, `points --group` and group failover against a real local repository whose
segments and catalog entries are written the way the process server writes them."""

from __future__ import annotations

import asyncio
import json
import os
import random
import ssl
import tempfile
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from lifeboat.cli.main import main
from lifeboat.core import config as cfgmod
from lifeboat.core import tls
from lifeboat.core.catalog import PointEntry
from lifeboat.core.segment import SegmentHeader, assemble_segment, encode_record
from lifeboat.core.wire import FRAME_BOOKMARK, FRAME_WRITE, Frame
from lifeboat.repository.materialize import image_digest_of
from lifeboat.repository.open import open_repository

BLOCK = 4096
DISK_SIZE = 64 * BLOCK
GROUP = "shop"
MEMBERS = ("db01", "web01")
DISKS = {"db01": ["sda"], "web01": ["sda", "sdb"], "solo": ["sda"]}
REFUSAL = ("machine db01 is in consistency group shop: fail over the whole group with --group shop "
           "(a member alone would not match the others' instant)")


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def digest_of(data: bytes) -> str:
    with tempfile.TemporaryFile() as f:
        f.write(data)
        f.flush()
        return image_digest_of(f.fileno(), len(data), BLOCK)


class Deployment:
    """An initialised directory and repository holding points for db01, web01 (group shop) and solo."""

    def __init__(self, root: Path, capsys) -> None:
        self.dir = root / "etc"
        code, out, _ = run(capsys, "init", "--dir", str(self.dir))
        assert code == 0
        self.init = json.loads(out)
        self.repo_args = ["--repo", self.init["repository"], "--key-file", self.init["key_file"]]
        self.images: dict[str, bytearray] = {}
        self.seq: dict[str, int] = {}
        self.expected: dict[tuple[str, str], bytes] = {}   # (point_id, disk_id) -> image at the point
        self.rng = random.Random(4)

    async def cycle(self, machine: str, point_id: str, created: float, consistency: str = "crash",
                    tag: str = "") -> None:
        """One cycle of one machine: random writes to each disk, then its bookmark, as one segment per disk."""
        cfg = cfgmod.RepositoryConfig(url=self.init["repository"], key_file=self.init["key_file"])
        repo = await open_repository(cfg)
        try:
            for disk in DISKS[machine]:
                disk_id = f"{machine}.{disk}"
                image = self.images.setdefault(disk_id, bytearray(DISK_SIZE))
                seq = self.seq[disk_id] = self.seq.get(disk_id, 0) + 1
                frames = []
                for _ in range(3):
                    offset = self.rng.randrange(DISK_SIZE // BLOCK) * BLOCK
                    data = self.rng.randbytes(BLOCK)
                    image[offset:offset + BLOCK] = data
                    frames.append(Frame(FRAME_WRITE, offset, BLOCK, data))
                digest = digest_of(bytes(image))
                group = {"group": GROUP, "group_tag": tag, "group_members": list(MEMBERS)} if tag else {}
                bookmark = {"point_id": point_id, "machine": machine, "created": created, "consistency": consistency,
                            "cycle": seq, "block_size": BLOCK, "image_digest": digest, **group}
                frames.append(Frame(FRAME_BOOKMARK, 0, 0, json.dumps(bookmark).encode()))
                header = SegmentHeader(disk_id, seq, DISK_SIZE, len(frames))
                encoded = [encode_record(repo.segment_key, header.encode(), i, f) for i, f in enumerate(frames)]
                await repo.put_segment(disk_id, seq, assemble_segment(repo.segment_key, header, encoded))
                await repo.put_point(PointEntry(
                    point_id=point_id, machine=machine, disk_id=disk_id, seq=seq, frame_index=len(frames) - 1,
                    disk_size=DISK_SIZE, created=created, consistency=consistency, cycle=seq, block_size=BLOCK,
                    image_digest=digest, group=GROUP if tag else "", group_tag=tag,
                    group_members=MEMBERS if tag else ()))
                self.expected[(point_id, disk_id)] = bytes(image)
        finally:
            await repo.backend.close()


@pytest.fixture
def dep(tmp_path, capsys) -> Deployment:
    d = Deployment(tmp_path, capsys)

    async def fill() -> None:
        await d.cycle("db01", "db01-plain", 10.0)                      # before the group existed
        await d.cycle("solo", "solo-1", 15.0)
        await d.cycle("db01", "db01-g1", 100.0, "app", tag="g1")
        await d.cycle("web01", "web01-g1", 100.5, "app", tag="g1")
        await d.cycle("db01", "db01-g2", 200.0, "crash", tag="g2")     # web01 never marked g2: aborted
        await d.cycle("web01", "web01-g3", 299.5, "crash", tag="g3")
        await d.cycle("db01", "db01-g3", 300.0, "app", tag="g3")
    asyncio.run(fill())
    return d


def test_points_group_lists_complete_group_points(dep, capsys):
    code, out, err = run(capsys, "points", *dep.repo_args, "--group", GROUP, "--json")
    assert code == 0
    assert json.loads(out) == [
        {"group": "shop", "tag": "g1", "created": 100.0, "consistency": "app",
         "members": {"db01": "db01-g1", "web01": "web01-g1"}},
        {"group": "shop", "tag": "g3", "created": 299.5, "consistency": "crash",
         "members": {"db01": "db01-g3", "web01": "web01-g3"}},
    ]
    assert "1 incomplete point(s) of group shop left out" in err and "g2" in err
    code, out, err = run(capsys, "points", *dep.repo_args, "--group", GROUP)
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["TAG", "CREATED", "(UTC)", "CONSISTENCY", "MEMBERS"]
    assert [ln.split()[0] for ln in lines[1:]] == ["g1", "g3"] and lines[1].split()[-1] == "db01,web01"
    code, out, _ = run(capsys, "points", *dep.repo_args, "--group", "nosuch", "--json")
    assert code == 0 and json.loads(out) == []


def test_plain_points_listing_is_unchanged(dep, capsys):
    code, out, _ = run(capsys, "points", *dep.repo_args, "--json")
    assert code == 0
    assert len(json.loads(out)) == 7


def test_failover_of_a_group_member_alone_is_refused(dep, capsys, tmp_path):
    for point in ("latest", "db01-g1", "db01-g2"):
        code, out, err = run(capsys, "failover", *dep.repo_args, "--test", "--machine", "db01", "--point", point,
                             "--to", str(tmp_path / "alone.img"), "-q")
        assert code != 0 and out == ""
        assert REFUSAL in err
    assert not (tmp_path / "alone.img").exists()


def test_failover_of_a_point_from_before_the_group_and_of_other_machines_still_works(dep, capsys, tmp_path):
    code, out, err = run(capsys, "failover", *dep.repo_args, "--test", "--machine", "db01", "--point", "db01-plain",
                         "--to", str(tmp_path / "plain.img"), "-q")
    assert code == 0, err
    assert (tmp_path / "plain.img").read_bytes() == dep.expected[("db01-plain", "db01.sda")]
    code, _, err = run(capsys, "failover", *dep.repo_args, "--test", "--machine", "solo",
                       "--to", str(tmp_path / "solo.img"), "-q")
    assert code == 0, err


@pytest.mark.parametrize("choice,tag", [("g1", "g1"), ("latest-group", "g3"), ("latest", "g3"), ("latest-app", "g1")])
def test_group_failover_materialises_every_members_disks(dep, capsys, tmp_path, choice, tag):
    target = tmp_path / "dr"
    code, out, err = run(capsys, "failover", *dep.repo_args, "--test", "--group", GROUP, "--point", choice,
                         "--to", str(target), "-q")
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert sorted(r["disk_id"] for r in rows) == ["db01.sda", "web01.sda", "web01.sdb"]
    assert {r["tag"] for r in rows} == {tag} and all(r["verified"] and r["group"] == GROUP for r in rows)
    assert sorted(p.name for p in target.iterdir()) == ["db01.sda.img", "web01.sda.img", "web01.sdb.img"]
    for r in rows:
        assert r["point_id"] == f"{r['machine']}-{tag}"
        assert Path(r["path"]).read_bytes() == dep.expected[(r["point_id"], r["disk_id"])]


def test_group_failover_refuses_incomplete_tags_files_and_existing_images(dep, capsys, tmp_path):
    code, _, err = run(capsys, "failover", *dep.repo_args, "--test", "--group", GROUP, "--point", "g2",
                       "--to", str(tmp_path / "dr"), "-q")
    assert code == 66 and "web01 lack it" in err
    code, _, err = run(capsys, "failover", *dep.repo_args, "--test", "--group", GROUP, "--point", "g9",
                       "--to", str(tmp_path / "dr"), "-q")
    assert code == 3
    code, _, err = run(capsys, "failover", *dep.repo_args, "--test", "--group", "nosuch", "--to",
                       str(tmp_path / "dr"), "-q")
    assert code == 3 and "latest of group nosuch" in err
    (tmp_path / "file.img").write_bytes(b"x")
    code, _, err = run(capsys, "failover", *dep.repo_args, "--test", "--group", GROUP, "--to",
                       str(tmp_path / "file.img"), "-q")
    assert code != 0 and "is not a directory" in err
    code, _, err = run(capsys, "failover", *dep.repo_args, "--test", "--group", GROUP, "--machine", "db01",
                       "--to", str(tmp_path / "dr"), "-q")
    assert code != 0 and "--machine and --disk do not apply" in err
    target = tmp_path / "dr"
    target.mkdir()
    (target / "web01.sdb.img").write_bytes(b"old")
    code, _, err = run(capsys, "failover", *dep.repo_args, "--test", "--group", GROUP, "--to", str(target), "-q")
    assert code != 0 and "web01.sdb.img exists (1 of the 3 images do)" in err
    assert sorted(p.name for p in target.iterdir()) == ["web01.sdb.img"]   # nothing written
    code, _, err = run(capsys, "failover", *dep.repo_args, "--test", "--group", GROUP, "--to", str(target), "-q",
                       "--overwrite")
    assert code == 0, err
    assert (target / "web01.sdb.img").read_bytes() == dep.expected[("web01-g3", "web01.sdb")]


# --- member certificates ----------------------------------------------------------------------

def test_member_cert_is_issued_by_the_init_ca(tmp_path, capsys):
    d = tmp_path / "etc"
    code, _, err = run(capsys, "member-cert", "--dir", str(d), "--machine", "web01")
    assert code != 0 and "ca.pem does not exist" in err and "lifeboat init --dir" in err
    assert run(capsys, "init", "--dir", str(d))[0] == 0
    code, out, err = run(capsys, "member-cert", "--dir", str(d), "--machine", "web01", "--hosts", "127.0.0.1,web01.lan")
    assert code == 0, err
    info = json.loads(out)
    assert info["cert"] == str(d / "tls" / "web01.pem") and info["key"] == str(d / "tls" / "web01.key")
    assert info["ca_cert"] == str(d / "tls" / "ca.pem")
    assert os.stat(info["key"]).st_mode & 0o077 == 0
    cert = x509.load_pem_x509_certificate(Path(info["cert"]).read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "web01"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.CLIENT_AUTH in eku and ExtendedKeyUsageOID.SERVER_AUTH in eku
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "web01.lan" in san.get_values_for_type(x509.DNSName)

    code, _, err = run(capsys, "member-cert", "--dir", str(d), "--machine", "web01")
    assert code != 0 and "pass --overwrite" in err
    assert run(capsys, "member-cert", "--dir", str(d), "--machine", "web01", "--overwrite", "--hosts",
               "127.0.0.1")[0] == 0
    for bad in ("ca", "server"):
        code, _, err = run(capsys, "member-cert", "--dir", str(d), "--machine", bad)
        assert code != 0 and "would overwrite" in err
    for bad in ("Web01", "web.01", "-web", "a" * 33):
        code, _, err = run(capsys, "member-cert", "--dir", str(d), f"--machine={bad}")
        assert code != 0 and "must match" in err


def test_two_member_certs_authenticate_each_other(tmp_path, capsys):
    d = tmp_path / "etc"
    assert run(capsys, "init", "--dir", str(d))[0] == 0
    certs = {}
    for m in ("db01", "web01"):
        code, out, _ = run(capsys, "member-cert", "--dir", str(d), "--machine", m, "--hosts", "127.0.0.1")
        assert code == 0
        certs[m] = json.loads(out)

    async def handshake() -> tuple[str | None, str | None]:
        seen = {}

        async def serve(reader, writer):
            seen["server saw"] = tls.peer_common_name(writer.get_extra_info("ssl_object"))
            writer.close()

        db = certs["db01"]
        server = await asyncio.start_server(serve, "127.0.0.1", 0,
                                            ssl=tls.mutual_server_context(db["cert"], db["key"], db["ca_cert"]))
        port = server.sockets[0].getsockname()[1]
        web = certs["web01"]
        ctx = tls.mutual_client_context(web["cert"], web["key"], web["ca_cert"])
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
        client_saw = tls.peer_common_name(writer.get_extra_info("ssl_object"))
        await reader.read()
        writer.close()
        server.close()
        await server.wait_closed()
        return seen.get("server saw"), client_saw

    assert asyncio.run(handshake()) == ("web01", "db01")

    async def without_client_cert() -> list:
        called = []
        server = await asyncio.start_server(
            lambda r, w: (called.append(tls.peer_common_name(w.get_extra_info("ssl_object"))), w.close()),
            "127.0.0.1", 0,
                                            ssl=tls.mutual_server_context(certs["db01"]["cert"], certs["db01"]["key"],
                                                                          certs["db01"]["ca_cert"]))
        port = server.sockets[0].getsockname()[1]
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port,
                                                           ssl=tls.client_context(certs["db01"]["ca_cert"]))
            try:
                await reader.read()   # TLS 1.3: the server's refusal arrives after the client's handshake
            except (ssl.SSLError, ConnectionResetError):
                pass
            writer.close()
        finally:
            server.close()
            await server.wait_closed()
        return called

    # No client certificate: the handshake completes, but the handler sees no identity, so the group
    # listener refuses (and counts) it before reading a frame (tests/integration/test_integration_group.py).
    assert asyncio.run(without_client_cert()) == [None]
