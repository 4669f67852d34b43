"""The seam between the engine and a model family: what the session, the cache and the loop may ask of a model.

The engine talks to every family through `DiffusionModel`:
- `facts`: the shapes and token ids the cache, the session and the features need (`ModelFacts`);
- `forward(ids, key_mask, positions, return_kv)`: the plain bidirectional forward, logits aligned so that position i's
  logits predict the token at position i (a family whose network predicts i from i - 1 shifts them itself);
- `forward_partial(ids, cache, start_layer, logit_positions, ...)`: the forward under a refresh plan, reusing cached
  keys/values wherever a position does not run;
- `layer_flops(n_queries, n_keys)` / `head_flops(n_out)`: the FLOPs of one layer for n recomputed positions and of the
  output head, which the accounting sums over what actually ran.

Both forwards are written here once, over five per-layer primitives a family implements (`embed`, `layer_qkv`,
`layer_finish`, `value_probe`, `output_logits`), so a new transformer family (Dream, an MoE) is its layer maths plus a
config reader; a family whose compute does not fit these primitives overrides the forwards instead. Loading and
saving use the classmethod `config_from_dict` and the methods `checkpoint_tensors`, `checkpoint_state` and
`config_dict` (see `cache_core.checkpoint`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from cache_core.cache import BlockKVCache


@dataclass(frozen=True)
class ModelFacts:
    """What the engine needs to know about a model, whatever its family."""

    n_layers: int
    vocab_size: int  # predicted tokens: logits have this width
    mask_token_id: int
    max_sequence_length: int
    hidden_size: int  # width of the layer inputs the cache keeps for depth refreshes
    n_kv_heads: int
    head_dim: int


@dataclass
class PartialForwardTrace:
    """What one partial forward observed, for features, heuristics and accounting.

    active_counts: (n_layers, B) positions computed per layer and row.
    attention_to_keys: (n_traced, B, n_out, N) attention of each logit query on each key (mean over heads), only
        when asked for: every layer (Elastic-Cache's drift test) or the last one (the attention features).
    value_drift: (B, N) 1 - cosine(old cached value, new value), averaged over the layers where the position was
        recomputed and had been computed before; NaN where it was not recomputed.
    """

    active_counts: torch.Tensor
    attention_to_keys: torch.Tensor | None = None
    value_drift: torch.Tensor | None = None
    extra_flops: float = 0.0  # probes that are not part of a layer's compute (adaptive value probes)
    adaptive_counts: torch.Tensor | None = None  # (n_layers, B) positions added by an adaptive refresh
    # (n_layers, B, N) cosine similarity of each carried position's fresh value with its cached one at each layer
    # (dLLM-Cache's test); NaN where the position was not a candidate there
    adaptive_similarity: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)


TRACE_ATTENTION = (True, False, "all", "last")


def check_trace_attention(value: bool | str) -> None:
    """trace_attention of `forward_partial` / `DecodingSession`: True or "all", "last", or False."""
    if value not in TRACE_ATTENTION:
        raise ValueError(f"trace_attention={value!r}; use True/'all', 'last' or False")


class DiffusionModel(nn.Module):
    """A masked-diffusion network behind the engine's one protocol (see the module docstring)."""

    family: ClassVar[str] = ""
    modality: ClassVar[str] = "text"  # "text": masked-diffusion LMs (generate); "image": DiTs (sample_images)
    model_type: ClassVar[str] = ""  # what config.json's model_type says for this family ("" = the family name)
    # 1 for a family whose network predicts token i from hidden state i - 1 (Dream): its forwards shift the logits so
    # that the engine still reads position i's prediction at i, and `logit_sources` names the outputs that needs.
    logit_shift: ClassVar[int] = 0
    # For the loader's error messages when a directory does not match its config: the weight names, the config key
    # of the layer count, and the config keys that set the weights' shapes.
    weight_names_hint: ClassVar[str] = ""
    layer_count_key: ClassVar[str] = ""
    shape_keys: ClassVar[str] = ""

    # --- what a family implements ---------------------------------------------------------------------------------
    @property
    def facts(self) -> ModelFacts:
        raise NotImplementedError

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, n) ids -> (B, n, hidden) input of layer 0."""
        raise NotImplementedError

    def layer_qkv(self, layer: int, x: torch.Tensor, positions: torch.Tensor, real: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys (rotated) and values of the rows of x at `layer`: (B, heads or kv_heads, n, head_dim).
        real: optional (B, n) bool, the rows that are not padding (see `rowwise`)."""
        raise NotImplementedError

    def layer_finish(self, layer: int, x: torch.Tensor, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                     key_mask: torch.Tensor | None, real: torch.Tensor | None = None) -> torch.Tensor:
        """Attend the queries of x's rows to (keys, values), apply the layer's residual updates: (B, n, hidden)."""
        raise NotImplementedError

    def value_probe(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Fresh values of the rows of x at `layer`, flattened over heads: (B, n, n_kv_heads * head_dim). dLLM-Cache's
        similarity test reads them."""
        raise NotImplementedError

    def value_probe_flops(self, n_positions: float) -> float:
        raise NotImplementedError

    def output_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, n, hidden) last-layer outputs -> (B, n, vocab_size) fp32 logits."""
        raise NotImplementedError

    def layer_flops(self, n_queries: torch.Tensor | float, n_keys: torch.Tensor | float, layer: int = 0
                    ) -> torch.Tensor | float:
        """FLOPs of layer `layer` for n_queries recomputed positions attending to n_keys keys (a family whose layers
        differ, e.g. dense and MoE layers, reads `layer`)."""
        raise NotImplementedError

    def head_flops(self, n_out: float) -> float:
        """FLOPs of the output head for n_out positions."""
        raise NotImplementedError

    @classmethod
    def config_from_dict(cls, raw: dict[str, Any], source: str) -> Any:
        """The family's config from a checkpoint's config.json; refuses settings of another architecture."""
        raise NotImplementedError

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """This module's weights under the names its checkpoint format uses."""
        raise NotImplementedError

    def optional_checkpoint_names(self) -> set[str]:
        """Checkpoint names that may be present and are not loaded (e.g. a copy of a tied head)."""
        return set()

    def checkpoint_state(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Checkpoint tensors (names of `checkpoint_tensors`) -> this module's state_dict names."""
        raise NotImplementedError

    def config_dict(self) -> dict[str, Any]:
        """The config.json entries of this model (read back by `config_from_dict`)."""
        raise NotImplementedError

    # --- shared by every family -------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def logit_sources(self, positions: torch.Tensor) -> torch.Tensor:
        """The positions whose last-layer outputs give the logits of `positions` (the same positions unless the family
        shifts its logits). A partial forward must compute these from layer 0; the session asks the cache for them."""
        if not self.logit_shift:
            return positions
        # Dream's generation: logits = cat([logits[:, :1], logits[:, :-1]]), so position 0 reads its own output.
        return (positions - self.logit_shift).clamp(min=0)

    def _shift(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.logit_shift:
            return logits
        return torch.cat([logits[:, :1], logits[:, :-1]], dim=1)

    def check_input(self, input_ids: torch.Tensor) -> None:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
        limit = self.facts.max_sequence_length
        if input_ids.shape[1] > limit:
            raise ValueError(f"sequence of {input_ids.shape[1]} tokens exceeds the model's max_sequence_length="
                             f"{limit}: shorten the prompt or gen_length")

    def forward(self, input_ids: torch.Tensor, key_mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, return_kv: bool = False, return_hidden: bool = False):
        """Plain forward over the whole canvas.

        input_ids: (B, N); key_mask: (B, N) bool, False for padding (never attended to); positions: (B, N) rotary
        positions (default 0..N-1). Returns logits (B, N, vocab) in fp32, and with return_kv the per-layer
        (keys, values) lists, each (B, n_kv_heads, N, head_dim), for oracle drift measurement; with return_hidden
        (needs return_kv) also the per-layer inputs (B, N, hidden), what the cache keeps (the quality monitor's repair).
        """
        if return_hidden and not return_kv:
            raise ValueError("return_hidden=True needs return_kv=True")
        self.check_input(input_ids)
        B, N = input_ids.shape
        if positions is None:
            positions = torch.arange(N, device=input_ids.device).expand(B, N)
        x = self.embed(input_ids)
        keys, values, hidden = [], [], []
        for layer in range(self.facts.n_layers):
            if return_hidden:
                hidden.append(x)
            q, k, v = self.layer_qkv(layer, x, positions)
            if return_kv:
                keys.append(k)
                values.append(v)
            x = self.layer_finish(layer, x, q, k, v, key_mask)
        logits = self._shift(self.output_logits(x))
        if return_hidden:
            return logits, keys, values, hidden
        return (logits, keys, values) if return_kv else logits

    def forward_partial(self, input_ids: torch.Tensor, cache: BlockKVCache, start_layer: torch.Tensor,
                        logit_positions: torch.Tensor, trace_attention: bool | str = False,
                        adaptive: tuple[torch.Tensor, float] | None = None) -> tuple[torch.Tensor, PartialForwardTrace]:
        """Forward that recomputes position p only in layers >= start_layer[b, p] and reuses the cache elsewhere.

        input_ids: (B, N) canvas; start_layer: (B, N) ints in [0, n_layers] (n_layers = reuse in every layer);
        logit_positions: (B, n_out) positions whose logits are returned; they and their `logit_sources` must start at
            layer 0.
        trace_attention: True/"all": record every layer's attention of the logit queries (Elastic-Cache reads them);
            "last": the last layer's only (all the feature schema reads); False: none.
        adaptive: optional (candidates (B, N) bool, fraction rho): dLLM-Cache's per-layer rule (needs the cache's
            residual updates, `BlockKVCache.enable_residual_updates`). The candidates not refreshed from layer 0 are
            *carried* (the decoding block and its logit sources always run from layer 0, so they never are): they
            enter layer 0 with the embedding of their current token, and at every layer below their start layer their
            values are projected from that fresh input and compared with the cached values
            (cosine); per row the floor(rho * n) least similar of the n carried positions are recomputed in that
            layer (K/V, attention, MLP, cached update), and the others go on with input + cached residual update.
            Either way their input to the next layer is fresh, and it is what the cache keeps as their layer input.
        The cache's keys, values, layer inputs (and residual updates, when kept) are updated in place at every
        computed position. With every position active from layer 0 it computes what `forward` does. Returns logits
        (B, n_out, vocab) and a trace.
        """
        self.check_input(input_ids)
        n_layers = self.facts.n_layers
        B, N = input_ids.shape
        rows = torch.arange(B, device=input_ids.device)[:, None]
        sources = self.logit_sources(logit_positions)
        needed = torch.cat([logit_positions, sources], dim=1)
        if not bool((start_layer.gather(1, needed) == 0).all()):
            raise ValueError("every logit position and the position its logits come from (model.logit_sources) must be "
                             "recomputed from layer 0 (start_layer == 0)")

        first = start_layer == 0
        carried = None
        if adaptive is not None:
            if cache.updates is None:
                raise ValueError("an adaptive (dLLM-Cache) plan needs the cache's residual updates: call "
                                 "cache.enable_residual_updates() first (DecodingSession.step does)")
            candidates, rho = adaptive
            carried = candidates & cache.resident & ~first  # padding and evicted positions are never carried
        embedded = first if carried is None else first | carried
        inputs = None  # the positions whose input to the layer was written by this forward
        if bool(embedded.any()):
            inputs, _ = active_index(embedded)
            cache.set_hidden(0, rows, inputs, self.embed(input_ids.gather(1, inputs)))

        active_counts = torch.zeros(n_layers, B, dtype=torch.long)
        adaptive_counts = torch.zeros(n_layers, B, dtype=torch.long) if adaptive is not None else None
        similarity = torch.full((n_layers, B, N), float("nan"), device=input_ids.device) if adaptive is not None \
            else None
        check_trace_attention(trace_attention)
        traced = [] if not trace_attention else [n_layers - 1] if trace_attention == "last" else range(n_layers)
        attention = torch.zeros(len(traced), B, logit_positions.shape[1], N) if traced else None
        drift_sum = torch.zeros(B, N, device=input_ids.device)
        drift_n = torch.zeros(B, N, device=input_ids.device)
        extra_flops = 0.0
        out = None
        for layer in range(n_layers):
            cache.open_layer(layer)
            active = start_layer <= layer
            carry = None
            if carried is not None:
                carry = carried & ~active  # carried through this layer unless picked
                chosen, similarity[layer], probe_flops = self._adaptive_choice(cache, layer, carry, rho)
                extra_flops += probe_flops
                adaptive_counts[layer] = chosen.sum(1).cpu()
                active = active | chosen
                carry = carry & ~chosen
            idx, counts = active_index(active)
            active_counts[layer] = counts.cpu()
            real = packing_mask(idx, counts)
            x = cache.hidden[layer][rows, idx]
            q, k, v = self.layer_qkv(layer, x, cache.positions.gather(1, idx), real)
            # Drift probe at no extra cost: compare each recomputed value with the one it replaces.
            was_computed = cache.computed[layer].gather(1, idx)
            old_v = cache.values[layer][rows, :, idx]  # (B, n, kv_heads, head_dim)
            cos = F.cosine_similarity(old_v.flatten(2).float(), v.transpose(1, 2).flatten(2).float(), dim=-1)
            drift = torch.where(was_computed, 1.0 - cos, torch.zeros_like(cos))
            drift_sum.scatter_add_(1, idx, drift * unique_mask(idx, counts))
            drift_n.scatter_add_(1, idx, was_computed.float() * unique_mask(idx, counts))
            cache.keys[layer][rows, :, idx] = k.transpose(1, 2)
            cache.values[layer][rows, :, idx] = v.transpose(1, 2)
            cache.computed[layer][rows, idx] = True
            if layer in traced:
                attention[layer - n_layers] = _attention_to_keys(q, cache, layer, idx, logit_positions)
            x_out = self.layer_finish(layer, x, q, cache.keys[layer], cache.values[layer], cache.attention_mask, real)
            if cache.updates is not None:
                cache.updates[layer][rows, idx] = x_out - x
            written, x = idx, x_out
            if carry is not None and layer + 1 < n_layers and bool(carry.any()):
                # The carried positions not picked here add their cached update (attention + MLP of this layer) to
                # their fresh input: the same as running the layer on cached attention and MLP outputs, at the cost
                # of one addition (not counted in the FLOPs).
                written, _ = active_index(active | carry)
                nxt = cache.hidden[layer] + cache.updates[layer]
                nxt[rows, idx] = x_out
                x = nxt[rows, written]
            # Pages to store: the computed positions, and the carried ones whose input changed.
            cache.close_layer(layer, idx if carried is None or inputs is None else torch.cat([idx, inputs], 1))
            inputs = written
            if layer + 1 < n_layers:
                cache.set_hidden(layer + 1, rows, written, x)
            else:
                out = x
        # The logits' source positions are active in the last layer; find them among its active rows (idx is its).
        where = (idx[:, None, :] == sources[:, :, None]).float().argmax(-1)
        final = out.gather(1, where[..., None].expand(-1, -1, out.shape[-1]))
        nan = torch.full_like(drift_sum, float("nan"))
        value_drift = torch.where(drift_n > 0, drift_sum / drift_n.clamp(min=1), nan)
        trace = PartialForwardTrace(active_counts=active_counts, attention_to_keys=attention, value_drift=value_drift,
                                    extra_flops=extra_flops, adaptive_counts=adaptive_counts,
                                    adaptive_similarity=similarity.cpu() if similarity is not None else None)
        return self.output_logits(final), trace

    def _adaptive_choice(self, cache: BlockKVCache, layer: int, candidates: torch.Tensor, rho: float
                         ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """dLLM-Cache's pick at one layer: the candidates' values projected from their current (fresh) layer input
        against their cached values; per row the floor(rho * n) least similar of its n candidates (none when that
        is 0; ties go to the earlier position). Returns the picked positions (B, N), the cosine similarities (B, N;
        NaN off the candidates) and the probe's FLOPs."""
        B, N = candidates.shape
        chosen = torch.zeros_like(candidates)
        similarity = torch.full((B, N), float("nan"), device=candidates.device)
        if not bool(candidates.any()):
            return chosen, similarity, 0.0
        rows = torch.arange(B, device=candidates.device)[:, None].expand(B, N)
        idx, counts = active_index(candidates)
        rows = rows[:, : idx.shape[1]]
        v_new = self.value_probe(layer, cache.hidden[layer][rows, idx])  # values carry no rotary embedding
        v_old = cache.values[layer][rows, :, idx].flatten(2)
        cos = F.cosine_similarity(v_new.float(), v_old.float(), dim=-1)
        valid = unique_mask(idx, counts).bool()
        similarity[rows[valid], idx[valid]] = cos[valid]
        order = cos.masked_fill(~valid, float("inf")).argsort(dim=1, stable=True)  # least similar first
        k = (counts.double() * rho).floor().long()  # floor(rho * n) in float64, as Python's int(rho * n)
        picked = torch.arange(idx.shape[1], device=idx.device)[None, :] < k[:, None]
        chosen[rows[picked], idx.gather(1, order)[picked]] = True
        return chosen, similarity, self.value_probe_flops(float(counts.sum()))


def _attention_to_keys(q: torch.Tensor, cache: BlockKVCache, layer: int, idx: torch.Tensor,
                       logit_positions: torch.Tensor) -> torch.Tensor:
    """Attention of each logit query on each key, averaged over heads: (B, n_out, N)."""
    where = (idx[:, None, :] == logit_positions[:, :, None]).float().argmax(-1)  # (B, n_out)
    qd = q.gather(2, where[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[-1]))
    keys = cache.keys[layer]
    if keys.shape[1] != qd.shape[1]:
        keys = keys.repeat_interleave(qd.shape[1] // keys.shape[1], dim=1)
    scores = (qd.float() @ keys.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~cache.attention_mask[:, None, None, :], float("-inf"))
    return scores.softmax(-1).mean(dim=1).cpu()


def read_config(cls: type, raw: dict[str, Any], source: str, *, required: set[str],
                supported: dict[str, set], ignored: set[str], switches: dict[str, Any] | None = None) -> Any:
    """A family's config dataclass (with a `field_names()` classmethod) from config.json keys; a key set to something
    the family does not implement is refused by name.

    supported: keys whose value must be one of a set (anything else is another architecture, refused by name);
    ignored: keys that do not change the maths (bookkeeping, training-only settings); switches: fields the family
    fixes whatever config.json says (e.g. Dream's q/k/v biases)."""
    from cache_core.checkpoint import CheckpointError

    for key, allowed in supported.items():
        if key in raw and not any(raw[key] == value for value in allowed):  # values may be unhashable (dicts)
            raise CheckpointError(f"{source}: {key}={raw[key]!r} is not supported by this loader (supported: "
                                  f"{sorted(map(repr, allowed))}); this model cannot be run exactly here")
    missing = sorted(required - set(raw))
    if missing:
        raise CheckpointError(f"{source}: missing required keys {missing}; is this a complete config.json?")
    known = cls.field_names()
    unknown = set(raw) - known - ignored - set(supported)
    if unknown:
        # A key we do not know may change the architecture: say so rather than ignore it silently.
        log.warning("%s: ignoring unknown config keys %s", source, sorted(unknown))
    values = {k: val for k, val in raw.items() if k in known}
    values.update(switches or {})
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{source}: {err}") from err


def rowwise(fn: Callable[..., tuple[torch.Tensor, ...]], inputs: tuple[torch.Tensor, ...],
            real: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """fn (a per-position map of (B, n, ...) tensors) on the real rows only, packed into one (T, ...) batch.

    A partial forward pads each batch row to the longest row's active count. When rows refresh different numbers of
    positions (learned policies, the oracle) the padding can be most of the batch; the projections and the MLP, which
    act on each position alone, then run on the T real positions instead. Padding slots get their row's first slot's
    output: a padded index repeats that position (`active_index`), so the cache writes stay the same."""
    if real is None:
        return fn(*inputs)
    outputs = fn(*(t[real] for t in inputs))
    full = []
    for out in outputs:
        grid = out.new_zeros((*real.shape, *out.shape[1:]))
        grid[real] = out
        pad = ~real.view(*real.shape, *([1] * (out.dim() - 1)))
        full.append(torch.where(pad, grid[:, :1], grid))
    return tuple(full)


def active_index(active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions where `active` is True, per row, as a padded index (B, n) plus the real count per row.

    Rows with fewer active positions are padded by repeating their first active position: recomputing a position
    twice writes the same values twice, so padding never changes the result (and accounting uses the counts).
    """
    counts = active.sum(1)
    n = int(counts.max())
    if n == 0:
        raise ValueError("a partial forward needs at least one active position per layer")
    order = torch.argsort((~active).to(torch.int8), dim=1, stable=True)[:, :n]  # active positions first, in order
    slot = torch.arange(n, device=active.device)[None, :]
    return torch.where(slot < counts[:, None], order, order[:, :1]), counts


PACK_BELOW = 0.85  # pack the per-position layers when real positions fill less than this share of the padded batch


def packing_mask(idx: torch.Tensor, counts: torch.Tensor) -> torch.Tensor | None:
    """The real (non-padding) slots of a padded index when packing them pays, else None (see `rowwise`)."""
    if idx.shape[0] == 1 or int(counts.min()) < 1:
        return None
    if float(counts.sum()) >= PACK_BELOW * idx.numel():
        return None
    return unique_mask(idx, counts).bool()


def unique_mask(idx: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """1.0 for the real entries of a padded index from `active_index`, 0.0 for the padding."""
    slot = torch.arange(idx.shape[1], device=idx.device)[None, :]
    return (slot < counts[:, None]).float()
