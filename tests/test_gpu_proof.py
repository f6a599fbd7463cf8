"""The GPU proof, rehearsed on the CPU: the command a lent GPU will run is known to work before it does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from benchmarks.gpu import stage as gpu_stage
from benchmarks.gpu.fold import END, PREDICTIONS, START, fold
from benchmarks.gpu.summary import targets

ROOT = Path(__file__).resolve().parent.parent


def _rehearse(out: Path, work: Path, *flags: str) -> None:
    done = subprocess.run(
        [str(ROOT / "scripts" / "gpu-proof.sh"), str(out), "--rehearse", "--work", str(work), *flags],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("proof")
    _rehearse(out, tmp_path_factory.mktemp("proof-work"))
    return out


@pytest.fixture(scope="module")
def quick_rehearsal(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("proof-quick")
    _rehearse(out, tmp_path_factory.mktemp("proof-quick-work"), "--quick")
    return out


@pytest.mark.slow
def test_the_rehearsal_runs_every_step_and_returns_within_the_device_tools_limits(rehearsal: Path) -> None:
    files = sorted(p.name for p in rehearsal.iterdir())
    assert all((rehearsal / name).is_file() for name in files), "files only: the device tool returns two levels"
    assert len(files) <= 8 and all((rehearsal / name).stat().st_size < 16 * 2**20 for name in files)
    assert {"proof.json", "summary.md", "log.txt", "junit.xml", "bench-cpu.json", "bench-cpu.md"} <= set(files)
    facts = json.loads((rehearsal / "proof.json").read_text())
    steps = facts["steps"]
    assert list(steps) == ["environment", "model", "tests", "placement", "capture", "benchmark", "profile"]
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
    names = ("jobbert-onnx fp16", "jobbert-onnx fp16, mask 1D lengths", "jobbert-onnx fp16, mask 2D")
    for name in (*names, "jobbert-onnx fp16, vectors into page-locked host buffers"):
        for workload in ("titles", "skill_lists"):
            row = results[name]["workloads"][workload]
            assert row["cosine"]["min"] > 0.999, (name, workload)
            assert any(point and point["runs"] == 3 for point in row["throughput"].values()), "median of 3 runs"
    reference = results["sentence-transformers PyTorch fp32"]["workloads"]["titles"]
    assert all(point is None for point in reference["throughput"].values()), "the reference only gives vectors"
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
    for name in QUICK_CONTENDERS:
        row = results[name]["workloads"]["titles"]
        assert row["throughput"]["1024"]["runs"] == 3 and row["cosine"]["min"] > 0.999, name
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
    assert list(facts["steps"]) == ["environment"]
    environment = facts["steps"]["environment"]
    assert environment["status"].startswith("failed: CUDA cannot be used: ")
    assert environment["facts"]["onnxruntime"] == facts["proof_process"]["onnxruntime"]["version"]
    assert "stopping: without a usable GPU" in (tmp_path / "out" / "log.txt").read_text()


def test_the_steps_caps_fit_the_device_visit() -> None:
    """8 minutes for the full proof, 3 for --quick: the device tool runs a command at most 10 minutes,
    and a visit has 15 minutes of device time in all."""
    from benchmarks.gpu.proof import BUDGETS, CAPS

    assert BUDGETS[0] <= 480 and BUDGETS[1] <= 180
    for column in (0, 1):
        assert sum(caps[column] for caps in CAPS.values()) <= BUDGETS[column]
    assert CAPS["benchmark"][1] >= 85, "quick's benchmark needs time for ours and the peer"


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
    named = argv[argv.index("--only") + 1].split(",") if "--only" in argv else []
    assert {name.lower() for name in named} <= known, f"not in the {plan} plan: {set(named) - known}"
    assert bool(named) == quick, "only --quick picks contenders"
    assert argv[argv.index("--device") + 1] == "cuda" and "--quality-texts" in argv

    rehearsed = benchmark_argv(Proof(tmp_path, tmp_path, quick=quick, rehearse=True))
    scaled = {"--device", "--titles", "--skill-lists", "--quality-texts", "--latency-calls"}

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
