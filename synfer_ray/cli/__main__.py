"""``python -m synfer_ray.cli``: the same as the ``synfer`` command."""

from synfer_ray.cli import main

main()
