"""Training engine: optimizer, lr schedules, AMP, channels_last / torch.compile, DDP, exact checkpoints, run folder,
training and prediction loops (with Mixup / CutMix), the `fit` epoch loop, and the many / medium / few evaluation."""

from fastlt.engine.acceleration import channels_last_is_faster, maybe_compile, prepare_model, unwrap_model
from fastlt.engine.amp import autocast, grad_scaler
from fastlt.engine.checkpoint import capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from fastlt.engine.distributed import (DistributedContext, all_gather_concat, init_distributed, shutdown_distributed,
                                      uses_cuda, wrap_model)
from fastlt.engine.evaluate import evaluate_logits, evaluate_predictions, format_results, plot_per_class_accuracy
from fastlt.engine.loop import predict, train_one_epoch
from fastlt.engine.mix import MixedBatch, Mixup
from fastlt.engine.optim import build_sgd
from fastlt.engine.run_folder import RunFolder, json_ready, read_metrics, write_json
from fastlt.engine.schedules import build_schedule
from fastlt.engine.trainer import fit

__all__ = [
    "DistributedContext",
    "MixedBatch",
    "Mixup",
    "RunFolder",
    "all_gather_concat",
    "autocast",
    "build_schedule",
    "build_sgd",
    "capture_rng_state",
    "channels_last_is_faster",
    "evaluate_logits",
    "evaluate_predictions",
    "fit",
    "format_results",
    "grad_scaler",
    "init_distributed",
    "json_ready",
    "load_checkpoint",
    "maybe_compile",
    "plot_per_class_accuracy",
    "predict",
    "prepare_model",
    "read_metrics",
    "restore_rng_state",
    "save_checkpoint",
    "shutdown_distributed",
    "train_one_epoch",
    "unwrap_model",
    "uses_cuda",
    "wrap_model",
    "write_json",
]
