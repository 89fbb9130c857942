"""What the GPU machine needs to run the real broker and the service, packed to fit its 64 MiB carry.

The device machine has Python 3.12 with torch but none of this project's other dependencies, no
Java, and no network. This packs, into ``.gpu-bundle/`` (git-ignored; carry it):

- ``wheels/``: the service's dependencies the machine lacks (aiokafka, pydantic, ...), as cp312
  manylinux wheels from PyPI at the versions requirements.lock pins;
- ``jre.tar.xz``: a Java runtime made by ``jlink`` from this machine's JDK, with only the modules
  the Kafka broker loads (java.desktop is among them: the broker's configuration uses java.beans);
- ``kafka.tar.xz``: the Apache Kafka jars that scripts/kafka-local resolved, their entries stored
  uncompressed inside one xz stream (about half the jars' own size), native libraries of other
  platforms than linux x86-64 left out.

    .venv/bin/python bench/gpu_bundle.py pack              here, once (a few minutes: xz)
    python3 bench/gpu_bundle.py unpack DEST                 there: DEST/jre, DEST/kafka/<version>/libs

bench/gpu_check.sh unpacks it when it is there and runs bench/through_broker.py on the GPU.
"""
from __future__ import annotations

import argparse
import io
import lzma
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUNDLE = ROOT / ".gpu-bundle"
KAFKA = ROOT / ".cache" / "kafka"
WHEELS = ["aiokafka", "pydantic", "pydantic-settings", "async-timeout"]
JRE_MODULES = ("java.base,java.desktop,java.logging,java.management,java.naming,java.scripting,java.security.jgss,"
               "java.security.sasl,java.sql,java.xml,jdk.crypto.ec,jdk.management,jdk.naming.dns,jdk.unsupported")
# Native libraries inside the codec jars, by platform; only these are kept.
KEEP_NATIVE = ("linux/amd64/", "Linux/x86_64/", "linux/x86_64/")
NATIVE_SUFFIXES = (".so", ".dll", ".dylib", ".jnilib", ".a")


def _other_platform(name: str) -> bool:
    return name.endswith(NATIVE_SUFFIXES) and not any(keep in name for keep in KEEP_NATIVE)


def pack() -> int:
    versions = sorted(p for p in KAFKA.iterdir() if (p / "libs" / ".resolved").exists())
    if not versions:
        sys.exit("no resolved Kafka jars: run scripts/kafka-local start once first")
    libs = versions[-1] / "libs"
    if BUNDLE.exists():
        shutil.rmtree(BUNDLE)
    (BUNDLE / "wheels").mkdir(parents=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "--python-version", "3.12",
                    "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_28_x86_64",
                    "-c", str(ROOT / "requirements.lock"), "-d", str(BUNDLE / "wheels"), *WHEELS], check=True)
    jre = BUNDLE / "jre"
    subprocess.run(["jlink", "--add-modules", JRE_MODULES, "--strip-debug", "--no-header-files", "--no-man-pages",
                    "--compress=2", "--output", str(jre)], check=True)
    with tarfile.open(BUNDLE / "jre.tar.xz", "w:xz", preset=9) as tar:
        tar.add(jre, arcname="jre")
    shutil.rmtree(jre)
    with tarfile.open(BUNDLE / "kafka.tar.xz", "w:xz", preset=9) as tar:
        for jar in sorted(libs.glob("*.jar")):
            with zipfile.ZipFile(jar) as z:
                for entry in z.infolist():
                    if entry.is_dir() or _other_platform(entry.filename):
                        continue
                    data = z.read(entry)
                    info = tarfile.TarInfo(f"{versions[-1].name}/{jar.name}/{entry.filename}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        stamp = (libs / ".resolved").read_bytes()
        info = tarfile.TarInfo(f"{versions[-1].name}/.resolved")
        info.size = len(stamp)
        tar.addfile(info, io.BytesIO(stamp))
    total = sum(p.stat().st_size for p in BUNDLE.rglob("*") if p.is_file())
    for p in sorted(BUNDLE.rglob("*")):
        if p.is_file():
            print(f"{p.stat().st_size / 2**20:7.1f} MiB  {p.relative_to(ROOT)}")
    print(f"{total / 2**20:7.1f} MiB  in all (the device carries at most 64 MiB with the working tree)")
    return 0


def unpack(dest: Path) -> int:
    """JRE to DEST/jre; each jar rebuilt (entries stored) in DEST/kafka/<version>/libs, with the
    stamp that tells scripts/kafka-local the jars are resolved."""
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(BUNDLE / "jre.tar.xz") as tar:
        tar.extractall(dest, filter="tar")
    jars: dict[Path, zipfile.ZipFile] = {}
    with lzma.open(BUNDLE / "kafka.tar.xz") as raw, tarfile.open(fileobj=raw, mode="r|") as tar:
        for member in tar:
            version, jar, *entry = member.name.split("/", 2)
            data = tar.extractfile(member).read()  # type: ignore[union-attr]
            libs = dest / "kafka" / version / "libs"
            libs.mkdir(parents=True, exist_ok=True)
            if not entry:
                stamp = data
                continue
            path = libs / jar
            if path not in jars:
                jars[path] = zipfile.ZipFile(path, "w", zipfile.ZIP_STORED)
            jars[path].writestr(entry[0], data)
    for z in jars.values():
        z.close()
    (libs / ".resolved").write_bytes(stamp)
    print(f"unpacked {len(jars)} jars into {libs} and a JRE into {dest / 'jre'}")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("pack")
    u = sub.add_parser("unpack")
    u.add_argument("dest", type=Path)
    a = p.parse_args()
    return pack() if a.command == "pack" else unpack(a.dest)


if __name__ == "__main__":
    sys.exit(main())
