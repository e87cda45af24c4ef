"""`ray job submit ... -- python jobs/train.py --config train.yaml [key=value ...]` (same as `synfer train`)."""

import sys

from synfer_ray.cli import app

if __name__ == "__main__":
    app(["train", *sys.argv[1:]])
