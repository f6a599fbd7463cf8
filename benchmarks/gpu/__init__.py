"""The GPU proof (scripts/gpu-proof.sh): `proof` runs the steps, asking the machine through
`probe` and running the benchmark; `summary` judges the targets; `fold` brings the results
into RESULTS.md and GPU-NOTES.md; `stage` ships onnxruntime-gpu to a machine without an index."""
