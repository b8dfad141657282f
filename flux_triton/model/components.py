"""The rest of a FLUX pipeline folder beside ``transformer/``: the text encoders (CLIP and T5, with their tokenizers)
and the VAE, loaded through transformers' and diffusers' own ``from_pretrained`` (safetensors only) where the folder
has them, for the served ``flux_text_encoder`` and ``flux_vae`` (through which ``flux_generate`` takes prompt
strings and returns images); and a tiny random-weight set of them, written like real ones, for tests and the CPU
demo (``write_tiny_components``)."""

from __future__ import annotations

import string
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from flux_triton.model.presets import TINY_PRESETS, TINY_SEED
from flux_triton.model.store import ModelDirError, inside

TINY_COMPONENTS = "tiny-flux-components"  # the tiny models' encoders and VAE, under the model root
ENCODER_FOLDERS = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")


@dataclass
class Components:
    """What ``FluxPipeline`` takes besides the transformer and scheduler; ``None`` where the folder has none."""

    text_encoder: torch.nn.Module | None = None
    tokenizer: object | None = None
    text_encoder_2: torch.nn.Module | None = None
    tokenizer_2: object | None = None
    vae: torch.nn.Module | None = None

    @property
    def encodes(self) -> bool:
        return self.text_encoder is not None

    @property
    def decodes(self) -> bool:
        return self.vae is not None

    def pipeline_kwargs(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def load_components(folder: Path | None, device: torch.device | str, dtype: torch.dtype, encoders: bool = True,
                    vae: bool = True) -> Components:  # fmt: skip
    """The text encoders (all four folders of ``ENCODER_FOLDERS``, or none of them) and the VAE (``vae/``) in
    ``folder``, on ``device`` in ``dtype``, those asked for; empty for ``None``. Raises ``ModelDirError`` naming
    what is missing or cannot load."""
    if folder is None:
        return Components()
    present = [name for name in ENCODER_FOLDERS if encoders and (folder / name).is_dir()]
    if present and len(present) != len(ENCODER_FOLDERS):
        missing = ", ".join(name for name in ENCODER_FOLDERS if name not in present)
        raise ModelDirError(f"{folder}: has {', '.join(present)} but not {missing}; the text encoders need all four")
    components = Components()
    try:
        if present:
            from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

            for name, model_class in (("text_encoder", CLIPTextModel), ("text_encoder_2", T5EncoderModel)):
                model = model_class.from_pretrained(folder / name, torch_dtype=dtype, use_safetensors=True)
                setattr(components, name, model.to(device).eval().requires_grad_(False))
            components.tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
            components.tokenizer_2 = AutoTokenizer.from_pretrained(folder / "tokenizer_2")
        if vae and (folder / "vae").is_dir():
            from diffusers import AutoencoderKL

            vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=dtype, use_safetensors=True)
            components.vae = vae.to(device).eval().requires_grad_(False)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelDirError(f"cannot load the text encoders or VAE from {folder}: {exc}") from exc
    return components


def _tiny_tokenizers():
    """A CLIP tokenizer (byte-pair, single letters) and a T5 tokenizer (unigram, single letters), built here."""
    from transformers import CLIPTokenizer, T5Tokenizer

    letters = list(string.ascii_lowercase)
    vocab = {token: i for i, token in enumerate([*letters, *(f"{c}</w>" for c in letters)])}
    vocab |= {"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1}
    clip = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *((c, -1.0) for c in letters), ("\u2581", -1.0)]
    return clip, T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


def write_tiny_components(root: Path, force: bool = False) -> Path | None:
    """The tiny models' text encoders and VAE (random weights sized to ``TINY_PRESETS``) under
    ``root/TINY_COMPONENTS``, saved with ``save_pretrained``; ``None`` if already there."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    target = root / TINY_COMPONENTS
    if (target / "vae" / "config.json").is_file() and not force:
        return None
    tiny = TINY_PRESETS["tiny-flux-dev"]
    clip_tokenizer, t5_tokenizer = _tiny_tokenizers()
    torch.manual_seed(TINY_SEED)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(clip_tokenizer), hidden_size=tiny["pooled_projection_dim"],
                                        intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                                        max_position_embeddings=77, projection_dim=32))  # fmt: skip
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), d_model=tiny["joint_attention_dim"], d_kv=8, d_ff=37,
                                 num_layers=1, num_heads=2))  # fmt: skip
    # FLUX's VAE layout at tiny width: 8x downsampling (four blocks), in_channels / 4 latent channels
    down, up = ("DownEncoderBlock2D",) * 4, ("UpDecoderBlock2D",) * 4
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=tiny["in_channels"] // 4,
                        down_block_types=down, up_block_types=up, block_out_channels=(8,) * 4, layers_per_block=1,
                        norm_num_groups=4, use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611,
                        shift_factor=0.1159)  # fmt: skip
    for name, part in {"text_encoder": clip, "tokenizer": clip_tokenizer, "text_encoder_2": t5,
                       "tokenizer_2": t5_tokenizer, "vae": vae}.items():  # fmt: skip
        part.save_pretrained(target / name)
    return target


def components_folder(setting: str, model_dir: Path, root: Path) -> Path | None:
    """The folder of ``flux_generate``'s ``components_dir`` setting: ``auto``, the pipeline folder that holds
    ``model_dir`` as its ``transformer/`` (``None`` for a bare transformer folder); ``none``, ``None``; else a
    folder under the model ``root``."""
    if setting == "none":
        return None
    if setting == "auto":
        return model_dir.parent if model_dir.name == "transformer" else None
    folder = inside(root, setting)
    if not folder.is_dir():
        raise ModelDirError(f"components_dir {setting!r}: no folder {folder}")
    return folder
