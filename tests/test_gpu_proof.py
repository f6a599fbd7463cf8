"""The GPU proof, rehearsed on the CPU: the command a lent GPU will run is known to work before it does."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from benchmarks.gpu import stage as gpu_stage
from benchmarks.gpu.fold import END, PREDICTIONS, START, fold
from benchmarks.gpu.summary import targets

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("proof")
    work = tmp_path_factory.mktemp("proof-work")
    done = subprocess.run(
        [str(ROOT / "scripts" / "gpu-proof.sh"), str(out), "--rehearse", "--work", str(work)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.mark.slow
def test_the_rehearsal_runs_every_step_and_returns_within_the_device_tools_limits(rehearsal: Path) -> None:
    files = sorted(p.name for p in rehearsal.iterdir())
    assert all((rehearsal / name).is_file() for name in files), "files only: the device tool returns two levels"
    assert len(files) <= 8 and all((rehearsal / name).stat().st_size < 16 * 2**20 for name in files)
    assert {"proof.json", "summary.md", "log.txt", "junit.xml", "bench-cpu.json", "bench-cpu.md"} <= set(files)
    facts = json.loads((rehearsal / "proof.json").read_text())
    steps = facts["steps"]
    assert list(steps) == ["environment", "model", "tests", "placement", "benchmark", "profile"]
    for name, step in steps.items():
        assert step["status"] == "ok" or step["status"].startswith("skipped: no GPU"), (name, step["status"])
    assert steps["tests"]["status"].startswith("skipped: no GPU (collected: 10 tests")
    assert steps["placement"]["cuda_graphs"]["status"] == "skipped: no GPU"
    assert steps["profile"]["profile"]["kernels_per_batch"] == "skipped: no GPU"
    placement = steps["placement"]["placement"]
    assert set(placement["attention"]) == {"lengths-starts", "lengths", "2d"}
    assert all(seen["nonfinite_at_padded_positions"] == 0 for seen in placement["attention"].values())
    assert placement["graphs"]["encoder.fp16.onnx"]["nodes_per_provider"]["CPUExecutionProvider"] > 10


@pytest.mark.slow
def test_the_rehearsal_measures_the_gpu_contenders_on_the_cpu(rehearsal: Path) -> None:
    bench = json.loads((rehearsal / "bench-cpu.json").read_text())
    results = {c["contender"]: c for c in bench["contenders"]}
    assert results["jobbert-onnx fp16, CUDA graphs"]["error"] == "CUDA graphs need a GPU"
    for name in ("jobbert-onnx fp16", "jobbert-onnx fp16, mask 1D lengths", "jobbert-onnx fp16, mask 2D"):
        for workload in ("titles", "skill_lists"):
            row = results[name]["workloads"][workload]
            assert row["cosine"]["min"] > 0.999, (name, workload)
            assert any(point and point["runs"] == 3 for point in row["throughput"].values()), "median of 3 runs"
    reference = results["sentence-transformers PyTorch fp32"]["workloads"]["titles"]
    assert all(point is None for point in reference["throughput"].values()), "the reference only gives vectors"
    summary = (rehearsal / "summary.md").read_text()
    assert "| titles >= 150,000 texts/s | not measured (rehearsal on the CPU) | - |" in summary


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


@pytest.mark.parametrize(("quick", "rehearse"), [(False, False), (True, False), (False, True)])
def test_every_mode_benchmarks_contenders_the_benchmark_has(tmp_path: Path, quick: bool, rehearse: bool) -> None:
    """--quick once named a contender that does not exist, so its benchmark exited at once; the
    rehearsal never ran that branch."""
    from benchmarks.__main__ import contenders
    from benchmarks.gpu.proof import Proof, benchmark_argv

    argv = benchmark_argv(Proof(tmp_path, tmp_path, quick=quick, rehearse=rehearse))
    plan = argv[argv.index("--contenders") + 1]
    known = {c["name"].lower() for c in contenders(plan, "avx2")}
    named = argv[argv.index("--only") + 1].split(",") if "--only" in argv else []
    assert {name.lower() for name in named} <= known, f"not in the {plan} plan: {set(named) - known}"
    assert bool(named) == quick, "only --quick picks contenders"
