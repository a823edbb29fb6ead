"""Prints the newest glibc symbol version each native library in a wheel needs, and fails when
one needs a newer glibc than the wheel is meant for: the check behind the wheel's manylinux tag
(auditwheel's own, read from the same ELF version tables, is the repair step's).

    python scripts/wheel-glibc.py MAX WHEEL     e.g. 2.28 build/wheelhouse/devmem-*.whl

Needs pyelftools (auditwheel's dependency, so scripts/wheel.sh's tools venv has it). Exit 1 when
a library (or the devmem-keeper executable) needs more than glibc MAX, 2 when the wheel has no
native library at all or lacks devmem/devmem-keeper.
"""

import io
import re
import sys
import zipfile

from elftools.elf.elffile import ELFFile
from elftools.elf.gnuversions import GNUVerNeedSection


def glibc_versions(elf_bytes: bytes) -> list:
    """Every GLIBC_x.y version the library's version-needed table names, as (x, y) tuples."""
    versions = set()
    for section in ELFFile(io.BytesIO(elf_bytes)).iter_sections():
        if isinstance(section, GNUVerNeedSection):
            for _needed, auxiliaries in section.iter_versions():
                for aux in auxiliaries:
                    match = re.fullmatch(r"GLIBC_([0-9]+)\.([0-9]+)(?:\.[0-9]+)?", aux.name)
                    if match:
                        versions.add((int(match[1]), int(match[2])))
    return sorted(versions)


def main(limit: str, wheel: str) -> int:
    most = tuple(int(n) for n in limit.split("."))
    too_new = []
    libraries = 0
    with zipfile.ZipFile(wheel) as archive:
        archive_names = archive.namelist()
        for name in sorted(archive_names):
            if not re.search(r"\.so(\.[0-9]+)*$", name) and not name.endswith("/devmem-keeper"):
                continue
            libraries += 1
            data = archive.read(name)
            versions = glibc_versions(data)
            newest = "GLIBC_%d.%d" % versions[-1] if versions else "no glibc version"
            print(f"  {name} ({len(data)} bytes): needs {newest}")
            if versions and versions[-1] > most:
                needs = ", ".join("GLIBC_%d.%d" % v for v in versions if v > most)
                too_new.append(f"{name} needs {needs}")
    if not any(n.endswith("devmem/devmem-keeper") for n in archive_names):
        print(f"FAIL: {wheel} has no devmem/devmem-keeper executable", file=sys.stderr)
        return 2
    if libraries == 0:
        print(f"FAIL: {wheel} has no native library", file=sys.stderr)
        return 2
    if too_new:
        print(f"FAIL: built for glibc {limit}, but " + "; ".join(too_new), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1], sys.argv[2]))
