"""Complete SD3-family, FLUX.1 and PixArt-Σ pipelines built offline from small configs (no
download).

All nine components of `StableDiffusion3Pipeline` (seven of `FluxPipeline`, five of
`PixArtSigmaPipeline`) are real diffusers / transformers classes with seeded random weights;
the tokenizers are built from an in-memory vocabulary. Used by the tests, the benchmark and as
the untrained fallback of the demo.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch

from .shapes import SD3_CLASS, is_flux, transformer_config

# Words the tokenizers know as whole tokens; anything else falls back to characters (CLIP) or
# <unk> pieces (T5). Covers the toy captions and common prompt words.
BASE_WORDS = (
    "a",
    "an",
    "the",
    "of",
    "on",
    "at",
    "in",
    "with",
    "and",
    "small",
    "medium",
    "large",
    "big",
    "tiny",
    "red",
    "green",
    "blue",
    "yellow",
    "orange",
    "purple",
    "white",
    "black",
    "gray",
    "pink",
    "cyan",
    "brown",
    "circle",
    "square",
    "triangle",
    "cross",
    "ring",
    "star",
    "shape",
    "top",
    "bottom",
    "left",
    "right",
    "center",
    "middle",
    "striped",
    "dotted",
    "checkered",
    "plain",
    "noisy",
    "background",
    "girl",
    "boy",
    "cat",
    "dog",
    "photo",
    "picture",
    "painting",
    "of",
    "hair",
    "eyes",
    "sky",
    "sea",
    "tree",
    "house",
    "city",
    "night",
    "day",
)
_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789.,!?-'"


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encode one word's symbols with merge ranks (lowest rank merges first)."""
    while len(symbols) > 1:
        adjacent = zip(symbols, symbols[1:], strict=False)
        rank, i = min((ranks.get(pair, len(ranks)), i) for i, pair in enumerate(adjacent))
        if rank == len(ranks):
            break
        symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2 :]
    return symbols


def clip_tokenizer(words: Iterable[str] = BASE_WORDS, model_max_length: int = 77):
    """A CLIP BPE tokenizer in which every word of `words` is exactly one token.

    Merges are appended word by word until each word encodes to one symbol; a merge appended
    later never changes an earlier word's encoding. Other words fall back to characters.
    """
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in _CHARS:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    ranks: dict[tuple[str, str], int] = {}
    for word in dict.fromkeys(words):
        while len(symbols := _bpe(list(word[:-1]) + [word[-1] + "</w>"], ranks)) > 1:
            ranks[(symbols[0], symbols[1])] = len(ranks)
            vocab.setdefault(symbols[0] + symbols[1], len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=list(ranks), model_max_length=model_max_length)


def t5_tokenizer(words: Iterable[str] = BASE_WORDS):
    """A T5 (unigram) tokenizer with one piece per word plus single characters."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + w, -1.0) for w in dict.fromkeys(words)]
    pieces += [("\u2581", -5.0)] + [(c, -8.0) for c in _CHARS]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


def text_components(
    words: Iterable[str] = BASE_WORDS,
    seed: int = 0,
    clip_length: int = 77,
    clip_projection: int = 32,
    t5_dim: int = 64,
    t5_ff: int = 64,
    t5_kv: int = 16,
) -> dict[str, Any]:
    """The three tokenizers and three seeded random, frozen text encoders of an SD3 pipeline:
    two 2-layer CLIPs (hidden 32, projection `clip_projection` each) and a 2-layer T5 of width
    `t5_dim` (the transformer's joint_attention_dim)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    words = tuple(words)
    clip_tok = clip_tokenizer(words, clip_length)
    t5_tok = t5_tokenizer(words)

    def clip_encoder(offset: int):
        torch.manual_seed(seed + offset)
        return CLIPTextModelWithProjection(
            CLIPTextConfig(
                vocab_size=len(clip_tok),
                hidden_size=32,
                intermediate_size=64,
                projection_dim=clip_projection,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=clip_length,
                bos_token_id=clip_tok.bos_token_id,
                eos_token_id=clip_tok.eos_token_id,
                pad_token_id=clip_tok.pad_token_id,
            )
        )

    with torch.random.fork_rng(devices=[]):
        encoder, encoder_2 = clip_encoder(1), clip_encoder(2)
        torch.manual_seed(seed + 3)
        encoder_3 = T5EncoderModel(
            T5Config(
                vocab_size=len(t5_tok),
                d_model=t5_dim,
                d_ff=t5_ff,
                d_kv=t5_kv,
                num_layers=2,
                num_heads=2,
                decoder_start_token_id=0,
                pad_token_id=t5_tok.pad_token_id,
                eos_token_id=t5_tok.eos_token_id,
            )
        )
    for module in (encoder, encoder_2, encoder_3):
        module.requires_grad_(False).eval()
    return dict(
        text_encoder=encoder,
        tokenizer=clip_tok,
        text_encoder_2=encoder_2,
        tokenizer_2=copy.deepcopy(clip_tok),
        text_encoder_3=encoder_3,
        tokenizer_3=t5_tok,
    )


def vae(
    seed: int = 0,
    blocks: int = 3,
    channels: int = 16,
    latent_channels: int = 16,
    sample_size: int = 64,
    scaling_factor: float = 1.5305,
    shift_factor: float = 0.0609,
):
    """A seeded random `AutoencoderKL` of the SD3 layout (no quant convs); the image-to-latent
    scale factor is 2**(blocks - 1)."""
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 4)
        return AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * blocks,
            up_block_types=("UpDecoderBlock2D",) * blocks,
            block_out_channels=(channels,) * blocks,
            layers_per_block=1,
            latent_channels=latent_channels,
            norm_num_groups=8,
            sample_size=sample_size,
            scaling_factor=scaling_factor,
            shift_factor=shift_factor,
            use_quant_conv=False,
            use_post_quant_conv=False,
        ).eval()


def build_pipeline(
    shape: str = "tiny-sd3",
    pipeline_cls: Any = None,
    seed: int = 0,
    vae_blocks: int = 3,
    words: Iterable[str] = BASE_WORDS,
    **transformer_overrides: Any,
):
    """A complete SD3-family pipeline with seeded random weights, built offline.

    `shape` names the transformer layout (see `catpatch.models.shapes`); `pipeline_cls` defaults to
    `StableDiffusion3Pipeline` (any class taking the same nine components works, e.g.
    `StableDiffusion3Img2ImgPipeline`). `vae_blocks` sets the VAE depth: the image-to-latent
    scale factor is 2**(vae_blocks - 1).
    """
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    if is_flux(shape):
        return build_flux_pipeline(
            shape, pipeline_cls, seed, vae_blocks, words, **transformer_overrides
        )
    cfg = transformer_config(shape, **transformer_overrides)
    if cfg.get("_class_name", SD3_CLASS) == "PixArtTransformer2DModel":
        return build_pixart_pipeline(shape, pipeline_cls, seed, vae_blocks, words, **cfg)
    pipeline_cls = pipeline_cls or StableDiffusion3Pipeline
    text = text_components(
        words, seed, clip_projection=cfg["pooled_projection_dim"] // 2,
        t5_dim=cfg["joint_attention_dim"],
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 5)
        transformer = SD3Transformer2DModel(**cfg).eval()
    return pipeline_cls(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae(seed, vae_blocks, latent_channels=cfg["in_channels"]),
        **text,
    )


def t5_encoder(tokenizer, seed: int = 0, d_model: int = 64, d_ff: int = 64, d_kv: int = 16):
    """A seeded random, frozen 2-layer `T5EncoderModel` of width `d_model` for `tokenizer`."""
    from transformers import T5Config, T5EncoderModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 3)
        encoder = T5EncoderModel(
            T5Config(
                vocab_size=len(tokenizer), d_model=d_model, d_ff=d_ff, d_kv=d_kv, num_layers=2,
                num_heads=2, decoder_start_token_id=0, pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        )  # fmt: skip
    return encoder.requires_grad_(False).eval()


def build_pixart_pipeline(
    shape: str = "tiny-pixart-sigma",
    pipeline_cls: Any = None,
    seed: int = 0,
    vae_blocks: int = 3,
    words: Iterable[str] = BASE_WORDS,
    **transformer_config_: Any,
):
    """A complete `PixArtSigmaPipeline` with seeded random weights, built offline: a T5 text
    encoder of the transformer's caption width, a 4-channel `AutoencoderKL`, the
    DPM-Solver++ scheduler PixArt-Σ ships with. `transformer_config_`: the full config
    (default: the named `shape`'s)."""
    import diffusers
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline

    cfg = dict(transformer_config_ or transformer_config(shape))
    cls = getattr(diffusers, cfg.pop("_class_name"))
    tokenizer = t5_tokenizer(words)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 5)
        transformer = cls(**cfg).eval()
    return (pipeline_cls or PixArtSigmaPipeline)(
        tokenizer=tokenizer,
        text_encoder=t5_encoder(tokenizer, seed, d_model=cfg["caption_channels"]),
        vae=vae(seed, vae_blocks, latent_channels=cfg["in_channels"], scaling_factor=0.13025),
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(),
    )


def build_flux_pipeline(
    shape: str = "tiny-flux",
    pipeline_cls: Any = None,
    seed: int = 0,
    vae_blocks: int = 3,
    words: Iterable[str] = BASE_WORDS,
    **transformer_overrides: Any,
):
    """A complete FLUX.1 pipeline with seeded random weights, built offline.

    `pipeline_cls` defaults to `FluxPipeline` (any class taking the same components works,
    e.g. `FluxImg2ImgPipeline`; a ControlNet pipeline also needs `controlnet=`, passed through
    `transformer_overrides` is not: add it to the returned pipeline's components yourself).
    Components: a 2-layer CLIP text model (hidden = the pooled projection width), a 2-layer T5
    of width joint_attention_dim, a VAE with in_channels/4 latent channels (FLUX packs 2x2
    latents per token), the dynamic-shift flow-matching scheduler of FLUX.1-dev.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel

    pipeline_cls = pipeline_cls or FluxPipeline
    cfg = transformer_config(shape, **transformer_overrides)
    cfg.pop("_class_name", None)
    pooled, joint = cfg["pooled_projection_dim"], cfg["joint_attention_dim"]
    text = text_components(words, seed, t5_dim=joint, t5_ff=2 * joint)
    clip_tok = text["tokenizer"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        clip = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(clip_tok),
                hidden_size=pooled,
                intermediate_size=2 * pooled,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=clip_tok.model_max_length,
                bos_token_id=clip_tok.bos_token_id,
                eos_token_id=clip_tok.eos_token_id,
                pad_token_id=clip_tok.pad_token_id,
            )
        )
        clip.requires_grad_(False).eval()
        torch.manual_seed(seed + 5)
        transformer = FluxTransformer2DModel(**cfg).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096, shift=3.0,
    )  # fmt: skip
    # the transformer's output is the packed latents; its input may carry more (Fill, Control)
    latent_channels = (cfg.get("out_channels") or cfg["in_channels"]) // 4
    autoencoder = vae(seed, vae_blocks, latent_channels=latent_channels, shift_factor=0.1159)
    return pipeline_cls(
        transformer=transformer,
        scheduler=scheduler,
        vae=autoencoder,
        text_encoder=clip,
        tokenizer=clip_tok,
        text_encoder_2=text["text_encoder_3"],
        tokenizer_2=text["tokenizer_3"],
    )
