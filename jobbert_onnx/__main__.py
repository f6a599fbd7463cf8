"""`python -m jobbert_onnx`: the `jobbert-onnx` command."""

import sys

from jobbert_onnx.cli import main

sys.exit(main())
