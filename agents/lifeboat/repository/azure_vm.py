"""Machine descriptor and ARM template that create an Azure VM from failed-over VHD page blobs."""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field

from ..core.errors import LifeboatError

MACHINE_DESCRIPTOR_VERSION = 1
ARM_SCHEMA = "https://schema.management.azure.com/schemas/2019-04-01/deploymentTemplate.json#"
ARM_CONTENT_VERSION = "1.0.0.0"
DISKS_API_VERSION = "2023-04-02"
VMS_API_VERSION = "2023-03-01"
DEFAULT_VM_SIZE = "Standard_D2s_v3"
DEFAULT_DISK_SKU = "Standard_LRS"
# The agent does not record the guest OS yet; Lifeboat protects Linux machines only, so "Linux".
OS_TYPE_GUESS = "Linux"
# Managed disk names: 1-80 letters, digits, '_', '-', '.'; we derive them from the VM name and disk name.
_DISK_NAME_CHARS_RE = re.compile(r"[^A-Za-z0-9_.-]")


@dataclass
class FailedOverDisk:
    disk_id: str            # <machine>.<disk>
    blob_url: str
    disk_size: int          # the protected disk's size
    vhd_size: int           # the VHD's virtual size (disk_size rounded up to a whole MiB)
    image_digest: str       # the point's image digest, checked when the image was materialised


@dataclass
class FailedOverMachine:
    machine: str
    point_id: str
    consistency: str
    created: float          # the point's capture time (unix seconds, agent clock)
    disks: list[FailedOverDisk]
    os_disk: str = ""       # disk_id of the OS disk; default: the first disk in name order
    hints: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.disks:
            raise LifeboatError(f"machine {self.machine}: no disks to describe")
        self.disks = sorted(self.disks, key=lambda d: d.disk_id)
        ids = [d.disk_id for d in self.disks]
        if not self.os_disk:
            self.os_disk = ids[0]
        elif self.os_disk not in ids:
            raise LifeboatError(f"--os-disk {self.os_disk.split('.', 1)[-1]!r} is not a disk of {self.machine} (it has "
                                f"{', '.join(i.split('.', 1)[-1] for i in ids)})")


def _short(disk_id: str) -> str:
    return _DISK_NAME_CHARS_RE.sub("-", disk_id.split(".", 1)[-1])


def machine_descriptor(m: FailedOverMachine) -> dict:
    return {
        "version": MACHINE_DESCRIPTOR_VERSION,
        "machine": m.machine,
        "point_id": m.point_id,
        "consistency": m.consistency,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(m.created)),
        "created_unix": m.created,
        "os_type": OS_TYPE_GUESS,
        "os_type_guessed": True,
        "os_disk": m.os_disk,
        "disks": [{"disk_id": d.disk_id, "name": _short(d.disk_id), "role": "os" if d.disk_id == m.os_disk else "data",
                   "blob_url": d.blob_url, "format": "vhd-fixed", "disk_size": d.disk_size, "vhd_size": d.vhd_size,
                   "padding_bytes": d.vhd_size - d.disk_size, "image_digest": d.image_digest} for d in m.disks],
        "hints": m.hints,
    }


def arm_template(m: FailedOverMachine) -> dict:
    """An ARM deployment template: one managed disk imported per page blob, and a VM attaching them."""
    def disk_name(d: FailedOverDisk) -> str:
        return f"[concat(parameters('vmName'), '-{_short(d.disk_id)}')]"

    def disk_ref(d: FailedOverDisk) -> str:
        return f"[resourceId('Microsoft.Compute/disks', concat(parameters('vmName'), '-{_short(d.disk_id)}'))]"

    disks = []
    for d in m.disks:
        props = {"creationData": {"createOption": "Import",
                                  "storageAccountId": "[parameters('storageAccountId')]",
                                  "sourceUri": d.blob_url}}  # the size comes from the VHD footer
        if d.disk_id == m.os_disk:
            props.update({"osType": OS_TYPE_GUESS, "hyperVGeneration": "[parameters('hyperVGeneration')]"})
        disks.append({"type": "Microsoft.Compute/disks", "apiVersion": DISKS_API_VERSION, "name": disk_name(d),
                      "location": "[parameters('location')]", "sku": {"name": "[parameters('diskSku')]"},
                      "properties": props})
    os_disk = next(d for d in m.disks if d.disk_id == m.os_disk)
    data_disks = [d for d in m.disks if d.disk_id != m.os_disk]
    vm = {
        "type": "Microsoft.Compute/virtualMachines", "apiVersion": VMS_API_VERSION,
        "name": "[parameters('vmName')]", "location": "[parameters('location')]",
        "dependsOn": [disk_ref(d) for d in m.disks],
        "properties": {
            "hardwareProfile": {"vmSize": "[parameters('vmSize')]"},
            "storageProfile": {
                "osDisk": {"osType": OS_TYPE_GUESS, "createOption": "Attach",
                           "managedDisk": {"id": disk_ref(os_disk)}},
                "dataDisks": [{"lun": lun, "createOption": "Attach", "managedDisk": {"id": disk_ref(d)}}
                              for lun, d in enumerate(data_disks)],
            },
            "networkProfile": {"networkInterfaces": [{"id": "[parameters('networkInterfaceId')]"}]},
        },
    }

    def param(kind: str, description: str, default=None) -> dict:
        p = {"type": kind, "metadata": {"description": description}}
        if default is not None:
            p["defaultValue"] = default
        return p

    return {
        "$schema": ARM_SCHEMA,
        "contentVersion": ARM_CONTENT_VERSION,
        "metadata": {"generator": "lifeboat failover --to-azure", "machine": m.machine, "point_id": m.point_id},
        "parameters": {
            "vmName": param("string", "name of the VM (its disks are named <vmName>-<disk>)",
                            _DISK_NAME_CHARS_RE.sub("-", m.machine)),
            "location": param("string", "region; the storage account must be in the same one",
                              "[resourceGroup().location]"),
            "vmSize": param("string", "VM size", DEFAULT_VM_SIZE),
            "diskSku": param("string", "managed disk SKU", DEFAULT_DISK_SKU),
            "hyperVGeneration": param("string", "V1 for BIOS-booting images, V2 for UEFI", "V1"),
            "storageAccountId": param("string", "resource ID of the storage account that holds the VHD page blobs"),
            "networkInterfaceId": param("string", "resource ID of an existing NIC in the target network "
                                                  "(a test failover belongs in an isolated network)"),
        },
        "resources": disks + [vm],
        "outputs": {"vmId": {"type": "string",
                             "value": "[resourceId('Microsoft.Compute/virtualMachines', parameters('vmName'))]"}},
    }


def _write_json(path: str, doc: dict) -> None:
    tmp = path + ".partial"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_descriptors(out_dir: str, m: FailedOverMachine, name: str | None = None) -> tuple[str, str]:
    """Write <name>.machine.json and <name>.arm.json (name: the machine's) into out_dir; return both paths."""
    name = name or m.machine
    os.makedirs(out_dir, exist_ok=True)
    machine_path = os.path.join(out_dir, f"{name}.machine.json")
    arm_path = os.path.join(out_dir, f"{name}.arm.json")
    _write_json(machine_path, machine_descriptor(m))
    _write_json(arm_path, arm_template(m))
    return machine_path, arm_path
