"""`ray job submit ... -- python jobs/train_generator.py --config CONFIG.yaml [key=value ...]` (same as `synfer train-generator`)."""

import sys
from pathlib import Path

# Run from a checkout (`--working-dir .`), use that checkout's package; installed images have it anyway.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from synfer_ray.cli import app  # noqa: E402

if __name__ == "__main__":
    app(["train-generator", *sys.argv[1:]])
