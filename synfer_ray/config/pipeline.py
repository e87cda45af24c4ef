"""The ``synfer pipeline`` job's config: a generate section and a train section run as one job."""

from __future__ import annotations

from pydantic import Field

from synfer_ray.config.common import _Strict
from synfer_ray.config.generate import GenerateConfig
from synfer_ray.config.train import TrainConfig


class PipelineConfig(_Strict):
    """generate -> train -> evaluate in one job; ``train.data`` names the generated output itself."""

    generate: GenerateConfig = Field(..., description="The generate job that makes the synthetic dataset.")
    train: TrainConfig = Field(..., description=(
        "The train job run after it; its data.train sources name generate.output to train on the new dataset."))
