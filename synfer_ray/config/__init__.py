"""Typed job configs, read from YAML plus dotted ``key.sub=value`` overrides, validated once here.

- ``common``: the strict base model, actor pools, Ray, MLflow tracking, and the YAML/override reader.
- ``generate``: ``synfer generate``: AU and diffusion sampling, semantic guidance, the label ensemble.
- ``train``: ``synfer train`` and ``train-labeler``: data sources, augmentation, model, optimiser, scaling.
- ``generator``: ``synfer train-generator`` and ``train-adapter``: architecture, stages, LoRA, quality report.
- ``serve``: ``synfer serve``: the Ray Serve deployment, its limits and request defaults.
- ``study``: ``synfer study``: the models it trains, the generated conditions, the SG sweep, downstream.
- ``pipeline``: ``synfer pipeline``: a generate and a train section run as one job.
"""

from synfer_ray.config.common import (Config, PoolConfig, Precision, RayConfig, Shuffle, TrackingConfig,
                                      apply_overrides, build_config, expand_environment, load_config, parse_value)
from synfer_ray.config.generate import (ADDED_GENERATE_SETTINGS, DEFAULT_SG_TARGET, DIVERSITY_TOLERANCE,
                                        AUSamplingConfig, ClassScales, GenerateConfig, LabelingConfig, SamplingConfig,
                                        Scheduler, SgGuide, SgTarget, VoterConfig, without_added_settings)
from synfer_ray.config.generator import (AdapterTrainConfig, DenoiserStageConfig, GeneratorArchitecture,
                                         GeneratorTrainConfig, LabelledFacesConfig, LoRAConfig, QualityConfig,
                                         StageConfig, VAEStageConfig)
from synfer_ray.config.pipeline import PipelineConfig
from synfer_ray.config.serve import AutoscalingConfig, ServeConfig
from synfer_ray.config.study import (Condition, StudyConfig, StudyDownstreamConfig, StudyGenerationConfig,
                                     StudyStage, StudySweepConfig)
from synfer_ray.config.train import (AugmentConfig, LabelerModelConfig, ModelConfig, OptimConfig, ScalingConfig,
                                     SourceConfig, TrainConfig, TrainDataConfig)

# Each `synfer` command that reads a config file -> the model it validates that file into
# (train-labeler reads a train config and sets model.arch to feranno).
JOB_CONFIGS: dict[str, type] = {
    "generate": GenerateConfig,
    "train": TrainConfig,
    "train-generator": GeneratorTrainConfig,
    "train-adapter": AdapterTrainConfig,
    "train-labeler": TrainConfig,
    "serve": ServeConfig,
    "study": StudyConfig,
    "pipeline": PipelineConfig,
}

__all__ = [
    "ADDED_GENERATE_SETTINGS", "DEFAULT_SG_TARGET", "DIVERSITY_TOLERANCE", "JOB_CONFIGS", "AUSamplingConfig",
    "AdapterTrainConfig", "AugmentConfig", "AutoscalingConfig", "ClassScales", "Condition", "Config",
    "DenoiserStageConfig", "GenerateConfig", "GeneratorArchitecture", "GeneratorTrainConfig", "LabelerModelConfig",
    "LabelingConfig", "LabelledFacesConfig", "LoRAConfig", "ModelConfig", "OptimConfig", "PipelineConfig",
    "PoolConfig", "Precision", "QualityConfig", "RayConfig", "SamplingConfig", "ScalingConfig", "Scheduler",
    "ServeConfig", "SgGuide", "SgTarget", "Shuffle", "SourceConfig", "StageConfig", "StudyConfig", "StudyDownstreamConfig",
    "StudyGenerationConfig", "StudyStage", "StudySweepConfig", "TrackingConfig", "TrainConfig", "TrainDataConfig",
    "VAEStageConfig", "VoterConfig", "apply_overrides", "build_config", "expand_environment", "load_config",
    "parse_value", "without_added_settings",
]
