"""How close is a denoiser to a trained diffusion network? R^2 and MSE of x0 predictions along a trajectory.

The reference's main evaluation: run a trained network's sampling trajectory, and at every step compare the clean
image x0_hat that another denoiser predicts on the *same* noisy sample x_t with the trained network's x0_hat
(single-step comparison), or compare the two models' x0_hat along their *own* trajectories started from the same
noise (sample i from the generator of `(seed, i)`).

- `scores`: [`r2_score`], [`mse_score`] per sample; [`StepScores`] and [`score_steps`] per step of a trajectory.
- `trajectories`: [`Trajectory`]; [`trained_trajectory`] (a trained network, DDIM) and [`analytic_trajectory`]
  (an analytic denoiser, through [`AnalyticDDIMPipeline`]); [`x0_from_model_output`].
- `comparison`: [`evaluate_on_trajectory`] (single step) and [`compare_with_trained`] (everything) -> [`Comparison`].
- `calibration`: [`calibrate_patch_sizes`] -> [`Calibration`], an LS / ELS patch-size schedule from a trained model.
- `files`: [`load_trained`] (a trained pipeline folder or repo id).
- `metrics`: generated images against the training set: [`nearest_neighbors`], [`memorization`] (ratio test),
  [`frechet_distance`], and [`evaluate_samples`] (all of them) -> [`SampleEvaluation`].
- `features`: [`FeatureEncoder`], a `transformers` encoder (e.g. DINOv2) for FD and memorization in its features.

The building blocks are separate so that other tools can run a trained trajectory once with [`trained_trajectory`]
and score many candidate denoisers on it with [`evaluate_on_trajectory`], as [`calibrate_patch_sizes`] does.
"""

from .calibration import Calibration, calibrate_patch_sizes
from .comparison import Comparison, check_same_schedule, check_same_shape, compare_with_trained, evaluate_on_trajectory
from .features import FeatureEncoder
from .files import load_trained
from .metrics import (
    Memorization,
    Neighbors,
    SampleEvaluation,
    evaluate_samples,
    frechet_distance,
    frechet_distance_from_statistics,
    gaussian_statistics,
    memorization,
    nearest_neighbors,
    nearest_other_distances,
)
from .scores import StepScores, mse_score, r2_score, score_steps
from .trajectories import (
    Trajectory,
    analytic_trajectory,
    ddim_scheduler_like,
    trained_trajectory,
    unet_sample_shape,
    x0_from_model_output,
)

__all__ = [
    "Calibration",
    "Comparison",
    "FeatureEncoder",
    "Memorization",
    "Neighbors",
    "SampleEvaluation",
    "StepScores",
    "Trajectory",
    "analytic_trajectory",
    "calibrate_patch_sizes",
    "check_same_schedule",
    "check_same_shape",
    "compare_with_trained",
    "ddim_scheduler_like",
    "evaluate_on_trajectory",
    "evaluate_samples",
    "frechet_distance",
    "frechet_distance_from_statistics",
    "gaussian_statistics",
    "load_trained",
    "memorization",
    "mse_score",
    "nearest_neighbors",
    "nearest_other_distances",
    "r2_score",
    "score_steps",
    "trained_trajectory",
    "unet_sample_shape",
    "x0_from_model_output",
]
