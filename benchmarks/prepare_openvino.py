"""Run in the OpenVINO peers' environment: sentence-transformers' OpenVINO backend, fp32 and static int8.

    python -m benchmarks.prepare_openvino MODEL_COPY_DIR

The int8 model is what `sentence_transformers.backend.export_static_quantized_openvino_model`
makes (NNCF post-training quantization through optimum-intel's OVQuantizer, 300 calibration
samples, each padded to 384 tokens as that function pads them), calibrated on shipped job
titles and ESCO skill lists instead of the GLUE sentences it downloads from the hub.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

CALIBRATION_SAMPLES = 300
INT8_NAME = "openvino_model_qint8_quantized"


def calibration_texts() -> list[str]:
    """Titles in four languages and ESCO skill lists, about half and half, as our own int8 calibrates on."""
    from jobbert_onnx import samples

    texts: list[str] = []
    for language in samples.LANGUAGES:
        texts += samples.titles(language)[2::29][:38]
    for language in samples.SKILL_LANGUAGES:
        texts += samples.skill_lists(language, count=50, skills_per_list=10, offset=1500)
    return texts[:CALIBRATION_SAMPLES]


def main(argv: list[str]) -> int:
    from datasets import Dataset
    from optimum.intel.openvino import OVConfig, OVQuantizationConfig, OVQuantizer
    from sentence_transformers import SentenceTransformer

    folder = Path(argv[0])
    model = SentenceTransformer(str(folder), backend="openvino", device="cpu")
    model.save(str(folder))
    config = OVQuantizationConfig(num_samples=CALIBRATION_SAMPLES)
    quantizer = OVQuantizer.from_pretrained(model.transformers_model)
    encoded = model.tokenizer(calibration_texts(), padding="max_length", max_length=384, truncation=True)
    dataset = Dataset.from_dict(dict(encoded))
    staged = folder / "openvino-int8"
    quantizer.quantize(dataset, save_directory=str(staged), ov_config=OVConfig(quantization_config=config))
    # Where sentence-transformers' own export puts it, so it loads with file_name as its docs show.
    for suffix in (".xml", ".bin"):
        (staged / "openvino" / f"openvino_model{suffix}").replace(folder / "openvino" / f"{INT8_NAME}{suffix}")
    shutil.rmtree(staged)
    print(sorted(str(p.relative_to(folder)) for p in folder.rglob("openvino*.xml")))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
