"""One small description per model family: where the blocks, heads, FFN, norms and per-layer config lists live.

Every stage asks this table (`families.of(config)`) instead of testing `model_type` itself, so supporting a new
family is one entry here. Module paths are as transformers 5 builds the model in memory (dotted, relative to
the ...ForCausalLM / encoder model, or to one decoder layer).

    fam = families.of(model.config)          # a Family, or a one-line error listing the supported families
    layers = fam.layer_list(model)           # the decoder blocks
    attn = fam.attention                     # q/k/v/o names, fused layouts, q/k norms
    fam.cut_layers(config_dict, keep=[0, 2]) # config with per-layer lists kept consistent

What differs between families and how it is written down:
- attention projections: separate q/k/v, or one fused projection with a row layout: `split` (rows [q heads | k
  heads | v heads]: Phi-3), `per_head` (each head's q, k, v rows together: GPT-NeoX), `falcon` (per kv group its
  query heads then k and v; multi-query: [q heads | k | v]), `conv1d` (GPT-2: a Conv1D whose weight is [in, out],
  columns [q | k | v]); q/k norms over each head (Qwen3, Gemma 3) or over the whole projection (OLMo 2);
- the FFN: gated (gate/up/down), fused gate_up (Phi-3), plain two linears (fc1/fc2), on the layer itself (OPT),
  or mixture of experts (fused 3-D experts `gate_up_proj` [E, 2I, H] and `down_proj` [E, H, I] and a router);
- norms by role in the block (before attention, before the FFN, after attention / the FFN inside the residual
  branch) and kind: RMSNorm, Gemma's RMSNorm scaled by (1 + w), LayerNorm with bias; parallel blocks where
  attention and FFN read the same residual (Phi-2, GPT-NeoX, Falcon);
- config keys (GPT-2's n_embd, OPT's ffn_dim, Falcon's ffn_hidden_size...) and the per-layer lists that must
  follow when layers are dropped (`layer_types`; Qwen3-MoE's `mlp_only_layers` holds layer indices);
- numerics: Gemma's activations overflow float16 (transformers #36822; vLLM refuses float16 for Gemma 3), so
  quantization stages keep its unquantized parts in bfloat16 (`half_dtype`);
- MoE checkpoints: transformers 5 holds experts fused in memory but saves them per expert under the family's
  original names (`FFN.expert_names`; Mixtral also renames mlp -> block_sparse_moe: `saved_names`); quantized
  checkpoints hold per-expert linears under those same names (compress/moe.py).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from compress.errors import CompressError


@dataclass(frozen=True)
class Attention:
    path: str = "self_attn"           # the attention module inside a layer
    q: str | None = "q_proj"          # separate projections (None when fused into `qkv`)
    k: str | None = "k_proj"
    v: str | None = "v_proj"
    o: str = "o_proj"                 # output projection: its input is the heads' outputs, its output a residual update
    qkv: str | None = None            # one fused q/k/v projection
    qkv_layout: str = "split"         # split | per_head | falcon | conv1d (see the module docstring)
    q_norm: str | None = None         # RMSNorm on queries (Qwen3, Gemma 3, OLMo 2)
    k_norm: str | None = None
    qk_norm_per_head: bool = True     # False: one norm over all heads' dims (OLMo 2): it must follow head pruning
    head_dim_free: bool = True        # the attention reads config.head_dim: heads and hidden size prune apart

    def projections(self) -> list[str]:
        """Names of the linears reading the block's attention input, in q, k, v order (or the fused one)."""
        return [self.qkv] if self.qkv else [n for n in (self.q, self.k, self.v) if n]


@dataclass(frozen=True)
class FFN:
    path: str = "mlp"                 # the FFN module inside a layer ("" = the layer itself: OPT)
    up: str | None = "up_proj"        # gated: the up projection; plain: the first linear (fc1, c_fc, dense_h_to_4h)
    down: str | None = "down_proj"    # the last linear: its input is the intermediate, its output a residual update
    gate: str | None = "gate_proj"    # gated MLP: act(gate(x)) * up(x); None: plain act(up(x))
    gate_up: str | None = None        # fused [gate rows; up rows] (Phi-3)
    experts: str | None = None        # MoE: module holding gate_up_proj [E, 2I, H] and down_proj [E, H, I]
    router: str | None = None         # MoE: module whose `weight` [E, H] scores the experts
    expert_names: tuple = ("gate_proj", "up_proj", "down_proj")  # MoE: one expert's gate, up, down linears as the
    # family's per-expert checkpoints name them (experts.E.<name>), what GPTQModel and vLLM read (compress/moe.py)

    def inputs(self) -> list[str]:
        """Names of the linears reading the FFN input (dense FFNs)."""
        if self.gate_up:
            return [self.gate_up]
        return [n for n in (self.gate, self.up) if n]


@dataclass(frozen=True)
class Keys:
    """config.json key names of the shape (read through transformers' aliases, written to these names)."""
    layers: str = "num_hidden_layers"
    hidden: str = "hidden_size"
    heads: str = "num_attention_heads"
    kv_heads: str | None = "num_key_value_heads"   # None: no grouped-query attention (kv heads = heads)
    intermediate: str = "intermediate_size"
    head_dim: str | None = "head_dim"              # None: head_dim = hidden / heads, not settable
    moe_intermediate: str | None = None            # MoE experts' width when it has its own key (Qwen3-MoE)
    experts: str | None = None                     # number of experts


@dataclass(frozen=True)
class Family:
    name: str                         # what the user reads in messages and the support table
    model_types: tuple[str, ...]      # config.model_type values
    layers: str                       # dotted path of the block list
    embed: str                        # token embeddings
    final_norm: str | None            # the norm after the last block (None: none, e.g. encoders)
    attention: Attention = Attention()
    ffn: FFN = FFN()
    norms: dict = field(default_factory=lambda: {"attn_in": "input_layernorm", "ffn_in": "post_attention_layernorm"})
    # roles: attn_in / ffn_in (before the sublayer), attn_out / ffn_out (on the sublayer's output inside the residual
    # branch: Gemma, OLMo 2), both_in (one norm feeding attention and FFN in parallel)
    norm: str = "rms"                 # rms | rms_unit_offset (weight used as 1 + w: Gemma) | layer (LayerNorm + bias)
    parallel: bool = False            # x + attn(.) + ffn(.) from the same residual (Phi-2, GPT-NeoX, Falcon)
    embed_scale: bool = False         # embeddings times sqrt(hidden_size) (Gemma): pruning hidden must fold the change
    position_embed: str | None = None # learned position embeddings [positions, hidden] (GPT-2, OPT)
    lm_head: str | None = "lm_head"
    keys: Keys = Keys()
    layer_lists: tuple[str, ...] = ("layer_types",)       # config lists with one entry per layer
    layer_index_lists: tuple[str, ...] = ()                # config lists of layer indices (Qwen3-MoE mlp_only_layers)
    fp16_safe: bool = True            # float16 activations stay in range (not Gemma's)
    encoder: bool = False             # bidirectional encoder (BERT): no causal stages like prune
    prune: str | None = None          # why `prune` cannot shrink this family (None: it can)
    saved_names: tuple = ()           # (in-memory, on-disk) module-name components transformers renames when it
    # saves (Mixtral: mlp -> block_sparse_moe); quantized checkpoints, written from the state dict, rename them too

    def get(self, root, path: str | None):
        """The submodule at dotted `path` below `root` ('' = root itself), or None when absent."""
        if path is None:
            return None
        try:
            return root.get_submodule(path) if path else root
        except AttributeError:
            return None

    def layer_list(self, model):
        layers = self.get(model, self.layers)
        if layers is None:
            raise CompressError(f"{type(model).__name__} has no `{self.layers}`: not a {self.name} model as described "
                                "in compress/families.py")
        return layers

    def is_moe(self) -> bool:
        return self.ffn.experts is not None

    def to_disk(self, name: str) -> str:
        """A dotted module or tensor name as the family's checkpoints spell it (`saved_names`), e.g. Mixtral's
        model.layers.0.mlp.experts.3.w1.qweight -> model.layers.0.block_sparse_moe.experts.3.w1.qweight."""
        return _rename(name, dict(self.saved_names))

    def from_disk(self, name: str) -> str:
        """Inverse of to_disk: a checkpoint name as the module is called in memory."""
        return _rename(name, {disk: mem for mem, disk in self.saved_names})

    def config_value(self, config: Any, role: str, default=None):
        """A shape value from a config object or dict by role (layers, hidden, heads, kv_heads, intermediate...)."""
        key = getattr(self.keys, role)
        if key is None:
            return default
        value = config.get(key) if isinstance(config, dict) else getattr(config, key, None)
        return default if value is None else value

    def widths(self, config: Any) -> tuple[int, int, bool]:
        """(FFN width per token, kv heads, gated FFN) for the memory planner: the width from the family's key
        (GPT-2 n_inner, OPT ffn_dim, Falcon ffn_hidden_size; unset = 4 * hidden), for MoE the experts' width
        times the experts each token visits."""
        hidden, heads = self.config_value(config, "hidden"), self.config_value(config, "heads")
        width = self.config_value(config, "moe_intermediate") or self.config_value(config, "intermediate") or 4 * hidden
        if self.is_moe():
            per_token = config.get("num_experts_per_tok") if isinstance(config, dict) else getattr(
                config, "num_experts_per_tok", None)
            width *= int(per_token or 1)
        return width, self.config_value(config, "kv_heads") or heads, bool(self.ffn.gate or self.ffn.gate_up
                                                                          or self.is_moe())

    def cut_layers(self, config: dict, keep: list[int]) -> dict:
        """`config` (a dict) for the model made of the layers `keep` (old indices, in order): the layer count and
        every per-layer list follow, layer-index lists are renumbered (Qwen3-MoE: a dense layer stays dense)."""
        out = copy.deepcopy(config)
        n = config.get(self.keys.layers)
        out[self.keys.layers] = len(keep)
        for key in self.layer_lists:
            value = config.get(key)
            if isinstance(value, list):
                if n is not None and len(value) != n:
                    raise CompressError(f"config {key} has {len(value)} entries for {n} layers")
                out[key] = [value[i] for i in keep]
        for key in self.layer_index_lists:
            value = config.get(key)
            if isinstance(value, list):
                out[key] = [keep.index(i) for i in value if i in keep]
        step = config.get("decoder_sparse_step")
        if step not in (None, 1) and "mlp_only_layers" in self.layer_index_lists:
            # sparse layers were every `step`-th: list the kept dense ones explicitly instead
            dense = {i for i in range(n) if i in (config.get("mlp_only_layers") or []) or (i + 1) % step != 0}
            out["mlp_only_layers"] = [j for j, i in enumerate(keep) if i in dense]
            out["decoder_sparse_step"] = 1
        return out


def _rename(name: str, table: dict) -> str:
    """`name` with every dot-separated component found in `table` replaced (whole components only)."""
    if not table:
        return name
    return ".".join(table.get(part, part) for part in name.split("."))


_GATED_RMS = dict(layers="model.layers", embed="model.embed_tokens", final_norm="model.norm")

# The registry: a literal list, one entry per family (model_type -> entry is built below).
FAMILY_LIST = [
    Family("Llama", ("llama",), **_GATED_RMS),
    Family("Mistral", ("mistral",), **_GATED_RMS),
    Family("Qwen2", ("qwen2",), **_GATED_RMS),
    Family("Qwen3", ("qwen3",), **_GATED_RMS, attention=Attention(q_norm="q_norm", k_norm="k_norm")),
    Family("Gemma 2", ("gemma2",), **_GATED_RMS, norm="rms_unit_offset", embed_scale=True, fp16_safe=False,
           norms={"attn_in": "input_layernorm", "attn_out": "post_attention_layernorm",
                  "ffn_in": "pre_feedforward_layernorm", "ffn_out": "post_feedforward_layernorm"}),
    Family("Gemma 3", ("gemma3_text",), **_GATED_RMS, norm="rms_unit_offset", embed_scale=True, fp16_safe=False,
           attention=Attention(q_norm="q_norm", k_norm="k_norm"),
           norms={"attn_in": "input_layernorm", "attn_out": "post_attention_layernorm",
                  "ffn_in": "pre_feedforward_layernorm", "ffn_out": "post_feedforward_layernorm"}),
    Family("Phi-3", ("phi3",), **_GATED_RMS, attention=Attention(q=None, k=None, v=None, qkv="qkv_proj"),
           ffn=FFN(up=None, gate=None, gate_up="gate_up_proj")),
    Family("Phi-2", ("phi",), layers="model.layers", embed="model.embed_tokens", final_norm="model.final_layernorm",
           attention=Attention(o="dense"), ffn=FFN(up="fc1", down="fc2", gate=None), norm="layer", parallel=True,
           norms={"both_in": "input_layernorm"}),
    Family("OLMo 2", ("olmo2",), **_GATED_RMS,
           attention=Attention(q_norm="q_norm", k_norm="k_norm", qk_norm_per_head=False),
           norms={"attn_out": "post_attention_layernorm", "ffn_out": "post_feedforward_layernorm"}),
    Family("Granite", ("granite",), **_GATED_RMS),
    Family("StableLM", ("stablelm",), **_GATED_RMS, norm="layer",
           attention=Attention(head_dim_free=False),
           prune="its attention takes head_dim = hidden / heads and its o_proj is hidden x hidden, so a smaller "
                 "hidden size or head count does not load in transformers' StableLM class"),
    Family("GPT-NeoX", ("gpt_neox",), layers="gpt_neox.layers", embed="gpt_neox.embed_in",
           final_norm="gpt_neox.final_layer_norm",
           attention=Attention(path="attention", q=None, k=None, v=None, qkv="query_key_value", qkv_layout="per_head",
                               o="dense", head_dim_free=False),
           ffn=FFN(up="dense_h_to_4h", down="dense_4h_to_h", gate=None), norm="layer", parallel=True,
           keys=Keys(kv_heads=None, head_dim=None),
           prune="its attention takes head_dim = hidden / heads (no head_dim setting), so a smaller hidden size or "
                 "head count does not load in transformers' GPT-NeoX class"),
    Family("Falcon", ("falcon",), layers="transformer.h", embed="transformer.word_embeddings",
           final_norm="transformer.ln_f",
           attention=Attention(path="self_attention", q=None, k=None, v=None, qkv="query_key_value",
                               qkv_layout="falcon", o="dense", head_dim_free=False),
           ffn=FFN(up="dense_h_to_4h", down="dense_4h_to_h", gate=None), norm="layer", parallel=True,
           norms={"both_in": "input_layernorm"},
           keys=Keys(kv_heads="num_kv_heads", intermediate="ffn_hidden_size", head_dim=None),
           prune="its head_dim is hidden / heads (a read-only property), so a smaller hidden size or head count does "
                 "not load in transformers' Falcon class"),
    Family("GPT-2", ("gpt2",), layers="transformer.h", embed="transformer.wte", final_norm="transformer.ln_f",
           attention=Attention(path="attn", q=None, k=None, v=None, qkv="c_attn", qkv_layout="conv1d", o="c_proj",
                               head_dim_free=False),
           ffn=FFN(up="c_fc", down="c_proj", gate=None), norm="layer", position_embed="transformer.wpe",
           norms={"attn_in": "ln_1", "ffn_in": "ln_2"},
           keys=Keys(layers="n_layer", hidden="n_embd", heads="n_head", kv_heads=None, intermediate="n_inner",
                     head_dim=None),
           prune="its attention takes head_dim = hidden / heads, so a smaller hidden size or head count does not "
                 "load in transformers' GPT-2 class"),
    Family("OPT", ("opt",), layers="model.decoder.layers", embed="model.decoder.embed_tokens",
           final_norm="model.decoder.final_layer_norm",
           attention=Attention(o="out_proj", head_dim_free=False),
           ffn=FFN(path="", up="fc1", down="fc2", gate=None), norm="layer",
           position_embed="model.decoder.embed_positions",
           norms={"attn_in": "self_attn_layer_norm", "ffn_in": "final_layer_norm"},
           keys=Keys(kv_heads=None, intermediate="ffn_dim", head_dim=None),
           prune="its attention takes head_dim = hidden / heads, so a smaller hidden size or head count does not "
                 "load in transformers' OPT class"),
    Family("Mixtral", ("mixtral",), **_GATED_RMS,
           ffn=FFN(up=None, down=None, gate=None, experts="experts", router="gate", expert_names=("w1", "w3", "w2")),
           keys=Keys(experts="num_local_experts"), saved_names=(("mlp", "block_sparse_moe"),)),
    Family("Qwen3-MoE", ("qwen3_moe",), **_GATED_RMS, attention=Attention(q_norm="q_norm", k_norm="k_norm"),
           ffn=FFN(up=None, down=None, gate=None, experts="experts", router="gate"),
           keys=Keys(moe_intermediate="moe_intermediate_size", experts="num_experts"),
           layer_index_lists=("mlp_only_layers",)),
    Family("BERT", ("bert", "roberta", "xlm-roberta"), layers="encoder.layer", embed="embeddings.word_embeddings",
           final_norm=None, lm_head=None, encoder=True,
           attention=Attention(path="attention", q="self.query", k="self.key", v="self.value", o="output.dense",
                               head_dim_free=False),
           ffn=FFN(path="", up="intermediate.dense", down="output.dense", gate=None), norm="layer",
           norms={"attn_out": "attention.output.LayerNorm", "ffn_out": "output.LayerNorm"},
           keys=Keys(kv_heads=None, head_dim=None),
           prune="an encoder: Sheared-LLaMA prunes causal language models (use distill for encoders)"),
]

FAMILIES = {t: fam for fam in FAMILY_LIST for t in fam.model_types}


def supported(pred=lambda f: True) -> list[str]:
    """Names of the families satisfying `pred`, in table order."""
    return [f.name for f in FAMILY_LIST if pred(f)]


def of(config: Any) -> Family:
    """The Family of a model, its config (object or dict) or a model_type string; a one-line error for others."""
    if hasattr(config, "config") and not isinstance(config, dict):
        config = config.config
    model_type = config if isinstance(config, str) else (
        config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None))
    fam = FAMILIES.get(model_type)
    if fam is None:
        raise CompressError(f"model type {model_type!r} is not a supported family; supported: {', '.join(supported())}")
    return fam


def find(config: Any) -> Family | None:
    """The Family of a model or config, or None for a model type this table does not describe."""
    try:
        return of(config)
    except CompressError:
        return None


def require(config: Any, stage: str, pred, why: str = "") -> Family:
    """The Family, when `stage` supports it (`pred(family)`); else one line naming the family, the reason and the
    families the stage supports."""
    fam = of(config)
    if not pred(fam):
        names = ", ".join(supported(pred))
        raise CompressError(f"{stage} does not support {fam.name}{': ' + why if why else ''}; it supports {names}")
    return fam


# Llama config names -> Keys roles (changed_config writes them to the family's own keys)
_ROLES = {"num_hidden_layers": "layers", "hidden_size": "hidden", "num_attention_heads": "heads",
          "num_key_value_heads": "kv_heads", "intermediate_size": "intermediate", "head_dim": "head_dim"}


def changed_config(config: dict, **changes) -> dict:
    """`config` (a dict) with some fields changed, for shapes of pruned or shallower models: Llama names
    (num_hidden_layers, intermediate_size...) go to the family's keys (GPT-2 n_layer, OPT ffn_dim...), and a new
    layer count keeps the per-layer lists consistent (Family.cut_layers on evenly spaced layers: layer_types)."""
    config = dict(config)
    fam = find(config)
    if fam is None:
        return {**config, **changes}
    changes = {(getattr(fam.keys, _ROLES[k], None) or k) if k in _ROLES else k: v for k, v in changes.items()}
    n_old, n_new = config.get(fam.keys.layers), changes.pop(fam.keys.layers, None)
    if n_new is not None and n_old and n_new != n_old:
        keep = ([round(j * (n_old - 1) / (n_new - 1)) for j in range(n_new)] if 1 < n_new <= n_old
                else [0] if n_new == 1 else [j % n_old for j in range(n_new)])
        config = fam.cut_layers(config, keep)
    elif n_new is not None:
        config[fam.keys.layers] = n_new
    return {**config, **changes}


def half_dtype(config: Any) -> str:
    """The 16-bit dtype for the unquantized parts of a quantized model: float16 (what GPTQ checkpoints and their
    kernels expect) unless the family overflows it (`fp16_safe=False`: Gemma 2/3), then bfloat16. Families this
    table does not describe get float16."""
    fam = find(config)
    return "float16" if fam is None or fam.fp16_safe else "bfloat16"
