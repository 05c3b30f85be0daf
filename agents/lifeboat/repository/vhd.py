"""Fixed VHD footer (Microsoft Virtual Hard Disk Image Format Specification 1.0): build and parse."""

from __future__ import annotations

import struct
import time
import uuid as uuidmod
from dataclasses import dataclass

from ..core.errors import FormatError

# The footer is the last 512 bytes of a fixed VHD; the disk's bytes come first, unchanged. All its
# integers are big-endian (the VHD spec's byte order, unlike the rest of FORMATS.md).
VHD_FOOTER = struct.Struct(">8sIIQI4sI4sQQHBBII16sB427s")
VHD_FOOTER_BYTES = 512
VHD_COOKIE = b"conectix"
VHD_FEATURES = 2                     # "reserved" bit: the spec says it MUST always be set
VHD_VERSION = 0x00010000             # file format version 1.0
VHD_FIXED_DATA_OFFSET = 0xFFFFFFFFFFFFFFFF   # fixed disks have no dynamic header
VHD_DISK_TYPE_FIXED = 2
VHD_CREATOR_APP = b"lfbt"
VHD_CREATOR_VERSION = 0x00010000
# Azure and Hyper-V expect "Wi2k" here (qemu-img writes it too); the host OS of the creator does not
# change how the disk is read.
VHD_CREATOR_HOST_OS = b"Wi2k"
VHD_EPOCH_UNIX_SECONDS = 946684800   # 2000-01-01T00:00:00Z, the spec's time origin
VHD_CHECKSUM_OFFSET = 64
SECTOR_BYTES = 512
# Azure imports a VHD only when its virtual size is a whole number of MiB.
VHD_SIZE_ALIGNMENT_BYTES = 1024 * 1024
# The spec's geometry algorithm caps cylinders x heads x sectors at this many sectors (~127.5 GiB);
# bigger disks still work, their CHS field just says the maximum.
VHD_MAX_CHS_SECTORS = 65535 * 16 * 255

_DISK_TYPE_NAMES = {0: "none", 1: "reserved (deprecated)", 2: "fixed", 3: "dynamic", 4: "differencing",
                    5: "reserved (deprecated)", 6: "reserved (deprecated)"}


class VhdFooterError(FormatError):
    """Malformed VHD footer ({}): {}."""


@dataclass(frozen=True)
class VhdFooter:
    original_size: int
    current_size: int
    cylinders: int
    heads: int
    sectors_per_track: int
    disk_type: int
    checksum: int
    uuid: uuidmod.UUID
    timestamp: int          # seconds since 2000-01-01T00:00:00Z
    creator_app: bytes
    creator_version: int
    creator_host_os: bytes
    saved_state: int

    @property
    def created_unix(self) -> int:
        return self.timestamp + VHD_EPOCH_UNIX_SECONDS


def rounded_size(disk_size: int) -> int:
    """The VHD virtual size for a disk of disk_size bytes: rounded up to a whole MiB (zeros appended)."""
    if disk_size <= 0:
        raise ValueError(f"a disk of {disk_size} bytes cannot become a VHD: the size must be positive")
    return -(-disk_size // VHD_SIZE_ALIGNMENT_BYTES) * VHD_SIZE_ALIGNMENT_BYTES


def chs_geometry(size: int) -> tuple[int, int, int]:
    """(cylinders, heads, sectors per track) for a disk of size bytes, by the spec's appendix algorithm."""
    total = size // SECTOR_BYTES
    if total > VHD_MAX_CHS_SECTORS:
        total = VHD_MAX_CHS_SECTORS
    if total >= 65535 * 16 * 63:
        sectors, heads = 255, 16
        cyl_times_heads = total // sectors
    else:
        sectors = 17
        cyl_times_heads = total // sectors
        heads = max((cyl_times_heads + 1023) // 1024, 4)
        if cyl_times_heads >= heads * 1024 or heads > 16:
            sectors, heads = 31, 16
            cyl_times_heads = total // sectors
        if cyl_times_heads >= heads * 1024:
            sectors, heads = 63, 16
            cyl_times_heads = total // sectors
    return cyl_times_heads // heads, heads, sectors


def footer_checksum(footer: bytes) -> int:
    """One's complement of the byte sum of the footer, the checksum field itself counted as zero."""
    total = sum(footer[:VHD_CHECKSUM_OFFSET]) + sum(footer[VHD_CHECKSUM_OFFSET + 4:])
    return ~total & 0xFFFFFFFF


def build_footer(size: int, uuid: uuidmod.UUID | None = None, timestamp: float | None = None) -> bytes:
    """The 512-byte footer of a fixed VHD whose data part is `size` bytes (a whole number of MiB).

    timestamp is unix seconds (default: now); uuid defaults to a random one.
    """
    if size <= 0 or size % VHD_SIZE_ALIGNMENT_BYTES:
        raise ValueError(f"VHD size {size} is not a positive whole number of MiB: round it with rounded_size()")
    unix = time.time() if timestamp is None else timestamp
    vhd_time = max(0, int(unix) - VHD_EPOCH_UNIX_SECONDS) & 0xFFFFFFFF
    cylinders, heads, sectors = chs_geometry(size)
    uid = uuid or uuidmod.uuid4()
    fields = [VHD_COOKIE, VHD_FEATURES, VHD_VERSION, VHD_FIXED_DATA_OFFSET, vhd_time, VHD_CREATOR_APP,
              VHD_CREATOR_VERSION, VHD_CREATOR_HOST_OS, size, size, cylinders, heads, sectors,
              VHD_DISK_TYPE_FIXED, 0, uid.bytes, 0, bytes(427)]
    unsummed = VHD_FOOTER.pack(*fields)
    fields[14] = footer_checksum(unsummed)
    return VHD_FOOTER.pack(*fields)


def parse_footer(data: bytes) -> VhdFooter:
    """Parse and check a fixed VHD footer; VhdFooterError names what is wrong."""
    data = bytes(data)
    if len(data) != VHD_FOOTER_BYTES:
        raise VhdFooterError("size", f"a footer is {VHD_FOOTER_BYTES} bytes, got {len(data)}")
    (cookie, features, version, data_offset, timestamp, app, app_version, host_os, original, current,
     cylinders, heads, sectors, disk_type, checksum, uid, saved_state, _reserved) = VHD_FOOTER.unpack(data)
    if cookie != VHD_COOKIE:
        raise VhdFooterError("cookie", f"expected {VHD_COOKIE!r}, found {cookie!r}: the last 512 bytes are not a "
                             "VHD footer (a raw image, or a blob that was not fully written)")
    want = footer_checksum(data)
    if checksum != want:
        raise VhdFooterError("checksum", f"stored 0x{checksum:08x}, computed 0x{want:08x}: the footer is damaged")
    if version >> 16 != VHD_VERSION >> 16:
        raise VhdFooterError("version", f"file format version 0x{version:08x} is not 1.x")
    if disk_type != VHD_DISK_TYPE_FIXED:
        raise VhdFooterError("disk type", f"{disk_type} ({_DISK_TYPE_NAMES.get(disk_type, 'unknown')}), Azure "
                             "and this tool need 2 (fixed)")
    if data_offset != VHD_FIXED_DATA_OFFSET:
        raise VhdFooterError("data offset", f"0x{data_offset:x}, a fixed disk has 0x{VHD_FIXED_DATA_OFFSET:x}")
    if current <= 0 or current % SECTOR_BYTES:
        raise VhdFooterError("current size", f"{current} is not a positive multiple of {SECTOR_BYTES}")
    return VhdFooter(original, current, cylinders, heads, sectors, disk_type, checksum, uuidmod.UUID(bytes=uid),
                     timestamp, app, app_version, host_os, saved_state)
