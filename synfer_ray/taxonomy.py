"""Expressions, facial action units (AUs), per-class AU prototypes, and seeded AU and prompt sampling.

Pure functions: every sampled value depends only on its arguments, so a manifest row rebuilt from
its seed is the same row on every machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from synfer_ray.errors import SynferError

AFFECTNET_7: tuple[str, ...] = ("neutral", "happy", "sad", "surprise", "fear", "disgust", "anger")
AFFECTNET_8: tuple[str, ...] = AFFECTNET_7 + ("contempt",)
EXPRESSION_SETS: dict[str, tuple[str, ...]] = {"affectnet7": AFFECTNET_7, "affectnet8": AFFECTNET_8}

# Names other datasets use for the same classes (FER-2013 says "angry", RAF-DB "happiness", ...).
EXPRESSION_ALIASES: dict[str, str] = {
    "angry": "anger", "happiness": "happy", "sadness": "sad", "surprised": "surprise",
    "fearful": "fear", "disgusted": "disgust", "calm": "neutral",
}

FINEFACE_12: tuple[str, ...] = tuple(f"AU{n}" for n in (1, 2, 4, 5, 6, 9, 12, 15, 17, 20, 25, 26))
OPENGRAPHAU_41: tuple[str, ...] = tuple(
    [f"AU{n}" for n in (1, 2, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 22, 23,
                        24, 25, 26, 27, 32, 38, 39)]
    + [f"AU{side}{n}" for n in (1, 2, 4, 6, 10, 12, 14) for side in ("L", "R")]
)
AU_SETS: dict[str, tuple[str, ...]] = {"fineface12": FINEFACE_12, "opengraphau41": OPENGRAPHAU_41}

# EMFACS prototypes (METHOD.md section 4) with typical intensities in [0, 1]. AUs that the active AU
# set does not have are dropped, so one table serves both the 12- and the 41-AU space.
AU_PROTOTYPES: dict[str, dict[str, float]] = {
    "neutral": {},
    "happy": {"AU6": 0.7, "AU12": 0.9, "AU25": 0.4},
    "sad": {"AU1": 0.8, "AU4": 0.6, "AU15": 0.8, "AU17": 0.4},
    "surprise": {"AU1": 0.9, "AU2": 0.9, "AU5": 0.8, "AU25": 0.6, "AU26": 0.9},
    "fear": {"AU1": 0.8, "AU2": 0.6, "AU4": 0.6, "AU5": 0.8, "AU7": 0.6, "AU20": 0.8, "AU26": 0.6},
    "disgust": {"AU9": 0.9, "AU10": 0.6, "AU15": 0.6, "AU16": 0.5, "AU17": 0.4},
    "anger": {"AU4": 0.9, "AU5": 0.6, "AU7": 0.7, "AU17": 0.4, "AU23": 0.8},
    "contempt": {"AU12": 0.4, "AU14": 0.7, "AUR12": 0.8, "AUR14": 0.8},
}

EXPRESSION_PHRASES: dict[str, tuple[str, ...]] = {
    "neutral": ("a neutral expression", "a calm, relaxed face", "an expressionless face"),
    "happy": ("a happy smile", "a broad, joyful smile", "a cheerful expression"),
    "sad": ("a sad expression", "a sorrowful face with downturned lips", "a gloomy look"),
    "surprise": ("a surprised expression", "an astonished face with raised eyebrows", "a shocked look"),
    "fear": ("a fearful expression", "a frightened face with wide eyes", "a scared look"),
    "disgust": ("a disgusted expression", "a wrinkled nose of disgust", "a repulsed look"),
    "anger": ("an angry expression", "a furious face with knitted brows", "a hostile glare"),
    "contempt": ("a contemptuous expression", "a one-sided smirk of contempt", "a scornful look"),
}

PROMPT_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "age": ("young", "middle-aged", "elderly", "teenage", "adult"),
    "ethnicity": ("asian", "black", "white", "latino", "middle eastern", "indian"),
    "gender": ("man", "woman", "person"),
    "hair": ("short hair", "long hair", "curly hair", "no hair", "a ponytail", "grey hair"),
    "accessory": ("no accessories", "glasses", "a hat", "earrings", "a scarf"),
    "pose": ("facing the camera", "head turned slightly left", "head turned slightly right",
             "head tilted down"),
    "lighting": ("soft lighting", "studio lighting", "natural daylight", "dim lighting"),
    "background": ("plain background", "outdoor background", "office background", "blurred background"),
}
PROMPT_TEMPLATE = ("a close-up photo of the face of a {age} {ethnicity} {gender} with {hair}, "
                   "{accessory}, {pose}, {lighting}, {background}, {expression}")
# Captions that say only what a label tells: the expression, in varied wording.
EXPRESSION_TEMPLATES = ("{expression}", "a photo of {expression}", "a close-up photo showing {expression}",
                        "a face showing {expression}", "someone showing {expression}", "a picture of {expression}")
# How a bundle's captions were written for faces without one, and so what prompts it expects:
# "attributes" (PROMPT_TEMPLATE: Stable Diffusion bases, bundles trained before captions were
# honest) or "expression" (EXPRESSION_TEMPLATES).
CAPTION_STYLES = ("attributes", "expression")

# Independent random streams per purpose, so adding an attribute never shifts the sampled AUs.
_STREAM_CLASS, _STREAM_AUS, _STREAM_PROMPT = 1, 2, 3


def _rng(seed: int, stream: int) -> np.random.Generator:
    if seed < 0:
        raise SynferError("seed", seed, "an integer >= 0")
    return np.random.default_rng([seed, stream])


def expression_set(name: str) -> tuple[str, ...]:
    if name not in EXPRESSION_SETS:
        raise SynferError("expressions", name, f"one of {sorted(EXPRESSION_SETS)}")
    return EXPRESSION_SETS[name]


def au_set(name: str) -> tuple[str, ...]:
    if name not in AU_SETS:
        raise SynferError("au_set", name, f"one of {sorted(AU_SETS)}")
    return AU_SETS[name]


def canonical_expression(name: str, classes: Sequence[str], field: str = "expression") -> str:
    """The class name as ``classes`` spells it; aliases (``angry``) and case are forgiven."""
    key = name.strip().lower()
    key = EXPRESSION_ALIASES.get(key, key)
    if key not in classes:
        raise SynferError(field, name, f"one of {list(classes)}")
    return key


def class_mix_weights(classes: Sequence[str], mix: Mapping[str, float] | None = None) -> np.ndarray:
    """Normalised sampling weights over ``classes``; None means uniform."""
    if not mix:
        return np.full(len(classes), 1.0 / len(classes))
    weights = np.zeros(len(classes))
    for name, weight in mix.items():
        index = list(classes).index(canonical_expression(name, classes, field="class_mix"))
        if not np.isfinite(weight) or weight < 0:
            raise SynferError(f"class_mix.{name}", weight, "a finite weight >= 0")
        weights[index] = weight
    if weights.sum() <= 0:
        raise SynferError("class_mix", dict(mix), "at least one class with a weight > 0")
    return weights / weights.sum()


def sample_expression(seed: int, classes: Sequence[str], weights: np.ndarray | None = None) -> str:
    """The target expression of the row with this seed."""
    probabilities = class_mix_weights(classes) if weights is None else weights
    return classes[int(_rng(seed, _STREAM_CLASS).choice(len(classes), p=probabilities))]


def prototype_aus(expression: str, au_names: Sequence[str]) -> np.ndarray:
    """The EMFACS prototype of ``expression`` as a vector over ``au_names`` (missing AUs are 0)."""
    prototype = AU_PROTOTYPES[expression]
    return np.array([prototype.get(name, 0.0) for name in au_names], dtype=np.float32)


def sample_target_aus(seed: int, expression: str, au_names: Sequence[str], jitter: float = 0.1,
                      extra_au_probability: float = 0.05, extra_au_max: float = 0.3) -> np.ndarray:
    """Prototype AUs of ``expression`` with Gaussian intensity jitter and rare extra AUs, in [0, 1]."""
    rng = _rng(seed, _STREAM_AUS)
    base = prototype_aus(expression, au_names)
    active = base > 0
    noise = rng.normal(0.0, jitter, size=base.shape)
    extra = (rng.random(base.shape) < extra_au_probability) * rng.uniform(0.0, extra_au_max, base.shape)
    values = np.where(active, base + noise, extra)
    return np.clip(values, 0.0, 1.0).astype(np.float32)


def build_prompt(seed: int, expression: str,
                 attributes: Mapping[str, Sequence[str]] = PROMPT_ATTRIBUTES,
                 template: str = PROMPT_TEMPLATE, style: str = "attributes") -> str:
    """A caption fixed by ``seed``: an expression phrase in the attribute template (random attributes
    that say nothing about any image), or with ``style="expression"`` only the phrase in one of
    :data:`EXPRESSION_TEMPLATES`."""
    rng = _rng(seed, _STREAM_PROMPT)
    if style == "expression":
        phrases = EXPRESSION_PHRASES[expression]
        wording = EXPRESSION_TEMPLATES[int(rng.integers(len(EXPRESSION_TEMPLATES)))]
        return wording.format(expression=phrases[int(rng.integers(len(phrases)))])
    if style != "attributes":
        raise SynferError("captions", style, f"one of {list(CAPTION_STYLES)}")
    chosen = {key: options[int(rng.integers(len(options)))] for key, options in sorted(attributes.items())}
    phrases = EXPRESSION_PHRASES[expression]
    chosen["expression"] = phrases[int(rng.integers(len(phrases)))]
    return template.format(**chosen)


@dataclass(frozen=True)
class ActionUnits:
    """AU intensities by name, checked against the AU names a bundle declares."""

    names: tuple[str, ...]
    values: tuple[float, ...]

    @classmethod
    def from_mapping(cls, given: Mapping[str, float], au_names: Sequence[str],
                     field: str = "aus") -> "ActionUnits":
        values = dict.fromkeys(au_names, 0.0)
        for name, value in given.items():
            if name not in values:
                raise SynferError(field, name, f"an AU name of this bundle: {list(au_names)}")
            value = float(value)
            if not (0.0 <= value <= 1.0):
                raise SynferError(f"{field}.{name}", value, "an intensity in [0, 1]")
            values[name] = value
        return cls(tuple(au_names), tuple(values.values()))

    def as_array(self) -> np.ndarray:
        return np.asarray(self.values, dtype=np.float32)
