"""Evaluation: zero-shot classification, linear probing, reconstruction metrics (PSNR, SSIM,
LPIPS, rFID), code statistics and reports. Protocols: docs/evaluation.md.

    from qlip.eval import zero_shot_classifier, evaluate_zero_shot, write_report
"""
from .codes import CodeStats, bits_per_image, code_stats, compression_ratio
from .linear_probe import evaluate_linear_probe, fit_probe, run_linear_probe
from .recon import FeatureStats, ReconMetrics, evaluate_reconstruction, frechet_distance, run_recon
from .report import compare_runs, write_comparison, write_report
from .shape_judge import judge_accuracy, judge_shapes
from .zeroshot import evaluate_zero_shot, run_zero_shot, zero_shot_classifier

__all__ = [
    "CodeStats", "bits_per_image", "code_stats", "compression_ratio",
    "evaluate_linear_probe", "fit_probe", "run_linear_probe",
    "FeatureStats", "ReconMetrics", "evaluate_reconstruction", "frechet_distance", "run_recon",
    "compare_runs", "write_comparison", "write_report",
    "judge_accuracy", "judge_shapes",
    "evaluate_zero_shot", "run_zero_shot", "zero_shot_classifier",
]
