"""`ray job submit ... -- python jobs/generate.py --config gen.yaml [key=value ...]`

Thin entrypoint: the same command as `synfer generate`; inside a Ray job it attaches to the
cluster through RAY_ADDRESS.
"""

import sys
from pathlib import Path

# Run from a checkout (`--working-dir .`), use that checkout's package; installed images have it anyway.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from synfer_ray.cli import app  # noqa: E402

if __name__ == "__main__":
    app(["generate", *sys.argv[1:]])
