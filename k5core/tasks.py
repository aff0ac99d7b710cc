"""The task table: every Kandinsky 5 task of the official configs, with its DiT and sampling settings.

Numbers come from kandinskylab/kandinsky-5 `configs/*.yaml` and the pipelines' defaults
(see shared/research/k5-facts.md). The `k5-tiny-*` tasks are tiny random models for the demo
and the tests; they are never matched against a real checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

DEFAULT_NEGATIVE_PROMPT = (
    "Static, 2D cartoon, cartoon, 2d animation, paintings, images, worst quality, low quality, "
    "ugly, deformed, walking backwards"
)

BUCKETS_512 = ((512, 512), (512, 768), (768, 512))  # (height, width)
BUCKETS_1024 = ((1024, 1024), (640, 1408), (1408, 640), (768, 1280), (1280, 768), (896, 1152),
                (1152, 896))
BUCKETS_TINY = ((64, 64), (64, 96), (96, 64))


@dataclass(frozen=True)
class DiTParams:
    """Constructor arguments of the DiT, named as the official `dit_params`."""
    model_dim: int
    ff_dim: int
    num_text_blocks: int
    num_visual_blocks: int
    axes_dims: tuple[int, int, int]
    time_dim: int
    in_visual_dim: int = 16
    out_visual_dim: int = 16
    in_text_dim: int = 3584      # Qwen2.5-VL-7B hidden size
    in_text_dim2: int = 768      # CLIP-L pooled size
    patch_size: tuple[int, int, int] = (1, 2, 2)
    visual_cond: bool = False
    instruct_type: str | None = None  # "channel" for I2I

    @property
    def head_dim(self) -> int:
        return sum(self.axes_dims)

    @property
    def num_heads(self) -> int:
        return self.model_dim // self.head_dim

    @property
    def visual_embed_dim(self) -> int:
        """Input channels: [noisy latent, condition latent, mask] when conditioned, else the latent."""
        cond = self.visual_cond or self.instruct_type == "channel"
        return 2 * self.in_visual_dim + 1 if cond else self.in_visual_dim


@dataclass(frozen=True)
class Attention:
    """Self-attention of the visual blocks: dense ("full") or NABLA block-sparse ("nabla")."""
    type: str = "full"
    P: float = 0.9           # top-CDF mass kept per query block
    wT: int = 11             # STA window in blocks along time, height, width
    wH: int = 3
    wW: int = 3
    add_sta: bool = True
    method: str = "topcdf"


NABLA = Attention("nabla")


@dataclass(frozen=True)
class Task:
    """One generation task: which DiT, how to sample it, what sizes it was trained on."""
    name: str
    mode: str                  # "t2v" | "i2v" | "t2i" | "i2i"
    dit: DiTParams
    steps: int = 50
    guidance: float = 5.0
    shift: float = 10.0        # scheduler_scale: the config's metrics value, else the pipeline default
    resolution: int = 512
    buckets: tuple[tuple[int, int], ...] = BUCKETS_512
    scale_factor: tuple[float, float, float] = (1.0, 2.0, 2.0)  # RoPE positions divided by this
    attention: Attention = field(default_factory=Attention)
    frames: int = 121          # default pixel frames (5 s at 24 fps); 1 for images
    fps: int = 24
    vae: str = "hunyuan"       # "hunyuan" 3D VAE or "flux" 2D VAE
    text_max_length: int = 256  # Qwen tokens kept after the template crop
    checkpoint: str = ""       # official file name
    variant: str = "sft"       # sft | pretrain | nocfg | distil

    @property
    def content(self) -> str:
        """Qwen prompt template type of this task."""
        return {"t2v": "video", "i2v": "image2video", "t2i": "image", "i2i": "image_edit"}[self.mode]

    @property
    def is_video(self) -> bool:
        return self.mode in ("t2v", "i2v")

    @property
    def needs_image(self) -> bool:
        return self.mode in ("i2v", "i2i")

    @property
    def default_size(self) -> tuple[int, int]:
        """(height, width) of the first bucket."""
        return self.buckets[0]


LITE = DiTParams(model_dim=1792, ff_dim=7168, num_text_blocks=2, num_visual_blocks=32,
                 axes_dims=(16, 24, 24), time_dim=512, visual_cond=True)
LITE_IMAGE = DiTParams(model_dim=2560, ff_dim=10240, num_text_blocks=2, num_visual_blocks=50,
                       axes_dims=(32, 48, 48), time_dim=512)
PRO = DiTParams(model_dim=4096, ff_dim=16384, num_text_blocks=4, num_visual_blocks=60,
                axes_dims=(32, 48, 48), time_dim=1024, visual_cond=True)
TINY = DiTParams(model_dim=64, ff_dim=128, num_text_blocks=1, num_visual_blocks=2,
                 axes_dims=(8, 4, 4), time_dim=32, in_text_dim=32, in_text_dim2=16, visual_cond=True)


def _lite_t2v(seconds: int, variant: str, checkpoint: str) -> Task:
    suffix = "" if variant == "sft" else f"-{variant}"
    distil = variant == "distil"
    return Task(
        name=f"k5-lite-t2v-{seconds}s-sd{suffix}", mode="t2v", dit=LITE,
        steps=16 if distil else 50,
        shift=5.0 if (distil and seconds == 5) else 10.0,  # configs' metrics.scheduler_scale
        guidance=1.0 if variant in ("nocfg", "distil") else 5.0,
        attention=NABLA if seconds == 10 else Attention(),
        frames=seconds * 24 + 1, checkpoint=checkpoint, variant=variant)


def _pro(mode: str, seconds: int, hd: bool, checkpoint: str) -> Task:
    p = {(5, False): None, (10, False): 0.9, (5, True): 0.8, (10, True): 0.7}[(seconds, hd)]
    return Task(
        name=f"k5-pro-{mode}-{seconds}s-{'hd' if hd else 'sd'}", mode=mode, dit=PRO,
        resolution=1024 if hd else 512, buckets=BUCKETS_1024 if hd else BUCKETS_512,
        scale_factor=(1.0, 3.16, 3.16) if hd else (1.0, 2.0, 2.0),
        attention=replace(NABLA, P=p) if p else Attention(),
        shift=5.0 if (mode == "i2v" and hd) else 10.0,  # configs' metrics.scheduler_scale
        frames=seconds * 24 + 1, checkpoint=checkpoint)


def _image(mode: str, checkpoint: str) -> Task:
    dit = LITE_IMAGE if mode == "t2i" else replace(LITE_IMAGE, instruct_type="channel")
    return Task(name=f"k5-lite-{mode}-hd", mode=mode, dit=dit, guidance=3.5, shift=3.0,
                resolution=1024, buckets=BUCKETS_1024, scale_factor=(1.0, 1.0, 1.0), frames=1,
                vae="flux", text_max_length=512, checkpoint=checkpoint)


def _tiny(mode: str) -> Task:
    image = mode in ("t2i", "i2i")
    dit = TINY if mode != "t2i" else replace(TINY, visual_cond=False)
    dit = replace(dit, visual_cond=False, instruct_type="channel") if mode == "i2i" else dit
    return Task(name=f"k5-tiny-{mode}", mode=mode, dit=dit, steps=4, resolution=64,
                buckets=BUCKETS_TINY, frames=1 if image else 9, vae="flux" if image else "hunyuan",
                shift=3.0 if image else 10.0, guidance=3.5 if image else 5.0,
                scale_factor=(1.0, 1.0, 1.0) if image else (1.0, 2.0, 2.0), variant="tiny")


_ALL = [
    _lite_t2v(5, "sft", "kandinsky5lite_t2v_sft_5s.safetensors"),
    _lite_t2v(5, "pretrain", "kandinsky5lite_t2v_pretrain_5s.safetensors"),
    _lite_t2v(5, "nocfg", "kandinsky5lite_t2v_nocfg_5s.safetensors"),
    _lite_t2v(5, "distil", "kandinsky5lite_t2v_distilled16steps_5s.safetensors"),
    _lite_t2v(10, "sft", "kandinsky5lite_t2v_sft_10s.safetensors"),
    _lite_t2v(10, "pretrain", "kandinsky5lite_t2v_pretrain_10s.safetensors"),
    _lite_t2v(10, "nocfg", "kandinsky5lite_t2v_nocfg_10s.safetensors"),
    _lite_t2v(10, "distil", "kandinsky5lite_t2v_distilled16steps_10s.safetensors"),
    Task(name="k5-lite-i2v-5s-sd", mode="i2v", dit=LITE,
         checkpoint="kandinsky5lite_i2v_5s.safetensors"),
    _image("t2i", "kandinsky5lite_t2i.safetensors"),
    _image("i2i", "kandinsky5lite_i2i.safetensors"),
    _pro("t2v", 5, False, "kandinsky5pro_t2v_sft_5s.safetensors"),
    _pro("t2v", 5, True, "kandinsky5pro_t2v_sft_5s.safetensors"),
    _pro("t2v", 10, False, "kandinsky5pro_t2v_sft_10s.safetensors"),
    _pro("t2v", 10, True, "kandinsky5pro_t2v_sft_10s.safetensors"),
    _pro("i2v", 5, False, "kandinsky5pro_i2v_sft_5s.safetensors"),
    _pro("i2v", 5, True, "kandinsky5pro_i2v_sft_5s.safetensors"),
    _tiny("t2v"), _tiny("i2v"), _tiny("t2i"), _tiny("i2i"),
]
TASKS: dict[str, Task] = {t.name: t for t in _ALL}


def get_task(name: str) -> Task:
    """Look a task up by name, with an error listing the known names."""
    try:
        return TASKS[name]
    except KeyError:
        known = ", ".join(n for n in TASKS if not n.startswith("k5-tiny"))
        raise KeyError(f"unknown task {name!r}; known tasks: {known}") from None


def latent_frames(pixel_frames: int) -> int:
    """Latent frames of the 4x temporal VAE: 4k+1 pixel frames -> k+1 latent frames."""
    return (pixel_frames - 1) // 4 + 1
