"""The U-Net half of the diffusers bridge: iddpm ``UNetModel`` <-> diffusers ``UNet2DModel`` configs and weights.

Pure functions over config dicts and state_dicts: no diffusers import and no file I/O (the folders are written
and read by :mod:`iddpm.checkpoints.diffusers_bridge`).  With L levels, R = ``num_res_blocks`` and level l of
width ``num_channels * channel_mult[l]`` the modules correspond as follows::

    iddpm                                    UNet2DModel
    input_blocks.0.0                         conv_in
    time_embed.0 / time_embed.2              time_embedding.linear_1 / linear_2
    label_emb                                class_embedding                  (num_class_embeds)
    input_blocks.{1+l(R+1)+j}.0 / .1         down_blocks.{l}.resnets.{j} / attentions.{j}
    input_blocks.{1+l(R+1)+R}.0.op           down_blocks.{l}.downsamplers.0.conv      (l < L-1)
    middle_block.0 / .1 / .2                 mid_block.resnets.0 / attentions.0 / resnets.1
    output_blocks.{i(R+1)+j}.0 / .1          up_blocks.{i}.resnets.{j} / attentions.{j}   (level L-1-i, j <= R)
    output_blocks.{i(R+1)+R}.{last}.conv     up_blocks.{i}.upsamplers.0.conv          (i < L-1)
    out.0 / out.2                            conv_norm_out / conv_out

    ResBlock: in_layers.0 norm1, in_layers.2 conv1, emb_layers.1 time_emb_proj ([scale | shift] rows with
    scale-shift norm, chunked in the same order by both), out_layers.0 norm2, out_layers.3 conv2,
    skip_connection conv_shortcut (a 1x1 conv, present in both exactly when the width changes).
    AttentionBlock: norm group_norm; qkv (Conv1d weight [3C, C, 1]) whose rows are grouped per head as
    [q_h | k_h | v_h] (the original's QKVAttention) -> to_q / to_k / to_v (Linear [C, C], head h = rows
    h*d .. h*d+d-1, d = C / heads); proj_out [C, C, 1] -> to_out.0 [C, C].

Both nets concatenate the skip *after* the running features (``cat([h, skip])``), push skips in the same order
(conv_in, every res/attention block, every downsample) and embed timesteps as ``[cos(t f), sin(t f)]`` with
``f_i = exp(-ln(10000) i / half)`` (diffusers: ``flip_sin_to_cos=True, freq_shift=0``).
"""

from __future__ import annotations

from typing import Any

import torch

from iddpm.config import ConfigError, RunConfig, parse_int_list
from iddpm.models.builders import attention_downsample_rates, default_channel_mult

__all__ = [
    "UNET2D_DEFAULTS",
    "unet_levels",
    "unet2d_config",
    "model_flags_from_unet2d",
    "to_diffusers_state",
    "from_diffusers_state",
]

# UNet2DModel.__init__ defaults (diffusers 0.30 - 0.42): what a config.json that omits a key means.
UNET2D_DEFAULTS: dict[str, Any] = {
    "sample_size": None, "in_channels": 3, "out_channels": 3, "center_input_sample": False,
    "time_embedding_type": "positional", "time_embedding_dim": None, "freq_shift": 0, "flip_sin_to_cos": True,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [224, 448, 672, 896], "layers_per_block": 2, "mid_block_scale_factor": 1,
    "downsample_padding": 1, "downsample_type": "conv", "upsample_type": "conv", "dropout": 0.0, "act_fn": "silu",
    "attention_head_dim": 8, "norm_num_groups": 32, "attn_norm_num_groups": None, "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default", "add_attention": True, "class_embed_type": None, "num_class_embeds": None,
    "num_train_timesteps": None,
}

# The iddpm network always has these (GroupNorm32, eps 1e-5, SiLU, 3x3 stride-2 conv downsampling with padding 1).
_FIXED = {"center_input_sample": False, "time_embedding_type": "positional", "freq_shift": 0,
          "mid_block_type": "UNetMidBlock2D", "mid_block_scale_factor": 1, "downsample_padding": 1,
          "downsample_type": "conv", "upsample_type": "conv", "norm_num_groups": 32, "add_attention": True,
          "class_embed_type": None}


def unet_levels(cfg: RunConfig) -> tuple[list[int], list[bool], int, int]:
    """``(widths per level, attention per level, down/middle heads, up heads)`` of ``cfg``'s U-Net."""
    m = cfg.model
    mult = parse_int_list(m.channel_mult, "channel_mult") or default_channel_mult(m.image_size)
    rates = attention_downsample_rates(m.attention_resolutions, m.image_size, len(mult))
    widths = [m.num_channels * k for k in mult]
    attn = [2**level in rates for level in range(len(mult))]
    heads_up = m.num_heads if m.num_heads_upsample == -1 else m.num_heads_upsample
    return widths, attn, m.num_heads, heads_up


def _head_dim(cfg: RunConfig) -> int | None:
    """UNet2DModel's single ``attention_head_dim`` for ``cfg`` (None = one head per block); ConfigError if none fits."""
    widths, attn, heads, heads_up = unet_levels(cfg)
    uses = [(widths[-1], heads, "--num_heads")]  # the middle block always attends
    uses += [(w, heads, "--num_heads") for w, a in zip(widths, attn) if a]
    uses += [(w, heads_up, "--num_heads_upsample") for w, a in zip(widths, attn) if a]
    if all(h == 1 for _, h, _ in uses):
        return None
    dims = sorted({w // h for w, h, _ in uses})
    if len(dims) > 1:
        flag, h = next((f, h) for _, h, f in uses if h != 1)
        at = ", ".join(f"{w}/{hh}" for w, hh in sorted({(w, hh) for w, hh, _ in uses}))
        raise ConfigError(f"{flag} {h}: attention widths/heads {at} give head dims {dims}, but UNet2DModel has one "
                          "attention_head_dim for every block; only one head dim (or one head everywhere) exports")
    return dims[0]


def unet2d_config(cfg: RunConfig) -> dict[str, Any]:
    """``UNet2DModel(**kwargs)`` arguments for ``cfg``'s (base, 2-D) U-Net; ConfigError where none is exact."""
    m = cfg.model
    widths, attn, _, _ = unet_levels(cfg)
    if widths[0] != m.num_channels:
        raise ConfigError(f"--channel_mult {m.channel_mult}: UNet2DModel's first level has the base width "
                          "(block_out_channels[0] also sizes conv_in and the time embedding); it must start with 1")
    head_dim = _head_dim(cfg)
    levels = len(widths)
    return dict(
        _FIXED,
        sample_size=m.image_size,
        in_channels=m.in_channels,
        out_channels=m.in_channels * (2 if cfg.diffusion.learn_sigma else 1),
        flip_sin_to_cos=True,
        down_block_types=["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        up_block_types=["AttnUpBlock2D" if attn[levels - 1 - i] else "UpBlock2D" for i in range(levels)],
        block_out_channels=widths,
        layers_per_block=m.num_res_blocks,
        dropout=float(m.dropout),
        act_fn="silu",
        attention_head_dim=head_dim,
        attn_norm_num_groups=32,  # the middle attention's GroupNorm (diffusers drops it under scale_shift otherwise)
        norm_eps=1e-5,
        resnet_time_scale_shift="scale_shift" if m.use_scale_shift_norm else "default",
        num_class_embeds=m.num_classes if m.class_cond else None,
    )


def _get(conf: dict, key: str) -> Any:
    return conf.get(key, UNET2D_DEFAULTS.get(key))


def _refuse(source: str, key: str, value: Any, why: str) -> ConfigError:
    return ConfigError(f"{source}: {key}={value!r}: {why}")


def model_flags_from_unet2d(conf: dict[str, Any], source: str = "unet/config.json") -> tuple[dict[str, Any], int]:
    """Model flags (``iddpm.config`` names) of a UNet2DModel config of the DDPM/ADM shape, and its out_channels.

    Missing keys take UNet2DModel's defaults.  Raises a one-line ConfigError naming the first config key that
    iddpm's U-Net cannot reproduce exactly.
    """
    if conf.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise _refuse(source, "_class_name", conf["_class_name"], "only UNet2DModel folders can be imported")
    for key, want in _FIXED.items():
        if _get(conf, key) != want:
            raise _refuse(source, key, _get(conf, key), f"iddpm's U-Net needs {want!r}")
    if _get(conf, "act_fn") not in ("silu", "swish"):
        raise _refuse(source, "act_fn", _get(conf, "act_fn"), "iddpm's U-Net uses SiLU (silu / swish)")
    eps = _get(conf, "norm_eps")
    if abs(float(eps) - 1e-5) > 1e-12:
        raise _refuse(source, "norm_eps", eps, "iddpm's GroupNorm uses eps 1e-5")
    shift = _get(conf, "resnet_time_scale_shift")
    if shift not in ("default", "scale_shift"):
        raise _refuse(source, "resnet_time_scale_shift", shift, "iddpm supports default or scale_shift")
    attn_groups = _get(conf, "attn_norm_num_groups")
    if attn_groups not in (None, 32) or (attn_groups is None and shift == "scale_shift"):
        raise _refuse(source, "attn_norm_num_groups", attn_groups, "the middle attention needs a 32-group GroupNorm "
                      "(diffusers leaves it out for None with scale_shift)")
    size = _get(conf, "sample_size")
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            raise _refuse(source, "sample_size", size, "iddpm models are square")
        size = size[0]
    if not isinstance(size, int) or size < 1:
        raise _refuse(source, "sample_size", size, "need the image size (an int)")
    widths = [int(w) for w in _get(conf, "block_out_channels")]
    base = widths[0]
    if base < 32 or base % 32 or any(w % base for w in widths):
        raise _refuse(source, "block_out_channels", widths, "need a multiple of 32 first and multiples of it after")
    temb = _get(conf, "time_embedding_dim")
    if temb not in (None, 4 * base):
        raise _refuse(source, "time_embedding_dim", temb, f"iddpm's time embedding is 4 x {base} = {4 * base} wide")
    levels = len(widths)
    down = [str(b).removeprefix("UNetRes") for b in _get(conf, "down_block_types")]
    up = [str(b).removeprefix("UNetRes") for b in _get(conf, "up_block_types")]
    if len(down) != levels or len(up) != levels:
        raise _refuse(source, "down_block_types", down, f"need one down and one up block per level ({levels})")
    for key, blocks, kinds in (("down_block_types", down, ("DownBlock2D", "AttnDownBlock2D")),
                               ("up_block_types", up, ("UpBlock2D", "AttnUpBlock2D"))):
        if any(b not in kinds for b in blocks):
            raise _refuse(source, key, blocks, f"iddpm's U-Net has only {' / '.join(kinds)}")
    attn = [b == "AttnDownBlock2D" for b in down]
    if [b == "AttnUpBlock2D" for b in up] != attn[::-1]:
        raise _refuse(source, "up_block_types", up, "iddpm attends at the same levels on the way down and up")
    if size % 2 ** (levels - 1):
        raise _refuse(source, "sample_size", size, f"must be divisible by 2^(levels-1) = {2 ** (levels - 1)}")
    head_dim = _get(conf, "attention_head_dim")
    used = [widths[-1]] + [w for w, a in zip(widths, attn) if a]
    if head_dim is None:
        heads = 1
    else:
        counts = {w // int(head_dim) for w in used}
        if any(w % int(head_dim) for w in used) or len(counts) != 1:
            raise _refuse(source, "attention_head_dim", head_dim, f"gives different head counts at widths "
                          f"{sorted(set(used))}; iddpm has one num_heads for all blocks")
        heads = counts.pop()
    n_classes = _get(conf, "num_class_embeds")
    res_blocks = int(_get(conf, "layers_per_block"))
    if res_blocks < 1:
        raise _refuse(source, "layers_per_block", res_blocks, "need at least 1")
    flags = dict(
        image_size=size,
        in_channels=int(_get(conf, "in_channels")),
        num_channels=base,
        num_res_blocks=res_blocks,
        channel_mult=",".join(str(w // base) for w in widths),
        attention_resolutions=",".join(str(size // 2**level) for level in range(levels) if attn[level]),
        num_heads=heads,
        num_heads_upsample=-1,
        dropout=float(_get(conf, "dropout")),
        use_scale_shift_norm=shift == "scale_shift",
        class_cond=n_classes is not None,
    )
    if n_classes is not None:
        flags["num_classes"] = int(n_classes)
    return flags, int(_get(conf, "out_channels"))


# ---------------------------------------------------------------------------------------------- weights
_RES = (("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("emb_layers.1", "time_emb_proj"),
        ("out_layers.0", "norm2"), ("out_layers.3", "conv2"), ("skip_connection", "conv_shortcut"))
_ATTN = (("norm", "group_norm"), ("proj_out", "to_out.0"))


def _module_pairs(cfg: RunConfig) -> tuple[list[tuple[str, str]], list[tuple[str, str, int]]]:
    """``(plain (iddpm, diffusers) module prefixes, attention (iddpm, diffusers, heads) prefixes)`` for ``cfg``."""
    widths, attn, heads, heads_up = unet_levels(cfg)
    levels, r = len(widths), cfg.model.num_res_blocks
    plain = [("input_blocks.0.0", "conv_in"), ("time_embed.0", "time_embedding.linear_1"),
             ("time_embed.2", "time_embedding.linear_2"), ("label_emb", "class_embedding"),
             ("out.0", "conv_norm_out"), ("out.2", "conv_out")]
    attention: list[tuple[str, str, int]] = []

    def res(src: str, dst: str) -> None:
        plain.extend((f"{src}.{a}", f"{dst}.{b}") for a, b in _RES)

    for level in range(levels):
        for j in range(r):
            k = 1 + level * (r + 1) + j
            res(f"input_blocks.{k}.0", f"down_blocks.{level}.resnets.{j}")
            if attn[level]:
                attention.append((f"input_blocks.{k}.1", f"down_blocks.{level}.attentions.{j}", heads))
        if level < levels - 1:
            plain.append((f"input_blocks.{1 + level * (r + 1) + r}.0.op", f"down_blocks.{level}.downsamplers.0.conv"))
    res("middle_block.0", "mid_block.resnets.0")
    attention.append(("middle_block.1", "mid_block.attentions.0", heads))
    res("middle_block.2", "mid_block.resnets.1")
    for i in range(levels):
        level = levels - 1 - i
        for j in range(r + 1):
            k = i * (r + 1) + j
            res(f"output_blocks.{k}.0", f"up_blocks.{i}.resnets.{j}")
            if attn[level]:
                attention.append((f"output_blocks.{k}.1", f"up_blocks.{i}.attentions.{j}", heads_up))
            if level and j == r:
                plain.append((f"output_blocks.{k}.{2 if attn[level] else 1}.conv", f"up_blocks.{i}.upsamplers.0.conv"))
    for src, dst, _ in attention:
        plain.extend((f"{src}.{a}", f"{dst}.{b}") for a, b in _ATTN)
    return plain, attention


def _split_qkv(t: torch.Tensor, heads: int) -> list[torch.Tensor]:
    """qkv weight ``[3C, C, 1]`` / bias ``[3C]`` (rows per head: [q_h | k_h | v_h]) -> q, k, v ``[C, C]`` / ``[C]``."""
    if t.ndim == 3:
        t = t.squeeze(-1)
    grouped = t.reshape(heads, 3, t.shape[0] // (3 * heads), *t.shape[1:])
    return [grouped[:, i].reshape(-1, *t.shape[1:]).clone() for i in range(3)]


def _join_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Inverse of :func:`_split_qkv`: q, k, v ``[C, C]`` / ``[C]`` -> qkv weight ``[3C, C, 1]`` / bias ``[3C]``."""
    parts = [p.reshape(heads, p.shape[0] // heads, *p.shape[1:]) for p in (q, k, v)]
    joined = torch.stack(parts, dim=1).reshape(3 * q.shape[0], *q.shape[1:])
    return joined.unsqueeze(-1) if q.ndim == 2 else joined


def _unconsumed(keys, used: set[str], what: str, source: str) -> None:
    extra = sorted(set(keys) - used)
    if extra:
        more = f" (+{len(extra) - 3} more)" if len(extra) > 3 else ""
        raise ConfigError(f"{source}: {len(extra)} {what} weights have no counterpart: {', '.join(extra[:3])}{more}")


def to_diffusers_state(state_dict: dict[str, torch.Tensor], cfg: RunConfig) -> dict[str, torch.Tensor]:
    """iddpm U-Net state_dict (the original's keys) -> UNet2DModel state_dict (new tensors; same dtypes/values)."""
    plain, attention = _module_pairs(cfg)
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for src, dst in plain:
        for p in ("weight", "bias"):
            if f"{src}.{p}" in state_dict:
                t = state_dict[f"{src}.{p}"]
                out[f"{dst}.{p}"] = (t.squeeze(-1) if src.endswith("proj_out") and p == "weight" else t).clone()
                used.add(f"{src}.{p}")
    for src, dst, heads in attention:
        for p in ("weight", "bias"):
            for name, t in zip(("to_q", "to_k", "to_v"), _split_qkv(state_dict[f"{src}.qkv.{p}"], heads)):
                out[f"{dst}.{name}.{p}"] = t
            used.add(f"{src}.qkv.{p}")
    _unconsumed(state_dict, used, "iddpm", "to_diffusers_state")
    return out


def from_diffusers_state(
    state: dict[str, torch.Tensor], cfg: RunConfig, *, flip_sin_to_cos: bool = True, source: str = "unet"
) -> dict[str, torch.Tensor]:
    """UNet2DModel state_dict -> iddpm U-Net state_dict for ``cfg`` (inverse of :func:`to_diffusers_state`).

    ``flip_sin_to_cos=False`` (a ``[sin, cos]`` timestep embedding) swaps the two column halves of
    ``time_embedding.linear_1.weight``, which makes it exact for iddpm's ``[cos, sin]``.  Unmapped or missing
    keys raise a ConfigError naming ``source``.
    """
    plain, attention = _module_pairs(cfg)
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for src, dst in plain:
        for p in ("weight", "bias"):
            if f"{dst}.{p}" in state:
                t = state[f"{dst}.{p}"]
                out[f"{src}.{p}"] = (t.unsqueeze(-1) if src.endswith("proj_out") and p == "weight" else t).clone()
                used.add(f"{dst}.{p}")
    for src, dst, heads in attention:
        for p in ("weight", "bias"):
            names = [f"{dst}.{n}.{p}" for n in ("to_q", "to_k", "to_v")]
            missing = [n for n in names if n not in state]
            if missing:
                raise ConfigError(f"{source}: weight {missing[0]} is missing; the file does not match its config.json")
            out[f"{src}.qkv.{p}"] = _join_qkv(*(state[n] for n in names), heads)
            used.update(names)
    if not flip_sin_to_cos and "time_embed.0.weight" in out:
        w = out["time_embed.0.weight"]
        half = w.shape[1] // 2
        out["time_embed.0.weight"] = torch.cat([w[:, half:], w[:, :half]], dim=1)
    _unconsumed(state, used, "diffusers", source)
    return out
