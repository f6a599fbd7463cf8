"""The GPU proof: everything a lent GPU should tell us, in one command (`scripts/gpu-proof.sh OUT`).

Steps, in order of what decides the targets, each in its own process under its
own time cap. Every file is written into OUT as the run goes (whole: a finished
copy renamed over the last), so a run that is cut off still returns what it
measured, and proof.json lists from the start every step with its status: not
run yet, stopped during it, or what it found:

1. environment: GPU, driver, CUDA, versions, providers, the CUDA libraries loaded
   (the proof's own Python and onnxruntime are recorded before it, so a failing
   probe still leaves them in proof.json);
2. model: the full-size random-weight model built here, exported (fp16, fp32) and
   validated on CUDA, with CUDA required (``JOBBERT_ONNX_REQUIRE_CUDA=1``), with its
   merged graph; then the copies with the other attention-mask forms and the packed
   encoder (added apart: a packed encoder that misses its gate costs one contender,
   not the export). The benchmark builds none of them: it skips a missing one;
3. benchmark: ``python -m benchmarks --device cuda``: ours and sentence-transformers
   PyTorch fp16 at the same batch sizes, batch-1 with CUDA graphs, then each piece of
   the CUDA path against the default, with cosine to the fp32 reference;
4. outliers: fp16 and the packed encoder against fp32 PyTorch on the full-size
   outlier replica (activations large enough to test fp16's range), both heads;
5. tests: the GPU-marked tests with ``--require-cuda``, as junit XML;
6. capture: CUDA-graph capture per shape the runtime captures, replay against a plain run;
7. placement: nodes per execution provider, Memcpy nodes, the attention kernel per
   mask form, non-finite values at padded positions;
8. profile: time in tokenizing, copies and each graph; kernel launches and CPU time
   per batch with and without CUDA graphs; the fp16 matrix-product ceiling.

Every child runs in its own process group, killed whole when its cap runs out, and
starts through `benchmarks.gpu.child`, which stops it if it imported another
onnxruntime than the proof did (on the GPU machine a lost PYTHONPATH means the
image's CPU build), and has it die with the proof. Scratch (the benchmark's
vectors, exports, models) goes under --work, never into OUT.

``--quick`` (at most 150 s): model and parity, then ours and the peer, batch-1
and two throughput points. ``--rehearse``: the same plan (steps, contenders, argv) on the
CPU provider with the tiny model and fewer texts, onnxruntime imported from a
folder on PYTHONPATH that shadows site-packages' as the staged onnxruntime-gpu
does on the GPU machine; GPU-only parts say "skipped: no GPU". CI rehearses both
modes.

OUT holds at most 7 files at any moment, none in subfolders: proof.json (every
step's facts), summary.md, log.txt, junit.xml, bench-<device>.json,
bench-<device>.md, and briefly the one being rewritten (`benchmarks.files`).
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.files import write_whole
from benchmarks.gpu.probe import NO_GPU
from benchmarks.worker import SAME_ONNXRUNTIME_ENV

ROOT = Path(__file__).resolve().parents[2]
# Seconds per step: (full run, --quick); 0 leaves a step out. The full run stays within 330 s
# and --quick within 150 s (`BUDGETS`), so that the device tool's start, the staged parts, the
# full proof and a --quick rerun fit its 15 minutes (README, "On a lent GPU machine"). Time a
# step leaves unused goes to the next one. Sized from each step measured at full size on the CPU
# here (DEVELOPERS.md, "The GPU proof's time"), the steps that decide the targets first.
CAPS = {
    "environment": (15, 15),
    "model": (130, 70),
    "benchmark": (105, 65),
    "outliers": (25, 0),
    "tests": (25, 0),
    "capture": (10, 0),
    "placement": (10, 0),
    "profile": (10, 0),
}
BUDGETS = (330, 150)
# The device tool returns at most this many files from OUT, each under 16 MiB, flat or one folder down.
OUT_FILES = 8
# Set in the re-executed rehearsal, whose onnxruntime comes from a shadowing folder.
SHADOWED_ENV = "JOBBERT_PROOF_SHADOWED"
NOT_REACHED = "not run: the proof ended before this step"
# While a step's command runs, proof.json and the summary are rewritten this often (seconds).
REFRESH_S = 2.0
# Under the work folder: the outlier replica and its export (`benchmarks.gpu.outliers`).
OUTLIER_MODEL, OUTLIER_EXPORT = "outliers-model", "outliers-export"


class Proof:
    """The run's state: where it writes, what it found so far."""

    def __init__(self, out: Path, work: Path, quick: bool, rehearse: bool) -> None:
        self.out, self.work, self.quick, self.rehearse = out, work, quick, rehearse
        self.started = time.perf_counter()
        column = 1 if quick else 0
        self.facts: dict[str, Any] = {
            "mode": "rehearsal (CPU, tiny model)" if rehearse else ("quick" if quick else "full"),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            # Every step from the start: a proof killed at any moment says what it did not reach.
            "steps": {
                name: {"status": NOT_REACHED if caps[column] else "skipped: not in --quick"}
                for name, caps in CAPS.items()
            },
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
        deadline = time.perf_counter() + max(cap, 1)
        try:
            while True:
                try:
                    stdout, stderr = process.communicate(timeout=min(REFRESH_S, deadline - time.perf_counter()))
                    break
                except subprocess.TimeoutExpired:
                    if time.perf_counter() >= deadline:
                        raise
                    self.save()  # the summary follows what the command wrote meanwhile (the benchmark's results)
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
            raise RuntimeError(f"exit {process.returncode}: {_last_line(stderr or stdout)}")
        return subprocess.CompletedProcess(argv, process.returncode, stdout, stderr)

    def start(self, label: str, module: str, *args: str) -> Beside:
        """Start ``python -m module args`` (through `benchmarks.gpu.child`) and return at once: work
        that needs no GPU timing runs beside the step's own. Its output goes to ``WORK/label.log``,
        copied into the log when it is reaped (`reap`)."""
        argv = [sys.executable, "-m", "benchmarks.gpu.child", module, *args]
        self.log("$ (beside) " + " ".join(argv))
        output = self.work / f"{label}.log"
        with open(output, "w", encoding="utf-8") as handle:
            process = subprocess.Popen(
                argv, cwd=ROOT, env=self.env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
            )
        return Beside(process, output, module)

    def reap(self, beside: Beside, deadline: float) -> None:
        """Wait for `beside` until `deadline` (perf_counter), then kill what is left of it."""
        try:
            beside.process.wait(timeout=max(deadline - time.perf_counter(), 1))
        finally:
            kill_group(beside.process)
            beside.process.wait()
            with open(self.out / "log.txt", "a", encoding="utf-8") as handle:
                handle.write(f"[{beside.module}, beside]\n" + beside.output.read_text(errors="replace")[-20000:])
        if beside.process.returncode != 0:
            tail = _last_line(beside.output.read_text(errors="replace"))
            raise RuntimeError(f"{beside.module}: exit {beside.process.returncode}: {tail}")

    def module(self, module: str, *args: str, cap: float) -> subprocess.CompletedProcess:
        """``python -m module args``, started through `benchmarks.gpu.child` (the onnxruntime check)."""
        return self.command([sys.executable, "-m", "benchmarks.gpu.child", module, *args], cap)

    def probe(self, name: str, *args: str, cap: float) -> dict[str, Any]:
        done = self.module("benchmarks.gpu.probe", name, *args, cap=cap)
        answer: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        return answer

    def step(self, name: str, run: Callable[[float, dict[str, Any]], None]) -> None:
        """Run one step under its cap. `run` fills the step's record as it goes (saved with
        `save`), so a step that times out, fails or is killed leaves what it had found."""
        column = 1 if self.quick else 0
        names = list(CAPS)
        later = sum(CAPS[n][column] for n in names[names.index(name) + 1 :])
        budget = BUDGETS[column]
        cap = CAPS[name][column]
        if cap == 0:
            return
        cap = max(cap, round(budget - (time.perf_counter() - self.started) - later))
        started = time.perf_counter()
        at = round(started - self.started, 1)
        record: dict[str, Any] = {
            "cap_s": cap,
            "status": f"stopped during this step (started {at} s into the proof, cap {cap} s)",
        }
        self.facts["steps"][name] = record
        self.save()  # before the step's line in the log: whoever reads that line finds the step recorded
        self.log(f"== {name} (at most {cap} s)")
        try:
            run(cap, record)
            if record["status"].startswith("stopped during"):
                record["status"] = "ok"
        except subprocess.TimeoutExpired:
            record["status"] = f"timeout after {cap} s"
        except Exception as error:  # recorded; the next steps still run
            record["status"] = f"failed: {error}"
        record["seconds"] = round(time.perf_counter() - started, 1)
        self.log(f"== {name}: {record['status']} ({record['seconds']} s)")
        self.save()

    def save(self) -> None:
        self.facts["total_s"] = round(time.perf_counter() - self.started, 1)
        write_whole(self.out / "proof.json", json.dumps(self.facts, indent=2) + "\n")
        from benchmarks.gpu.summary import summary

        write_whole(self.out / "summary.md", summary(self.facts, self.out))


def _last_line(output: str) -> str:
    """A failed command's last line of output (the error, where Python printed a traceback)."""
    lines = [line.strip() for line in output.strip().splitlines() if line.strip()]
    return lines[-1][-600:] if lines else "no output"


@dataclass
class Beside:
    """A command running beside a step's own (`Proof.start`)."""

    process: subprocess.Popen
    output: Path
    module: str


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


def _environment(proof: Proof, cap: float, record: dict[str, Any]) -> None:
    facts = record["facts"] = proof.probe("env", cap=cap)
    if not proof.rehearse and facts.get("cuda_blocker"):
        record["status"] = f"failed: CUDA cannot be used: {facts['cuda_blocker']}"


def _model(proof: Proof, cap: float, record: dict[str, Any]) -> None:
    """The model and its export, then the copies the benchmark and placement use. Beside them, on
    the device's other cores, the outlier replica for the outliers step (no GPU timing runs yet)."""
    deadline = time.perf_counter() + cap
    model, export = proof.work / "model", proof.work / "export"
    size = record["size"] = "tiny" if proof.rehearse else "full"
    beside: list[Beside] = []  # killed, whatever is left of them, when the step ends
    try:
        if not proof.quick:
            argv = [str(proof.work / OUTLIER_MODEL), str(proof.work / OUTLIER_EXPORT), size, proof.device]
            beside.append(proof.start("outlier-replica", "benchmarks.gpu.outliers", *argv))
        if not (model / "modules.json").is_file():
            started = time.perf_counter()
            argv = ["random-model", str(model), "--size", size]
            proof.module("jobbert_onnx.cli", *argv, cap=deadline - time.perf_counter())
            record["build_s"] = round(time.perf_counter() - started, 1)
            proof.save()
        precisions = ("fp16",) if proof.quick else ("fp16", "fp32")
        if _reusable(export, precisions, proof.device):
            record["export"] = "reused: validated on this device by an earlier run"
        else:
            started = time.perf_counter()
            argv = ["export", str(model), str(export), "--overwrite", "--precision", ",".join(precisions)]
            argv += ["--merged", "--validate-device", proof.device]
            proof.module("jobbert_onnx.cli", *argv, cap=deadline - time.perf_counter())
            record["export_s"] = round(time.perf_counter() - started, 1)
        record |= _validation(export)
        proof.save()
        if proof.quick:
            return
        # The other mask forms and the packed encoder, one process each, side by side.
        started = time.perf_counter()
        copies = [proof.start(f"copy-{form}", "benchmarks.mask_exports", str(export), form) for form in COPIES]
        beside += copies
        for copy in copies:
            proof.reap(copy, deadline)
        record["mask_copies_s"] = round(time.perf_counter() - started, 1)
        record |= _validation(export)
        proof.save()
        try:
            proof.reap(beside[0], deadline)
            record["outlier_replica"] = "ready"
        except subprocess.TimeoutExpired:
            record["outlier_replica"] = f"not ready within the step's {cap} s: stopped"
        except RuntimeError as error:
            record["outlier_replica"] = f"failed: {error}"
    finally:
        for left in beside:
            kill_group(left.process)


def _validation(export: Path) -> dict[str, Any]:
    manifest = json.loads((export / "manifest.json").read_text())
    validation = {
        name: {
            "device": v["validation"].get("device", "-"),
            "heads": v["validation"].get("heads", {}),
            "note": v["validation"].get("note"),
            "merged": bool(v["validation"].get("merged")),
            "packed": v["validation"].get("packed", {}).get("note", "validated" if v.get("packed") else None),
        }
        for name, v in manifest["variants"].items()
    }
    return {"validation": validation, "passed": manifest["validation"]["passed"]}


# The attention-mask forms besides the export's own, as `benchmarks.mask_exports` derives them, and
# every copy the model step makes with it (the packed encoder is added to the export itself).
MASK_FORMS = ("lengths", "2d")
COPIES = (*MASK_FORMS, "packed")


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


def _outliers(proof: Proof, cap: float, record: dict[str, Any]) -> None:
    """fp16 and the packed encoder against fp32 PyTorch on the outlier replica (prepared in the model
    step, beside the export), whatever their gate says."""
    from benchmarks.gpu.outliers import ready

    size = "tiny" if proof.rehearse else "full"
    record["model"] = f"random-model --size {size} --outliers (RANDOM weights with trained encoders' outliers)"
    export = proof.work / OUTLIER_EXPORT
    if not ready(export, proof.device):
        record["status"] = "not run: the outlier replica was not prepared (see the model step)"
        return
    record["fp32"] = _validation(export)["validation"]["fp32"]
    record["fp16"] = proof.probe("fidelity", str(proof.work / OUTLIER_MODEL), str(export), cap=cap)


def _tests(proof: Proof, cap: float, record: dict[str, Any]) -> None:
    junit = proof.out / "junit.xml"
    argv = ["tests/test_gpu.py", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider"]
    argv += ["--junitxml", str(junit), "--full-model", str(proof.work / "model")]
    argv += ["--full-export", str(proof.work / "export")]
    if proof.rehearse:
        done = proof.module("pytest", *argv, "--collect-only", cap=cap)
        record["status"] = f"{NO_GPU} (collected: {done.stdout.strip().splitlines()[-1]})"
        return
    try:
        proof.module("pytest", *argv, "--require-cuda", cap=cap)
    finally:
        record["tests"] = _junit_counts(junit)


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


def _placement(proof: Proof, cap: float, record: dict[str, Any]) -> None:
    export = proof.work / "export"
    forms = [export, *(export.with_name(f"{export.name}-mask-{form}") for form in MASK_FORMS)]
    record["placement"] = proof.probe("placement", *map(str, forms), cap=cap)


def _capture(proof: Proof, cap: float, record: dict[str, Any]) -> None:
    record["cuda_graphs"] = proof.probe("capture", str(proof.work / "export"), cap=cap)


# What --quick benchmarks: ours, the peer a GPU user would pick instead, and batch-1 with CUDA graphs
# (names of `benchmarks.contenders`).
QUICK_CONTENDERS = ("jobbert-onnx fp16", "sentence-transformers PyTorch fp16", "jobbert-onnx fp16, CUDA graphs")


def benchmark_argv(proof: Proof) -> list[str]:
    """The benchmark's command line for this proof's mode (its time limits apart). A rehearsal runs
    its mode's plan, contenders and batch sizes included, on the CPU with the tiny model and fewer texts.
    Scratch goes under the work folder: OUT receives the results files only."""
    argv = ["--device", proof.device, "--contenders", "cuda", "--no-peers"]
    argv += ["--model", str(proof.work / "model"), "--export", str(proof.work / "export")]
    argv += ["--work", str(proof.work / "bench"), "--out", str(proof.out)]
    if proof.quick:
        counts = {"--titles": 20000, "--skill-lists": 5000, "--quality-texts": 1000}
        argv += [arg for name in QUICK_CONTENDERS for arg in ("--only", name)] + ["--batch-sizes", "256,1024"]
    else:
        counts = {"--titles": 50000, "--skill-lists": 10000, "--quality-texts": 2000}
        argv += ["--batch-sizes", "32,256,1024,4096"]
    # Small batches are timed on fewer texts: 64 batches' worth at least, the compared texts at least.
    counts |= {"--repeats": 3, "--latency-calls": 300, "--batches-per-point": 64}
    if proof.rehearse:
        counts |= {"--titles": 4096, "--skill-lists": 1024, "--quality-texts": 256, "--latency-calls": 20}
        counts |= {"--batches-per-point": 8}
        argv.append("--tiny")
    for flag, count in counts.items():
        argv += [flag, str(count)]
    return argv


def _benchmark(proof: Proof, cap: float, record: dict[str, Any]) -> None:
    record["results"] = f"bench-{proof.device}.json"
    limits = ["--deadline-s", str(max(cap - 30, 10)), "--timeout", str(cap)]
    proof.module("benchmarks", *benchmark_argv(proof), *limits, cap=cap)


def _profile(proof: Proof, cap: float, record: dict[str, Any]) -> None:
    record["profile"] = proof.probe("profile", str(proof.work / "export"), cap=cap)


STEPS = {
    "environment": _environment,
    "model": _model,
    "benchmark": _benchmark,
    "outliers": _outliers,
    "tests": _tests,
    "capture": _capture,
    "placement": _placement,
    "profile": _profile,
}
assert list(STEPS) == list(CAPS)


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
    proof.save()
    for name, run in STEPS.items():
        proof.step(name, lambda cap, record, run=run: run(proof, cap, record))  # type: ignore[misc]
        if name == "environment" and proof.facts["steps"][name]["status"] != "ok":
            proof.log("stopping: without a usable GPU nothing else can be proven")
            break
    proof.log(f"done in {time.perf_counter() - proof.started:.0f} s; results in {args.out}")
    proof.save()
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
