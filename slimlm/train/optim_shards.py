"""Checkpoints of the low-bit optimizers that load on any number of processes.

torch.distributed.checkpoint gathers DTensor states; ours are plain tensors of codes and scales that
describe one rank's local shard (block boundaries and rank-1 maxima depend on where the shard starts), so
they cannot be concatenated as they are. Each process that holds a distinct shard writes
`optimizer_rank{r}.pt`: its `state_dict()` entries keyed by parameter name, with the parameter's global
shape and the rows [row_offset, row_offset + rows) its shard covers (FSDP2 shards dim 0). One process or
DDP writes a single file covering whole tensors.

Loading: a process whose shard has the same rows as a saved one takes that state unchanged (bit-exact,
the usual N -> N resume). Otherwise (N -> M ranks, N ranks -> one process) the saved shards are decoded to
float32, concatenated along dim 0, cut to this process's rows and encoded again by this optimizer's codecs:
one extra rounding of the moments, as in any re-quantization. The factored second moment is stored as
row statistics (concatenated) and column statistics (the same on every rank of a 2-D weight).
"""

from __future__ import annotations

from pathlib import Path

import torch

from slimlm.errors import SlimlmError
from slimlm.optim import LowBitAdamW
from slimlm.optim.codecs import FactoredSecondMoment
from slimlm.optim.sharding import local_tensor, shard_spec

FILE_PATTERN = "optimizer_rank{rank}.pt"
SHARDS_FORMAT = 1


def uses_shards(optimizer: torch.optim.Optimizer) -> bool:
    return isinstance(optimizer, LowBitAdamW)


def has_shards(path: Path) -> bool:
    return any(Path(path).glob("optimizer_rank*.pt"))


def _named(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    names = {id(p): n for n, p in model.named_parameters()}
    out = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in names:
                raise SlimlmError("the optimizer holds a parameter the model does not name; rebuild it")
            out.append((names[id(p)], p))
    return out


def save_shard(tmp: Path, optimizer: LowBitAdamW, model: torch.nn.Module, rank: int, shards: int) -> None:
    """Write this process's shard file (call on every rank under FSDP, on rank 0 only otherwise)."""
    entries = {}
    for name, p in _named(optimizer, model):
        state = optimizer.state.get(p)
        if not state:
            continue
        spec, local = shard_spec(p), local_tensor(p)
        entries[name] = {
            "global_shape": list(spec.global_shape),
            "row_offset": spec.row_offset,
            "shape": list(local.shape),
            "state": {k: v.detach().cpu().clone() for k, v in state.items()},
        }
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    payload = {"format": SHARDS_FORMAT, "shards": shards, "header": optimizer._header(), "groups": groups,
               "params": entries}  # fmt: skip
    torch.save(payload, tmp / FILE_PATTERN.format(rank=rank))


def load_shards(path: Path, optimizer: LowBitAdamW, model: torch.nn.Module) -> None:
    """Give `optimizer` the state saved in `path`'s shard files, resharded to this process's shards."""
    files = sorted(Path(path).glob("optimizer_rank*.pt"))
    try:
        saved = [torch.load(f, map_location="cpu", weights_only=True) for f in files]
    except (OSError, RuntimeError) as e:
        raise SlimlmError(
            f"checkpoint {path}: an optimizer shard is unreadable ({e}); pick another one"
        ) from None
    if not saved or any(s.get("format") != SHARDS_FORMAT for s in saved) or len(saved) != saved[0]["shards"]:
        raise SlimlmError(
            f"checkpoint {path} has {len(saved)} optimizer shard file(s) of an unknown format or an "
            "incomplete set; pick another checkpoint"
        )
    header = saved[0]["header"]
    if header != optimizer._header():
        raise SlimlmError(
            f"checkpoint {path} holds {header['optimizer']} state (block {header['block_size']}) but this run "
            f"uses {type(optimizer).__name__}; resume with the checkpoint's --optim"
        )
    if len(saved[0]["groups"]) != len(optimizer.param_groups):
        raise SlimlmError(f"checkpoint {path}: other optimizer parameter groups than this run; start over")
    for group, old in zip(optimizer.param_groups, saved[0]["groups"], strict=True):
        group.update(old)  # lr, initial_lr, betas, ...: what the scheduler left there
    for name, p in _named(optimizer, model):
        pieces = sorted(
            (s["params"][name] for s in saved if name in s["params"]), key=lambda e: e["row_offset"]
        )
        if not pieces:
            continue
        if pieces[0]["global_shape"] != list(p.shape):
            raise SlimlmError(
                f"checkpoint {path}: optimizer state of {name} has shape {pieces[0]['global_shape']}, "
                f"the model's is {list(p.shape)}; was it saved for another model?"
            )
        optimizer.state[p] = _state_for(optimizer, p, pieces)


def _state_for(optimizer: LowBitAdamW, p: torch.Tensor, pieces: list[dict]) -> dict:
    spec, local = shard_spec(p), local_tensor(p)
    home = optimizer.state_device_for(p)
    for piece in pieces:  # the same rows as a saved shard: its state as saved, bit for bit
        if piece["row_offset"] == spec.row_offset and piece["shape"] == list(local.shape):
            return {k: v.to(home if k != "step" else v.device) for k, v in piece["state"].items()}
    m_codec, v_codec = optimizer.moment_codecs(p)
    decoded_m, decoded_v = [], []
    for piece in pieces:
        like = torch.empty(piece["shape"])  # decoding needs only the shard's shape
        decoded_m.append(m_codec.decode(piece["state"], like).clone())
        if not isinstance(v_codec, FactoredSecondMoment):
            decoded_v.append(v_codec.decode(piece["state"], like).clone())
    rows = slice(spec.row_offset, spec.row_offset + local.shape[0]) if local.ndim else slice(None)
    state = {"step": pieces[0]["state"]["step"].clone()}
    m_codec.init(state, local)  # codes are made on the parameter's device, then kept at `home`
    m_codec.encode(state, local, _cat(decoded_m)[rows].contiguous().to(local.device))
    if isinstance(v_codec, FactoredSecondMoment):
        key_row, key_col = f"{v_codec.prefix}_row", f"{v_codec.prefix}_col"
        row = torch.cat([piece["state"][key_row] for piece in pieces])[rows]
        col = (
            pieces[0]["state"][key_col]
            if local.ndim == 2
            else torch.cat([q["state"][key_col] for q in pieces])[rows]
        )
        state[key_row], state[key_col] = row.clone().to(local.device), col.clone().to(local.device)
    else:
        v_codec.init(state, local)
        v_codec.encode(state, local, _cat(decoded_v)[rows].contiguous().to(local.device))
    return {k: v.to(home) if k != "step" else v for k, v in state.items()}


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


__all__ = ["has_shards", "load_shards", "save_shard", "uses_shards"]
