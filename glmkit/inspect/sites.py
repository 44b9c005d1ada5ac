"""Probe sites, named after model.py's modules, and the checks of a probe call's selectors.

A site is what a probe reads (or patches) inside one block `transformer.layers.{i}`:

  residual         `transformer.layers.{i}`: the residual stream after block i. A post-LN DeepNorm block
                   returns a pair (y, m) meaning y * alpha + m; the residual stream is that sum.
  attention        `transformer.layers.{i}.attention`: the attention branch's output (after `dense`).
  mlp              `transformer.layers.{i}.mlp`: the MLP branch's output.
  attention_probs  `transformer.layers.{i}.attention.probs`: the attention probabilities of every head over
                   the sequence, under GLM's own mask (recomputed from the attention module's input).

`sites=` takes short names (with `layers=` choosing the blocks) or module names (which name their block);
`positions=` indexes the sequence as GLM sees it (context, [MASK]/eos, sop, generated tokens); negative indices
count from its end. Every check runs where the call is made, before any compute, and names what to change.
"""
from __future__ import annotations

import operator
import re

SITES = {
    "residual": "transformer.layers.{i}",
    "attention": "transformer.layers.{i}.attention",
    "mlp": "transformer.layers.{i}.mlp",
    "attention_probs": "transformer.layers.{i}.attention.probs",
}
# Sites whose values can be replaced in a forward pass (attention probabilities are recomputed, not a module's
# output, so they cannot).
PATCHABLE = ("residual", "attention", "mlp")
_SUFFIX = {"": "residual", ".attention": "attention", ".mlp": "mlp", ".attention.probs": "attention_probs"}
_MODULE_NAME = re.compile(r"transformer\.layers\.(-?\d+)(|\.attention|\.mlp|\.attention\.probs)")


def _ints(name: str, value) -> list[int] | None:
    """`value` (None, an int, or a list/tuple/range of ints) as a list; ValueError naming `name` otherwise."""
    if value is None:
        return None
    items = list(value) if isinstance(value, (list, tuple, range)) else [value]
    if not items:
        raise ValueError(f"{name} is empty: pass None for all of them, or at least one index")
    out = []
    for item in items:
        if isinstance(item, bool) or type(item).__name__ == "bool_" or isinstance(item, (str, bytes)):
            raise ValueError(f"{name} takes integer indices, got {item!r}")
        try:
            out.append(operator.index(item))
        except TypeError:
            raise ValueError(f"{name} takes an integer, a list of integers or None, got {item!r}") from None
    return out


def check_index(name: str, value: int, length: int, what: str) -> int:
    """`value` as an index in [0, length) (negative ones count from the end); ValueError naming `name`."""
    if not -length <= value < length:
        raise ValueError(f"{name}: {value} is out of range: {what} (0..{length - 1}, or -{length}..-1 from the end)")
    return value % length


def check_layers(layers, num_layers: int, name: str = "layers") -> tuple[int, ...]:
    """Sorted distinct block indices of `layers` (None: all blocks)."""
    items = _ints(name, layers)
    if items is None:
        return tuple(range(num_layers))
    what = f"the model has {num_layers} layers"
    return tuple(sorted({check_index(name, i, num_layers, what) for i in items}))


def check_sites(sites, layers, num_layers: int, allowed: tuple[str, ...] = tuple(SITES)) -> dict[str, tuple[int, ...]]:
    """{site: sorted block indices} for a call's `sites=` and `layers=`, in `allowed`'s order."""
    if isinstance(sites, str):
        sites = [sites]
    if not isinstance(sites, (list, tuple)) or not sites:
        raise ValueError(f"sites must be a site name or a non-empty list of them ({', '.join(allowed)}, or a "
                         f"module name such as transformer.layers.3.attention), got {sites!r}")
    chosen: dict[str, set[int]] = {}
    layer_list = None
    for site in sites:
        if not isinstance(site, str):
            raise ValueError(f"sites takes names (strings), got {site!r}")
        match = _MODULE_NAME.fullmatch(site)
        if match:
            kind = _SUFFIX[match.group(2)]
            picked = {check_index(f"sites ({site!r})", int(match.group(1)), num_layers,
                                  f"the model has {num_layers} layers")}
        elif site in SITES:
            kind = site
            if layer_list is None:
                layer_list = check_layers(layers, num_layers)
            picked = set(layer_list)
        else:
            raise ValueError(f"unknown site {site!r}: sites are {', '.join(allowed)} (with layers=), or module "
                             f"names such as {SITES[allowed[0]].format(i=3)}")
        if kind not in allowed:
            raise ValueError(f"site {site!r} cannot be used here: the sites this call takes are {', '.join(allowed)}")
        chosen.setdefault(kind, set()).update(picked)
    if layers is not None and layer_list is None:
        check_layers(layers, num_layers)  # a bad layers= is an error even when only module names were given
    return {kind: tuple(sorted(chosen[kind])) for kind in allowed if kind in chosen}


def check_positions(positions, length: int, what: str) -> tuple[int, ...] | None:
    """The indices of `positions` checked against a sequence of `length` tokens (None: all of them).

    They are kept as given (negative ones count from the end) and resolved by `resolve_positions` once the
    sequence is known: a generation may end before its longest possible length.
    """
    items = _ints("positions", positions)
    if items is None:
        return None
    for p in items:
        check_index("positions", p, length, what)
    return tuple(items)


def resolve_positions(positions: tuple[int, ...] | None, length: int) -> tuple[int, ...]:
    """Sorted distinct indices into a sequence of `length` tokens; those past its end are dropped."""
    if positions is None:
        return tuple(range(length))
    return tuple(sorted({p % length if p < 0 else p for p in positions if -length <= p < length}))


def check_int(name: str, value, minimum: int, maximum: int | None = None) -> int:
    """`value` as an int in [minimum, maximum]; ValueError naming `name` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def check_target(tokenizer, target) -> int:
    """The token id of `target`: an id, or a text that is one token.

    A text is read as `encode` reads a word ('Haus' is '▁Haus', what follows 'German:'), else as a piece name
    ('▁Haus', 'Haus', '<eop>'), else without the dummy-prefix space ('\\n' is '<n>').
    """
    if isinstance(target, str):
        ids = tokenizer.encode(target) if target else []
        if len(ids) == 1:
            return ids[0]
        try:
            return tokenizer.piece_to_id(target)
        except ValueError:
            pass
        bare = tokenizer.encode(target, add_dummy_prefix=False) if target else []
        if len(bare) == 1:
            return bare[0]
        if len(ids) != 1:
            pieces = [tokenizer.id_to_piece(i) for i in ids]
            raise ValueError(f"target {target!r} is {len(ids)} tokens {pieces}, not one: pass the text or id of a "
                             f"single token (e.g. {pieces[0]!r})" if ids else
                             f"target is empty: pass the text or id of a single token")
        return ids[0]
    if isinstance(target, bool):
        raise ValueError(f"target must be a token id or a token's text, got {target!r}")
    try:
        token = operator.index(target)
    except TypeError:
        raise ValueError(f"target must be a token id or a token's text, got {target!r}") from None
    if not 0 <= token < tokenizer.num_tokens:
        raise ValueError(f"target id {token} is outside the vocabulary (0..{tokenizer.num_tokens - 1})")
    return token
