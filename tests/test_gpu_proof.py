"""The GPU proof, rehearsed on the CPU: the command a lent GPU will run is known to work before it does."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from benchmarks.gpu import stage as gpu_stage
from benchmarks.gpu.fold import END, PREDICTIONS, START, fold
from benchmarks.gpu.proof import CAPS, NOT_REACHED, OUT_FILES
from benchmarks.gpu.summary import targets

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Watched:
    """What OUT held while a proof ran: checked at every poll, kept whole at each step's start."""

    out: Path
    work: Path
    polls: int = 0
    over_limits: list[str] = field(default_factory=list)
    at_step: dict[str, dict[str, str]] = field(default_factory=dict)


def _limits(out: Path) -> str | None:
    """What in OUT the device tool would not return (its README: at most 8 files, 16 MiB each,
    64 MiB together); None where it returns everything."""
    entries = list(out.iterdir())
    if any(entry.is_dir() for entry in entries):
        return f"folders in OUT: {[e.name for e in entries if e.is_dir()]}"
    sizes = {entry.name: entry.stat().st_size for entry in entries if entry.is_file()}
    if (
        len(sizes) > OUT_FILES
        or any(size >= 16 * 2**20 for size in sizes.values())
        or sum(sizes.values()) >= 64 * 2**20
    ):
        return f"{len(sizes)} files, {sum(sizes.values())} bytes: {sorted(sizes)}"
    return None


def _started_steps(out: Path) -> list[str]:
    log = out / "log.txt"
    text = log.read_text(errors="replace") if log.is_file() else ""
    return [name for name in CAPS if f"== {name} (at most" in text]


def _snapshot(out: Path) -> dict[str, str]:
    found = {}
    for entry in out.iterdir():
        try:
            found[entry.name] = entry.read_text(errors="replace")
        except (FileNotFoundError, IsADirectoryError):  # renamed over meanwhile
            continue
    return found


def _proof(out: Path, work: Path, *flags: str) -> subprocess.Popen:
    """The proof in a process group of its own, as the device tool's command runs (and kills) it."""
    argv = [str(ROOT / "scripts" / "gpu-proof.sh"), str(out), "--rehearse", "--work", str(work), *flags]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _rehearse(out: Path, work: Path, *flags: str) -> Watched:
    """Run a rehearsal to its end, checking OUT against the device tool's limits every 20 ms and
    keeping OUT as it was when each step began (what a kill at that moment would return)."""
    out.mkdir(parents=True, exist_ok=True)
    watched = Watched(out, work)
    process = _proof(out, work, *flags)
    deadline = time.monotonic() + 600
    while process.poll() is None and time.monotonic() < deadline:
        watched.polls += 1
        problem = _limits(out)
        if problem:
            watched.over_limits.append(problem)
        for name in _started_steps(out):
            if name not in watched.at_step:
                watched.at_step[name] = _snapshot(out)
        time.sleep(0.02)
    _, stderr = process.communicate(timeout=max(1, deadline - time.monotonic()))
    assert process.returncode == 0, stderr[-3000:]
    return watched


@pytest.fixture(scope="module")
def rehearsal_run(tmp_path_factory: pytest.TempPathFactory) -> Watched:
    return _rehearse(tmp_path_factory.mktemp("proof"), tmp_path_factory.mktemp("proof-work"))


@pytest.fixture(scope="module")
def rehearsal(rehearsal_run: Watched) -> Path:
    return rehearsal_run.out


@pytest.fixture(scope="module")
def quick_rehearsal_run(tmp_path_factory: pytest.TempPathFactory) -> Watched:
    out = tmp_path_factory.mktemp("proof-quick")
    return _rehearse(out, tmp_path_factory.mktemp("proof-quick-work"), "--quick")


@pytest.fixture(scope="module")
def quick_rehearsal(quick_rehearsal_run: Watched) -> Path:
    return quick_rehearsal_run.out


@pytest.mark.slow
def test_the_rehearsal_runs_every_step_and_returns_within_the_device_tools_limits(rehearsal: Path) -> None:
    files = sorted(p.name for p in rehearsal.iterdir())
    assert all((rehearsal / name).is_file() for name in files), "files only: the device tool returns two levels"
    assert len(files) <= 8 and all((rehearsal / name).stat().st_size < 16 * 2**20 for name in files)
    assert {"proof.json", "summary.md", "log.txt", "junit.xml", "bench-cpu.json", "bench-cpu.md"} <= set(files)
    facts = json.loads((rehearsal / "proof.json").read_text())
    steps = facts["steps"]
    # What decides the targets first: a proof cut short loses the diagnostics, not the targets.
    assert list(steps) == ["environment", "model", "benchmark", "outliers", "tests", "capture", "placement", "profile"]
    for name, step in steps.items():
        assert step["status"] == "ok" or step["status"].startswith("skipped: no GPU"), (name, step["status"])
    collected = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "tests/test_gpu.py",
            "-m",
            "gpu",
            "--collect-only",
            "-q",
            "-p",
            "no:cacheprovider",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    count = int(collected.stdout.strip().splitlines()[-1].split()[0])
    assert count >= 14 and steps["tests"]["status"].startswith(f"skipped: no GPU (collected: {count} tests")
    assert steps["capture"]["cuda_graphs"]["status"] == "skipped: no GPU"
    assert steps["model"]["mask_copies_s"] >= 0, "the mask forms are copied in the model step, under its cap"
    assert steps["model"]["outlier_replica"] == "ready", "prepared beside the export"
    outliers = steps["outliers"]["fp16"]  # measured whatever the gate says: both heads, and the packed encoder
    assert set(outliers["heads"]) == {"anchor", "positive"} and outliers["packed"]["note"].startswith("not validated")
    assert all(head["min_cosine"] > 0.999 for head in outliers["heads"].values()), "fp16 weights, fp32 arithmetic"
    assert (
        "## fp16 on the outlier replica (random-model --size tiny --outliers" in (rehearsal / "summary.md").read_text()
    )
    fp16 = steps["model"]["validation"]["fp16"]
    assert fp16["merged"] and fp16["packed"] == "added by benchmarks.mask_exports; not validated at export"
    assert steps["profile"]["profile"]["per_call"] == "skipped: no GPU"
    placement = steps["placement"]["placement"]
    assert set(placement["attention"]) == {"lengths-starts", "lengths", "2d"}
    assert all(seen["nonfinite_at_padded_positions"] == 0 for seen in placement["attention"].values())
    assert placement["graphs"]["encoder.fp16.onnx"]["nodes_per_provider"]["CPUExecutionProvider"] > 10


@pytest.mark.slow
def test_the_rehearsal_measures_the_gpu_contenders_on_the_cpu(rehearsal: Path) -> None:
    bench = json.loads((rehearsal / "bench-cpu.json").read_text())
    results = {c["contender"]: c for c in bench["contenders"]}
    assert results["jobbert-onnx fp16, CUDA graphs"]["error"] == "CUDA graphs need a GPU"
    assert results["jobbert-onnx fp16, padding removed (packed)"]["error"] == "the packed encoder needs a GPU"
    assert results["jobbert-onnx fp16"]["graphs"] == "merged"
    assert results["jobbert-onnx fp16, chained graphs"]["graphs"] == "chained"
    host = results["jobbert-onnx fp16, vectors into page-locked host buffers"]
    assert host["host_buffers"] == "pageable (not on CUDA)" and "host_buffers" not in results["jobbert-onnx fp16"]
    chained = "jobbert-onnx fp16, chained graphs"
    names = ("jobbert-onnx fp16", f"{chained}, mask 1D lengths", f"{chained}, mask 2D")
    for form in names[1:]:  # the mask forms are compared on the route their copies run: chained graphs
        assert results[form]["graphs"] == results[chained]["graphs"] == "chained", form
    for name in (*names, "jobbert-onnx fp16, vectors into page-locked host buffers"):
        for workload in ("titles", "skill_lists"):
            row = results[name]["workloads"][workload]
            assert row["cosine"]["min"] > 0.999, (name, workload)
            assert any(point and point["runs"] == 3 for point in row["throughput"].values()), "median of 3 runs"
    reference = results["sentence-transformers PyTorch fp32"]["workloads"]["titles"]
    assert all(point is None for point in reference["throughput"].values()), "the reference only gives vectors"
    # The peer as it ran: half precision throughout, TF32 off for it and for the reference, and
    # every batch size ours ran, on both workloads.
    peer, off = (
        results["sentence-transformers PyTorch fp16"],
        {"cuda_matmul_allow_tf32": False, "cudnn_allow_tf32": False},
    )
    assert peer["dtype"] == "torch.float16" and set(peer["parameter_dtypes"]) == {"float16"}
    for name in ("sentence-transformers PyTorch fp32", "sentence-transformers PyTorch fp16"):
        assert results[name]["tf32"]["ran_with"] == {"float32_matmul_precision": "highest", **off}, name
    for workload in ("titles", "skill_lists"):
        ours = results["jobbert-onnx fp16"]["workloads"][workload]["throughput"]
        theirs = peer["workloads"][workload]["throughput"]
        assert [size for size, point in ours.items() if point] == [size for size, point in theirs.items() if point]
    summary = (rehearsal / "summary.md").read_text()
    assert "| titles >= 150,000 texts/s | not measured (rehearsal on the CPU) | - |" in summary


@pytest.mark.slow
def test_the_rehearsal_imports_onnxruntime_from_a_folder_that_shadows_site_packages(rehearsal: Path) -> None:
    """The GPU machine's layout: the staged onnxruntime-gpu on PYTHONPATH ahead of the image's CPU build."""
    facts = json.loads((rehearsal / "proof.json").read_text())
    own = facts["proof_process"]["onnxruntime"]["file"]
    assert "shadow-site" in own and facts["steps"]["environment"]["facts"]["onnxruntime_file"] == own
    bench = json.loads((rehearsal / "bench-cpu.json").read_text())
    gpu_only = ("CUDA graphs need a GPU", "the packed encoder needs a GPU")
    assert all(c.get("error", gpu_only[0]) in gpu_only for c in bench["contenders"]), "every worker checked"


@pytest.mark.slow
def test_the_quick_rehearsal_runs_ours_and_the_peer_with_their_vectors_compared(quick_rehearsal: Path) -> None:
    from benchmarks.gpu.proof import QUICK_CONTENDERS

    steps = json.loads((quick_rehearsal / "proof.json").read_text())["steps"]
    assert [n for n, step in steps.items() if step["status"] == "ok"] == ["environment", "model", "benchmark"]
    assert all(step["status"] == "skipped: not in --quick" for n, step in steps.items() if step["status"] != "ok")
    results = {c["contender"]: c for c in json.loads((quick_rehearsal / "bench-cpu.json").read_text())["contenders"]}
    assert results["jobbert-onnx fp16, CUDA graphs"]["error"] == "CUDA graphs need a GPU"
    for name in QUICK_CONTENDERS[:2]:
        for workload in ("titles", "skill_lists"):
            row = results[name]["workloads"][workload]
            assert row["throughput"]["1024"]["runs"] == 3 and row["cosine"]["min"] > 0.999, (name, workload)
    reference = results["sentence-transformers PyTorch fp32"]["workloads"]["titles"]
    assert reference["latency"] is None, "the reference gives vectors only"


def test_a_child_that_loses_the_shadowing_path_stops_naming_both_onnxruntimes(tmp_path: Path) -> None:
    """Item 1 of the first GPU visit's plan: workers started with the repository alone on PYTHONPATH
    imported the image's CPU build. Under the rehearsal's layout such a child now stops."""
    from benchmarks.gpu.proof import shadow_site
    from benchmarks.worker import SAME_ONNXRUNTIME_ENV

    site = shadow_site(tmp_path)
    shadowed = {"version": __import__("onnxruntime").__version__, "file": str(site / "onnxruntime" / "__init__.py")}
    env = {**os.environ, SAME_ONNXRUNTIME_ENV: json.dumps(shadowed)}
    argv = [sys.executable, "-m", "benchmarks.gpu.child", "benchmarks.gpu.probe", "env"]
    kept = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, env={**env, "PYTHONPATH": f"{site}:{ROOT}"})
    assert kept.returncode == 0, kept.stderr[-2000:]
    assert json.loads(kept.stdout.splitlines()[-1])["onnxruntime_file"] == shadowed["file"]
    lost = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, env={**env, "PYTHONPATH": str(ROOT)})
    assert lost.returncode != 0 and shadowed["file"] in lost.stderr and "site-packages" in lost.stderr


def test_a_step_past_its_cap_is_killed_with_everything_it_started(tmp_path: Path) -> None:
    from benchmarks.gpu.proof import Proof

    pid_file = tmp_path / "grandchild.pid"
    code = (
        "import subprocess, sys, time; "
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
        f"open({str(pid_file)!r}, 'w').write(str(child.pid)); time.sleep(120)"
    )
    proof = Proof(tmp_path, tmp_path, quick=False, rehearse=True)
    with pytest.raises(subprocess.TimeoutExpired):
        proof.command([sys.executable, "-c", code], cap=3)
    grandchild = int(pid_file.read_text())
    for _ in range(50):
        if not Path(f"/proc/{grandchild}").exists() or "Z" in Path(f"/proc/{grandchild}/stat").read_text().split()[2]:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the step's grandchild {grandchild} outlived the step's cap")


def test_without_a_gpu_the_proof_stops_after_the_environment_and_keeps_its_facts(tmp_path: Path) -> None:
    """The run a GPU machine without a working CUDA provider would make: it fails, saying why, and
    proof.json still holds what the environment step and the proof's own process found."""
    done = subprocess.run(
        [str(ROOT / "scripts" / "gpu-proof.sh"), str(tmp_path / "out"), "--work", str(tmp_path / "work")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stderr[-2000:]
    facts = json.loads((tmp_path / "out" / "proof.json").read_text())
    assert list(facts["steps"]) == list(CAPS)
    assert all(step["status"] == NOT_REACHED for name, step in facts["steps"].items() if name != "environment")
    environment = facts["steps"]["environment"]
    assert environment["status"].startswith("failed: CUDA cannot be used: ")
    assert environment["facts"]["onnxruntime"] == facts["proof_process"]["onnxruntime"]["version"]
    assert "stopping: without a usable GPU" in (tmp_path / "out" / "log.txt").read_text()


def test_the_steps_caps_fit_the_device_visit() -> None:
    """A visit has 15 minutes of device time: the start (a minute or more), three staged parts, the
    full proof and a --quick rerun must fit, with the full sequence up to the proof's end in 9
    minutes (README's table). The steps that decide the targets come first."""
    from benchmarks.gpu.proof import BUDGETS

    assert BUDGETS[0] <= 330 and BUDGETS[1] <= 150
    for column in (0, 1):
        assert sum(caps[column] for caps in CAPS.values()) <= BUDGETS[column]
    assert list(CAPS)[:3] == ["environment", "model", "benchmark"]
    assert CAPS["benchmark"][1] >= 65, "quick's benchmark needs time for ours and the peer"
    readme = (ROOT / "README.md").read_text()
    calls = re.findall(r"^\| (\d[-\d]*) \| .* \| (\d+) \|$", readme, flags=re.M)
    assert [call for call, _ in calls] == ["1-3", "4", "5"], calls
    timeouts = {call: int(limit) for call, limit in calls}
    assert timeouts["4"] >= BUDGETS[0] + 30 and timeouts["5"] >= BUDGETS[1] + 30, "the proof ends before the tool's cap"
    start, parts = 90, 3 * 30  # the start; each part's call, transfer included
    assert start + parts + timeouts["4"] <= 9 * 60
    assert start + parts + timeouts["4"] + timeouts["5"] <= 15 * 60 - 60, "a minute spare for the gaps"


@pytest.mark.slow
def test_folding_writes_the_gpu_sections_and_refuses_a_rehearsal(rehearsal: Path, tmp_path: Path) -> None:
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "RESULTS.md").write_text(f"# Results\n\nCPU text stays.\n\n{START}\nold\n{END}\n")
    with pytest.raises(SystemExit, match="rehearsal on the CPU, not GPU results"):
        fold(rehearsal, tmp_path)
    raw = fold(rehearsal, tmp_path, allow_rehearsal=True)
    assert (raw / "proof.json").is_file() and (raw / "bench-cpu.json").is_file()
    results = (tmp_path / "benchmarks" / "RESULTS.md").read_text()
    assert results.startswith("# Results\n\nCPU text stays.") and "old" not in results
    assert results.count(START) == 1 and "| batch-1 p50 <= 0.4 ms |" in results
    notes = (tmp_path / "benchmarks" / "GPU-NOTES.md").read_text()
    for name, _, _ in PREDICTIONS:
        assert f"| {name} |" in notes
    assert "lengths-starts: (no kernel information printed: CPU provider)" in notes
    assert "| Padding-free encoder | " in notes and "not measured (the packed encoder needs a GPU) |" in notes
    assert "x the default); host buffers pageable (not on CUDA) |" in notes


def test_each_piece_of_the_cuda_path_is_observed_against_the_default() -> None:
    from benchmarks.gpu.fold import _versus

    def contender(name: str, rates: dict[str, float | None], **facts: str) -> dict:
        points = {size: rate and {"texts_per_s": rate} for size, rate in rates.items()}
        return {"contender": name, **facts, "workloads": {"titles": {"throughput": points}}}

    bench = {
        "contenders": [
            contender("jobbert-onnx fp16", {"32": 1000.0, "1024": 40000.0}),
            contender("jobbert-onnx fp16, chained graphs", {"32": None, "1024": 30000.0}),
            contender("host", {"1024": 42000.0}, host_buffers="page-locked"),
            {"contender": "jobbert-onnx fp16, padding removed (packed)", "error": "boom"},
        ]
    }
    assert _versus("jobbert-onnx fp16, chained graphs")({}, bench) == (
        "titles at 1024: 30,000 vs 40,000 texts/s (0.75x the default)"
    )
    assert _versus("host")({}, bench).endswith("(1.05x the default); host buffers page-locked")
    assert _versus("jobbert-onnx fp16, padding removed (packed)")({}, bench) == "not measured (boom)"
    assert _versus("absent")({}, bench) == "not measured"


def _bench(rates: dict[str, float], p50: float, cosine: float) -> dict:
    def contender(name: str, titles: float, skills: float) -> dict:
        def row(rate: float) -> dict:
            return {
                "latency": {"p50_ms": p50},
                "throughput": {"1024": {"texts_per_s": rate}},
                "cosine": {"mean": cosine, "min": cosine},
            }

        return {"contender": name, "workloads": {"titles": row(titles), "skill_lists": row(skills)}}

    return {
        "contenders": [
            contender("jobbert-onnx fp16", rates["titles"], rates["skills"]),
            contender("sentence-transformers PyTorch fp16", rates["peer"], 1.0),
        ]
    }


def test_targets_are_judged_from_the_measurements() -> None:
    met = targets(_bench({"titles": 160_000, "skills": 31_000, "peer": 50_000}, 0.35, 0.99995), rehearsal=False)
    assert [verdict for _, _, verdict in met] == ["met"] * 5
    missed = targets(_bench({"titles": 100_000, "skills": 20_000, "peer": 50_000}, 0.9, 0.998), rehearsal=False)
    assert [verdict for _, _, verdict in missed] == ["missed"] * 5
    assert missed[3][1] == "2.00x"
    assert all(row[1] == "not measured" for row in targets(None, rehearsal=False))


def _fake_wheel(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr(gpu_stage.PROVIDER, bytes(range(256)) * 4000)
        wheel.writestr("onnxruntime/__init__.py", "__version__ = 'staged'\n")
        wheel.writestr("onnxruntime_gpu-9.9.dist-info/METADATA", "Name: onnxruntime-gpu\n")


def test_staged_parts_unpack_to_the_wheel_and_name_what_is_missing(tmp_path: Path) -> None:
    _fake_wheel(tmp_path / "ort.whl")
    parts = gpu_stage.pack(tmp_path / "ort.whl", tmp_path / "stage", part_bytes=400)
    assert len(parts) > 2
    arrived = tmp_path / "arrived"
    arrived.mkdir()
    (arrived / gpu_stage.INDEX).write_text((tmp_path / "stage" / gpu_stage.INDEX).read_text())
    for part in parts[:-1]:
        (arrived / part.name).write_bytes(part.read_bytes())
    site = tmp_path / "site"
    with pytest.raises(SystemExit, match=f"parts missing: {parts[-1].name}; send each"):
        gpu_stage.unpack(site, [arrived])
    broken = bytearray(parts[0].read_bytes())
    broken[0] ^= 1
    (arrived / parts[0].name).write_bytes(bytes(broken))
    with pytest.raises(SystemExit, match=r"part-0, part-\d+ \(damaged copies: .*part-0\)"):
        gpu_stage.unpack(site, [arrived])
    gpu_stage.unpack(site, [arrived, tmp_path / "stage"])  # the good copies, wherever they are
    with zipfile.ZipFile(tmp_path / "ort.whl") as wheel:
        for name in wheel.namelist():
            assert (site / name).read_bytes() == wheel.read(name), name
    code = "import onnxruntime; print(onnxruntime.__version__)"
    done = subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": str(site)}, capture_output=True, text=True)
    assert done.stdout.strip() == "staged"


def test_the_cuda_libraries_of_nvidia_packages_are_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for folder, library in (("cu13/lib", "libcublasLt.so.13"), ("cudnn/lib", "libcudnn.so.9"), ("cu13/bin", "x.so")):
        (tmp_path / "nvidia" / folder).mkdir(parents=True, exist_ok=True)
        (tmp_path / "nvidia" / folder / library).write_bytes(b"")
    monkeypatch.setattr(gpu_stage.site, "getsitepackages", lambda: [str(tmp_path)])
    monkeypatch.setattr(gpu_stage.site, "getusersitepackages", lambda: str(tmp_path / "none"))
    assert gpu_stage.library_path() == f"{tmp_path}/nvidia/cu13/lib:{tmp_path}/nvidia/cudnn/lib"


@pytest.mark.parametrize("quick", [False, True])
def test_every_mode_benchmarks_contenders_the_benchmark_has(tmp_path: Path, quick: bool) -> None:
    """--quick once named a contender that does not exist, so its benchmark exited at once; the
    rehearsal never ran that branch. Now a rehearsal runs its mode's plan with only the provider,
    the model's size and the text counts changed."""
    from benchmarks.__main__ import contenders
    from benchmarks.gpu.proof import Proof, benchmark_argv

    argv = benchmark_argv(Proof(tmp_path, tmp_path, quick=quick, rehearse=False))
    plan = argv[argv.index("--contenders") + 1]
    known = {c["name"].lower() for c in contenders(plan, "avx2")}
    named = [argv[i + 1] for i, arg in enumerate(argv) if arg == "--only"]
    assert {name.lower() for name in named} <= known, f"not in the {plan} plan: {set(named) - known}"
    assert bool(named) == quick, "only --quick picks contenders"
    assert argv[argv.index("--device") + 1] == "cuda" and "--quality-texts" in argv

    rehearsed = benchmark_argv(Proof(tmp_path, tmp_path, quick=quick, rehearse=True))
    scaled = {"--device", "--titles", "--skill-lists", "--quality-texts", "--latency-calls", "--batches-per-point"}

    def plan_of(args: list[str]) -> list[str]:
        kept, skip = [], False
        for arg in args:
            if skip or arg == "--tiny":
                skip = False
                continue
            skip = arg in scaled
            kept.append(arg)
        return kept

    assert plan_of(rehearsed) == plan_of(argv) and "--tiny" in rehearsed


def test_the_summary_tabulates_launches_and_cpu_time_per_call(tmp_path: Path) -> None:
    from benchmarks.gpu.summary import summary

    per_call = {
        "one title, no CUDA graphs": {"wall_ms": 0.61, "cpu_ms": 0.55, "launches": {"cudaLaunchKernel": 98}},
        "one title, CUDA graphs": {"wall_ms": 0.21, "cpu_ms": 0.12, "launches": {"cudaGraphLaunch": 3}},
    }
    profile = {"device": "cuda", "split_ms": {"one title": {"copy in": 0.01}}, "per_call": per_call}
    facts = {
        "mode": "full",
        "started": "2026-12-01T00:00:00Z",
        "proof_process": {"onnxruntime": {"version": "1.31.1", "file": "/tmp/ortsite/onnxruntime/__init__.py"}},
        "steps": {"profile": {"status": "ok", "profile": profile | {"fp16_ceiling_tflops": 700.0}}},
    }
    text = summary(facts, tmp_path)
    assert "| one title, CUDA graphs | 0.210 | 0.120 | {'cudaGraphLaunch': 3} |" in text
    assert "every child checks it imports the same): 1.31.1 from /tmp/ortsite/onnxruntime/__init__.py" in text


@pytest.mark.slow
def test_out_holds_only_what_the_device_tool_returns_at_every_moment(rehearsal_run: Watched) -> None:
    """The device tool returns at most 8 files from OUT, flat, under 16 MiB each; a proof killed at
    its time limit returns OUT as it is at that moment. The benchmark's vectors once went there."""
    assert rehearsal_run.polls > 100 and not rehearsal_run.over_limits, rehearsal_run.over_limits[:3]
    assert set(rehearsal_run.at_step) == set(CAPS)
    for name, files in rehearsal_run.at_step.items():
        facts = json.loads(files["proof.json"])  # whole at every moment: replaced, never rewritten in place
        steps = facts["steps"]
        assert steps[name]["status"].startswith("stopped during this step"), (name, steps[name])
        later = list(CAPS)[list(CAPS).index(name) + 1 :]
        assert all(steps[n]["status"] == NOT_REACHED for n in later), name
        assert f"| {name} | stopped during this step" in files["summary.md"], name


def _processes_naming(text: str) -> list[str]:
    """Live processes whose command line names `text`."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if not entry.name.isdigit() or (entry / "stat").read_text().split(") ")[1].startswith("Z"):
                continue
            if text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                found.append(entry.name)
        except (FileNotFoundError, ProcessLookupError, PermissionError, IndexError):
            continue
    return found


@pytest.mark.slow
@pytest.mark.parametrize("point", ["model", "mid-benchmark", "outliers"])
def test_a_proof_killed_at_any_point_returns_what_it_measured(
    rehearsal_run: Watched, tmp_path: Path, point: str
) -> None:
    """Killed as the device tool kills a command past its limit (its process group, SIGKILL), the
    proof leaves OUT within the tool's limits, proof.json and summary.md readable and saying what
    was measured and what was not, and nothing of it running (children die with it)."""
    out = tmp_path / "out"
    out.mkdir()
    step = "benchmark" if point == "mid-benchmark" else point
    process = _proof(out, rehearsal_run.work)  # the finished rehearsal's model and exports are reused
    deadline = time.monotonic() + 400
    while process.poll() is None and time.monotonic() < deadline:
        started = step in _started_steps(out)
        # Mid-benchmark: once a contender's results are in and the summary has followed them (it is
        # rewritten every REFRESH_S while a step runs).
        summary = out / "summary.md"
        if started and (
            point != "mid-benchmark" or "## Benchmark" in (summary.read_text() if summary.is_file() else "")
        ):
            break
        time.sleep(0.01)
    assert process.poll() is None, f"the proof ended before {point}"
    os.killpg(process.pid, signal.SIGKILL)
    process.communicate()
    for _ in range(100):
        if not _processes_naming(str(rehearsal_run.work)):
            break
        time.sleep(0.05)
    assert not _processes_naming(str(rehearsal_run.work)), "a child of the killed proof is still running"
    assert _limits(out) is None, _limits(out)
    steps = json.loads((out / "proof.json").read_text())["steps"]
    assert steps[step]["status"].startswith("stopped during this step"), steps[step]
    names = list(CAPS)
    assert all(steps[n]["status"] == NOT_REACHED for n in names[names.index(step) + 1 :])
    assert all(
        steps[n]["status"] in ("ok", "skipped: no GPU") or "collected" in steps[n]["status"]
        for n in names[: names.index(step)]
    )
    summary = (out / "summary.md").read_text()
    assert f"| {step} | stopped during this step" in summary
    if point == "mid-benchmark":
        bench = json.loads((out / "bench-cpu.json").read_text())
        assert bench["contenders"] and len(bench["contenders"]) < len(bench["planned"])
        assert "Not measured (the benchmark stopped before them): " in summary
        assert not list(out.glob("*.npy")), "vectors stay in the scratch folder"
    if point == "outliers":
        assert (out / "bench-cpu.json").is_file() and not_reached_in(out) == []


def not_reached_in(out: Path) -> list[str]:
    from benchmarks.gpu.summary import not_reached

    return not_reached(json.loads((out / "bench-cpu.json").read_text()))


def test_the_targets_are_measured_first_and_like_for_like() -> None:
    """Batch-1 with CUDA graphs was 9th of 14 contenders, after the deadline in practice; the peer ran
    at 1,024 only while ours ran four batch sizes."""
    from benchmarks.__main__ import REFERENCE, contenders

    plan = contenders("cuda", "avx2")
    names = [c["name"] for c in plan]
    assert names[:4] == [
        REFERENCE,
        "jobbert-onnx fp16",
        "sentence-transformers PyTorch fp16",
        "jobbert-onnx fp16, CUDA graphs",
    ]
    ours, peer = plan[1], plan[2]
    assert "batch_sizes" not in ours and "batch_sizes" not in peer, "both run every batch size of the run"
    masks = [c for c in plan if "mask" in c["options"]]
    assert len(masks) == 2 and all(c["options"]["merged"] is False for c in masks), "same route as their baseline"
    chained = next(c for c in plan if c["name"] == "jobbert-onnx fp16, chained graphs")
    assert chained["options"]["merged"] is False and names.index(chained["name"]) < names.index(masks[0]["name"])


def test_the_capture_probe_tries_only_what_the_runtime_captures_and_labels_what_it_saw() -> None:
    from benchmarks.gpu.probe import capture_plan, capture_shapes
    from jobbert_onnx.runtime.chain import MAX_CUDA_GRAPHS

    buckets = (4, 6, 8, 10, 12, 14, 16, 24, 32, 48, 64)
    plan, beyond = capture_plan(buckets, MAX_CUDA_GRAPHS)
    assert len(plan) == MAX_CUDA_GRAPHS and beyond == 9 * len(buckets) - MAX_CUDA_GRAPHS
    assert {(1, width) for width in buckets} <= set(plan), "batch 1 at every width"

    class Chain:  # captures its first `limit` shapes, as GraphChain does, then runs without graphs
        def __init__(self, limit: int) -> None:
            self.limit, self.captured, self.runs = limit, [], 0

        def run(self, batch: object, task: str) -> None:
            self.runs += 1
            shape = batch.input_ids.shape  # type: ignore[attr-defined]
            if len(self.captured) < self.limit and shape not in self.captured:
                self.captured.append(shape)

        def captured_shapes(self) -> list[tuple[int, int]]:
            return list(self.captured)

    shapes = capture_shapes(Chain(3), Chain(0), plan[:5])
    assert [key for key, seen in shapes.items() if seen["captured"]] == ["1x4", "1x6", "1x8"]
    assert shapes["1x10"]["error"] == "ran without a graph: the chain did not capture this shape"
    assert "replay_ms" not in shapes["1x10"] and shapes["1x10"]["uncaptured_ms"] >= 0


def test_the_benchmark_builds_no_copy_and_says_which_is_missing(tiny_exports: dict, tmp_path: Path) -> None:
    """Mask copies were rebuilt inside the benchmark when the model step had not finished them,
    eating its cap; now the benchmark skips the contender and names the command that makes it."""
    import shutil

    from benchmarks.__main__ import _missing, contenders

    export = tmp_path / "export"
    shutil.copytree(tiny_exports[("router", "fp16")], export)
    plan = {c["name"]: c for c in contenders("cuda", "avx2")}
    two_d = plan["jobbert-onnx fp16, chained graphs, mask 2D"]
    said = _missing(two_d, "cuda", export)
    assert said is not None and said.startswith("not run: no copy of") and "benchmarks.mask_exports" in said
    packed = _missing(plan["jobbert-onnx fp16, padding removed (packed)"], "cuda", export)
    assert packed is not None and "has no packed encoder" in packed
    assert _missing(plan["jobbert-onnx fp16, chained graphs"], "cuda", export) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"], "nothing was derived"


def test_a_step_stopped_by_its_cap_keeps_what_it_found(tmp_path: Path) -> None:
    from benchmarks.gpu.proof import Proof

    proof = Proof(tmp_path, tmp_path, quick=False, rehearse=True)

    def run(cap: float, record: dict) -> None:
        record["export_s"] = 12.5
        proof.save()
        raise subprocess.TimeoutExpired("export", cap)

    proof.step("model", run)
    model = json.loads((tmp_path / "proof.json").read_text())["steps"]["model"]
    assert model["status"].startswith("timeout after") and model["export_s"] == 12.5


def test_ours_against_the_peer_per_batch_size_and_the_peer_as_it_ran(tmp_path: Path) -> None:
    from benchmarks.gpu.summary import not_reached, ratios, summary

    def row(rates: dict[str, float]) -> dict:
        return {"throughput": {size: {"texts_per_s": rate} for size, rate in rates.items()}, "latency": {"p50_ms": 1.0}}

    bench = {
        "planned": ["jobbert-onnx fp16", "sentence-transformers PyTorch fp16", "jobbert-onnx fp16, CUDA graphs"],
        "contenders": [
            {"contender": "jobbert-onnx fp16", "workloads": {"titles": row({"32": 9000.0, "1024": 90000.0})}},
            {
                "contender": "sentence-transformers PyTorch fp16",
                "kind": "st-torch",
                "dtype": "torch.float16",
                "parameter_dtypes": {"float16": 100},
                "tf32": {"found": {"cudnn_allow_tf32": True}, "ran_with": {"cudnn_allow_tf32": False}},
                "workloads": {"titles": row({"32": 3000.0, "1024": 45000.0})},
            },
        ],
    }
    assert ratios(bench) == [
        "| titles | 32 | 9,000 | 3,000 | 3.00x |",
        "| titles | 1024 | 90,000 | 45,000 | 2.00x |",
    ]
    assert not_reached(bench) == ["jobbert-onnx fp16, CUDA graphs"]
    (tmp_path / "bench-cuda.json").write_text(json.dumps(bench))
    facts = {"mode": "full", "started": "2026-12-08T00:00:00Z", "steps": {}}
    text = summary(facts, tmp_path)
    assert "dtype torch.float16, parameters {'float16': 100}, TF32 found {'cudnn_allow_tf32': True}" in text
    assert "Not measured (the benchmark stopped before them): jobbert-onnx fp16, CUDA graphs." in text


def test_mask_forms_are_observed_against_the_chained_graphs() -> None:
    from benchmarks.gpu.fold import PREDICTIONS

    def contender(name: str, rate: float) -> dict:
        return {"contender": name, "workloads": {"titles": {"throughput": {"1024": {"texts_per_s": rate}}}}}

    chained = "jobbert-onnx fp16, chained graphs"
    bench = {
        "contenders": [
            contender("jobbert-onnx fp16", 50000.0),
            contender(chained, 40000.0),
            contender(f"{chained}, mask 1D lengths", 30000.0),
            contender(f"{chained}, mask 2D", 20000.0),
        ]
    }
    observe = dict((name, seen) for name, _, seen in PREDICTIONS)["Attention-mask forms"]
    assert observe({}, bench) == (
        "1D lengths: titles at 1024: 30,000 vs 40,000 texts/s (0.75x the chained graphs); "
        "2D: titles at 1024: 20,000 vs 40,000 texts/s (0.50x the chained graphs)"
    )


def test_every_device_call_stays_under_the_tools_64_mib() -> None:
    """Each call carries the working tree and one staged part; the tool refuses a call over 64 MiB."""
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    tree = sum((ROOT / name).stat().st_size for name in tracked.decode().split("\0") if (ROOT / name).is_file())
    assert tree + gpu_stage.PART_BYTES + 2**20 <= 64 * 2**20 - 2 * 2**20, f"tree {tree / 2**20:.1f} MiB"


@pytest.mark.slow
def test_the_device_versions_export_what_this_environment_exports(
    quick_rehearsal_run: Watched, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The GPU image has transformers 5.17.0, sentence-transformers 6.0.1, tokenizers 0.23.2 and
    onnx 1.23.1 (older than the set-up's): the quick rehearsal in an environment of those versions
    (from PyPI, as the set-up installs) fuses the same nodes and passes its validation, so a
    fusion difference would show here, not on the device."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("device_versions", ROOT / "tests" / "heldout" / "device_versions.py")
    assert spec is not None and spec.loader is not None
    device_versions = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(device_versions)
    result = device_versions.check(tmp_path_factory.mktemp("device-versions"), quick_rehearsal_run.work / "export")
    assert result["proof_exit"] == 0, result["steps"]
    versions = result["export"]["versions"]
    assert (versions["transformers"], versions["onnx"], versions["tokenizers"]) == ("5.17.0", "1.23.1", "0.23.2")
    assert result["export"]["passed"] and result["same_nodes"], result


def test_small_batches_are_timed_on_fewer_texts_but_never_fewer_than_are_compared() -> None:
    from benchmarks.__main__ import main
    from benchmarks.worker import point_texts

    texts = [f"t{i}" for i in range(5000)]
    assert len(point_texts(texts, 32, 64, 1000)) == 2048
    assert len(point_texts(texts, 8, 64, 1000)) == 1000, "the compared texts are always encoded"
    assert len(point_texts(texts, 1024, 64, 1000)) == 5000 and point_texts(texts, 32, None, None) == texts
    with pytest.raises(SystemExit):
        main(["--batches-per-point", "8", "--tiny"])
