"""Text Encode node: prompt and negative prompt -> K5_EMBEDS, cached by text so a re-queue with the
same prompts never loads the text encoders."""
from __future__ import annotations

from dataclasses import dataclass

from k5core.tasks import DEFAULT_NEGATIVE_PROMPT
from k5core.text import CONTENT_TYPES, TextEmbeds

from . import comfy
from .cache import CACHE, EMBEDS, TextEncoderHandle

AFTER = ("offload", "keep", "unload")


@dataclass
class Embeds:
    """K5_EMBEDS: the prompt's and the negative prompt's embeddings (CPU) and the template used."""
    positive: TextEmbeds
    negative: TextEmbeds
    content: str
    prompt: str
    negative_prompt: str


class K5TextEncode:
    DESCRIPTION = ("Encode a prompt and a negative prompt with Qwen2.5-VL + CLIP-L using the official "
                   "Kandinsky 5 template of the content type (video for T2V, image2video for I2V, image for "
                   "T2I, image_edit for I2I). Results are cached by text: re-queues skip the encoders.")
    CATEGORY = comfy.CATEGORY
    RETURN_TYPES = ("K5_EMBEDS",)
    RETURN_NAMES = ("embeds",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "text_encoder": ("K5_TEXT_ENCODER",),
            "prompt": ("STRING", {"multiline": True, "default": "", "dynamicPrompts": False}),
            "negative_prompt": ("STRING", {"multiline": True, "default": DEFAULT_NEGATIVE_PROMPT,
                                           "dynamicPrompts": False, "tooltip":
                                           "used when guidance != 1; the official video default is preset, "
                                           "image models use an empty one"}),
            "content": (list(CONTENT_TYPES), {"default": "video", "tooltip":
                        "prompt template: video (T2V), image2video (I2V), image (T2I), image_edit (I2I)"}),
            "after": (list(AFTER), {"default": "offload", "tooltip":
                      "what happens to the encoders afterwards: offload to CPU memory, keep on the GPU, or "
                      "unload (frees the most; a new prompt loads them again)"}),
        }, "optional": {
            "image": ("IMAGE", {"tooltip": "image_edit (I2I): the source image, read by Qwen2.5-VL together with "
                                "the prompts as the official pipeline does (then an empty negative prompt works). "
                                "Give it at the output size, as the sampler's edit latent. Ignored by other "
                                "content types."}),
        }}

    def encode(self, text_encoder: TextEncoderHandle, prompt, negative_prompt, content, after, image=None):
        if content not in CONTENT_TYPES:
            raise ValueError(f"content: expected one of {', '.join(CONTENT_TYPES)}, got {content!r}")
        if after not in AFTER:
            raise ValueError(f"after: expected one of {', '.join(AFTER)}, got {after!r}")
        source = image[0] if image is not None and content == "image_edit" else None  # (H, W, 3) float [0, 1]
        key = (text_encoder, prompt, negative_prompt, content, _fingerprint(source))
        embeds = EMBEDS.get(key)
        if embeds is None:
            encoder = CACHE.text_encoder(text_encoder)
            both = encoder.encode([prompt, negative_prompt], content, images=source)
            embeds = Embeds(both.select(0).to("cpu"), both.select(1).to("cpu"), content, prompt, negative_prompt)
            EMBEDS.put(key, embeds)
        if after == "unload":
            CACHE.unload("text", text_encoder)
        elif after == "offload":
            CACHE.offload_text_encoder(text_encoder)
        return (embeds,)


def _fingerprint(image) -> str | None:
    """A digest of the source image's pixels, so the embeddings cache tells images apart."""
    if image is None:
        return None
    import hashlib

    data = image.detach().cpu().contiguous()
    return hashlib.sha1(str(tuple(data.shape)).encode() + data.numpy().tobytes()).hexdigest()


NODE_CLASS_MAPPINGS = {"K5TextEncode": K5TextEncode}
NODE_DISPLAY_NAME_MAPPINGS = {"K5TextEncode": "K5 Text Encode"}
