"""Copies of an export whose fp16 encoder takes the attention mask in another form, to measure the forms.

    python -m benchmarks.mask_exports EXPORT FORM [FORM ...]     # e.g. lengths 2d packed

Each form may run in a process of its own beside the others (the GPU proof runs
them side by side): the copies lie beside EXPORT, and every manifest is replaced
whole. ``packed`` adds the packed fp16 encoder (`export --packed`) to EXPORT itself, made from its
fp32 encoder: the GPU proof adds it apart from the export, so that a packed encoder that
misses its gate costs the proof one contender, not its export. The benchmark compares its
vectors with the PyTorch reference like every contender's.

The fp16 variant is rewritten from the export's fp32 encoder (the fused graph,
with the optimizer's "lengths" form) by the exporter's own `write_variant`; the
copy's manifest records the form, and the benchmark measures its vectors'
cosine to the PyTorch reference like every contender's.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from benchmarks.files import write_whole
from jobbert_onnx.export.graphs import write_variant
from jobbert_onnx.manifest import MANIFEST_NAME, encoder_file, read_manifest, sha256_file


def copy_path(export: Path, form: str) -> Path:
    """Where the copy of `export` with the mask in `form` lies: `export` itself where that is its form."""
    if read_manifest(export).variants["fp16"].attention_mask == form:
        return export
    return export.with_name(f"{export.name}-mask-{form}")


def has_copy(export: Path, form: str) -> bool:
    """Whether the copy of `export` with the mask in `form` was made (or `export` has that form)."""
    out = copy_path(export, form)
    return (out / MANIFEST_NAME).is_file() and read_manifest(out).variants["fp16"].attention_mask == form


def has_packed(export: Path) -> bool:
    return read_manifest(export).variants["fp16"].packed_file is not None


def derive(export: Path, form: str) -> Path:
    """A copy of `export` beside it whose fp16 encoder takes the mask in `form` (made once, then reused)."""
    out = copy_path(export, form)
    if has_copy(export, form):
        return out
    manifest = read_manifest(export)
    if "fp32" not in manifest.variants:
        raise ValueError(f"{export} has no fp32 encoder to derive an fp16 one with the {form!r} mask from")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    # The merged graph has the old form; the packed encoder (added apart, perhaps meanwhile) takes no mask.
    stale = {encoder_file("fp16"), manifest.variants["fp16"].merged_file, manifest.variants["fp16"].packed_file}
    for name in manifest.files:
        if name not in stale:
            os.link(export / name, out / name) if _same_device(export, out) else shutil.copy2(export / name, out / name)
    fp16 = out / encoder_file("fp16")
    nodes = write_variant(export / encoder_file("fp32"), fp16, "fp16", form)["nodes"]
    raw = dict(manifest.raw)
    kept = {name: facts for name, facts in raw["files"].items() if name not in stale}
    raw["files"] = {**kept, fp16.name: {"sha256": sha256_file(fp16), "size": fp16.stat().st_size}}
    raw["variants"] = {
        **raw["variants"],
        "fp16": {
            **{
                key: value
                for key, value in raw["variants"]["fp16"].items()
                if key not in ("merged", "merged_nodes", "packed", "packed_nodes")
            },
            "nodes": nodes,
            "attention_mask": form,
            "validation": {"note": f"derived by benchmarks.mask_exports from {export}; not validated at export"},
        },
    }
    write_whole(out / MANIFEST_NAME, json.dumps(raw, indent=2) + "\n")
    return out


def _same_device(a: Path, b: Path) -> bool:
    return a.stat().st_dev == b.stat().st_dev


def add_fp16(export: Path, form: str = "lengths-starts") -> Path:
    """Write an fp16 encoder into `export` (from its fp32 encoder, the mask in `form`), unvalidated:
    for measuring fp16 where the export's gate would have left it out (the proof's outlier replica)."""
    manifest = read_manifest(export)
    if "fp16" in manifest.variants:
        return export
    path = export / encoder_file("fp16")
    nodes = write_variant(export / encoder_file("fp32"), path, "fp16", form)["nodes"]
    raw = dict(manifest.raw)
    raw["files"] = {**raw["files"], path.name: {"sha256": sha256_file(path), "size": path.stat().st_size}}
    fp16 = {
        **{key: value for key, value in raw["variants"]["fp32"].items() if key not in ("file", "validation")},
        "file": path.name,
        "nodes": nodes,
        "attention_mask": form,
        "validation": {"note": "added by benchmarks.mask_exports; not validated at export"},
    }
    raw["variants"] = {**raw["variants"], "fp16": fp16}
    write_whole(export / MANIFEST_NAME, json.dumps(raw, indent=2) + "\n")
    return export


def add_packed(export: Path) -> Path:
    """Write the packed fp16 encoder into `export` (from its fp32 encoder) and list it in the manifest."""
    from jobbert_onnx.export.packed import write_packed
    from jobbert_onnx.manifest import packed_file

    manifest = read_manifest(export)
    if manifest.variants["fp16"].packed_file:
        return export
    if "fp32" not in manifest.variants:
        raise ValueError(f"{export} has no fp32 encoder to make the packed fp16 encoder from")
    path = export / packed_file("fp16")
    facts = write_packed(export / encoder_file("fp32"), path)
    raw = dict(manifest.raw)
    raw["files"] = {**raw["files"], path.name: {"sha256": sha256_file(path), "size": path.stat().st_size}}
    fp16 = dict(raw["variants"]["fp16"])
    fp16["packed"] = path.name
    fp16["packed_nodes"] = facts["nodes"]
    fp16["validation"] = {
        **fp16["validation"],
        "packed": {"file": path.name, "heads": {}, "note": "added by benchmarks.mask_exports; not validated at export"},
    }
    raw["variants"] = {**raw["variants"], "fp16": fp16}
    write_whole(export / MANIFEST_NAME, json.dumps(raw, indent=2) + "\n")
    return export


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        raise SystemExit("usage: python -m benchmarks.mask_exports EXPORT FORM [FORM ...]")
    export = Path(argv[0])
    for form in argv[1:]:
        print(add_packed(export) if form == "packed" else derive(export, form))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
