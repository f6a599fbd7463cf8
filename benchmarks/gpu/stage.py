"""Carry onnxruntime-gpu to a GPU machine that has no package index, in as few parts as possible.

Here (`scripts/stage-gpu.sh` runs it):

    python -m benchmarks.gpu.stage pack WHEEL .device/ort

repacks the wheel: its 284 MB CUDA provider library xz-compressed on its own
(about 185 MB), the rest of the wheel as an LZMA zip, both in one tar split into
parts of at most 56 MiB, with a sha256 for every part and for the whole.

There (`source .device/ort/install.sh` runs it):

    python3 -m benchmarks.gpu.stage unpack SITE DIR [DIR ...]

finds the parts in the DIRs, names any that are missing or damaged, checks the
whole, and unpacks onnxruntime-gpu into SITE (put first on PYTHONPATH); and

    python3 -m benchmarks.gpu.stage libpath

prints the folders of the nvidia-* pip packages' libraries (CUDA, cuBLAS, cuDNN)
that the machine's Python has, for LD_LIBRARY_PATH, so onnxruntime finds them
without torch having loaded them first. Standard library only: it runs before
anything is installed.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import shutil
import site
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

PROVIDER = "onnxruntime/capi/libonnxruntime_providers_cuda.so"
PART_BYTES = 56 * 2**20
INDEX = "parts.json"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def pack(wheel: Path, out: Path, part_bytes: int = PART_BYTES) -> list[Path]:
    """Split `wheel` into parts under `out`; returns the parts."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("part-*"):
        old.unlink()
    with tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir)
        with zipfile.ZipFile(wheel) as source:
            if PROVIDER not in source.namelist():
                raise SystemExit(f"{wheel} has no {PROVIDER}: is it onnxruntime-gpu?")
            with zipfile.ZipFile(scratch / "rest.zip", "w", zipfile.ZIP_LZMA) as rest:
                for info in source.infolist():
                    if info.filename != PROVIDER:
                        rest.writestr(info.filename, source.read(info.filename))
            source.extract(PROVIDER, scratch)
        library = scratch / PROVIDER
        _xz(library, scratch / "provider.xz")
        payload = scratch / "payload.tar"
        with tarfile.open(payload, "w") as tar:
            tar.add(scratch / "rest.zip", "rest.zip")
            tar.add(scratch / "provider.xz", "provider.xz")
        parts: list[Path] = []
        with open(payload, "rb") as handle:
            while block := handle.read(part_bytes):
                part = out / f"part-{len(parts)}"
                part.write_bytes(block)
                parts.append(part)
        index = {
            "wheel": wheel.name,
            "payload_sha256": _sha256(payload),
            "parts": {p.name: {"sha256": _sha256(p), "bytes": p.stat().st_size} for p in parts},
        }
    (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return parts


def _xz(source: Path, target: Path) -> None:
    """xz -9e, on every core where the xz tool is there (minutes), else with Python's lzma (slower)."""
    if shutil.which("xz"):
        with open(target, "wb") as handle:
            subprocess.run(["xz", "-9e", "-T0", "-c", str(source)], stdout=handle, check=True)
        return
    with open(source, "rb") as raw, lzma.open(target, "wb", preset=9 | lzma.PRESET_EXTREME) as packed:
        shutil.copyfileobj(raw, packed, 1 << 20)


def unpack(site_dir: Path, folders: list[Path]) -> str:
    """Install the staged onnxruntime-gpu into `site_dir` from the parts found in `folders`; returns its wheel."""
    index_path = next((f / INDEX for f in folders if (f / INDEX).is_file()), None)
    if index_path is None:
        raise SystemExit(f"no {INDEX} in {', '.join(map(str, folders))}: run scripts/stage-gpu.sh here first")
    index = json.loads(index_path.read_text())
    marker = site_dir / f".installed-{index['payload_sha256'][:16]}"
    if marker.is_file():
        return str(index["wheel"])
    found: dict[str, Path] = {}
    damaged = []
    for name, facts in index["parts"].items():
        for folder in folders:
            candidate = folder / name
            if candidate.is_file() and candidate.stat().st_size == facts["bytes"]:
                if _sha256(candidate) == facts["sha256"]:
                    found[name] = candidate
                    break
                damaged.append(str(candidate))
    missing = [name for name in index["parts"] if name not in found]
    if missing:
        raise SystemExit(
            f"onnxruntime-gpu parts missing: {', '.join(missing)}"
            + (f" (damaged copies: {', '.join(damaged)})" if damaged else "")
            + "; send each with its own run call (carry .device/ort/part-K) before installing"
        )
    with tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir)
        payload = scratch / "payload.tar"
        with open(payload, "wb") as joined:
            for name in sorted(found, key=lambda n: int(n.split("-")[1])):
                joined.write(found[name].read_bytes())
        if _sha256(payload) != index["payload_sha256"]:
            raise SystemExit("the joined onnxruntime-gpu parts do not match their sha256: stage and send them again")
        with tarfile.open(payload) as tar:
            tar.extractall(scratch, filter="data")
        if site_dir.exists():
            shutil.rmtree(site_dir)
        with zipfile.ZipFile(scratch / "rest.zip") as rest:
            rest.extractall(site_dir)
        library = site_dir / PROVIDER
        library.parent.mkdir(parents=True, exist_ok=True)
        with lzma.open(scratch / "provider.xz") as packed, open(library, "wb") as raw:
            shutil.copyfileobj(packed, raw, 1 << 20)
    marker.write_text(str(index["wheel"]) + "\n")
    return str(index["wheel"])


def library_path() -> str:
    """Folders of the nvidia-* packages' shared libraries, joined with ':'."""
    folders: set[str] = set()
    for root in {*site.getsitepackages(), site.getusersitepackages()}:
        nvidia = Path(root) / "nvidia"
        if nvidia.is_dir():
            folders.update(str(p.parent) for p in nvidia.rglob("lib*.so*") if p.parent.name.startswith("lib"))
    return ":".join(sorted(folders))


def main(argv: list[str]) -> int:
    if argv[:1] == ["pack"] and len(argv) == 3:
        parts = pack(Path(argv[1]), Path(argv[2]))
        print(f"{len(parts)} parts in {argv[2]}: {', '.join(p.name for p in parts)}")
    elif argv[:1] == ["unpack"] and len(argv) >= 3:
        wheel = unpack(Path(argv[1]), [Path(a) for a in argv[2:]])
        print(f"unpacked {wheel} into {argv[1]}")
    elif argv == ["libpath"]:
        print(library_path())
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
