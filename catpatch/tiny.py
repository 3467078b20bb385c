"""Complete SD3-family pipelines built offline from small configs (no download).

All nine components of `StableDiffusion3Pipeline` are real diffusers / transformers classes with
seeded random weights; the tokenizers are built from an in-memory vocabulary. Used by the tests,
the benchmark and as the untrained fallback of the demo.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from .shapes import transformer_config

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


def clip_tokenizer(words: Iterable[str] = BASE_WORDS):
    """A CLIP BPE tokenizer whose vocabulary holds every character and each word as one token."""
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}

    def add(tok: str) -> None:
        vocab.setdefault(tok, len(vocab))

    for special in ("<|startoftext|>", "<|endoftext|>"):
        add(special)
    for c in _CHARS:
        add(c)
        add(c + "</w>")
    merges: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for word in dict.fromkeys(words):
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        left = pieces[0]
        for right in pieces[1:]:
            if (left, right) not in seen:
                seen.add((left, right))
                merges.append((left, right))
            left = left + right
            add(left)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def t5_tokenizer(words: Iterable[str] = BASE_WORDS):
    """A T5 (unigram) tokenizer with one piece per word plus single characters."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + w, -1.0) for w in dict.fromkeys(words)]
    pieces += [("\u2581", -5.0)] + [(c, -8.0) for c in _CHARS]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


def build_pipeline(
    shape: str = "tiny-sd3",
    pipeline_cls: Any = None,
    seed: int = 0,
    vae_blocks: int = 3,
    words: Iterable[str] = BASE_WORDS,
    **transformer_overrides: Any,
):
    """A complete SD3-family pipeline with seeded random weights, built offline.

    `shape` names the transformer layout (see `catpatch.shapes`); `pipeline_cls` defaults to
    `StableDiffusion3Pipeline` (any class taking the same nine components works, e.g.
    `StableDiffusion3Img2ImgPipeline`). `vae_blocks` sets the VAE depth: the image-to-latent
    scale factor is 2**(vae_blocks - 1).
    """
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        T5Config,
        T5EncoderModel,
    )

    pipeline_cls = pipeline_cls or StableDiffusion3Pipeline
    words = tuple(words)
    cfg = transformer_config(shape, **transformer_overrides)
    clip_tok = clip_tokenizer(words)
    t5_tok = t5_tokenizer(words)

    def clip_encoder(offset: int):
        torch.manual_seed(seed + offset)
        return CLIPTextModelWithProjection(
            CLIPTextConfig(
                vocab_size=len(clip_tok),
                hidden_size=32,
                intermediate_size=64,
                projection_dim=cfg["pooled_projection_dim"] // 2,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=77,
                bos_token_id=clip_tok.bos_token_id,
                eos_token_id=clip_tok.eos_token_id,
                pad_token_id=clip_tok.pad_token_id,
            )
        ).eval()

    with torch.random.fork_rng(devices=[]):
        text_encoder, text_encoder_2 = clip_encoder(1), clip_encoder(2)
        torch.manual_seed(seed + 3)
        text_encoder_3 = T5EncoderModel(
            T5Config(
                vocab_size=len(t5_tok),
                d_model=cfg["joint_attention_dim"],
                d_ff=64,
                d_kv=16,
                num_layers=2,
                num_heads=2,
                decoder_start_token_id=0,
                pad_token_id=t5_tok.pad_token_id,
                eos_token_id=t5_tok.eos_token_id,
            )
        ).eval()
        torch.manual_seed(seed + 4)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * vae_blocks,
            up_block_types=("UpDecoderBlock2D",) * vae_blocks,
            block_out_channels=(16,) * vae_blocks,
            layers_per_block=1,
            latent_channels=cfg["in_channels"],
            norm_num_groups=8,
            sample_size=64,
            scaling_factor=1.5305,
            shift_factor=0.0609,
            use_quant_conv=False,
            use_post_quant_conv=False,
        ).eval()
        torch.manual_seed(seed + 5)
        transformer = SD3Transformer2DModel(**cfg).eval()

    return pipeline_cls(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tok,
        text_encoder_2=text_encoder_2,
        tokenizer_2=clip_clone(clip_tok),
        text_encoder_3=text_encoder_3,
        tokenizer_3=t5_tok,
    )


def clip_clone(tok):
    """A second, independent CLIP tokenizer object (the pipeline holds two)."""
    import copy

    return copy.deepcopy(tok)
