"""`ray job submit ... -- python jobs/evaluate.py MODEL DATA [--out DIR]` (same as `synfer evaluate`)."""

import sys

from synfer_ray.cli import app

if __name__ == "__main__":
    app(["evaluate", *sys.argv[1:]])
