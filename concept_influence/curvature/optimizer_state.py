"""TrackStar's optimizer-state correction (Chang et al. 2024) as a diagonal curvature.

TrackStar rescales every gradient element-wise by Adam's ``D = 1 / (sqrt(v̂) + ε)``, with ``v̂ = v / (1 − β₂ᵗ)`` the
bias-corrected second moments of the fine-tune's optimizer, on the training and on the query side. A score is linear in
the example's gradient, so ``<D∘q, D∘∇L(z)> = <D²∘q, ∇L(z)>``: the correction multiplies the query alone, a
preconditioner like any other, and the streaming engine and the per-example gradients are unchanged.
``power`` is 2 (TrackStar, both sides) or 1 (the training side only: Adam's own step direction).

:meth:`AdamStateCurvature.from_checkpoint` reads a TRL / Hugging Face Trainer checkpoint folder's ``optimizer.pt``
with ``torch.load(weights_only=True)`` only (anything that needs more is refused, never unpickled). The optimizer's
state is keyed by position; the positions are the model's trained parameters (a PEFT model's ``lora_*``, else every
parameter) in the order the Trainer gives them: its two parameter groups, weight decay (neither bias nor norm) then
none, each in ``named_parameters`` order, or one group in ``named_parameters`` order (a plain
``AdamW(model.parameters())``). The order is checked by every parameter's shape; ``param_names`` gives it explicitly.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

from .base import Curvature, CurvatureError, map_shapes

__all__ = ["AdamStateCurvature", "OPTIMIZER_FILE", "POWERS", "load_optimizer_state", "optimizer_file",
           "check_optimizer_state", "trainer_parameter_order"]

OPTIMIZER_FILE = "optimizer.pt"
POWERS = (1, 2)
# transformers.Trainer.get_decay_parameter_names: no decay inside nn.LayerNorm or for names matching these
_NO_DECAY = [re.compile(p) for p in (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")]


def load_optimizer_state(path: str | Path, mmap: bool = False) -> dict:
    """An optimizer's ``state_dict`` from ``path`` (a checkpoint folder or its ``optimizer.pt``), read with
    ``torch.load(weights_only=True)``; a :class:`CurvatureError` naming the file when it cannot be read that way.
    ``mmap``: the tensors are memory-mapped, read only when used (a file in torch.save's zip format)."""
    path = optimizer_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except FileNotFoundError:
        raise CurvatureError(f"{path}: no such file (a Trainer checkpoint folder holds {OPTIMIZER_FILE})") from None
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError, TypeError, AttributeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CurvatureError(f"{path}: cannot be loaded with torch.load(weights_only=True), and nothing else is "
                             f"unpickled ({first})") from None
    if not isinstance(state, dict) or not isinstance(state.get("state"), dict) \
            or not isinstance(state.get("param_groups"), list):
        raise CurvatureError(f"{path}: not an optimizer state_dict (expected 'state' and 'param_groups')")
    return state


def optimizer_file(path: str | Path) -> Path:
    """``path`` itself, or a checkpoint folder's ``optimizer.pt``."""
    path = Path(path)
    return path / OPTIMIZER_FILE if path.is_dir() else path


def _trained(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters a fine-tune trains: a PEFT model's adapter weights (``lora_*``), else every parameter."""
    named = list(model.named_parameters())
    lora = [(n, p) for n, p in named if "lora_" in n]
    return lora or named


def trainer_parameter_order(model: nn.Module) -> list[list[tuple[str, nn.Parameter]]]:
    """The trained parameters in the Hugging Face Trainer's two optimizer groups: weight decay, then none."""
    in_layernorm = {f"{m}.{n}" if m else n for m, mod in model.named_modules() if isinstance(mod, nn.LayerNorm)
                    for n, _ in mod.named_parameters(recurse=False)}

    def decays(name: str) -> bool:
        return name not in in_layernorm and not any(p.search(name.lower()) for p in _NO_DECAY)

    trained = _trained(model)
    return [[(n, p) for n, p in trained if decays(n)], [(n, p) for n, p in trained if not decays(n)]]


def _candidate_orders(model: nn.Module, param_names: Sequence[str] | None) -> list[tuple[str, list]]:
    """``(description, [[(name, parameter)] per group]])`` of each order the optimizer may hold, most likely first."""
    if param_names is not None:
        named = dict(model.named_parameters())
        missing = [n for n in param_names if n not in named]
        if missing:
            raise CurvatureError(f"param_names: the model has no parameter {missing[0]!r}")
        return [("the given param_names", [[(n, named[n]) for n in param_names]])]
    return [("the Trainer's groups (weight decay, then none)", trainer_parameter_order(model)),
            ("named_parameters order", [_trained(model)])]


def _match(state: dict, model: nn.Module, param_names: Sequence[str] | None, where: str,
           map_names: Mapping[int, str]) -> dict[int, tuple[str, int]]:
    """``{id(parameter): (name, position)}``: the optimizer's positions matched to the model's parameters, in the first
    candidate order whose group sizes and shapes all agree; else an error naming the first parameter that does not."""
    groups = [list(g.get("params", [])) for g in state["param_groups"]]
    sizes = [len(g) for g in groups]
    problems = []
    for what, order in _candidate_orders(model, param_names):
        ours, ours_sizes = [pair for group in order for pair in group], [len(g) for g in order]
        fits = ours_sizes == sizes if len(order) > 1 else len(ours) == sum(sizes)  # the Trainer's: group by group
        if not fits:
            problems.append(f"{what}: {len(ours)} trained parameters in groups of {ours_sizes}, the optimizer has "
                            f"{sum(sizes)} in groups of {sizes}")
            continue
        positions = [i for g in groups for i in g]
        bad = next(((name, p, i) for (name, p), i in zip(ours, positions) if "exp_avg_sq" in state["state"].get(i, {})
                    and tuple(state["state"][i]["exp_avg_sq"].shape) != tuple(p.shape)), None)
        if bad is None:
            return {id(p): (name, i) for (name, p), i in zip(ours, positions)}
        name, p, i = bad
        label = f"{name} (map {map_names[id(p)]})" if id(p) in map_names else name
        problems.append(f"{what}: optimizer parameter {i} has shape {tuple(state['state'][i]['exp_avg_sq'].shape)}, "
                        f"the model's {label} {tuple(p.shape)}")
    raise CurvatureError(f"{where}: the optimizer's parameters do not match the model's ({'; '.join(problems)}); pass "
                         "param_names in the optimizer's order")


def _group_of(state: dict, position: int) -> dict:
    return next(g for g in state["param_groups"] if position in g.get("params", []))


def _moments(adapter, state: dict, maps, param_names: Sequence[str] | None, where: str) -> list[tuple]:
    """``(map, second moments, parameter group, step)`` of each of ``maps`` (default: every tracked map) in an
    optimizer's ``state``; a :class:`CurvatureError` naming the map when its parameter is not matched or has no
    moments."""
    maps = adapter.linear_maps() if maps is None else list(maps)
    matched = _match(state, adapter.model, param_names, where, {id(m.weight): m.name for m in adapter.linear_maps()})
    out = []
    for m in maps:
        if id(m.weight) not in matched:
            raise CurvatureError(f"{where}: map {m.name}'s weight is not among the parameters the optimizer trained; "
                                 "build the curvature for the trained maps (e.g. a LoRA fine-tune's factors)")
        name, i = matched[id(m.weight)]
        s, group = state["state"].get(i, {}), _group_of(state, i)
        key = "max_exp_avg_sq" if group.get("amsgrad") else "exp_avg_sq"
        if key not in s or "step" not in s or float(s["step"]) < 1:
            raise CurvatureError(f"{where}: no Adam second moments ({key}) after a step for map {m.name} (parameter "
                                 f"{name}); an Adam(W) optimizer's state after at least one step is needed")
        out.append((m, s[key], group, float(s["step"])))
    return out


def check_optimizer_state(adapter, checkpoint: str | Path, maps=None, param_names: Sequence[str] | None = None) -> Path:
    """The :class:`CurvatureError` :meth:`AdamStateCurvature.from_checkpoint` would raise, found without computing
    (the file memory-mapped: its moments are not read); returns the ``optimizer.pt`` path."""
    path = optimizer_file(checkpoint)
    _moments(adapter, load_optimizer_state(path, mmap=True), maps, param_names, str(path))
    return path


class AdamStateCurvature(Curvature):
    """``precondition`` multiplies each map's gradient element-wise by ``D^power``, ``D = 1 / (sqrt(v̂) + ε)`` from an
    Adam(W) optimizer's state (see the module docstring); ``scales[name]`` is ``D`` ``[d_out, d_in]`` (float32)."""

    strategies = {"adam_state": None}  # built from an optimizer's state (from_checkpoint), not fitted

    def __init__(self, scales: Mapping[str, torch.Tensor], *, power: int = 2, eps: float | None = None,
                 source: str | None = None, fingerprint: str | None = None) -> None:
        if power not in POWERS:
            raise ValueError(f"power must be one of {', '.join(map(str, POWERS))} (2: TrackStar, both sides; 1: the "
                             f"training side only), got {power!r}")
        shapes = {name: tuple(d.shape) for name, d in scales.items()}
        super().__init__("adam_state", shapes, fisher=None, fingerprint=fingerprint, n_examples=0)
        self.scales = {name: d.float() for name, d in scales.items()}
        self.power, self.eps, self.source = int(power), eps, source

    @classmethod
    def from_checkpoint(cls, adapter, checkpoint: str | Path, maps=None, *, power: int = 2, eps: float | None = None,
                        param_names: Sequence[str] | None = None) -> "AdamStateCurvature":
        """From a Trainer checkpoint folder (or its ``optimizer.pt``) of the fine-tune whose model ``adapter`` holds
        (the weights at that checkpoint), for ``maps`` (default: every tracked map). ``eps``: the optimizer's own
        unless given. ``param_names``: the optimizer's parameters by name, in its order, when neither of the Trainer's
        orders is it."""
        path = optimizer_file(checkpoint)
        return cls.from_state_dict(adapter, load_optimizer_state(path), maps, power=power, eps=eps,
                                   param_names=param_names, source=str(path))

    @classmethod
    def from_state_dict(cls, adapter, state: dict, maps=None, *, power: int = 2, eps: float | None = None,
                        param_names: Sequence[str] | None = None, source: str | None = None) -> "AdamStateCurvature":
        """From an optimizer's ``state_dict()`` (``source`` names it in errors)."""
        scales = {}
        for m, v, group, step in _moments(adapter, state, maps, param_names, source or "the optimizer state"):
            v_hat = v.double() / (1 - group["betas"][1] ** step)
            d = 1 / (v_hat.sqrt() + (group["eps"] if eps is None else eps))
            scales[m.name] = m.to_matrix(d).float().contiguous().to(m.weight.device)
        return cls(scales, power=power, eps=eps, source=source, fingerprint=adapter.fingerprint())

    def _precondition_map(self, name: str, v: torch.Tensor) -> torch.Tensor:
        w = self.scales[name].to(device=v.device, dtype=torch.promote_types(v.dtype, torch.float32)) ** self.power
        return (v.to(w.dtype) * w).to(v.dtype)

    def _config(self) -> dict:
        return {"power": self.power, "eps": self.eps, "source": self.source}

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {f"{name}/scale": d.contiguous() for name, d in self.scales.items()}

    @classmethod
    def _restore(cls, config: dict, tensors: dict[str, torch.Tensor]) -> "AdamStateCurvature":
        missing = [n for n in map_shapes(config) if f"{n}/scale" not in tensors]
        if missing:
            raise CurvatureError(f"saved adam_state curvature: no scale for map {missing[0]!r}")
        return cls({n: tensors[f"{n}/scale"] for n in map_shapes(config)}, power=config["power"], eps=config["eps"],
                   source=config.get("source"), fingerprint=config["fingerprint"])
