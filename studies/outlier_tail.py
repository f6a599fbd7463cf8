"""Where the outlier replica's int8 tail comes from: the replica's conditioning, or int8?

Usage: python -m studies.outlier_tail MODEL EXPORT [--titles 1024] [--noise 0.01,0.02] --out DIR

For each title, against the PyTorch fp32 reference (anchor head):

- the export's int8 cosine;
- the margin of the replica's outlier circuit: the late-layer feed-forward units
  that `random_model` wires to fire on the outlier dimensions (bias
  ``-outlier_level``) have a pre-activation z per token; a content token
  (not ``<s>`` or ``</s>``) with |z| < 3 sits on the edge of a switch whose
  output is written back with weight ``OUTLIER_OUT_WEIGHT`` into dimensions that
  carry hundreds, so a small change of its input moves that token's whole
  vector (LayerNorm follows);
- the cosine of the same PyTorch model in fp32 after relative Gaussian noise of
  each given size on every encoder weight matrix (int8's per-channel rounding
  error is about 1% of a weight's spread): if small random perturbations give
  the same kind of tail, no quantization scheme can remove it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import workloads
from benchmarks.machine import cpu_name
from jobbert_onnx import Encoder, Tuning
from jobbert_onnx.export import random_model as rm
from jobbert_onnx.export.reference import TorchReference
from jobbert_onnx.export.source import read_model
from jobbert_onnx.vectors import row_cosines

EDGE = 3.0  # |z| below this: the unit's GELU is between off and on


def _margins(reference: TorchReference, titles: list[str]) -> list[float | None]:
    """Per title, the smallest |z| of any content token at any outlier unit (None: the model has none)."""
    import torch

    layers = reference.model.encoder.layer
    level = rm.outlier_level(reference.model.config.hidden_size)
    units = {i: (layer.intermediate.dense.bias == -level).nonzero().flatten() for i, layer in enumerate(layers)}
    units = {i: found for i, found in units.items() if len(found)}
    if not units:
        return [None] * len(titles)
    caught: dict[int, Any] = {}
    hooks = [
        layers[i].intermediate.dense.register_forward_hook(
            lambda _module, _inputs, output, i=i: caught.__setitem__(i, output[0, :, units[i]])
        )
        for i in units
    ]
    margins: list[float | None] = []
    try:
        with torch.inference_mode():
            for title in titles:
                encoded = reference.tokenizer([title], return_tensors="pt", truncation=True, max_length=64)
                reference.model(**encoded)
                content = slice(1, encoded["input_ids"].shape[1] - 1)
                margins.append(min(float(caught[i][content].abs().min()) for i in units))
    finally:
        for hook in hooks:
            hook.remove()
    return margins


def _noisy(reference: TorchReference, titles: list[str], relative: float, seed: int) -> np.ndarray:
    import torch

    original = {name: value.clone() for name, value in reference.model.state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    try:
        with torch.no_grad():
            for name, weight in reference.model.named_parameters():
                if weight.ndim == 2 and "embeddings" not in name:
                    weight.add_(torch.randn(weight.shape, generator=generator) * relative * weight.std())
        return reference.encode(titles, "anchor")
    finally:
        reference.model.load_state_dict(original)


def run(model: Path, export: Path, count: int, noise: list[float]) -> dict[str, Any]:
    titles = workloads.titles(count)
    reference = TorchReference(read_model(str(model)))
    want = reference.encode(titles, "anchor")
    encoder = Encoder.load(export, device="cpu", precision="int8", tuning=Tuning(dedup=False))
    int8 = row_cosines(encoder.encode(titles, task="anchor"), want)
    margins = _margins(reference, titles)
    low = np.flatnonzero(int8 < 0.98)
    summary: dict[str, Any] = {
        "int8": {"mean": float(int8.mean()), "min": float(int8.min()), "below_0.98": len(low)},
        "worst_int8": [
            {"title": titles[i], "cosine": float(int8[i]), "margin": margins[i]} for i in np.argsort(int8)[:15]
        ],
    }
    if margins[0] is not None:
        edge = np.array([m is not None and m < EDGE for m in margins])
        summary["on_the_edge"] = {
            "titles": int(edge.sum()),
            "of_them_int8_below_0.98": int(edge[low].sum()),
            "int8_below_0.98_on_the_edge_share": float(edge[low].mean()) if len(low) else None,
            "int8_mean_cosine_on_the_edge": float(int8[edge].mean()) if edge.any() else None,
            "int8_mean_cosine_elsewhere": float(int8[~edge].mean()),
        }
    summary["noise"] = {}
    for relative in noise:
        cosines = row_cosines(_noisy(reference, titles, relative, seed=0), want)
        bad = np.flatnonzero(cosines < 0.98)
        summary["noise"][str(relative)] = {
            "mean": float(cosines.mean()),
            "min": float(cosines.min()),
            "below_0.98": len(bad),
            "also_int8_below_0.98": len(set(bad) & set(low)),
            "worst": [(titles[i], float(cosines[i])) for i in np.argsort(cosines)[:5]],
        }
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m studies.outlier_tail", description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="the sentence-transformers folder the export was made from")
    parser.add_argument("export", type=Path, help="its export, with an int8 encoder")
    parser.add_argument("--titles", type=int, default=1024)
    parser.add_argument("--noise", default="0.01,0.02", help="relative weight-noise sizes, comma-separated")
    parser.add_argument("--out", type=Path, required=True, help="folder for tail.json")
    args = parser.parse_args(argv)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    summary = run(args.model, args.export, args.titles, [float(n) for n in args.noise.split(",")])
    record = {
        "command": "python -m studies.outlier_tail " + " ".join(argv if argv is not None else sys.argv[1:]),
        "started": started,
        "cpu": cpu_name(),
        **summary,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tail.json").write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps({k: v for k, v in record.items() if k != "worst_int8"}, indent=1, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
