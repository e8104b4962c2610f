#!/usr/bin/env python3
"""Writes the seed inputs under fuzz/seeds/<target>/ (run from anywhere; idempotent).

The seeds are small, valid protocol exchanges so that libFuzzer starts from deep states
instead of having to discover the magic numbers. Values follow the NBD protocol document
(doc/proto.md) as implemented in tracker/src/nbd/consts.rs. Exports match the fuzz targets:
"disk0" (1 MiB, dirty bitmap "vmreplica") and "disk1" (4 KiB, read-only). The state seeds
are valid tracker state files (a bitmap header, activity log copies); the vm seeds a VM
definition and QMP and guest-agent transcripts.
"""
import os
import struct
import zlib

IHAVEOPT = 0x49484156454F5054
REQUEST_MAGIC = 0x25609513
EXTENDED_REQUEST_MAGIC = 0x21E41C71

OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_INFO, OPT_GO = 1, 2, 3, 6, 7
OPT_STRUCTURED_REPLY, OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT = 8, 9, 10
OPT_EXTENDED_HEADERS = 11
INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE = 1, 2, 3
CMD_READ, CMD_WRITE, CMD_BLOCK_STATUS = 0, 1, 7
CMD_FLAG_FUA, CMD_FLAG_REQ_ONE, CMD_FLAG_PAYLOAD_LEN = 1 << 0, 1 << 3, 1 << 5

FIXED_NO_ZEROES = struct.pack(">I", 3)
FIXED_ONLY = struct.pack(">I", 1)


def opt(o, data=b""):
    return struct.pack(">QII", IHAVEOPT, o, len(data)) + data


def go_data(name, infos=()):
    n = name.encode()
    return struct.pack(">I", len(n)) + n + struct.pack(">H", len(infos)) + b"".join(
        struct.pack(">H", i) for i in infos
    )


def meta_data(name, queries):
    n = name.encode()
    d = struct.pack(">I", len(n)) + n + struct.pack(">I", len(queries))
    for q in queries:
        d += struct.pack(">I", len(q)) + q.encode()
    return d


def compact(flags, typ, cookie, offset, length):
    return struct.pack(">IHHQQI", REQUEST_MAGIC, flags, typ, cookie, offset, length)


def extended(flags, typ, cookie, offset, length):
    return struct.pack(">IHHQQQ", EXTENDED_REQUEST_MAGIC, flags, typ, cookie, offset, length)


# handshake: first byte selects the read sizes (0x00 = 1 byte at a time, 0x07 = 8 bytes,
# bit 0x80 = pseudo-random 1..64); with bit 0x40, a repeat header follows (see expand()).
# The rest is what the client sends after the greeting.


def repeat(pos, seg, reps):
    """The handshake target's repeat header: stream[pos:pos+seg] occurs reps more times."""
    return struct.pack(">HBH", pos, seg, reps)


OVERSIZED = 70000  # > MAX_OPTION_LEN (64 KiB): discarded and answered with ERR_TOO_BIG
HANDSHAKE = {
    "go_extended_meta": b"\x00"
    + FIXED_NO_ZEROES
    + opt(OPT_EXTENDED_HEADERS)
    + opt(
        OPT_SET_META_CONTEXT,
        meta_data("disk0", ["base:allocation", "qemu:dirty-bitmap:vmreplica"]),
    )
    + opt(OPT_GO, go_data("disk0", [INFO_BLOCK_SIZE])),
    "structured_list_info_go": b"\x87"
    + FIXED_NO_ZEROES
    + opt(OPT_STRUCTURED_REPLY)
    + opt(OPT_LIST)
    + opt(OPT_LIST_META_CONTEXT, meta_data("disk0", []))
    + opt(OPT_LIST_META_CONTEXT, meta_data("disk0", ["qemu:"]))
    + opt(OPT_INFO, go_data("disk1", [INFO_NAME, INFO_DESCRIPTION]))
    + opt(OPT_GO, go_data("")),
    "export_name_oldstyle": b"\x07" + FIXED_ONLY + opt(OPT_EXPORT_NAME, b"disk1"),
    "abort": b"\x03" + FIXED_NO_ZEROES + opt(99, b"junk") + opt(OPT_ABORT),
    # An option over 64 KiB (the two zero bytes at offset 20 become 70000), then ABORT.
    "oversized_option": b"\x7f"
    + repeat(20, 2, OVERSIZED // 2 - 1)
    + FIXED_NO_ZEROES
    + struct.pack(">QII", IHAVEOPT, OPT_LIST_META_CONTEXT, OVERSIZED)
    + b"\0\0"
    + opt(OPT_ABORT),
    # 4097 unknown options: one more than MAX_OPTIONS, read in pseudo-random sizes.
    "too_many_options": b"\xc0" + repeat(4, 16, 4096) + FIXED_NO_ZEROES + opt(99),
}

# request: raw header bytes (decoded both as compact and as extended by the target).
REQUEST = {
    "compact_read": compact(0, CMD_READ, 1, 4096, 65536),
    "compact_write_fua": compact(CMD_FLAG_FUA, CMD_WRITE, 2, 0, 512),
    "extended_block_status": extended(CMD_FLAG_REQ_ONE, CMD_BLOCK_STATUS, 3, 0, 1 << 30),
    "extended_write_payload": extended(CMD_FLAG_PAYLOAD_LEN, CMD_WRITE, 4, 8192, 4096),
}


# Replication wire frames (common/src/wire.rs, protocol 2): 4-byte length, type, fields.
# Checksums are not valid xxh3 values; the frames decode, and unpacking then reaches lz4 and
# the checksum. (The undo log seeds, fuzz/seeds/undo, need valid xxh3 checks: the applier's
# test `fuzz_seeds_are_valid_logs` writes them, with VMREPLICA_WRITE_FUZZ_SEEDS=fuzz/seeds/undo;
# the zero record seeds, fuzz/seeds/zero_log, the test `fuzz_seeds_are_valid_records`.)
T_HELLO, T_WELCOME, T_BEGIN, T_RESUME, T_CHUNK, T_MANIFEST, T_APPLIED, T_HASHES, T_ACKED = (
    1, 2, 3, 4, 5, 6, 7, 10, 11)
LINEAGE = bytes(range(16))


def frame(body):
    return struct.pack(">I", len(body)) + body


def wstr(s):
    return struct.pack(">H", len(s)) + s


def chunk(encoding, length, payload):
    return frame(struct.pack(">B", T_CHUNK) + LINEAGE
                 + struct.pack(">QQHQIBQI", 7, 3, 0, 65536, length, encoding, 99, len(payload))
                 + payload)


WIRE = {
    "hello": frame(struct.pack(">BH", T_HELLO, 2) + wstr(b"vm1") + b"\x01" + LINEAGE),
    "hello_v1": frame(struct.pack(">BH", T_HELLO, 1) + wstr(b"vm1")),
    "welcome": frame(struct.pack(">BHQ", T_WELCOME, 2, 6) + b"\x01" + LINEAGE
                     + struct.pack(">QB", 66, 1) + LINEAGE + struct.pack(">QBQ", 7, 0, 77)),
    "begin": frame(struct.pack(">B", T_BEGIN) + LINEAGE + struct.pack(">QBQI", 7, 0, 77, 1)
                   + wstr(b"sys") + struct.pack(">QI", 1 << 30, 65536)),
    "resume": frame(struct.pack(">B", T_RESUME) + LINEAGE + struct.pack(">QQBI", 7, 3, 1, 2)
                    + struct.pack(">HQQ", 0, 65536, 4096) + struct.pack(">HQQ", 1, 0, 1 << 20)),
    "chunk_zero": chunk(0, 65536, b""),
    "chunk_lz4": chunk(1, 4, bytes([0x40]) + b"abcd"),
    "chunk_raw": chunk(2, 8, b"12345678"),
    "acked": frame(struct.pack(">BQQQ", T_ACKED, 7, 3, 65536)),
    "manifest": frame(struct.pack(">B", T_MANIFEST) + LINEAGE + struct.pack(">QQQQQ", 7, 3, 1, 4096, 5)),
    "applied": frame(struct.pack(">B", T_APPLIED) + LINEAGE + struct.pack(">Q", 7)),
    "hashes": frame(struct.pack(">B", T_HASHES) + wstr(b"sys") + struct.pack(">QIQQ", 0, 2, 1, 2)),
}


# Tracker state files, little-endian, CRC-32 (zlib's): a dirty bitmap header
# (tracker/src/bitmap.rs) and one activity log copy (tracker/src/activity_log.rs).
def bitmap_header(disk_size, granularity):
    words = -(-(-(-disk_size // granularity)) // 64)
    slot = max(1, -(-(words * 8) // 4096)) * 4096
    h = b"VMRBMAP1" + struct.pack("<IIQQ", 1, granularity, disk_size, slot)
    return h + struct.pack("<I", zlib.crc32(h))


def activity_copy_v1(seq, extents):
    head = b"VMRAL001" + struct.pack("<QI", seq, len(extents))
    body = b"".join(struct.pack("<Q", e) for e in extents)
    return head + struct.pack("<I", zlib.crc32(head + body)) + body


def activity_copy(seq, extents, sums):
    head = b"VMRAL002" + struct.pack("<QIQQ", seq, len(extents), *sums)
    body = b"".join(struct.pack("<Q", e) for e in extents)
    return head + struct.pack("<I", zlib.crc32(head + body)) + body


STATE = {
    "bitmap_8g": bitmap_header(8 << 30, 65536),
    "bitmap_odd": bitmap_header((1 << 30) + 1, 4096),
    "activity_empty": activity_copy(1, [], (0, 0)),
    "activity_three": activity_copy(42, [0, 7, 2047], (0x1234, 0xFFFF_FFFF_0000_0001)),
    "activity_v1": activity_copy_v1(42, [0, 7, 2047]),
}

# VM definitions (vmreplica-vm): one with a libvirt template inline, one minimal.
VM_DEFINITION = {
    "full": b"""version = 1
name = "vm1"
disks = ["sys", "data"]
qemu = ["qemu-system-x86_64", "-name", "${name}", "-m", "1024",
  "-drive", "file=${disk:sys},format=raw,if=virtio", "-drive", "file=${disk:data},format=raw",
  "-qmp", "unix:${qmp},server=on,wait=off",
  "-chardev", "socket,id=qga0,path=${qga},server=on,wait=off",
  "-serial", "file:${console}", "${net}", "-cost", "$$0"]
net = ["-nic", "bridge,br=br0"]
test_net = ["-nic", "none"]
[libvirt]
xml = "<domain><name>${name}</name>${disk_source:sys}${disk:data}<x p='${qga}'/>${net}</domain>"
net = "<interface type='bridge'/>"
""",
    "minimal": b"""version = 1
name = "t"
disks = ["d"]
qemu = ["q", "file=${disk:d}", "unix:${qmp}", "${net}"]
net = []
""",
}

GREETING = (b'{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, '
            b'"package": ""}, "capabilities": ["oob"]}}\r\n')

# What QEMU or a guest agent sends; the first byte picks the client (0 QMP, 1 agent sync,
# 2 agent commands).
VM_PROTOCOL = {
    "qmp_session": b"\x00" + GREETING + b'{"return": {}, "id": 1}\r\n'
    + b'{"event": "STOP", "data": {}, "timestamp": {"seconds": 1, "microseconds": 2}}\r\n'
    + b'{"return": {"status": "paused", "running": false}, "id": 2}\r\n'
    + b'{"error": {"class": "GenericError", "desc": "no"}, "id": 3}\r\n'
    + b'{"event": "SHUTDOWN", "data": {"guest": true}, '
    + b'"timestamp": {"seconds": 3, "microseconds": 4}}\r\n',
    "agent_sync": b"\x01" + b'{"error": {"class": "GenericError", "desc": "JSON parse error"}}\n'
    + b'\xff{"return": 1234}\n',
    "agent_commands": b"\x02" + b'{"return": "thawed"}\n{"return": 1}\n{"return": 1}\n'
    + b'{"return": {}}\n',
}


def main():
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "seeds")
    for target, seeds in (("handshake", HANDSHAKE), ("request", REQUEST), ("wire", WIRE),
                          ("state", STATE), ("vm_definition", VM_DEFINITION),
                          ("vm_protocol", VM_PROTOCOL)):
        d = os.path.join(root, target)
        os.makedirs(d, exist_ok=True)
        for name, data in seeds.items():
            with open(os.path.join(d, name), "wb") as f:
                f.write(data)
            print(f"{target}/{name}: {len(data)} bytes")


if __name__ == "__main__":
    main()
