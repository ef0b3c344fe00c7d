"""fastlt's fused ops. Each op lives in one file here: public function, eager reference, torch.library glue."""

from fastlt.ops._backend import get_backend, set_backend, use_backend
from fastlt.ops._class_parallel import class_shard
from fastlt.ops.batch_norm_channels_last import batch_norm_channels_last, batch_norm_channels_last_reference
from fastlt.ops.expert_aggregate import expert_aggregate, expert_aggregate_reference
from fastlt.ops.linear_prior_shifted_ce import linear_prior_shifted_ce, linear_prior_shifted_ce_reference
from fastlt.ops.linear_reslt_loss import linear_reslt_loss, linear_reslt_loss_reference
from fastlt.ops.linear_ride_loss import linear_ride_loss, linear_ride_loss_reference
from fastlt.ops.prior_shifted_ce import prior_shifted_ce, prior_shifted_ce_reference, shifted_ce
from fastlt.ops.reslt_loss import reslt_groups, reslt_loss, reslt_loss_reference
from fastlt.ops.ride_loss import ride_loss, ride_loss_reference
from fastlt.ops.tau_normalize import tau_normalize, tau_normalize_reference
from fastlt.ops.tau_sweep import shot_accuracy_per_tau, tau_sweep, tau_sweep_reference

__all__ = [
    "get_backend",
    "set_backend",
    "use_backend",
    "class_shard",
    "batch_norm_channels_last",
    "batch_norm_channels_last_reference",
    "expert_aggregate",
    "expert_aggregate_reference",
    "tau_normalize",
    "tau_normalize_reference",
    "tau_sweep",
    "tau_sweep_reference",
    "shot_accuracy_per_tau",
    "ride_loss",
    "ride_loss_reference",
    "reslt_loss",
    "reslt_loss_reference",
    "reslt_groups",
    "prior_shifted_ce",
    "linear_ride_loss",
    "linear_ride_loss_reference",
    "linear_prior_shifted_ce",
    "linear_prior_shifted_ce_reference",
    "linear_reslt_loss",
    "linear_reslt_loss_reference",
    "prior_shifted_ce_reference",
    "shifted_ce",
]
