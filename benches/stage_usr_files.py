#!/usr/bin/env python3
"""Stages real files for a benchmark image: hard-links files from /usr into STAGE_DIR (the
kind of data a guest disk holds: binaries, libraries, text) until BUDGET bytes, in a fixed
order (sorted walk), so two runs on one machine stage the same files. Prints the bytes staged.

Usage: stage_usr_files.py STAGE_DIR BUDGET_BYTES
Shared by benches/replication.sh and benches/cpu-callgrind.sh."""
import os
import sys

stage, budget = sys.argv[1], int(sys.argv[2])
used = 0
for root in ("/usr/share", "/usr/bin", "/usr/lib", "/usr/libexec", "/usr/sbin"):
    for dirpath, dirs, files in os.walk(root):
        dirs.sort(); files.sort()
        for f in files:
            src = os.path.join(dirpath, f)
            try:
                st = os.lstat(src)
            except OSError:
                continue
            if not os.path.isfile(src) or os.path.islink(src):
                continue
            if used + st.st_size > budget:
                continue
            dst = os.path.join(stage, src.lstrip("/"))
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            try:
                os.link(src, dst)
            except OSError:
                continue
            used += st.st_size
print(used)
