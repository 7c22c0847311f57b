"""``finetune``'s checkpoints: the tensors phase 2 changes, the optimiser's moments and the best
weights in ``checkpoint.safetensors``, the rest in ``checkpoint.json`` (no pickle), written
after every epoch so that ``resume=True`` continues exactly where a run stopped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._fs import atomic_write_bytes
from ..errors import ProbeError
from ..models.finetuned import FORMAT  # finetune.json and checkpoints share it

if TYPE_CHECKING:
    import torch
    from torch import nn


class TrainedState:
    """The tensors phase 2 changes: the backbone's (all, for simplicity) and the head's."""

    def __init__(self, net: nn.Module, head: nn.Module) -> None:
        self.net, self.head = net, head

    def state(self) -> dict[str, torch.Tensor]:
        out = {f"net.{k}": v.detach().cpu().clone() for k, v in self.net.state_dict().items()}
        head = self.head.state_dict()
        out.update({f"head.{k}": v.detach().cpu().clone() for k, v in head.items()})
        return out

    def load(self, state: dict[str, torch.Tensor]) -> None:
        self.net.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("net.")})
        self.head.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("head.")})


def _opt_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            if hasattr(v, "shape"):
                out[f"opt.{i}.{k}"] = v.detach().cpu().contiguous()
    return out


def write_checkpoint(
    out: Path,
    trained: TrainedState,
    opt: torch.optim.Optimizer,
    sched: Any,
    best: dict[str, torch.Tensor],
    meta: dict[str, Any],
) -> None:
    from safetensors.torch import save

    tensors = {**trained.state(), **_opt_tensors(opt)}
    tensors.update({f"best.{k}": v for k, v in best.items()})
    out.mkdir(parents=True, exist_ok=True)
    # Tensors first, then the JSON that points at them: a crash between the two leaves the
    # previous JSON, which a resume detects by the epoch recorded in the tensors' metadata.
    atomic_write_bytes(out / "checkpoint.safetensors",
                       save({k: v.contiguous() for k, v in tensors.items()},
                            metadata={"epoch": str(meta["epoch"])}))  # fmt: skip
    meta = {**meta, "scheduler": sched.state_dict(), "opt_param_groups": [
        {k: v for k, v in g.items() if k != "params"} for g in opt.state_dict()["param_groups"]
    ]}  # fmt: skip
    atomic_write_bytes(out / "checkpoint.json", json.dumps(meta, indent=1).encode())


def read_checkpoint(out: Path) -> dict[str, Any] | None:
    if not (out / "checkpoint.json").is_file() or not (out / "checkpoint.safetensors").is_file():
        return None
    meta: dict[str, Any] = json.loads((out / "checkpoint.json").read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT:
        return None
    return meta


def restore(
    ckpt: dict[str, Any], trained: TrainedState, opt: torch.optim.Optimizer, sched: Any, out: Path
) -> tuple[int, float, int, int, list[dict[str, float]], dict[str, torch.Tensor]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(out / "checkpoint.safetensors"), framework="pt") as f:
        if (f.metadata() or {}).get("epoch") != str(ckpt["epoch"]):
            raise ProbeError(f"checkpoint in {out} is torn (tensors and JSON of other epochs)")
    tensors = load_file(str(out / "checkpoint.safetensors"))
    trained.load({k: v for k, v in tensors.items() if k.startswith(("net.", "head."))})
    best = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
    sd = opt.state_dict()
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, i, name = key.split(".", 2)
            state.setdefault(int(i), {})[name] = v
    sd["state"] = state
    for g, saved in zip(sd["param_groups"], ckpt["opt_param_groups"], strict=True):
        g.update({k: v for k, v in saved.items() if k != "params"})
    opt.load_state_dict(sd)
    sched.load_state_dict(ckpt["scheduler"])
    return (int(ckpt["epoch"]) + 1, float(ckpt["best_loss"]), int(ckpt["best_epoch"]),
            int(ckpt["bad_epochs"]), list(ckpt["history"]), best)  # fmt: skip
