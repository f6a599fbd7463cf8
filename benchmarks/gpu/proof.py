"""The GPU proof: everything a lent GPU should tell us, in one command (`scripts/gpu-proof.sh OUT`).

Steps, in order of value, each in its own process under its own time cap. Every
file is written into OUT as the run goes, so a run that is cut off still returns
what it measured:

1. environment: GPU, driver, CUDA, versions, providers, the CUDA libraries loaded;
2. model: the full-size random-weight model built here, exported (fp16, fp32) and
   validated on CUDA, with CUDA required (``JOBBERT_ONNX_REQUIRE_CUDA=1``);
3. tests: the GPU-marked tests with ``--require-cuda``, as junit XML;
4. placement: nodes per execution provider, Memcpy nodes, the attention kernel per
   mask form, non-finite values at padded positions; CUDA-graph capture per shape;
5. benchmark: ``python -m benchmarks --device cuda``, this runtime's configurations
   and sentence-transformers PyTorch fp16/fp32, with cosine to the fp32 reference;
6. profile: time in tokenizing, copies and each graph; kernels per batch with and
   without CUDA graphs; the fp16 matrix-product ceiling.

``--quick`` (at most 3 minutes): model and parity, then batch-1 and one
throughput point. ``--rehearse``: the same command on the CPU with the tiny model
and the CPU provider; GPU-only parts say "skipped: no GPU". CI runs the rehearsal.

OUT holds at most 8 files, none in subfolders: proof.json (every step's facts),
summary.md, log.txt, junit.xml, bench-<device>.json and bench-<device>.md.
``python -m benchmarks.gpu.fold OUT`` folds them into benchmarks/RESULTS.md and
benchmarks/GPU-NOTES.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.gpu.probe import NO_GPU

ROOT = Path(__file__).resolve().parents[2]
# Seconds per step: (full run, --quick). The full run stays within 8 minutes, --quick within 3;
# time a step leaves unused goes to the next one.
CAPS = {
    "environment": (30, 20),
    "model": (170, 110),
    "tests": (75, 0),
    "placement": (40, 0),
    "benchmark": (130, 45),
    "profile": (35, 0),
}


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

    @property
    def device(self) -> str:
        return "cpu" if self.rehearse else "cuda"

    def log(self, line: str) -> None:
        stamped = f"[{time.perf_counter() - self.started:6.1f}s] {line}"
        print(stamped, file=sys.stderr, flush=True)
        with open(self.out / "log.txt", "a", encoding="utf-8") as handle:
            handle.write(stamped + "\n")

    def command(self, argv: list[str], cap: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run one command under `cap` seconds; its output goes to the log."""
        self.log("$ " + " ".join(argv))
        try:
            done = subprocess.run(
                argv, cwd=ROOT, env=env or self.env, capture_output=True, text=True, timeout=max(cap, 1)
            )
        except subprocess.TimeoutExpired as error:
            for stream in (error.stdout, error.stderr):
                if stream:
                    self.log(stream.decode("utf-8", "replace") if isinstance(stream, bytes) else stream)
            raise
        with open(self.out / "log.txt", "a", encoding="utf-8") as handle:
            handle.write(done.stdout[-20000:] + done.stderr[-20000:])
        if done.returncode != 0:
            raise RuntimeError(f"exit {done.returncode}: {(done.stderr or done.stdout).strip()[-600:]}")
        return done

    def probe(self, name: str, *args: str, cap: float) -> dict[str, Any]:
        done = self.command([sys.executable, "-m", "benchmarks.gpu.probe", name, *args], cap)
        answer: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        return answer

    def step(self, name: str, run: Callable[[float], dict[str, Any]]) -> None:
        column = 1 if self.quick else 0
        names = list(CAPS)
        later = sum(CAPS[n][column] for n in names[names.index(name) + 1 :])
        budget = sum(caps[column] for caps in CAPS.values())
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


def _environment(proof: Proof, cap: float) -> dict[str, Any]:
    facts = proof.probe("env", cap=cap)
    if not proof.rehearse and facts.get("cuda_blocker"):
        raise RuntimeError(f"CUDA cannot be used: {facts['cuda_blocker']}")
    return {"facts": facts}


def _model(proof: Proof, cap: float) -> dict[str, Any]:
    deadline = time.perf_counter() + cap
    model, export = proof.work / "model", proof.work / "export"
    size = "tiny" if proof.rehearse else "full"
    timings = {}
    if not (model / "modules.json").is_file():
        started = time.perf_counter()
        cli = [sys.executable, "-m", "jobbert_onnx.cli"]
        proof.command([*cli, "random-model", str(model), "--size", size], deadline - time.perf_counter())
        timings["build_s"] = round(time.perf_counter() - started, 1)
    started = time.perf_counter()
    precision = "fp16" if proof.quick else "fp16,fp32"
    export_argv = [sys.executable, "-m", "jobbert_onnx.cli", "export", str(model), str(export), "--overwrite"]
    export_argv += ["--precision", precision, "--validate-device", proof.device]
    proof.command(export_argv, deadline - time.perf_counter())
    timings["export_s"] = round(time.perf_counter() - started, 1)
    manifest = json.loads((export / "manifest.json").read_text())
    validation = {
        name: {
            "device": v["validation"]["device"],
            "heads": v["validation"]["heads"],
            "note": v["validation"].get("note"),
        }
        for name, v in manifest["variants"].items()
    }
    return {"size": size, **timings, "validation": validation, "passed": manifest["validation"]["passed"]}


def _tests(proof: Proof, cap: float) -> dict[str, Any]:
    junit = proof.out / "junit.xml"
    argv = [sys.executable, "-m", "pytest", "tests/test_gpu.py", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider"]
    argv += ["--junitxml", str(junit), "--full-model", str(proof.work / "model")]
    argv += ["--full-export", str(proof.work / "export")]
    if proof.rehearse:
        done = proof.command([*argv, "--collect-only"], cap)
        return {"status": f"{NO_GPU} (collected: {done.stdout.strip().splitlines()[-1]})"}
    try:
        proof.command([*argv, "--require-cuda"], cap)
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
    from benchmarks import mask_exports

    export = proof.work / "export"
    forms = [export]
    for form in ("lengths", "2d"):
        forms.append(mask_exports.derive(export, form))
    deadline = time.perf_counter() + cap
    placed = proof.probe("placement", *map(str, forms), cap=cap)
    captured = proof.probe("capture", str(export), cap=deadline - time.perf_counter())
    return {"placement": placed, "cuda_graphs": captured}


# What --quick benchmarks: ours, and the peer a GPU user would pick instead (names of `benchmarks.contenders`).
QUICK_CONTENDERS = ("jobbert-onnx fp16", "sentence-transformers PyTorch fp16")


def benchmark_argv(proof: Proof) -> list[str]:
    """The benchmark's command line for this proof's mode (its time limits apart)."""
    argv = [sys.executable, "-m", "benchmarks", "--device", proof.device, "--contenders", "cuda"]
    argv += ["--model", str(proof.work / "model"), "--export", str(proof.work / "export")]
    argv += ["--work", str(proof.work / "bench"), "--out", str(proof.out), "--no-peers"]
    if proof.rehearse:
        argv += ["--tiny", "--quick", "--repeats", "3"]
    elif proof.quick:
        argv += ["--only", ",".join(QUICK_CONTENDERS), "--titles", "10000", "--skill-lists", "5000"]
        argv += ["--batch-sizes", "1024", "--repeats", "3", "--latency-calls", "300"]
    else:
        argv += ["--titles", "50000", "--skill-lists", "20000", "--batch-sizes", "32,256,1024,4096"]
        argv += ["--repeats", "3", "--latency-calls", "300"]
    return argv


def _benchmark(proof: Proof, cap: float) -> dict[str, Any]:
    proof.command([*benchmark_argv(proof), "--deadline-s", str(max(cap - 40, 10)), "--timeout", str(cap)], cap)
    return {"results": f"bench-{proof.device}.json"}


def _profile(proof: Proof, cap: float) -> dict[str, Any]:
    return {"profile": proof.probe("profile", str(proof.work / "export"), cap=cap)}


STEPS = {
    "environment": _environment,
    "model": _model,
    "tests": _tests,
    "placement": _placement,
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
    proof = Proof(args.out, work, args.quick, args.rehearse)
    for name, run in STEPS.items():
        proof.step(name, lambda cap, run=run: run(proof, cap))  # type: ignore[misc]
        if name == "environment" and proof.facts["steps"][name]["status"] != "ok":
            proof.log("stopping: without a usable GPU nothing else can be proven")
            break
    proof.log(f"done in {time.perf_counter() - proof.started:.0f} s; results in {args.out}")
    failed = [name for name, step in proof.facts["steps"].items() if not step["status"].startswith(("ok", "skipped"))]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
