"""The GPU proof: everything a lent GPU should tell us, in one command (`scripts/gpu-proof.sh OUT`).

Steps, in order of value, each in its own process under its own time cap. Every
file is written into OUT as the run goes, so a run that is cut off still returns
what it measured:

1. environment: GPU, driver, CUDA, versions, providers, the CUDA libraries loaded
   (the proof's own Python and onnxruntime are recorded before it, so a failing
   probe still leaves them in proof.json);
2. model: the full-size random-weight model built here, exported (fp16, fp32) and
   validated on CUDA, with CUDA required (``JOBBERT_ONNX_REQUIRE_CUDA=1``), with its
   merged graph; the copies with the other attention-mask forms that placement and the
   benchmark use, and the packed encoder (added apart: a packed encoder that misses its
   gate costs one contender, not the export);
3. tests: the GPU-marked tests with ``--require-cuda``, as junit XML;
4. placement: nodes per execution provider, Memcpy nodes, the attention kernel per
   mask form, non-finite values at padded positions;
5. capture: CUDA-graph capture per shape, replay against a plain run;
6. benchmark: ``python -m benchmarks --device cuda``, this runtime's configurations
   and sentence-transformers PyTorch fp16/fp32, with cosine to the fp32 reference;
7. profile: time in tokenizing, copies and each graph; kernel launches and CPU time
   per batch with and without CUDA graphs; the fp16 matrix-product ceiling.

Every child runs in its own process group, killed whole when its cap runs out, and
starts through `benchmarks.gpu.child`, which stops it if it imported another
onnxruntime than the proof did (on the GPU machine a lost PYTHONPATH means the
image's CPU build).

``--quick`` (at most 3 minutes): model and parity, then batch-1 and one
throughput point. ``--rehearse``: the same plan (steps, contenders, argv) on the
CPU provider with the tiny model and fewer texts, onnxruntime imported from a
folder on PYTHONPATH that shadows site-packages' as the staged onnxruntime-gpu
does on the GPU machine; GPU-only parts say "skipped: no GPU". CI rehearses both
modes.

OUT holds at most 8 files, none in subfolders: proof.json (every step's facts),
summary.md, log.txt, junit.xml, bench-<device>.json and bench-<device>.md.
``python -m benchmarks.gpu.fold OUT`` folds them into benchmarks/RESULTS.md and
benchmarks/GPU-NOTES.md.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.gpu.probe import NO_GPU
from benchmarks.worker import SAME_ONNXRUNTIME_ENV

ROOT = Path(__file__).resolve().parents[2]
# Seconds per step: (full run, --quick). The full run stays within 8 minutes, --quick within 3
# (`BUDGETS`); time a step leaves unused goes to the next one.
CAPS = {
    "environment": (25, 15),
    "model": (185, 80),
    "tests": (70, 0),
    "placement": (30, 0),
    "capture": (25, 0),
    "benchmark": (125, 85),
    "profile": (20, 0),
}
BUDGETS = (480, 180)
# Set in the re-executed rehearsal, whose onnxruntime comes from a shadowing folder.
SHADOWED_ENV = "JOBBERT_PROOF_SHADOWED"


class Proof:
    """The run's state: where it writes, what it found so far."""

    def __init__(self, out: Path, work: Path, quick: bool, rehearse: bool) -> None:
        self.out, self.work, self.quick, self.rehearse = out, work, quick, rehearse
        self.started = time.perf_counter()
        self.facts: dict[str, Any] = {
            "mode": "rehearsal (CPU, tiny model)" if rehearse else ("quick" if quick else "full"),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "steps": {},
        }
        self.env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        self.env["PYTHONUNBUFFERED"] = "1"
        if not rehearse:
            self.env["JOBBERT_ONNX_REQUIRE_CUDA"] = "1"
        self.facts["proof_process"] = own_facts()
        onnxruntime = self.facts["proof_process"]["onnxruntime"]
        if isinstance(onnxruntime, dict):  # every child must import this one (`benchmarks.gpu.child`)
            self.env[SAME_ONNXRUNTIME_ENV] = json.dumps(onnxruntime)

    @property
    def device(self) -> str:
        return "cpu" if self.rehearse else "cuda"

    def log(self, line: str) -> None:
        stamped = f"[{time.perf_counter() - self.started:6.1f}s] {line}"
        print(stamped, file=sys.stderr, flush=True)
        with open(self.out / "log.txt", "a", encoding="utf-8") as handle:
            handle.write(stamped + "\n")

    def command(self, argv: list[str], cap: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run one command under `cap` seconds in its own process group (killed whole at the cap,
        workers and all); its output goes to the log."""
        self.log("$ " + " ".join(argv))
        process = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=env or self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            stdout, stderr = process.communicate(timeout=max(cap, 1))
        except subprocess.TimeoutExpired:
            kill_group(process)
            stdout, stderr = process.communicate()
            for stream in (stdout, stderr):
                if stream:
                    self.log(stream[-20000:])
            raise
        finally:
            kill_group(process)  # what the command left behind, if it exited first
        with open(self.out / "log.txt", "a", encoding="utf-8") as handle:
            handle.write(stdout[-20000:] + stderr[-20000:])
        if process.returncode != 0:
            raise RuntimeError(f"exit {process.returncode}: {(stderr or stdout).strip()[-600:]}")
        return subprocess.CompletedProcess(argv, process.returncode, stdout, stderr)

    def module(self, module: str, *args: str, cap: float) -> subprocess.CompletedProcess:
        """``python -m module args``, started through `benchmarks.gpu.child` (the onnxruntime check)."""
        return self.command([sys.executable, "-m", "benchmarks.gpu.child", module, *args], cap)

    def probe(self, name: str, *args: str, cap: float) -> dict[str, Any]:
        done = self.module("benchmarks.gpu.probe", name, *args, cap=cap)
        answer: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        return answer

    def step(self, name: str, run: Callable[[float], dict[str, Any]]) -> None:
        column = 1 if self.quick else 0
        names = list(CAPS)
        later = sum(CAPS[n][column] for n in names[names.index(name) + 1 :])
        budget = BUDGETS[column]
        cap = CAPS[name][column]
        if cap:
            cap = max(cap, round(budget - (time.perf_counter() - self.started) - later))
        record: dict[str, Any] = {"cap_s": cap}
        if cap == 0:
            record["status"] = "skipped: not in --quick"
        else:
            self.log(f"== {name} (at most {cap} s)")
            started = time.perf_counter()
            try:
                record |= run(cap)
                record.setdefault("status", "ok")
            except subprocess.TimeoutExpired:
                record["status"] = f"timeout after {cap} s"
            except Exception as error:  # recorded; the next steps still run
                record["status"] = f"failed: {error}"
            record["seconds"] = round(time.perf_counter() - started, 1)
            self.log(f"== {name}: {record['status']} ({record['seconds']} s)")
        self.facts["steps"][name] = record
        self.save()

    def save(self) -> None:
        self.facts["total_s"] = round(time.perf_counter() - self.started, 1)
        (self.out / "proof.json").write_text(json.dumps(self.facts, indent=2) + "\n")
        from benchmarks.gpu.summary import summary

        (self.out / "summary.md").write_text(summary(self.facts, self.out))


def kill_group(process: subprocess.Popen) -> None:
    """Kill the process group `process` leads (it was started with ``start_new_session``)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def own_facts() -> dict[str, Any]:
    """What the proof's own process sees: written before any step, so it reaches proof.json whatever fails."""
    facts: dict[str, Any] = {
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "pythonpath": os.environ.get("PYTHONPATH", ""),
        "ld_library_path": os.environ.get("LD_LIBRARY_PATH", ""),
    }
    try:
        import onnxruntime as ort

        facts["onnxruntime"] = {"version": ort.__version__, "file": ort.__file__}
        facts["providers"] = ort.get_available_providers()
    except Exception as error:  # recorded: the environment step says what that means
        facts["onnxruntime"] = f"not importable: {type(error).__name__}: {error}"
    return facts


def _environment(proof: Proof, cap: float) -> dict[str, Any]:
    facts = proof.probe("env", cap=cap)
    if not proof.rehearse and facts.get("cuda_blocker"):
        return {"facts": facts, "status": f"failed: CUDA cannot be used: {facts['cuda_blocker']}"}
    return {"facts": facts}


def _model(proof: Proof, cap: float) -> dict[str, Any]:
    deadline = time.perf_counter() + cap
    model, export = proof.work / "model", proof.work / "export"
    size = "tiny" if proof.rehearse else "full"
    timings: dict[str, Any] = {}
    if not (model / "modules.json").is_file():
        started = time.perf_counter()
        proof.module("jobbert_onnx.cli", "random-model", str(model), "--size", size, cap=deadline - time.perf_counter())
        timings["build_s"] = round(time.perf_counter() - started, 1)
    precisions = ("fp16",) if proof.quick else ("fp16", "fp32")
    if _reusable(export, precisions, proof.device):
        timings["export"] = "reused: validated on this device by an earlier run"
    else:
        started = time.perf_counter()
        argv = ["export", str(model), str(export), "--overwrite", "--precision", ",".join(precisions)]
        argv.append("--merged")
        proof.module("jobbert_onnx.cli", *argv, "--validate-device", proof.device, cap=deadline - time.perf_counter())
        timings["export_s"] = round(time.perf_counter() - started, 1)
    if not proof.quick:  # the other mask forms and the packed encoder, for placement and the benchmark
        started = time.perf_counter()
        forms = [*MASK_FORMS, "packed"]
        proof.module("benchmarks.mask_exports", str(export), *forms, cap=deadline - time.perf_counter())
        timings["mask_copies_s"] = round(time.perf_counter() - started, 1)
    manifest = json.loads((export / "manifest.json").read_text())
    validation = {
        name: {
            "device": v["validation"]["device"],
            "heads": v["validation"]["heads"],
            "note": v["validation"].get("note"),
            "merged": bool(v["validation"].get("merged")),
            "packed": v["validation"].get("packed", {}).get("note", "validated" if v.get("packed") else None),
        }
        for name, v in manifest["variants"].items()
    }
    return {"size": size, **timings, "validation": validation, "passed": manifest["validation"]["passed"]}


# The attention-mask forms besides the export's own, as `benchmarks.mask_exports` derives them.
MASK_FORMS = ("lengths", "2d")


def _reusable(export: Path, precisions: tuple[str, ...], device: str) -> bool:
    """Whether an earlier run's export has every variant wanted, validated on `device` and passed."""
    try:
        manifest = json.loads((export / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    variants = manifest.get("variants", {})
    return (
        bool(manifest.get("validation", {}).get("passed"))
        and "merged" in variants.get("fp16", {})
        and all(
            name in variants and variants[name].get("validation", {}).get("device", "").startswith(device)
            for name in precisions
        )
    )


def _tests(proof: Proof, cap: float) -> dict[str, Any]:
    junit = proof.out / "junit.xml"
    argv = ["tests/test_gpu.py", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider"]
    argv += ["--junitxml", str(junit), "--full-model", str(proof.work / "model")]
    argv += ["--full-export", str(proof.work / "export")]
    if proof.rehearse:
        done = proof.module("pytest", *argv, "--collect-only", cap=cap)
        return {"status": f"{NO_GPU} (collected: {done.stdout.strip().splitlines()[-1]})"}
    try:
        proof.module("pytest", *argv, "--require-cuda", cap=cap)
    finally:
        counts = _junit_counts(junit)
    return {"tests": counts}


def _junit_counts(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {"error": "no junit XML was written"}
    root = ElementTree.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return {"error": "no test suite in the junit XML"}
    failed = [
        case.get("name")
        for case in suite.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    return {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")} | {"failed": failed}


def _placement(proof: Proof, cap: float) -> dict[str, Any]:
    export = proof.work / "export"
    forms = [export, *(export.with_name(f"{export.name}-mask-{form}") for form in MASK_FORMS)]
    return {"placement": proof.probe("placement", *map(str, forms), cap=cap)}


def _capture(proof: Proof, cap: float) -> dict[str, Any]:
    return {"cuda_graphs": proof.probe("capture", str(proof.work / "export"), cap=cap)}


# What --quick benchmarks: ours, and the peer a GPU user would pick instead (names of `benchmarks.contenders`).
QUICK_CONTENDERS = ("jobbert-onnx fp16", "sentence-transformers PyTorch fp16")


def benchmark_argv(proof: Proof) -> list[str]:
    """The benchmark's command line for this proof's mode (its time limits apart). A rehearsal runs
    its mode's plan, contenders and batch sizes included, on the CPU with the tiny model and fewer texts."""
    argv = ["--device", proof.device, "--contenders", "cuda", "--no-peers"]
    argv += ["--model", str(proof.work / "model"), "--export", str(proof.work / "export")]
    argv += ["--work", str(proof.work / "bench"), "--out", str(proof.out)]
    if proof.quick:
        counts = {"--titles": 10000, "--skill-lists": 5000, "--quality-texts": 1000}
        argv += ["--only", ",".join(QUICK_CONTENDERS), "--batch-sizes", "1024"]
    else:
        counts = {"--titles": 50000, "--skill-lists": 20000, "--quality-texts": 2000}
        argv += ["--batch-sizes", "32,256,1024,4096"]
    counts |= {"--repeats": 3, "--latency-calls": 300}
    if proof.rehearse:
        counts |= {"--titles": 4096, "--skill-lists": 1024, "--quality-texts": 256, "--latency-calls": 20}
        argv.append("--tiny")
    for flag, count in counts.items():
        argv += [flag, str(count)]
    return argv


def _benchmark(proof: Proof, cap: float) -> dict[str, Any]:
    limits = ["--deadline-s", str(max(cap - 30, 10)), "--timeout", str(cap)]
    proof.module("benchmarks", *benchmark_argv(proof), *limits, cap=cap)
    return {"results": f"bench-{proof.device}.json"}


def _profile(proof: Proof, cap: float) -> dict[str, Any]:
    return {"profile": proof.probe("profile", str(proof.work / "export"), cap=cap)}


STEPS = {
    "environment": _environment,
    "model": _model,
    "tests": _tests,
    "placement": _placement,
    "capture": _capture,
    "benchmark": _benchmark,
    "profile": _profile,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder for the results (created; files only, no subfolders)")
    parser.add_argument("--quick", action="store_true", help="model, parity, batch-1, one throughput point (3 min)")
    parser.add_argument("--rehearse", action="store_true", help="on the CPU with the tiny model (what CI runs)")
    parser.add_argument("--work", type=Path, help="where the model and exports go (default: a folder in /tmp)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path("/tmp") / ("jobbert-proof-rehearsal" if args.rehearse else "jobbert-proof")
    work.mkdir(parents=True, exist_ok=True)
    if args.rehearse and not os.environ.get(SHADOWED_ENV):
        _run_shadowed(work, sys.argv[1:] if argv is None else argv)
    proof = Proof(args.out, work, args.quick, args.rehearse)
    for name, run in STEPS.items():
        proof.step(name, lambda cap, run=run: run(proof, cap))  # type: ignore[misc]
        if name == "environment" and proof.facts["steps"][name]["status"] != "ok":
            proof.log("stopping: without a usable GPU nothing else can be proven")
            break
    proof.log(f"done in {time.perf_counter() - proof.started:.0f} s; results in {args.out}")
    failed = [name for name, step in proof.facts["steps"].items() if not step["status"].startswith(("ok", "skipped"))]
    return 1 if failed else 0


def shadow_site(work: Path) -> Path:
    """A folder whose ``onnxruntime`` (a link to the installed package) shadows site-packages' when it
    leads PYTHONPATH: the layout of the GPU machine, where the staged onnxruntime-gpu shadows the
    image's CPU build. A child that loses PYTHONPATH imports site-packages' copy: another file."""
    import importlib.util

    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("onnxruntime is not installed: install the project's dependencies first")
    site = work / "shadow-site"
    site.mkdir(parents=True, exist_ok=True)
    link = site / "onnxruntime"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(Path(next(iter(spec.submodule_search_locations))), target_is_directory=True)
    return site


def _run_shadowed(work: Path, argv: list[str]) -> None:
    """Run the rehearsal again (this process is replaced) with onnxruntime from `shadow_site`."""
    site = shadow_site(work)
    path = os.pathsep.join(p for p in (str(site), str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, SHADOWED_ENV: "1"}
    os.execve(sys.executable, [sys.executable, "-m", "benchmarks.gpu.proof", *argv], env)


if __name__ == "__main__":
    sys.exit(main())
