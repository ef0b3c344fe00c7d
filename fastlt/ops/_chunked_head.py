"""The fused head's chunked algorithm in PyTorch: RIDE's loss of ``features @ W^T`` and its gradients, walking the
classes in chunks so that no tensor is larger than ``[E, B, chunk]`` or ``[chunk, D]``.

It is what the overloads ``fastlt::linear_ride_loss.torch`` (elementwise work in PyTorch) and ``.triton`` (the
elementwise work in kernels/linear_ride_loss.py) run; the C++ and CUDA kernels (csrc/cpu/linear_ride_loss.cpp,
csrc/cuda/linear_ride_loss.cu) follow the same two passes. The op, its checks and its registrations:
fastlt/ops/linear_ride_loss.py; the formulas: docs/methods.md 3.2, 6.3 and 6.5.

1. Pass 1, :func:`row_statistics`: for each chunk, the logits ``z[:, :, c0:c1]`` (one GEMM per expert), merged into
   the online per-row softmax statistics (running maximum, sum of exps rescaled to it) of every term of the loss:
   each expert's LDAM-margin CE ``z'``, each expert's tempered logits ``u_k = z_k / T``, the tempered expert mean
   ``v = mean_k(z_k) / T`` (the detached target distribution pbar), each expert's KL gap ``sum_c exp(v_c - max v)
   (v_c - u_kc)`` rescaled with v's maximum, and the margin target logits. :func:`loss_from_statistics` gives the
   loss from them. Statistics of disjoint class ranges merge the same way as chunks do (max, then rescaled sums).
2. Pass 2, :func:`parameter_gradients`: for each chunk again, the logits, their gradient from the finished
   statistics (:func:`chunk_logits_gradient`), then :func:`backpropagate_chunk`: d features += dz @ W and
   d weight[c0:c1] = dz^T @ features. The cosine classifier's weight normalisation is never materialised: the
   weight's row norms scale the GEMM's columns, and its backward is row-local, applied per chunk.
"""

import torch

from fastlt._formulas import accumulate_dtype

NORM_EPS = 1e-12  # F.normalize's eps, as NormedLinear uses it

# The per-row statistics of pass 1 ([E, B] per expert, [B] for the expert mean): each *_max / *_sum pair is a running
# softmax maximum and the sum of exps rescaled to it.
STATISTICS = {"ce_max": "expert", "ce_sum": "expert", "expert_max": "expert", "expert_sum": "expert",
              "mean_max": "row", "mean_sum": "row", "gap": "expert", "target_logit": "expert"}


class ChunkedHead:
    """The op's inputs in the accumulation dtype and its logits chunk by chunk (``normalize``: the weight's rows are
    normalised on the fly; the features arrive normalised)."""

    def __init__(self, features, weight, bias, row_bias_scales, labels, target_margins, temperatures, scale,
                 normalize):
        acc = target_margins.dtype
        self.weight, self.bias, self.normalize, self.scale, self.acc = weight, bias, normalize, scale, acc
        self.row_bias_scales = row_bias_scales[:, None].to(acc) if row_bias_scales is not None else None  # [B, 1]
        self.num_experts, self.num_classes, _ = weight.shape
        self.features = features.to(acc).expand(self.num_experts, *features.shape[-2:])
        if normalize:
            # [E, C] scale / ||w_c||: multiplies the GEMM's columns instead of normalising the weight.
            weight_norms = torch.linalg.vector_norm(weight, dim=-1, dtype=acc)
            self.column_scale = scale / weight_norms.clamp_min(NORM_EPS)
            # below eps F.normalize's clamp has no radial term
            self.weight_above_eps = (weight_norms > NORM_EPS).to(acc)
        self.target = labels  # -1 for ignored rows: never in a chunk
        self.inverse_temperature = temperatures.reciprocal()
        self.target_margins = target_margins[labels.clamp_min(0)]  # [B]

    def chunks(self, chunk_size):
        """The class ranges ``(c0, c1)`` of the chunks."""
        return [(c0, min(self.num_classes, c0 + chunk_size)) for c0 in range(0, self.num_classes, chunk_size)]

    def weight_chunk(self, c0, c1):
        return self.weight[:, c0:c1].to(self.acc)  # [E, n, D]; a view for fp32 / fp64

    def logits(self, weight_chunk, c0, c1):
        """z[:, :, c0:c1]: [E, B, n]."""
        logits = torch.bmm(self.features, weight_chunk.transpose(1, 2))
        if self.normalize:
            logits.mul_(self.column_scale[:, None, c0:c1])
        if self.bias is not None:
            logits.add_(self.bias_chunk(c0, c1))
        return logits

    def bias_chunk(self, c0, c1):
        """The bias each row adds to z[:, :, c0:c1]: [E, 1 or B, n]."""
        bias = self.bias[:, None, c0:c1].to(self.acc)
        return bias if self.row_bias_scales is None else bias * self.row_bias_scales

    def target_mask(self, c0, c1):
        """[B, n] 1 at (b, y_b) when y_b is in the chunk, else 0."""
        classes = torch.arange(c0, c1, device=self.target.device)
        return (self.target[:, None] == classes[None, :]).to(self.acc)

    def chunk_views(self, logits, mask, c0, c1):
        """The three views of a chunk of logits the loss needs: margin logits z', tempered u, tempered mean v."""
        margin_logits = logits - (self.target_margins[:, None] * mask)[None]
        inverse_temperature = self.inverse_temperature[c0:c1]
        tempered = logits * inverse_temperature
        tempered_mean = logits.mean(0) * inverse_temperature
        return margin_logits, tempered, tempered_mean


def row_coefficients(target, class_weights, temperatures, diversity_factor, reduction, ignore_index,
                     row_weights=None):
    """Each row's factor on its CE and on its diversity term (docs/methods.md 6.5), and its label with ignored rows
    set to -1 (never a class): (labels [B], ce_coefs [B], div_coefs [B]) in the tables' dtype. A row's factors are
    ``row_weights`` (1 if None) times its class weight w_y (CE) or lam * mean(T)^2 (diversity). Under mean the CE is
    divided by the kept rows' total CE factor W, the diversity term by the kept rows' total row weight N (0 if W or N
    is 0); the kernels take these as their per-row tables."""
    kept = target != ignore_index
    labels = torch.where(kept, target, -1)
    kept_values = kept.to(temperatures.dtype)
    if row_weights is not None:
        kept_values = kept_values * row_weights.to(temperatures.dtype)
    ce_coefs = kept_values if class_weights is None else class_weights[labels.clamp_min(0)] * kept_values
    div_coefs = diversity_factor * temperatures.mean() ** 2 * kept_values
    if reduction == 1:
        weight_total, kept_rows = ce_coefs.sum(), kept_values.sum()
        ce_coefs = torch.where(weight_total > 0, ce_coefs / weight_total, 0.0)
        div_coefs = torch.where(kept_rows > 0, div_coefs / kept_rows, 0.0)
    return labels, ce_coefs, div_coefs


# ---- pass 1: the per-row statistics and the loss ----


def online_softmax_update(maximum, shifted_sum, values, dim=-1):
    """Merge the softmax statistics of `values` (reduced over `dim`) into (maximum, shifted_sum) in place."""
    new_maximum = torch.maximum(maximum, values.amax(dim))
    shifted_sum.mul_(torch.exp(maximum - new_maximum)).add_(torch.exp(values - new_maximum.unsqueeze(dim)).sum(dim))
    maximum.copy_(new_maximum)


def empty_statistics(num_experts, batch, dtype, device):
    """The statistics of no class yet (:data:`STATISTICS`): maxima -inf, sums 0."""
    shapes = {"expert": (num_experts, batch), "row": (batch,)}
    return {name: torch.full(shapes[kind], float("-inf") if name.endswith("_max") else 0.0, dtype=dtype,
                             device=device) for name, kind in STATISTICS.items()}


def merge_chunk_statistics(head, stats, logits, c0, c1, diversity):
    """Merge the chunk ``logits`` = z[:, :, c0:c1] into ``stats`` in place (the PyTorch form of the Triton kernel
    ``merge_chunk``)."""
    mask = head.target_mask(c0, c1)
    margin_logits, tempered, tempered_mean = head.chunk_views(logits, mask, c0, c1)
    stats["target_logit"].add_((margin_logits * mask).sum(-1))
    online_softmax_update(stats["ce_max"], stats["ce_sum"], margin_logits)
    if not diversity:
        return
    online_softmax_update(stats["expert_max"], stats["expert_sum"], tempered)
    previous_mean_max = stats["mean_max"].clone()
    online_softmax_update(stats["mean_max"], stats["mean_sum"], tempered_mean)
    mean_exp = torch.exp(tempered_mean - stats["mean_max"][:, None])  # [B, n]
    stats["gap"].mul_(torch.exp(previous_mean_max - stats["mean_max"]))
    stats["gap"].add_((mean_exp * (tempered_mean - tempered)).sum(-1))


def row_statistics(head, chunk_size, diversity, kernels=None):
    """Pass 1: the per-row statistics (:data:`STATISTICS`) over every class, chunk by chunk; the elementwise work in
    PyTorch or in ``kernels`` (fastlt.kernels.linear_ride_loss)."""
    E, B = head.features.shape[:2]
    stats = empty_statistics(E, B, head.acc, head.features.device)
    for c0, c1 in head.chunks(chunk_size):
        logits = head.logits(head.weight_chunk(c0, c1), c0, c1)
        if kernels is not None:
            kernels.merge_chunk(logits, head.target, head.target_margins,
                                head.inverse_temperature[c0:c1].contiguous(), stats, c0, diversity)
        else:
            merge_chunk_statistics(head, stats, logits, c0, c1, diversity)
    return stats


def loss_from_statistics(stats, ce_coef, div_coef, diversity):
    """The loss: sum of ce_coef x each expert's CE and (with ``diversity``) div_coef x each expert's KL term, from
    the finished statistics. ``ce_coef``: [1, B], ``div_coef``: [B] per-row factors (:func:`row_coefficients`)."""
    ce = torch.log(stats["ce_sum"]) + stats["ce_max"] - stats["target_logit"]  # [E, B]
    loss = (ce * ce_coef).sum()
    if diversity:
        mean_lse = torch.log(stats["mean_sum"]) + stats["mean_max"]
        expert_lse = torch.log(stats["expert_sum"]) + stats["expert_max"]
        kl = stats["gap"] / stats["mean_sum"] + expert_lse - mean_lse
        loss = loss + (div_coef * kl).sum()
    return loss


# ---- pass 2: the gradients ----


def chunk_logits_gradient(head, stats, logits, c0, c1, ce_coef, div_coef, diversity):
    """d loss / d z[:, :, c0:c1] ([E, B, n]) from the finished statistics: ce_coef * (softmax(z')_c - [c == y]) plus
    div_coef / T_c * (softmax(u_k)_c - softmax(v)_c) (the PyTorch form of the Triton kernel ``chunk_gradient``).
    ``ce_coef``: [1, B, 1]."""
    mask = head.target_mask(c0, c1)
    margin_logits, tempered, tempered_mean = head.chunk_views(logits, mask, c0, c1)
    grad = (torch.exp(margin_logits - stats["ce_max"][..., None]).mul_(stats["ce_sum"].reciprocal()[..., None])
            .sub_(mask).mul_(ce_coef))
    if diversity:
        expert_p = torch.exp(tempered - stats["expert_max"][..., None])
        expert_p.mul_(stats["expert_sum"].reciprocal()[..., None])
        mean_p = torch.exp(tempered_mean - stats["mean_max"][:, None]).mul_(stats["mean_sum"].reciprocal()[:, None])
        grad.add_(expert_p.sub_(mean_p).mul_(head.inverse_temperature[c0:c1] * div_coef[:, None]))
    return grad


def backpropagate_chunk(head, grad, cosine_part, weight_chunk, c0, c1, grad_features, grad_weight, grad_bias):
    """Backpropagate d loss / d z[:, :, c0:c1] (``grad``, modified in place) through the chunk's GEMM: adds to
    ``grad_features`` ([E, B, D], the normalised features' gradient), writes ``grad_weight[:, c0:c1]`` and
    ``grad_bias[:, c0:c1]``. ``cosine_part``: the chunk's logits (their bias is removed in place here)."""
    if grad_bias is not None:
        grad_bias[:, c0:c1] = grad.sum(1) if head.row_bias_scales is None else (grad * head.row_bias_scales).sum(1)
    if head.normalize:
        # d w_c = (column_scale_c * dz^T x - w_c * column_scale_c / ||w_c||^2 * sum_b dz_bc cos_bc*scale)
        if head.bias is not None:
            cosine_part = cosine_part.sub_(head.bias_chunk(c0, c1))
        radial = (grad * cosine_part).sum(1)  # [E, n]: w_hat_c . d w_hat_c
        grad.mul_(head.column_scale[:, None, c0:c1])
    for k in range(head.num_experts):
        grad_features[k].addmm_(grad[k], weight_chunk[k])
        grad_weight_chunk = torch.mm(grad[k].t(), head.features[k])  # [n, D]
        if head.normalize:
            coefficient = (radial[k] * head.column_scale[k, c0:c1].square() / head.scale ** 2
                           * head.weight_above_eps[k, c0:c1])
            grad_weight_chunk.addcmul_(weight_chunk[k], coefficient[:, None], value=-1.0)
        grad_weight[k, c0:c1] = grad_weight_chunk


def parameter_gradients(head, stats, chunk_size, ce_coef, div_coef, diversity, grad_weight, grad_bias, kernels=None):
    """Pass 2: each chunk's d loss / d logits, accumulated into d (normalised) features and written to grad_weight /
    grad_bias chunk by chunk. Returns d features in the accumulation dtype, [E, B, D]."""
    grad_features = torch.zeros_like(head.features)
    for c0, c1 in head.chunks(chunk_size):
        weight_chunk = head.weight_chunk(c0, c1)
        logits = head.logits(weight_chunk, c0, c1)
        if kernels is not None:
            cosine_part = logits.clone() if head.normalize else None  # the kernel overwrites the logits
            kernels.chunk_gradient(logits, head.target, head.target_margins, ce_coef.reshape(-1).contiguous(),
                                   head.inverse_temperature[c0:c1].contiguous(), stats, div_coef.contiguous(), c0,
                                   diversity)
            grad = logits
        else:
            grad = chunk_logits_gradient(head, stats, logits, c0, c1, ce_coef, div_coef, diversity)
            cosine_part = logits
        backpropagate_chunk(head, grad, cosine_part, weight_chunk, c0, c1, grad_features, grad_weight, grad_bias)
    return grad_features


def gradient_outputs(head, stats, features, weight, bias, chunk_size, ce_coef, div_coef, diversity, kernels=None):
    """Pass 2 as the op returns it: (d features, d weight, d bias), d features summed over the experts for shared
    ``[B, D]`` features, each in its input's dtype (d bias ``[0]``-shaped without a bias). ``ce_coef``: [B]."""
    grad_weight = torch.empty_like(weight, memory_format=torch.contiguous_format)
    grad_bias = torch.empty_like(bias, dtype=head.acc) if bias is not None else None
    grad_features = parameter_gradients(head, stats, chunk_size, ce_coef[None, :, None], div_coef, diversity,
                                        grad_weight, grad_bias, kernels)
    grad_features = (grad_features.sum(0) if features.dim() == 2 else grad_features).to(features.dtype)
    return grad_features, grad_weight, grad_bias.to(bias.dtype) if bias is not None else features.new_empty((0,))


def chunked_forward(features, weight, bias, target, target_margins, class_weights, temperatures, row_weights,
                    row_bias_scales, scale, normalize_weight, diversity_factor, reduction, ignore_index, chunk_size,
                    compute_grad, kernels=None):
    """The loss and (when compute_grad) d features, d weight, d bias ([0]-shaped when absent); the elementwise work
    in PyTorch, or in ``kernels`` (fastlt.kernels.linear_ride_loss: Triton). The arguments are the op's
    (``linear_ride_loss.SCHEMA``), already checked."""
    acc = accumulate_dtype(weight.dtype)
    target_margins, temperatures = target_margins.to(acc), temperatures.to(acc)
    class_weights = class_weights.to(acc) if class_weights is not None else None
    labels, ce_coef, div_coef = row_coefficients(target, class_weights, temperatures, diversity_factor, reduction,
                                                 ignore_index, row_weights)
    head = ChunkedHead(features, weight, bias, row_bias_scales, labels, target_margins, temperatures, scale,
                       normalize_weight)
    diversity = diversity_factor != 0.0
    stats = row_statistics(head, chunk_size, diversity, kernels)
    loss = loss_from_statistics(stats, ce_coef[None, :], div_coef, diversity)
    if not compute_grad:  # three distinct empty outputs: a custom op's outputs may not alias each other
        return loss, features.new_empty((0,)), features.new_empty((0,)), features.new_empty((0,))
    return (loss, *gradient_outputs(head, stats, features, weight, bias, chunk_size, ce_coef, div_coef, diversity,
                                    kernels))
