"""`ray job submit ... -- python jobs/generate.py --config gen.yaml [key=value ...]`

Thin entrypoint: the same command as `synfer generate`; inside a Ray job it attaches to the
cluster through RAY_ADDRESS.
"""

import sys

from synfer_ray.cli import app

if __name__ == "__main__":
    app(["generate", *sys.argv[1:]])
