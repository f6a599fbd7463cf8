"""Held-out check: models saved by sentence-transformers releases this project does not pin.

For each release, a virtual environment of its own (PyPI, kept under the work folder) loads
the hand-written JobBERT-v3 layouts (legacy Asym, and Router from 5.0 on, when the Router
appeared), saves them and encodes the check texts with both heads (`st_save.py`). This
project's environment then exports each saved folder (fp32) and compares its vectors with
that release's: the same gate as the suite (min cosine >= 0.99999 on both heads). With
``--export-there`` the export runs in the release's environment instead, under the
transformers that release was installed with.

    scripts/check-save-formats.sh                        # the releases in RELEASES
    scripts/check-save-formats.sh 5.2.3 6.1.0:transformers==5.17.*   # others
    scripts/check-save-formats.sh --export-there         # exported under each release's transformers

Needs network access to PyPI; several minutes per release the first time (each environment
installs torch), seconds per release after that.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent
sys.path.insert(0, str(TESTS))

from conftest import parity_texts  # noqa: E402
from venvs import pip_install, virtual_environment  # noqa: E402

from jobbert_onnx import Encoder  # noqa: E402
from jobbert_onnx.export import export_model  # noqa: E402
from jobbert_onnx.export.random_model import build_random_model  # noqa: E402
from jobbert_onnx.vectors import row_cosines  # noqa: E402

# Releases and the transformers each is installed with ("RELEASE:REQUIREMENT" on the command line):
# a spread over every save format (Asym 2.x-4.x; Router with the old type names 5.0-5.3; the new names
# 5.4 on; Normalize's second move 6.0), with transformers 4 and 5 under the releases that take both.
RELEASES = (
    "2.7.0:transformers<5",
    "3.4.1:transformers<5",
    "4.1.0:transformers<5",
    "5.1.2:transformers<5",
    "5.3.0:transformers<5",
    "5.3.0:transformers>=5",
    "5.4.1:transformers<5",
    "5.4.1:transformers>=5",
    "5.7.0:transformers>=5",
    "6.0.1:transformers==5.17.*",
)
TORCH = "torch==2.13.0"  # the CPU build this project is set up with
MIN_COSINE = 0.99999
TASKS = ("anchor", "positive")


def _log(line: str) -> None:
    print(line, flush=True)


def _quiet(_: str) -> None:
    pass


def environment(work: Path, release: str, requirement: str) -> Path:
    """The release's virtual environment, with `requirement` (made once); its python."""
    short = requirement.replace("transformers", "tf").replace(">=", "ge").replace("<", "lt").replace("==", "")
    folder = work / ("st-" + re.sub(r"[^A-Za-z0-9.-]+", "", f"{release}-{short}".replace(".*", "")))
    started = time.perf_counter()
    installs = ([TORCH], [f"sentence-transformers=={release}", *([requirement] if requirement else [])])
    python = virtual_environment(folder, installs)
    _log(f"  environment for {release}: {time.perf_counter() - started:.0f}s")
    return python


def _major(release: str) -> int:
    return int(release.split(".")[0])


def layouts(release: str) -> tuple[str, ...]:
    """The hand-written layouts a release can load: the Router arrived in 5.0."""
    return ("legacy-asym", "router") if _major(release) >= 5 else ("legacy-asym",)


def pickled_heads(model: Path, target: Path) -> Path:
    """A copy of `model` whose Dense heads are ``pytorch_model.bin``: releases before 3.0 read no
    other weights file for Dense (and save theirs so)."""
    import torch
    from safetensors.torch import load_file

    if not (target / "modules.json").is_file():
        shutil.copytree(model, target)
        for weights in target.glob("2_*/*/model.safetensors"):
            torch.save(load_file(str(weights)), weights.with_name("pytorch_model.bin"))
            weights.unlink()
    return target


def with_exporter(python: Path) -> Path:
    """The release's environment with this project's exporter added (its own torch and transformers
    kept), so an export runs under the transformers of that release's day."""
    marker = python.parents[1] / "exporter-ready"
    if not marker.is_file():
        for packages in (["onnx", "onnxruntime", "safetensors", "sympy", "packaging"], ["--no-deps", "-e", str(ROOT)]):
            pip_install(python, packages)
        marker.write_text("")
    return python


def check(
    work: Path,
    release: str,
    requirement: str,
    layout: str,
    models: dict[str, Path],
    texts_file: Path,
    export_there: bool = False,
) -> dict[str, Any]:
    """Save `layout` with `release`, export what it wrote (here, or with `export_there` in the release's
    environment), and compare the two sets of vectors."""
    python = environment(work, release, requirement)
    source = models[layout] if _major(release) >= 3 else pickled_heads(models[layout], work / "models" / "pickled")
    run = python.parents[1] / f"run-{layout}"
    shutil.rmtree(run, ignore_errors=True)
    saved, vectors = run / "saved", run / "vectors"
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env |= {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    subprocess.run(
        [
            str(python),
            str(Path(__file__).with_name("st_save.py")),
            str(source),
            str(saved),
            str(texts_file),
            str(vectors),
        ],
        check=True,
        env=env,
    )
    versions = json.loads((vectors / "versions.json").read_text())
    # Releases before 3.0 write the heads' weights with pickle only: exported as a user who trusts them would.
    pickled = any(saved.glob("*/*/pytorch_model.bin"))
    if export_there:
        command = [str(with_exporter(python)), "-m", "jobbert_onnx.cli", "export", str(saved), str(run / "export")]
        command += ["--precision", "fp32", "--validate-device", "cpu", *(["--allow-pickle"] if pickled else [])]
        subprocess.run(command, check=True, env=env, capture_output=True)
    else:
        export_model(
            str(saved), run / "export", precision="fp32", validate_device="cpu", log=_quiet, allow_pickle=pickled
        )
    encoder = Encoder.load(run / "export", device="cpu", precision="fp32")
    texts = json.loads(texts_file.read_text())
    manifest = encoder.manifest.raw
    result: dict[str, Any] = {
        "release": release,
        "layout": layout,
        "versions": versions,
        "module_types": manifest["source"]["module_types"],
        "max_seq_length_from": manifest["source"]["max_seq_length_from"],
        "pickled_heads": pickled,
        "exported_with": manifest["versions"]["transformers"],
        "texts": len(texts),
        "heads": {},
    }
    for task in TASKS:
        theirs = np.load(vectors / f"{task}.npy")
        ours = encoder.encode(texts, task=task, batch_size=8)
        cosines = row_cosines(ours, theirs)
        result["heads"][task] = {
            "min_cosine": float(cosines.min()),
            "max_abs_diff": float(np.abs(ours - theirs).max()),
            "below_gate": [texts[i] for i in np.flatnonzero(cosines < MIN_COSINE)],
        }
    result["passed"] = all(head["min_cosine"] >= MIN_COSINE for head in result["heads"].values())
    return result


def _verdict(result: dict[str, Any]) -> str:
    if result["passed"]:
        return "pass"
    missed = sorted({text for head in result["heads"].values() for text in head["below_gate"]})
    return f"FAIL on {len(missed)} of {result['texts']} texts: {', '.join(map(repr, missed[:4]))}"


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| sentence-transformers | its transformers | layout loaded | asymmetric module written as | length cap from | "
        "exported with transformers | min cosine anchor / positive | max abs diff | |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['release']} | | {r['layout']} | | | | | | error: {r['error']} |")
            continue
        heads = r["heads"]
        written = f"`{r['module_types'][2]}`" + (", heads pickled" if r["pickled_heads"] else "")
        lines.append(
            f"| {r['release']} | {r['versions']['transformers']} | {r['layout']} | {written} | "
            f"{r['max_seq_length_from']} | {r['exported_with']} | {heads['anchor']['min_cosine']:.7f} / "
            f"{heads['positive']['min_cosine']:.7f} | "
            f"{max(h['max_abs_diff'] for h in heads.values()):.1e} | {_verdict(r)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "releases", nargs="*", default=list(RELEASES), help="sentence-transformers releases, as RELEASE[:REQUIREMENT]"
    )
    parser.add_argument("--work", type=Path, default=Path(".heldout"), help="environments and runs (kept)")
    parser.add_argument(
        "--export-there",
        action="store_true",
        help="export in each release's environment (its transformers), not in this project's",
    )
    args = parser.parse_args(argv)
    work: Path = args.work.resolve()
    models = work / "models"
    built = {
        layout: models / layout
        if (models / layout / "modules.json").is_file()
        else build_random_model(models / layout, size="tiny", layout=layout, seed=seed)
        for seed, layout in enumerate(("router", "legacy-asym"))
    }
    texts_file = work / "texts.json"
    texts_file.write_text(json.dumps(parity_texts(), ensure_ascii=False))
    results = []
    for given in args.releases:
        release, _, requirement = given.partition(":")
        for layout in layouts(release):
            _log(f"sentence-transformers {release} ({requirement or 'its own requirements'}), {layout} layout ...")
            try:
                results.append(check(work, release, requirement, layout, built, texts_file, args.export_there))
            except Exception as error:  # one release's failure is a result, not the end of the check
                results.append({"release": release, "layout": layout, "error": f"{type(error).__name__}: {error}"})
            _log(f"  {results[-1].get('passed', results[-1].get('error'))}")
    (work / ("results-exported-there.json" if args.export_there else "results.json")).write_text(
        json.dumps(results, indent=2)
    )
    print(table(results))
    return 0 if all(r.get("passed") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
