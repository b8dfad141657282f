"""``flux_generate``'s IO contract: a whole generation per request, its prompt batch the batch of images. A prompt is
UTF-8 strings (where the server has text encoders) or its embeddings; the answer is ``FluxPipeline``'s packed latents
and, where the server has a VAE, each image as the base64 text of its PNG file. Torch-free: the server, the client
and the guard read it."""

from __future__ import annotations

GENERATE_MODEL = "flux_generate"
GENERATE_STREAM_MODEL = "flux_generate_stream"  # the same, decoupled: a progress response after each step

# (name, Triton dtype, dims, default; ...: optional without a default)
GENERATE_INPUTS = (
    ("prompt", "BYTES", (-1,), ...),
    ("negative_prompt", "BYTES", (-1,), ...),  # true CFG only
    ("prompt_embeds", "FP32", (-1, -1, -1), ...),
    ("pooled_prompt_embeds", "FP32", (-1, -1), ...),
    ("negative_prompt_embeds", "FP32", (-1, -1, -1), ...),
    ("negative_pooled_prompt_embeds", "FP32", (-1, -1), ...),
    ("height", "INT32", (1,), 1024),
    ("width", "INT32", (1,), 1024),
    ("num_inference_steps", "INT32", (1,), 28),
    ("guidance_scale", "FP32", (1,), 3.5),
    ("true_cfg_scale", "FP32", (1,), 1.0),
    ("seed", "INT64", (1,), 0),
)
GENERATE_INPUT_TYPES = {name: dtype for name, dtype, _, _ in GENERATE_INPUTS}
STRING_INPUTS = tuple(name for name, dtype, _, _ in GENERATE_INPUTS if dtype == "BYTES")
LATENTS, IMAGES = "latents", "images"  # FP32 [B, N, C]; BYTES [B]
GENERATE_OUTPUTS = (LATENTS, IMAGES)
PROGRESS = "progress"  # INT32 [2]: steps done, steps (flux_generate_stream's responses before the last)

# The text encoders and the VAE, each one served model that every flux_generate instance calls in process:
# flux_text_encoder: prompt (BYTES [B]) and max_sequence_length (INT32 [1]) -> prompt_embeds (FP32 [B, S, D]) and
# pooled_prompt_embeds (FP32 [B, P]); flux_vae: latents (FP32 [B, N, C]), height and width (INT32 [1]) -> images.
TEXT_ENCODER_MODEL, VAE_MODEL = "flux_text_encoder", "flux_vae"
MAX_SEQUENCE_LENGTH = "max_sequence_length"
ENCODED = ("prompt_embeds", "pooled_prompt_embeds")  # flux_text_encoder's outputs, T5's and CLIP's


def utf8_strings(name: str, items: list[bytes]) -> list[str]:
    """A BYTES input as strings: one or more, each UTF-8; ``InputError`` naming ``name`` otherwise."""
    from flux_triton.contract import InputError

    try:
        strings = [item.decode("utf-8") for item in items]
    except (UnicodeDecodeError, AttributeError):
        raise InputError(f"{name}: expected UTF-8 strings") from None
    if not strings:
        raise InputError(f"{name}: expected one or more strings, got none")
    return strings
