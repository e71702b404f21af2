"""``AttentionDistillLoss``: attention-map distillation between two diffusers models.

The loss records q and k of chosen ``Attention`` layers of a teacher and a student during their
ordinary forward passes (through :class:`fastdistill.diffusers.FusedAttnProcessor`'s recorder hook,
so those layers also run the fused attention kernel) and returns

    sum over layers l of  weight_l * attention_kl(q_s, k_s, q_t, k_t, scale_s, scale_t, reduction)

with :func:`fastdistill.attention_kl` computing, per head and query, ``KL(softmax(scale_t q_t k_t^T)
|| softmax(scale_s q_s k_s^T))`` without materialising either ``Lq x Lk`` map.

Head pairing (teacher heads ``H_t``, student heads ``H_s`` of a layer pair):

* ``H_t == H_s``: head ``i`` of the teacher supervises head ``i`` of the student.
* ``H_t = g * H_s``: the teacher's heads are taken in consecutive groups of ``g``; student head ``j``
  is matched to each teacher head ``j*g .. j*g+g-1``, and the loss averages the ``g`` KLs (student
  q/k repeated ``g`` times along the head axis).
* ``H_s = g * H_t``: teacher head ``i`` supervises each student head ``i*g .. i*g+g-1``.
* Otherwise (neither divides the other) a ``ValueError`` is raised.

Head dims may differ freely (``attention_kl`` compares attention distributions, not features);
each side uses the scale its layer attends with (``head_dim**-0.5`` for ``AttnProcessor2_0`` layers,
``attn.scale`` for legacy ``AttnProcessor`` ones, as :func:`fastdistill.diffusers.fused_processor_for`). Query and key
lengths of a pair must match (same latent resolution and text length).
"""

from __future__ import annotations

from typing import Iterable, Mapping, Optional, Sequence, Union

import torch
from torch import nn

__all__ = ["AttentionDistillLoss"]

Layers = Union[None, str, Sequence[str], Mapping[str, str]]


class _Record:
    """Recorder installed on one layer: keeps the latest ``(q, k, scale)`` of that layer."""

    def __init__(self, store: dict[str, tuple[torch.Tensor, torch.Tensor, float]], name: str,
                 use_attn_scale: bool = False) -> None:
        self.store = store
        self.name = name
        self.use_attn_scale = use_attn_scale

    def __call__(self, attn: nn.Module, query: torch.Tensor, key: torch.Tensor) -> None:
        # The scale the layer's processor attends with (FusedAttnProcessor's rule), so the distilled
        # distribution is the one the layer computes.
        scale = float(attn.scale) if self.use_attn_scale else query.shape[-1] ** -0.5
        self.store[self.name] = (query, key, scale)


def _norm_path(path: str) -> str:
    # Accept attn_processors keys ("...attn1.processor") and DDP-prefixed paths ("module....").
    if path.endswith(".processor"):
        path = path[: -len(".processor")]
    if path.startswith("module."):
        path = path[len("module."):]
    return path


class AttentionDistillLoss(nn.Module):
    """Attention-map KL between ``teacher`` and ``student`` diffusers models (UNet2DConditionModel,
    UNet2DModel, or any module tree of diffusers ``Attention`` layers; DDP/accelerate wrappers are
    unwrapped).

    Args:
        teacher: the teacher model. Run it (typically under ``torch.no_grad()``) before calling the
            loss; its q/k receive no gradient.
        student: the student model; its q/k (hence its parameters) receive the gradient.
        layers: which attention layers to match. ``None``: every ``Attention`` module path present
            in both models. A path or a list of paths (module paths such as
            ``"mid_block.attentions.0.transformer_blocks.0.attn1"``; an ``attn_processors`` key also
            works) present in both. A mapping ``{student_path: teacher_path}`` for models whose
            layer names differ.
        weights: optional per-layer weights (same order as the layers), default 1 each.
        reduction: per layer, ``"mean"`` over the ``B * H * Lq`` query rows (default) or ``"sum"``.

    Use::

        loss_fn = AttentionDistillLoss(teacher, student, layers=[...])
        with torch.no_grad():
            teacher(noisy, t, text)
        student(noisy, t, text)
        loss = loss_fn()            # sum over layers; clears the recorded q/k

    The loss uses the most recent forward of each model since the last call. While the loss
    exists, the chosen layers run :class:`~fastdistill.diffusers.FusedAttnProcessor`;
    :meth:`remove` puts the previous processors back. The models are referenced, not registered
    as submodules (``loss_fn.parameters()`` is empty).
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, layers: Layers = None, *,
                 weights: Optional[Iterable[float]] = None, reduction: str = "mean") -> None:
        super().__init__()
        from ..diffusers.processor import attention_modules, unwrap_model

        if not isinstance(teacher, nn.Module) or not isinstance(student, nn.Module):
            raise TypeError("AttentionDistillLoss: teacher and student must be nn.Modules, got "
                            f"{type(teacher).__name__} and {type(student).__name__}")
        if unwrap_model(teacher) is unwrap_model(student):
            raise ValueError("AttentionDistillLoss: teacher and student are the same model; pass two models")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"AttentionDistillLoss: reduction must be one of ['mean', 'sum'], got {reduction!r}")
        self.reduction = reduction
        t_mods, s_mods = attention_modules(teacher), attention_modules(student)
        self.pairs = self._resolve_layers(layers, s_mods, t_mods)  # [(student_path, teacher_path)]
        if weights is None:
            self.weights = [1.0] * len(self.pairs)
        else:
            self.weights = [float(w) for w in weights]
            if len(self.weights) != len(self.pairs):
                raise ValueError(f"AttentionDistillLoss: weights has {len(self.weights)} entries for "
                                 f"{len(self.pairs)} layers")
        # Plain attributes (a tuple is not registered): the loss does not own the models.
        self._models = (teacher, student)
        self._t_rec: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
        self._s_rec: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
        self._installed: list[tuple[nn.Module, object]] = []
        self._install(t_mods, [t for _, t in self.pairs], self._t_rec, "teacher")
        self._install(s_mods, [s for s, _ in self.pairs], self._s_rec, "student")

    @staticmethod
    def _resolve_layers(layers: Layers, s_mods: dict[str, nn.Module],
                        t_mods: dict[str, nn.Module]) -> list[tuple[str, str]]:
        if layers is None:
            pairs = [(p, p) for p in s_mods if p in t_mods]
            if not pairs:
                raise ValueError("AttentionDistillLoss: teacher and student share no Attention layer path; pass "
                                 "layers={student_path: teacher_path}")
            return pairs
        if isinstance(layers, str):
            layers = [layers]
        if isinstance(layers, Mapping):
            pairs = [(_norm_path(s), _norm_path(t)) for s, t in layers.items()]
        else:
            pairs = [(_norm_path(p), _norm_path(p)) for p in layers]
        if not pairs:
            raise ValueError("AttentionDistillLoss: layers is empty")
        for s, t in pairs:
            if s not in s_mods:
                raise ValueError(f"AttentionDistillLoss: layers names {s!r}, which is not an Attention module of "
                                 f"the student; its Attention layers are: {sorted(s_mods)}")
            if t not in t_mods:
                raise ValueError(f"AttentionDistillLoss: layers names {t!r}, which is not an Attention module of "
                                 f"the teacher; its Attention layers are: {sorted(t_mods)}")
        return pairs

    def _install(self, mods: dict[str, nn.Module], paths: list[str], store: dict, side: str) -> None:
        from ..diffusers.processor import _replaceable, fused_processor_for

        for path in dict.fromkeys(paths):
            m = mods[path]
            if not _replaceable(m.processor):
                raise ValueError(f"AttentionDistillLoss: {side} layer {path!r} uses {type(m.processor).__name__}, "
                                 f"which the recording processor would replace with different math; only "
                                 f"AttnProcessor/AttnProcessor2_0/FusedAttnProcessor layers can be matched")
            self._installed.append((m, m.processor))
            proc = fused_processor_for(m.processor)
            proc.recorder = _Record(store, path, use_attn_scale=proc.use_attn_scale)
            m.set_processor(proc)

    def remove(self) -> None:
        """Put back the processors the chosen layers had; the loss cannot be used afterwards."""
        for m, prev in reversed(self._installed):
            m.set_processor(prev)
        self._installed.clear()
        self.clear()

    def clear(self) -> None:
        """Drop the recorded q/k (they are dropped after every loss computation too)."""
        self._t_rec.clear()
        self._s_rec.clear()

    @staticmethod
    def _pair_heads(q_s: torch.Tensor, k_s: torch.Tensor, q_t: torch.Tensor, k_t: torch.Tensor,
                    where: str) -> tuple[torch.Tensor, ...]:
        hs, ht = q_s.shape[1], q_t.shape[1]
        if hs == ht:
            return q_s, k_s, q_t, k_t
        if ht % hs == 0:  # student head j <-> teacher heads j*g .. j*g+g-1
            g = ht // hs
            return q_s.repeat_interleave(g, dim=1), k_s.repeat_interleave(g, dim=1), q_t, k_t
        if hs % ht == 0:  # teacher head i supervises student heads i*g .. i*g+g-1
            g = hs // ht
            return q_s, k_s, q_t.repeat_interleave(g, dim=1), k_t.repeat_interleave(g, dim=1)
        raise ValueError(f"AttentionDistillLoss: {where}: cannot pair {ht} teacher heads with {hs} student heads "
                         f"(one count must divide the other)")

    def forward(self) -> torch.Tensor:
        """The summed (weighted) attention KL of the recorded layers; clears the records."""
        from ..ops.attention_kl import attention_kl

        if not self._installed:
            raise RuntimeError("AttentionDistillLoss: remove() was called; create a new loss")
        total: Optional[torch.Tensor] = None
        try:
            for (s_path, t_path), w in zip(self.pairs, self.weights):
                if t_path not in self._t_rec:
                    raise RuntimeError(f"AttentionDistillLoss: teacher layer {t_path!r} has not run since the last "
                                       f"loss; run the teacher's forward before calling the loss")
                if s_path not in self._s_rec:
                    raise RuntimeError(f"AttentionDistillLoss: student layer {s_path!r} has not run since the last "
                                       f"loss; run the student's forward before calling the loss")
                q_s, k_s, scale_s = self._s_rec[s_path]
                q_t, k_t, scale_t = self._t_rec[t_path]
                where = f"layer {s_path!r}" + (f" (teacher {t_path!r})" if t_path != s_path else "")
                if q_s.shape[0] != q_t.shape[0] or q_s.shape[2] != q_t.shape[2] or k_s.shape[2] != k_t.shape[2]:
                    raise ValueError(f"AttentionDistillLoss: {where}: batch and token counts must match; student "
                                     f"q {tuple(q_s.shape)}, k {tuple(k_s.shape)} vs teacher q {tuple(q_t.shape)}, "
                                     f"k {tuple(k_t.shape)} (B, H, L, D)")
                q_s, k_s, q_t, k_t = self._pair_heads(q_s, k_s, q_t.detach(), k_t.detach(), where)
                term = attention_kl(q_s, k_s, q_t, k_t, scale_s=scale_s, scale_t=scale_t, reduction=self.reduction)
                term = term * w if w != 1.0 else term
                total = term if total is None else total + term
        finally:
            self.clear()
        assert total is not None
        return total

    def extra_repr(self) -> str:
        return f"layers={len(self.pairs)}, reduction={self.reduction!r}"
