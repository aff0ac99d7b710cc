"""LoRA training nodes: K5 Dataset -> K5 Cache Builder -> K5 Train LoRA -> (K5 LoRA Loader).

K5_DATASET is a `Dataset`: a checked dataset config in musubi-tuner's TOML schema (as a dict with
absolute paths) and the task its caches were built for. K5_LORA is the path (str) of a LoRA file;
the LoRA Loader's optional `lora` input takes it.

The Train node runs `python -m trainer` as a subprocess (nodes.train_runs) with its settings written
to `<ComfyUI output>/k5_train/<output_name>/run.toml`; the LoRA files, training states and samples
land in that folder too (samples are served by ComfyUI's /view for the widget). To use a trained
LoRA in later sessions from the LoRA Loader's list, copy it into models/loras.
"""
from __future__ import annotations

import hashlib
import logging
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path

import tomli_w

from k5core.data import (FRAME_EXTRACTION_MODES, DatasetConfig, DatasetConfigError, DatasetSpec,
                         dataset_config_from_dict, load_dataset_config)
from k5core.files import atomic_write_text
from k5core.media import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS
from k5core.tasks import get_task

from . import comfy, train_runs
from .cache import CACHE, ModelHandle, TextEncoderHandle, VAEHandle

log = logging.getLogger("k5.nodes")

NODE_SOURCE = "K5 Dataset"


# ----------------------------------------------------------------------------- K5_DATASET
@dataclass(frozen=True)
class Dataset:
    """K5_DATASET: a checked dataset config in TOML form ({"datasets": [{...}, ...]}, every setting
    spelled out, absolute paths) and the task whose caches a K5 Cache Builder made for it (None: not
    built in this graph)."""
    config: dict
    source: str
    cached_for: str | None = None

    def load(self) -> DatasetConfig:
        return dataset_config_from_dict(self.config, source=self.source)


def config_to_dict(config: DatasetConfig) -> dict:
    """A parsed dataset config back in TOML form, every default spelled out and every path absolute,
    so the trainer reads exactly what the nodes checked."""
    return {"datasets": [_spec_table(spec) for spec in config.datasets]}


def _spec_table(spec: DatasetSpec) -> dict:
    table = {spec.source_key: str(spec.source), "cache_directory": str(spec.cache_directory),
             "resolution": list(spec.resolution), "caption_extension": spec.caption_extension,
             "batch_size": spec.batch_size, "num_repeats": spec.num_repeats, "enable_bucket": spec.enable_bucket,
             "bucket_no_upscale": spec.bucket_no_upscale}
    if spec.kind == "video":
        table.update(target_frames=list(spec.target_frames), frame_extraction=spec.frame_extraction,
                     frame_stride=spec.frame_stride, frame_sample=spec.frame_sample, max_frames=spec.max_frames)
        if spec.source_fps is not None:
            table["source_fps"] = spec.source_fps
    return table


def _lines(text: str) -> list[str]:
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def _folder(value: str) -> Path:
    return Path(value).expanduser().resolve()


def parse_frames(text: str) -> list[int]:
    """"25" or "1, 25, 45" -> [25] / [1, 25, 45]."""
    parts = [p for p in str(text).replace(",", " ").split() if p]
    try:
        frames = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"target_frames: expected whole numbers like \"25\" or \"1, 25, 45\", got {text!r}") from None
    if not frames or min(frames) < 1:
        raise ValueError(f"target_frames: expected numbers of at least 1, got {text!r}")
    return frames


def source_problems(dataset_config: str = "", video_folders: str = "", image_folders: str = "",
                    target_frames: str = "25") -> list[str]:
    """What is wrong with the dataset node's sources (checked when the prompt is queued)."""
    folders = _lines(video_folders) + _lines(image_folders)
    if dataset_config.strip():
        if folders:
            return ["give either a dataset TOML (dataset_config) or folders (video_folders / image_folders), "
                    "not both"]
        path = _folder(dataset_config.strip())
        return [] if path.is_file() else [f"dataset_config: {path} is not a file"]
    if not folders:
        return ["no data: set video_folders and/or image_folders (one folder a line), or a dataset TOML"]
    problems = [f"{key}: {_folder(f)} is not a folder" for key, text in
                (("video_folders", video_folders), ("image_folders", image_folders))
                for f in _lines(text) if not _folder(f).is_dir()]
    if _lines(video_folders):
        try:
            parse_frames(target_frames)
        except ValueError as e:
            problems.append(str(e))
    return problems


def _fingerprint(paths: list[Path], suffixes: set[str]) -> str:
    """Names, sizes and times of the media and caption files in the given folders (and of the given
    files): changes when the data changes, so ComfyUI re-runs the dataset node and what follows.
    Cache files are left out: building caches beside the media must not look like new data."""
    h = hashlib.sha256()
    for p in paths:
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in suffixes) if p.is_dir() else [p]
        for f in files:
            try:
                st = f.stat()
            except OSError:
                continue
            h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


class K5Dataset:
    DESCRIPTION = ("A LoRA training dataset: folders of video clips and/or images with a caption file each "
                   "(clip.mp4 + clip.txt), or a musubi-tuner dataset TOML. Checked when queued; unreadable files "
                   "are listed and left out.")
    CATEGORY = comfy.CATEGORY
    RETURN_TYPES = ("K5_DATASET", "STRING")
    RETURN_NAMES = ("dataset", "summary")
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "video_folders": ("STRING", {"multiline": True, "default": "", "tooltip":
                              "folders of clips (.mp4, .webm, ...) with captions, one folder a line"}),
            "image_folders": ("STRING", {"multiline": True, "default": "", "tooltip":
                              "folders of images (.png, .jpg, ...) with captions, one folder a line"}),
            "width": ("INT", {"default": 512, "min": 16, "max": 4096, "step": 16, "tooltip":
                      "training resolution (with buckets: the area; without: crop size)"}),
            "height": ("INT", {"default": 512, "min": 16, "max": 4096, "step": 16}),
            "target_frames": ("STRING", {"default": "25", "tooltip":
                              "clip lengths to cut, e.g. \"25\" or \"1, 25, 45\" (rounded down to 4k+1)"}),
            "frame_extraction": (list(FRAME_EXTRACTION_MODES), {"default": "head", "tooltip":
                                 "head: first frames; chunk: back-to-back windows; slide: every frame_stride; "
                                 "uniform: frame_sample windows spread over the clip; full: the whole clip"}),
            "frame_stride": ("INT", {"default": 1, "min": 1, "max": 1000, "tooltip": "slide: step between windows"}),
            "frame_sample": ("INT", {"default": 1, "min": 1, "max": 1000, "tooltip": "uniform: windows per clip"}),
            "max_frames": ("INT", {"default": 129, "min": 1, "max": 10000, "tooltip": "full: frame limit"}),
            "num_repeats": ("INT", {"default": 1, "min": 1, "max": 1000, "tooltip":
                            "items repeat this often per epoch"}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 64}),
            "enable_bucket": ("BOOLEAN", {"default": True, "tooltip":
                              "keep each file's aspect ratio (bucket sizes) instead of center-cropping"}),
            "caption_extension": ("STRING", {"default": ".txt"}),
            "cache_directory": ("STRING", {"default": "", "tooltip":
                                "where caches go; empty = beside the media (musubi-tuner's default)"}),
            "dataset_config": ("STRING", {"default": "", "tooltip":
                               "a musubi-tuner dataset TOML; when set, the folder settings above are not used"}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, video_folders=None, image_folders=None, target_frames=None, dataset_config=None):
        values = (dataset_config, video_folders, image_folders, target_frames)
        if any(v is None for v in values):       # an input fed by a link: checked when the node runs
            return True
        problems = source_problems(*values)
        return True if not problems else "; ".join(problems)

    @classmethod
    def IS_CHANGED(cls, video_folders="", image_folders="", dataset_config="", caption_extension=".txt", **_):
        suffixes = {*IMAGE_EXTENSIONS, *VIDEO_EXTENSIONS, caption_extension.lower()}
        if dataset_config.strip():
            path = _folder(dataset_config.strip())
            try:
                tables = config_to_dict(load_dataset_config(path))["datasets"]
            except DatasetConfigError:
                tables = []
            sources = [Path(t[k]) for t in tables for k in t if k.endswith(("_directory", "_jsonl_file"))
                       and k != "cache_directory"]
            return _fingerprint([path, *sources], suffixes | {".toml", ".jsonl"})
        return _fingerprint([_folder(f) for f in _lines(video_folders) + _lines(image_folders)], suffixes)

    def build(self, video_folders, image_folders, width, height, target_frames, frame_extraction, frame_stride,
              frame_sample, max_frames, num_repeats, batch_size, enable_bucket, caption_extension,
              cache_directory, dataset_config):
        problems = source_problems(dataset_config, video_folders, image_folders, target_frames)
        if problems:
            raise ValueError("K5 Dataset: " + "; ".join(problems))
        if dataset_config.strip():
            config = load_dataset_config(_folder(dataset_config.strip()))
        else:
            common = {"resolution": [width, height], "caption_extension": caption_extension,
                      "batch_size": batch_size, "num_repeats": num_repeats, "enable_bucket": enable_bucket}
            video = {"target_frames": parse_frames(target_frames), "frame_extraction": frame_extraction,
                     "frame_stride": frame_stride, "frame_sample": frame_sample, "max_frames": max_frames}
            tables = [{"video_directory": str(_folder(f)), **video} for f in _lines(video_folders)]
            tables += [{"image_directory": str(_folder(f))} for f in _lines(image_folders)]
            if cache_directory.strip():
                base = _folder(cache_directory.strip())
                for i, table in enumerate(tables):   # one cache folder per dataset: they must not share
                    source = Path(table.get("video_directory") or table["image_directory"])
                    table["cache_directory"] = str(base / f"{i:02d}_{source.name}")
            config = dataset_config_from_dict({"general": common, "datasets": tables}, source=NODE_SOURCE)
        for warning in config.warnings:
            log.warning("K5 Dataset: %s", warning)
        dataset = Dataset(config_to_dict(config), config.source)
        return (dataset, self._summary(dataset.load()))

    @staticmethod
    def _summary(config: DatasetConfig) -> str:
        """Count the items (probing every file); no usable item is an error listing why."""
        from k5core.cache import all_items
        items = all_items(config)
        good = [i for i in items if i.ok]
        failed = [i for i in items if not i.ok]
        if not good:
            reasons = "\n  ".join(i.error for i in failed[:20]) or "no image or video files with those extensions"
            raise ValueError(f"K5 Dataset: no usable items in {config.source}:\n  {reasons}")
        for item in failed:
            log.warning("K5 Dataset: left out %s", item.error)
        videos = sum(i.kind == "video" for i in good)
        text = f"{len(good)} items ({videos} video windows, {len(good) - videos} images)"
        if failed:
            text += f"; {len(failed)} left out:\n" + "\n".join(i.error for i in failed[:20])
        return text


# ----------------------------------------------------------------------------- cache builder
class K5CacheBuilder:
    DESCRIPTION = ("Build the latent and text-encoder caches of a dataset for the task of a model (what the "
                   "trainer reads). skip_existing keeps valid caches, so an interrupted build continues. Frees "
                   "the VAE and text encoders afterwards (training needs the memory).")
    CATEGORY = comfy.CATEGORY
    RETURN_TYPES = ("K5_DATASET", "STRING")
    RETURN_NAMES = ("dataset", "report")
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "dataset": ("K5_DATASET",),
            "model": ("K5_MODEL", {"tooltip": "the model to train: its task decides T2V / I2V caches and the "
                                   "prompt template; nothing is loaded"}),
            "vae": ("K5_VAE",),
            "text_encoder": ("K5_TEXT_ENCODER",),
            "skip_existing": ("BOOLEAN", {"default": True, "tooltip": "keep caches that are valid for this task"}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 64, "tooltip":
                           "clips of one size encoded together by the VAE"}),
        }}

    def build(self, dataset: Dataset, model: ModelHandle, vae: VAEHandle, text_encoder: TextEncoderHandle,
              skip_existing, batch_size):
        from k5core.cache import (all_items, cache_latents, cache_text_encoder_outputs, latent_cache_problem,
                                  text_cache_problem, text_cache_path)
        task = get_task(model.task)
        config = dataset.load()
        i2v = task.mode == "i2v"
        dims = {"text_dim": task.dit.in_text_dim, "pooled_dim": task.dit.in_text_dim2}
        items = [i for i in all_items(config) if i.ok]
        units = list({text_cache_path(i): i for i in items}.values())
        need_latents = not skip_existing or any(latent_cache_problem(i, vae_kind=task.vae, i2v=i2v) for i in items)
        need_text = not skip_existing or any(text_cache_problem(i, content=task.content, **dims) for i in units)
        lines = []
        if need_latents:
            report = cache_latents(config, CACHE.vae(vae), skip_existing=skip_existing, i2v=i2v,
                                   batch_size=batch_size, progress=comfy.progress_bar(max(1, len(items))),
                                   should_stop=comfy.should_stop, task=task)
            CACHE.unload("vae")
            lines.append(self._check("latents", report))
        else:
            lines.append(f"latents: all {len(items)} cached already")
        if need_text:
            report = cache_text_encoder_outputs(config, CACHE.text_encoder(text_encoder), content=task.content,
                                                skip_existing=skip_existing, progress=comfy.progress_bar(
                                                    max(1, len(units))), should_stop=comfy.should_stop, task=task)
            CACHE.unload("text")
            lines.append(self._check("text", report))
        else:
            lines.append(f"text: all {len(units)} cached already")
        text = "\n".join(lines)
        log.info("K5 Cache Builder (%s): %s", task.name, text.replace("\n", "; "))
        return (replace(dataset, cached_for=task.name), text)

    @staticmethod
    def _check(what: str, report) -> str:
        if report.stopped:
            message = (f"K5 Cache Builder: {what} caching cancelled ({report.summary()}); queue again with "
                       f"skip_existing to continue")
            log.info(message)
            raise comfy.interrupted(InterruptedError(message))
        if report.failed and not report.usable:
            reasons = "\n  ".join(f"{path}: {why}" for path, why in report.failed[:20])
            raise RuntimeError(f"K5 Cache Builder: no {what} cache could be built:\n  {reasons}")
        failed = "".join(f"\n  {path}: {why}" for path, why in report.failed[:20])
        return f"{what}: {report.summary()}{failed}"


# ----------------------------------------------------------------------------- train
FP8_SETTINGS = {"none": {}, "e4m3fn": {"fp8_base": True, "fp8_scaled": False},
                "e4m3fn_scaled": {"fp8_base": True, "fp8_scaled": True}}
MIXED_PRECISION = {"auto": None, "bf16": "bf16", "fp16": "fp16", "fp32": "no"}   # K5_MODEL dtype -> trainer
NODE_OWNED = ("task", "dit", "dataset_config", "output_dir", "output_name", "events", "stop_file", "config",
              "resume", "sample_prompts", "vae", "text_encoder_qwen", "text_encoder_clip", "qwen_tokenizer",
              "clip_tokenizer", "comfy_root")


def _trainer_default(name: str):
    from trainer.config import FIELDS
    return FIELDS[name].default


def _choices(name: str) -> list[str]:
    from trainer.config import FIELDS
    return list(FIELDS[name].metadata["choices"])


def parse_extra_settings(text: str, taken: dict) -> dict:
    """The extra_settings box: TOML `key = value` lines with any other trainer setting."""
    try:
        extra = tomllib.loads(text or "")
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"extra_settings: not valid TOML ({e}); write one `key = value` a line, "
                         f"e.g. max_grad_norm = 0.5") from None
    owned = sorted(k for k in extra if k in NODE_OWNED)
    if owned:
        raise ValueError(f"extra_settings: the node sets {', '.join(owned)} itself")
    twice = sorted(k for k in extra if k in taken)
    if twice:
        raise ValueError(f"extra_settings: {', '.join(twice)} already set by the node's inputs (widgets or the "
                         f"K5_MODEL); change it there")
    return extra


def resume_setting(folder: Path, run: str, resume: bool) -> str | None:
    """"latest" to continue the run's newest state, None to start fresh; refuses to overwrite a run's
    LoRA files by accident."""
    loras, states = train_runs.run_files(folder, run)
    if resume:
        if states:
            return "latest"
        if loras:
            raise ValueError(f"resume: run {run!r} in {folder} has LoRA files but no saved training state to "
                             f"continue; pick another output_name to train again")
        log.info("K5 Train LoRA: nothing to resume in %s; starting run %s", folder, run)
        return None
    if loras or states:
        raise ValueError(f"output_name: {folder} already holds run {run!r} ({len(loras)} LoRA file(s), "
                         f"{len(states)} state(s)); turn on resume to continue it, or pick another output_name "
                         f"(or delete the folder) to start over")
    return None


class K5TrainLoRA:
    DESCRIPTION = ("Train a Kandinsky 5 LoRA on a cached dataset: runs the trainer (`python -m trainer`) as a "
                   "separate process with its settings in <output>/k5_train/<output_name>/run.toml, shows loss, "
                   "samples and ETA live in the node, and returns the LoRA file. Stop (button) saves the state "
                   "and returns the LoRA so far; resume continues from the last state.")
    CATEGORY = comfy.CATEGORY
    RETURN_TYPES = ("K5_LORA",)
    RETURN_NAMES = ("lora",)
    FUNCTION = "train"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        d = _trainer_default
        return {"required": {
            "dataset": ("K5_DATASET", {"tooltip": "from K5 Cache Builder (caches for the model's task)"}),
            "model": ("K5_MODEL", {"tooltip": "the DiT to train on, from K5 Model Loader: its file, task, dtype "
                                   "(mixed precision), fp8 and attention, and K5 Memory Settings' block swap"}),
            "output_name": ("STRING", {"default": "k5_lora", "tooltip":
                            "run name: folder <output>/k5_train/<name> and LoRA file <name>.safetensors"}),
            "max_train_steps": ("INT", {"default": d("max_train_steps"), "min": 1, "max": 1_000_000}),
            "max_train_epochs": ("INT", {"default": 0, "min": 0, "max": 100_000, "tooltip":
                                 "0 = train max_train_steps; otherwise this many epochs"}),
            "learning_rate": ("FLOAT", {"default": d("learning_rate"), "min": 1e-7, "max": 1.0, "step": 1e-5,
                                        "round": False}),
            "network_dim": ("INT", {"default": d("network_dim"), "min": 1, "max": 1024, "tooltip": "LoRA rank"}),
            "network_alpha": ("FLOAT", {"default": d("network_alpha"), "min": 0.01, "max": 1024.0, "step": 0.5,
                                        "tooltip": "scale = alpha / rank"}),
            "optimizer_type": (_choices("optimizer_type"), {"default": d("optimizer_type")}),
            "lr_scheduler": (_choices("lr_scheduler"), {"default": d("lr_scheduler")}),
            "lr_warmup_steps": ("FLOAT", {"default": float(d("lr_warmup_steps")), "min": 0.0, "max": 1_000_000.0,
                                          "step": 1.0, "tooltip": "below 1: a fraction of all steps"}),
            "gradient_accumulation_steps": ("INT", {"default": d("gradient_accumulation_steps"), "min": 1,
                                                    "max": 1024}),
            "timestep_sampling": (_choices("timestep_sampling"), {"default": d("timestep_sampling")}),
            "discrete_flow_shift": ("FLOAT", {"default": d("discrete_flow_shift"), "min": 0.01, "max": 100.0,
                                              "step": 0.1}),
            "gradient_checkpointing": ("BOOLEAN", {"default": True, "tooltip":
                                       "recompute activations in backward: much less memory, ~30% slower"}),
            "save_every_n_steps": ("INT", {"default": 0, "min": 0, "max": 1_000_000, "tooltip":
                                   "also save a LoRA every N steps (0 = only at the end)"}),
            "save_state": ("BOOLEAN", {"default": False, "tooltip":
                           "save optimizer state with every LoRA (a stop always saves it)"}),
            "train_seed": ("INT", {"default": 42, "min": 0, "max": 2**63 - 1, "control_after_generate": False}),
            "resume": ("BOOLEAN", {"default": False, "tooltip":
                       "continue this run from its newest saved state (the widget's Resume sets this)"}),
        }, "optional": {
            "sample_prompt": ("STRING", {"multiline": True, "default": "", "tooltip":
                              "prompts to sample while training, one a line, options --w --h --f --s --d "
                              "(--i image.png for I2V)"}),
            "sample_every_n_steps": ("INT", {"default": 0, "min": 0, "max": 1_000_000, "tooltip":
                                     "0 = no samples"}),
            "vae": ("K5_VAE", {"tooltip": "for samples"}),
            "text_encoder": ("K5_TEXT_ENCODER", {"tooltip": "for sample prompts"}),
            "extra_settings": ("STRING", {"multiline": True, "default": "", "tooltip":
                               "any other trainer setting as TOML, one `key = value` a line "
                               "(e.g. max_grad_norm = 0.5, network_args = [\"exclude_patterns=cross\"])"}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    @classmethod
    def VALIDATE_INPUTS(cls, output_name=None):
        if output_name is None:                  # fed by a link: checked when the node runs
            return True
        try:
            train_runs.run_dir(output_name)
        except train_runs.RunError as e:
            return str(e)
        return True

    @classmethod
    def IS_CHANGED(cls, output_name="k5_lora", resume=False, **_):
        """Re-run a resume whenever the run has a newer state (after a stop); otherwise ComfyUI's
        usual caching applies (a new sampler seed downstream does not retrain)."""
        if not resume:
            return ""
        try:
            folder = train_runs.run_dir(output_name)
            loras, states = train_runs.run_files(folder, output_name)
        except (train_runs.RunError, OSError):
            return ""
        return f"{states[-1][1].name if states else ''}|{[p.name for p in loras]}"

    # ------------------------------------------------------------------------------------------
    def train(self, dataset: Dataset, model: ModelHandle, output_name, max_train_steps, max_train_epochs,
              learning_rate, network_dim, network_alpha, optimizer_type, lr_scheduler, lr_warmup_steps,
              gradient_accumulation_steps, timestep_sampling, discrete_flow_shift, gradient_checkpointing,
              save_every_n_steps, save_state, train_seed, resume, sample_prompt="", sample_every_n_steps=0,
              vae: VAEHandle | None = None, text_encoder: TextEncoderHandle | None = None, extra_settings="",
              unique_id=None):
        run = train_runs.check_run_name(output_name)
        folder = train_runs.run_dir(run)
        settings = {
            "task": model.task, "dit": model.path, "dataset_config": str(folder / "dataset.toml"),
            "output_dir": str(folder), "output_name": run,
            **self._model_settings(model),
            "network_dim": network_dim, "network_alpha": float(network_alpha), "optimizer_type": optimizer_type,
            "learning_rate": float(learning_rate), "lr_scheduler": lr_scheduler,
            "lr_warmup_steps": float(lr_warmup_steps), "gradient_accumulation_steps": gradient_accumulation_steps,
            "max_train_steps": max_train_steps, "max_train_epochs": max_train_epochs or None,
            "seed": train_seed, "timestep_sampling": timestep_sampling,
            "discrete_flow_shift": float(discrete_flow_shift), "gradient_checkpointing": bool(gradient_checkpointing),
            "save_every_n_steps": save_every_n_steps or None, "save_state": bool(save_state),
        }
        settings.update(parse_extra_settings(extra_settings, settings))
        prompts = _lines(sample_prompt) if sample_every_n_steps else []
        if prompts:
            settings.update(self._sample_settings(folder, sample_every_n_steps, vae, text_encoder))
        self._check_caches(dataset, model)
        final = folder / f"{run}.safetensors"
        if resume and final.is_file() and not train_runs.run_files(folder, run)[1]:
            log.info("K5 Train LoRA: run %s already finished (no state to continue); returning %s", run, final)
            return {"ui": {"text": [str(final)]}, "result": (str(final),)}
        settings["resume"] = resume_setting(folder, run, resume)

        config_path = self._write_run(folder, dataset, settings, prompts)
        device = comfy.torch_device()
        if device.type == "cuda":            # the trainer needs the GPU memory: free ComfyUI's and ours
            CACHE.clear()
            comfy.free_comfy_models()
        progress = _StepProgress()

        def relay(payload: dict) -> None:
            comfy.send_event(train_runs.EVENT, payload)
            progress(payload)
        job = train_runs.REGISTRY.begin(run, "" if unique_id is None else str(unique_id), folder, relay)
        outcome = train_runs.run_trainer(config_path, job, cpu=device.type == "cpu",
                                         should_stop=lambda: comfy.should_stop() or progress.interrupt is not None)
        return self._result(outcome, run, progress.interrupt)

    @staticmethod
    def _model_settings(model: ModelHandle) -> dict:
        """The trainer settings a K5_MODEL carries (left out where they are the trainer's default)."""
        if model.loras:
            raise ValueError("model: the K5_MODEL carries LoRAs; train on the base model (connect K5 Model "
                             "Loader directly; to start from a LoRA, set network_weights in extra_settings)")
        if model.dtype not in MIXED_PRECISION or model.fp8 not in FP8_SETTINGS:
            raise ValueError(f"model: dtype {model.dtype!r} / fp8 {model.fp8!r} cannot be trained")
        out = {"mixed_precision": MIXED_PRECISION[model.dtype], **FP8_SETTINGS[model.fp8]}
        if model.attention != _trainer_default("attention"):
            out["attention"] = model.attention
        if model.blocks_to_swap:
            out["blocks_to_swap"] = model.blocks_to_swap
        if model.activation_offload:
            out["gradient_checkpointing_cpu_offload"] = True
        return {k: v for k, v in out.items() if v is not None}

    @staticmethod
    def _sample_settings(folder: Path, every: int, vae: VAEHandle | None,
                         text_encoder: TextEncoderHandle | None) -> dict:
        missing = [name for name, value in (("vae", vae), ("text_encoder", text_encoder)) if value is None]
        if missing:
            raise ValueError(f"sample_prompt: samples need the {' and '.join(missing)} input(s) connected "
                             f"(or set sample_every_n_steps to 0)")
        root = comfy.comfy_root()
        return {"sample_prompts": str(folder / "prompts.txt"), "sample_every_n_steps": every, "vae": vae.path,
                "text_encoder_qwen": text_encoder.qwen, "text_encoder_clip": text_encoder.clip,
                "qwen_tokenizer": text_encoder.qwen_tokenizer or None,
                "clip_tokenizer": text_encoder.clip_tokenizer or None,
                "comfy_root": str(root) if root else None}

    @staticmethod
    def _check_caches(dataset: Dataset, model: ModelHandle) -> None:
        """Every item has caches that fit the model's task, before a process is started."""
        from k5core.cache import CacheError, list_cached_items
        try:
            list_cached_items(dataset.load(), task=model.task)
        except CacheError as e:
            hint = "" if dataset.cached_for == model.task else \
                f"\nConnect a K5 Cache Builder with this model (task {model.task}) before K5 Train LoRA."
            raise ValueError(f"dataset: {e}{hint}") from None

    @staticmethod
    def _write_run(folder: Path, dataset: Dataset, settings: dict, prompts: list[str]) -> Path:
        """dataset.toml, prompts.txt and run.toml in the run folder, checked by the trainer's own
        settings reader."""
        from trainer.config import ConfigError, load_config
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / "dataset.toml", tomli_w.dumps(dataset.config))
        if prompts:
            atomic_write_text(folder / "prompts.txt", "\n".join(prompts) + "\n")
        settings = {k: v for k, v in settings.items() if v is not None}          # TOML has no null
        path = atomic_write_text(folder / "run.toml", tomli_w.dumps(settings))
        try:
            load_config(["--config", str(path)])
        except ConfigError as e:
            raise ValueError(f"K5 Train LoRA: {e}") from None
        return path

    @staticmethod
    def _result(outcome: train_runs.Outcome, run: str, interrupt: BaseException | None):
        """The LoRA path of a finished (or Stop-button stopped) run; ComfyUI's interrupt after a Cancel;
        RuntimeError with the trainer's message after a failure."""
        cancelled = outcome.stop_reason == train_runs.INTERRUPT
        if outcome.finished and not (cancelled and outcome.done.get("stopped")):
            lora = str(outcome.done["lora_path"])
            return {"ui": {"text": [lora]}, "result": (lora,)}
        if outcome.error is None and outcome.stop_reason is not None:
            step = outcome.done.get("step") if outcome.done else None
            error = InterruptedError(f"K5 Train LoRA: run {run} stopped at step {step}; state saved, resume to "
                                     f"continue" if outcome.finished else
                                     f"K5 Train LoRA: run {run} stopped before training began; nothing saved")
            if not cancelled:
                raise error
            log.info(str(error))
            raise interrupt if interrupt is not None else comfy.interrupted(error)
        raise RuntimeError(f"K5 Train LoRA: {outcome.failure()}")


class _StepProgress:
    """ComfyUI's progress bar from the trainer's start and step events. ComfyUI's progress hook raises
    its interrupt exception when the user pressed Cancel (and clears the flag): it is kept in
    `interrupt` so the node can stop the trainer gracefully and raise it when the trainer has exited."""

    def __init__(self):
        self.bar = None
        self.interrupt: BaseException | None = None

    def __call__(self, event: dict) -> None:
        total = event.get("total")
        if self.interrupt is not None or event.get("event") not in ("start", "step") \
                or not isinstance(total, int) or total <= 0:
            return
        try:
            if self.bar is None:
                self.bar = comfy.progress_bar(total)
            self.bar(int(event.get("step") or 0), total, None)
        except Exception as e:
            self.interrupt = e


NODE_CLASS_MAPPINGS = {"K5Dataset": K5Dataset, "K5CacheBuilder": K5CacheBuilder, "K5TrainLoRA": K5TrainLoRA}
NODE_DISPLAY_NAME_MAPPINGS = {"K5Dataset": "K5 Dataset", "K5CacheBuilder": "K5 Cache Builder",
                              "K5TrainLoRA": "K5 Train LoRA"}
