"""Tensor names: the release's layout, the layout ``transformers`` writes, and our parameter tree.

Our tree mirrors the release's names (see ``v4jax.model``), so a tree path maps to one official
name (routed experts: one name per expert). ``transformers``' ``save_pretrained`` (5.x) writes the
release's names with these differences, which ``to_official`` undoes:

* everything but ``head.weight`` carries a ``model.`` prefix;
* ``embed.weight`` is ``model.embed_tokens.weight`` and ``norm.weight`` is ``model.norm.weight``;
* ``hc_head_{fn,base,scale}`` is ``model.hc_head.hc_{fn,base,scale}``;
* the window KV norm ``attn.kv_norm.weight`` is ``attn.norm.weight``;
* no ``mtp.*`` tensors at all (the port has no MTP block).

Quantised weights (FP8/FP4) carry a ``.scale`` sibling in the release (``scale_name``).
"""

from __future__ import annotations

import re

import jax

OFFICIAL, HF = "official", "hf"
_NO_SUFFIX = {"weight", "bias", "tid2eid", "attn_sink", "ape"}


def tree_paths(tree) -> list[tuple[tuple, object]]:
    """[(path, leaf)] with paths as tuples of str/int, in a stable order (a ``BlockScaled`` weight
    is two leaves, its path + ("codes",) and + ("scales",), as Orbax stores it)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    out = []
    for keypath, leaf in flat:
        path = tuple(k.key if hasattr(k, "key") else k.idx if hasattr(k, "idx") else k.name for k in keypath)
        out.append((path, leaf))
    return out


def unflatten(specs, flat: dict):
    """Rebuild a tree shaped like ``specs`` from {path: leaf} (paths as ``tree_paths`` gives them)."""

    def build(tree, prefix):
        if isinstance(tree, dict):
            return {k: build(v, prefix + (k,)) for k, v in tree.items()}
        if isinstance(tree, list):
            return [build(v, prefix + (i,)) for i, v in enumerate(tree)]
        return flat[prefix]

    return build(specs, ())


def is_routed_expert(path: tuple) -> bool:
    return "experts" in path


def official_name(path: tuple, expert: int | None = None) -> str:
    """Tree path -> the release's tensor name (``expert`` picks one slice of a stacked expert tensor)."""
    if path[0] == "layers":
        prefix, rest = [f"layers.{path[1]}"], list(path[2:])
    elif path[0] == "mtp":
        prefix, rest = ["mtp.0"], list(path[1:])
    else:
        prefix, rest = [], list(path)
    if rest[0] in ("hc_attn", "hc_ffn", "hc_head"):
        return ".".join(prefix + [f"{rest[0]}_{rest[1]}"])
    if is_routed_expert(path):
        if expert is None:
            raise ValueError(f"{path} is a stacked expert tensor: pass the expert index")
        rest = rest[:-1] + [str(expert), rest[-1]]
    suffix = [] if rest[-1] in _NO_SUFFIX else ["weight"]
    return ".".join(prefix + rest + suffix)


def detect_layout(names) -> str:
    return HF if any(n.startswith("model.") for n in names) else OFFICIAL


_HF_TO_OFFICIAL = [
    (re.compile(r"^model\.embed_tokens\.weight$"), "embed.weight"),
    (re.compile(r"^model\.hc_head\.hc_(fn|base|scale)$"), r"hc_head_\1"),
    (re.compile(r"^model\.(layers\.\d+\.attn)\.norm\.weight$"), r"\1.kv_norm.weight"),
    (re.compile(r"^model\."), ""),
]
_OFFICIAL_TO_HF = [
    (re.compile(r"^embed\.weight$"), "model.embed_tokens.weight"),
    (re.compile(r"^hc_head_(fn|base|scale)$"), r"model.hc_head.hc_\1"),
    (re.compile(r"^(layers\.\d+\.attn)\.kv_norm\.weight$"), r"model.\1.norm.weight"),
    (re.compile(r"^(?!head\.weight$)(?!model\.)"), "model."),
]


def _apply(rules, name: str) -> str:
    for pattern, repl in rules:
        new = pattern.sub(repl, name)
        if new != name:
            return new
    return name


def to_official(name: str, layout: str) -> str:
    return name if layout == OFFICIAL else _apply(_HF_TO_OFFICIAL, name)


def from_official(name: str, layout: str) -> str:
    return name if layout == OFFICIAL else _apply(_OFFICIAL_TO_HF, name)


def scale_names(weight_name: str) -> list[str]:
    """Possible names of a quantised weight's scale, in the same layout: the release's ``.scale``
    sibling first, then ``.weight_scale_inv`` (the name other FP8 checkpoints on the Hub use)."""
    stem = weight_name[: -len(".weight")] if weight_name.endswith(".weight") else weight_name
    return [stem + ".scale", stem + ".weight_scale_inv"]


def scale_name(weight_name: str) -> str:
    return scale_names(weight_name)[0]


def is_mtp_extra(official: str) -> bool:
    """``mtp.N.emb*`` / ``mtp.N.head.weight``: copies of the shared embedding and head that some
    exports carry; the release's ``convert.py`` drops them, and so do we."""
    return re.match(r"^mtp\.\d+\.(emb[^.]*\..*|head\.weight)$", official) is not None


# Config styles, matching the two layouts: the release's config.json (``compress_ratios``) goes with
# the official layout, transformers' (``layer_types``, ``rope_parameters``) with the HF layout.
RELEASE_STYLE, HF_STYLE = "release", "hf"


def config_style(raw: dict) -> str:
    return RELEASE_STYLE if "compress_ratios" in raw else HF_STYLE

