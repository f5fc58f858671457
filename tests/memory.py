"""What this process holds of a file in memory: read from /proc/self/smaps (Linux). Free of torch and pytest, so
the other environments' scripts (tests/environments.py) import it too."""

from __future__ import annotations

from pathlib import Path


def resident_bytes(path: Path) -> int:
    """Bytes of ``path``'s pages resident in this process's mappings of it (a page mapped twice counts twice)."""
    target, total, inside = str(Path(path).resolve()), 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if "-" in fields[0] and len(fields) >= 5 and fields[1][:1] in "r-":  # a mapping's header line
            inside = len(fields) == 6 and fields[5] == target
        elif inside and fields[0] == "Rss:":
            total += int(fields[1]) * 1024
    return total
