"""ARM template and machine descriptor: valid structure, every reference resolves, disks attach as they should."""

from __future__ import annotations

import json
import re

import pytest

from lifeboat.core.errors import LifeboatError
from lifeboat.repository.azure_vm import (ARM_SCHEMA, FailedOverDisk, FailedOverMachine, arm_template,
                                          machine_descriptor, write_descriptors)

MiB = 1024 * 1024
URL = "https://acct.blob.core.windows.net/dr/drill/{}.vhd"


def machine(os_disk: str = "") -> FailedOverMachine:
    disks = [FailedOverDisk(f"web01.{d}", URL.format(f"web01.{d}"), size, -(-size // MiB) * MiB, f"digest-{d}")
             for d, size in (("sdb", 10 * MiB), ("sda", 20 * MiB - 4096), ("sdc", 5 * MiB))]
    return FailedOverMachine("web01", "p-123", "app", 1_764_000_000.0, disks, os_disk=os_disk,
                             hints={"block_size": 65536})


def expressions(node) -> list[str]:
    """Every ARM template expression string ("[...]") anywhere in the document."""
    if isinstance(node, dict):
        return [e for v in node.values() for e in expressions(v)]
    if isinstance(node, list):
        return [e for v in node for e in expressions(v)]
    return [node] if isinstance(node, str) and node.startswith("[") and node.endswith("]") else []


def disk_resource_id(name_expr: str) -> str:
    """The resourceId() expression that refers to the disk whose name expression is name_expr."""
    inner = name_expr[1:-1]
    return f"[resourceId('Microsoft.Compute/disks', {inner})]"


def test_template_structure_and_references_resolve():
    t = arm_template(machine())
    json.dumps(t)  # serialisable as is
    assert t["$schema"] == ARM_SCHEMA and "2019-04-01" in t["$schema"]
    assert re.fullmatch(r"\d+\.\d+\.\d+\.\d+", t["contentVersion"])
    for p in t["parameters"].values():
        assert p["type"] in ("string", "int", "bool", "object", "array", "securestring")
    # Every parameters('x') used anywhere is declared, and every declared parameter is used.
    used = {m for e in expressions(t) for m in re.findall(r"parameters\('(\w+)'\)", e)}
    assert used == set(t["parameters"]), (used, set(t["parameters"]))
    assert {"storageAccountId", "networkInterfaceId"} <= used
    # The two parameters without a default must be given at deployment: the storage account and the NIC.
    assert {n for n, p in t["parameters"].items() if "defaultValue" not in p} == {"storageAccountId",
                                                                                 "networkInterfaceId"}

    disks = [r for r in t["resources"] if r["type"] == "Microsoft.Compute/disks"]
    vms = [r for r in t["resources"] if r["type"] == "Microsoft.Compute/virtualMachines"]
    assert len(disks) == 3 and len(vms) == 1 and len(t["resources"]) == 4
    assert all(r.get("apiVersion") and r.get("location") and r.get("name") for r in t["resources"])
    assert len({r["name"] for r in disks}) == 3
    for r in disks:
        cd = r["properties"]["creationData"]
        assert cd["createOption"] == "Import" and cd["storageAccountId"] == "[parameters('storageAccountId')]"
    assert sorted(r["properties"]["creationData"]["sourceUri"] for r in disks) == \
        sorted(URL.format(f"web01.{d}") for d in ("sda", "sdb", "sdc"))

    vm = vms[0]
    disk_ids = {disk_resource_id(r["name"]) for r in disks}
    assert set(vm["dependsOn"]) == disk_ids, "the VM waits for every disk it attaches"
    sp = vm["properties"]["storageProfile"]
    attached = [sp["osDisk"]["managedDisk"]["id"]] + [d["managedDisk"]["id"] for d in sp["dataDisks"]]
    assert sorted(attached) == sorted(disk_ids), "each disk attached exactly once"
    assert sp["osDisk"]["createOption"] == "Attach" and sp["osDisk"]["osType"] == "Linux"
    assert all(d["createOption"] == "Attach" for d in sp["dataDisks"])
    assert [d["lun"] for d in sp["dataDisks"]] == [0, 1]
    # Default OS disk: the first in name order (sda); only it carries osType.
    assert sp["osDisk"]["managedDisk"]["id"].endswith("'-sda'))]")
    assert [r["properties"].get("osType") for r in disks] == ["Linux", None, None]
    assert vm["properties"]["networkProfile"]["networkInterfaces"] == [{"id": "[parameters('networkInterfaceId')]"}]


def test_os_disk_choice_and_bad_choice():
    t = arm_template(machine(os_disk="web01.sdc"))
    vm = next(r for r in t["resources"] if r["type"] == "Microsoft.Compute/virtualMachines")
    assert vm["properties"]["storageProfile"]["osDisk"]["managedDisk"]["id"].endswith("'-sdc'))]")
    with pytest.raises(LifeboatError, match=r"--os-disk 'sdz' is not a disk of web01 \(it has sda, sdb, sdc\)"):
        machine(os_disk="web01.sdz")
    with pytest.raises(LifeboatError, match="no disks"):
        FailedOverMachine("web01", "p", "crash", 0.0, [])


def test_descriptor_content_and_files(tmp_path):
    m = machine()
    d = machine_descriptor(m)
    assert (d["machine"], d["point_id"], d["consistency"], d["os_type"], d["os_disk"]) == \
        ("web01", "p-123", "app", "Linux", "web01.sda")
    assert d["created"] == "2025-11-24T16:00:00Z"
    sda = d["disks"][0]
    assert (sda["disk_id"], sda["role"], sda["format"], sda["vhd_size"], sda["padding_bytes"]) == \
        ("web01.sda", "os", "vhd-fixed", 20 * MiB, 4096)
    assert [x["role"] for x in d["disks"]] == ["os", "data", "data"]
    assert d["hints"] == {"block_size": 65536}
    descriptor, template = write_descriptors(str(tmp_path / "out"), m)
    assert descriptor.endswith("web01.machine.json") and template.endswith("web01.arm.json")
    assert json.loads(open(descriptor).read()) == d
    assert json.loads(open(template).read()) == arm_template(m)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["web01.arm.json", "web01.machine.json"]
