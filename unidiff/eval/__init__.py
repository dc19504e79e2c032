"""Evaluation: few-shot linear probe, FID / Inception Score, and the FID Inception-v3.

``probe`` and ``fid`` are numpy-only; ``inception`` is a Haiku network whose weights load
from a local ``.npz`` (see its docstring for the format and the conversion script).
"""

from unidiff.eval.fid import (
    RunningStats,
    feature_stats,
    frechet_distance,
    inception_score,
    load_stats,
    save_stats,
)
from unidiff.eval.inception import (
    InceptionOutput,
    load_inception_params,
    make_inception,
    preprocess,
    random_params,
    save_inception_params,
)
from unidiff.eval.probe import (
    LinearProbe,
    NonFiniteFeaturesError,
    few_shot_probe,
    fit_probe,
    predict,
    select_shots,
)

__all__ = [
    "InceptionOutput",
    "LinearProbe",
    "NonFiniteFeaturesError",
    "RunningStats",
    "feature_stats",
    "few_shot_probe",
    "fit_probe",
    "frechet_distance",
    "inception_score",
    "load_inception_params",
    "load_stats",
    "make_inception",
    "predict",
    "preprocess",
    "random_params",
    "save_inception_params",
    "save_stats",
    "select_shots",
]
