"""What the encoder and head configs (conf/model, conf/head) may hold, relative to where they sit
(`model.` in a training config, `models.<name>.` in the scoring benchmark). An encoder's own keys
(d_state, n_heads, ...) are checked only where its config has them."""

from __future__ import annotations

from recsys_mamba.models.score_terms import EARLIER
from recsys_mamba.ops.backend import BACKENDS
from recsys_mamba.schema import Bool, Choice, Int, IntList, Num, Relation, Rule, Schema

LIMIT = 1 << 20  # widths beyond this cannot be allocated anyway; refuse before trying
LENGTH_LIMIT = 1 << 24

# key -> (minimum, example)
_SIZES = {
    "d_model": (1, 64),
    "n_layers": (1, 2),
    "d_state": (1, 16),
    "d_conv": (2, 4),
    "expand": (1, 2),
    "ffn_mult": (1, 4),
    "n_heads": (1, 2),
}

MODEL = Schema(
    [
        Rule(key, Int(minimum, LIMIT, example=example), present_only=True)
        for key, (minimum, example) in _SIZES.items()
    ],
    Rule("max_len", Int(1, LENGTH_LIMIT, example=200)),
    Rule("dropout", Num(minimum=0, below=1, example=0.2), present_only=True),
    Rule("item_dropout", Num(minimum=0, below=1, example=0.2), present_only=True),
    [Rule(key, Bool(), present_only=True) for key in ("gradient_checkpointing", "ffn", "scale_embeddings")],
    Relation(
        ("d_model", "n_heads"),
        lambda d, h: d % h == 0,
        "{k0}={v0} must be divisible by {k1}={v1}",
        present_only=True,
    ),
    Rule("dt_min", Num(above=0, example=0.001), present_only=True),
    Rule("dt_max", Num(above=0, example=0.1), present_only=True),
    Relation(
        ("dt_min", "dt_max"),
        lambda lo, hi: lo <= hi,
        "{k0}={v0} must not exceed {k1}={v1}",
        present_only=True,
    ),
    Rule("dt_rank", Int(1, LIMIT, example="auto", also=("auto",)), present_only=True),
    Rule("norm", Choice(("rmsnorm", "layernorm")), present_only=True),
    Rule("scan_backend", Choice(BACKENDS), present_only=True),
)

HEAD = Schema(
    Rule("loss", Choice(("ce", "sampled")), present_only=True),
    Rule("n_negatives", Int(1, LIMIT, example=1024), present_only=True),
    [
        Rule(key, Bool(), present_only=True)
        for key in (
            "logq", "mask_history", "seen_bias", "transition_prior", "attribute_prior", "target_attention"
        )
    ],
    Rule("mlp_dims", IntList(1, LIMIT, example="[200,80]", allow_empty=True), present_only=True),
    Rule("dropout", Num(minimum=0, below=1, example=0.1), present_only=True),
    Rule("contrastive_weight", Num(minimum=0, example=0.1), present_only=True),
    Rule("contrastive_temperature", Num(above=0, example=1.0), present_only=True),
    Rule("label_smoothing", Num(minimum=0, below=1, example=0.1), present_only=True),
    Rule("transition_lags", Int(1, 1 + EARLIER, example=3), present_only=True),
    Rule("attribute_max_items", Int(2, 1 << 40, example=300), present_only=True),
    Rule("future_steps", Int(0, 64, example=1), present_only=True),
    Rule("future_weight", Num(minimum=0, example=0.3), present_only=True),
    Rule("attention_dim", Int(1, LIMIT), present_only=True),
    Rule("base_rate", Num(above=0, below=1, optional=True), present_only=True),
    Rule("n_users", Int(0, 1 << 40, optional=True, example="null"), present_only=True),
)

__all__ = ["HEAD", "LENGTH_LIMIT", "LIMIT", "MODEL"]
