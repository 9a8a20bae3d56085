"""Evaluation: segmentation / calibration metrics, volume inference and the results store (§6)."""

from medssl_kit.evaluate.inference import mc_dropout_predict, predict_classes, predict_volume
from medssl_kit.evaluate.metrics import (
    auroc,
    expected_calibration_error,
    segmentation_metrics,
    summarise,
    uncertainty_error_auroc,
)
from medssl_kit.evaluate.results import (
    RESULT_COLUMNS,
    aggregate,
    load_results,
    paired_wilcoxon,
    write_results,
)

__all__ = [
    "RESULT_COLUMNS",
    "aggregate",
    "auroc",
    "expected_calibration_error",
    "load_results",
    "mc_dropout_predict",
    "paired_wilcoxon",
    "predict_classes",
    "predict_volume",
    "segmentation_metrics",
    "summarise",
    "uncertainty_error_auroc",
    "write_results",
]
