"""Stateless Haiku models: encoder, side-interpolater and decoder (UMD, MAE, DiT,
MaskDiT, MDT backbones), composed by ``Model``.

    from unidiff import models as um
    cfg = um.umd_config("B/4", image_size=64, in_channels=3)
    model = um.Model(cfg)
    params = model.init(key)            # {'encoder', 'decoder'[, 'side_interpolater']}
    pred = model.apply(params, x_t, t, labels=None, masking=None)   # Prediction
    rep = model.represent(params, images)                           # (B, width)
    um.count_params(cfg)

Shape glossary: B batch, L tokens, K kept tokens, P = p*p*C values per patch, W width.
"""

from unidiff.models.attention import Attention, bias_index, default_head_groups, rel_pos_index
from unidiff.models.blocks import AdaLNBlock, FinalLayer, Mlp, ViTBlock, make_block
from unidiff.models.config import (
    FREQ_ORDERS,
    OUTPUT_KINDS,
    POS_EMBED_KINDS,
    SIZES,
    ModelConfig,
    count_params,
    dit_config,
    mae_config,
    maskdit_config,
    mdt_config,
    parse_variant,
    umd_config,
)
from unidiff.models.decoder import DecoderEmbed, decoder_forward, make_decoder, split_output
from unidiff.models.encoder import encoder_forward, make_encoder
from unidiff.models.layers import (
    Dense,
    LabelEmbed,
    LayerNorm,
    TimeEmbed,
    add_batch_shared,
    conditioning,
    drop_labels,
    layer_norm,
    modulate,
    position_embedding,
    sincos_1d,
    sincos_2d,
    timestep_features,
)
from unidiff.models.model import Model
from unidiff.models.outputs import EncoderOutput, Prediction
from unidiff.models.side_interpolater import make_side_interpolater, side_interpolater_forward
from unidiff.models.transfer import check_transfer, encoder_into_dit, interpolate_pos_embed

__all__ = [
    "AdaLNBlock", "Attention", "DecoderEmbed", "Dense", "EncoderOutput", "FREQ_ORDERS", "FinalLayer",
    "LabelEmbed", "LayerNorm", "Mlp", "Model", "ModelConfig", "OUTPUT_KINDS", "POS_EMBED_KINDS",
    "Prediction", "SIZES", "TimeEmbed", "ViTBlock", "add_batch_shared", "bias_index", "conditioning",
    "count_params", "decoder_forward", "default_head_groups", "dit_config", "drop_labels",
    "check_transfer", "encoder_forward", "encoder_into_dit", "interpolate_pos_embed", "layer_norm", "mae_config", "make_block",
    "make_decoder", "make_encoder", "make_side_interpolater", "maskdit_config", "mdt_config",
    "modulate", "parse_variant", "position_embedding", "rel_pos_index", "side_interpolater_forward",
    "sincos_1d", "sincos_2d", "split_output", "timestep_features", "umd_config",
]
