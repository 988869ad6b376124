"""What each Ray Train worker runs: ControlNet training as in the paper and diffusers'
`examples/controlnet/train_controlnet.py`.

The diffusion model is locked: UNet, VAE and text encoder are frozen (no gradients, not in the
optimizer). The ControlNet is a trainable copy of the UNet's encoder (`ControlNetModel.from_unet`)
joined by zero-initialised convolutions, so at step 0 it adds exactly nothing to the UNet. Each step
noises the target image's latents at a random timestep and trains the ControlNet (through the
locked UNet) to predict the noise. `unlock_unet_decoder` also trains the UNet's up blocks (the
original `sd_locked=False`). Workers run under DDP (gloo on CPU, NCCL on GPU); every
`checkpoint_every` steps rank 0 reports a checkpoint (ControlNet, optimizer, step) and writes
validation images; a re-run of the same job resumes from the last checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import tempfile
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from typing import Any

from pipeline.models import no_random_weights
from pipeline.train.config import TrainConfig


def load_models(cfg: TrainConfig, device):
    """The locked diffusion model and the ControlNet to train, as diffusers loads them."""
    import torch
    from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    common = {"revision": cfg.revision}
    scheduler = DDPMScheduler.from_pretrained(cfg.base_model, subfolder="scheduler", **common)
    text_encoder = CLIPTextModel.from_pretrained(cfg.base_model, subfolder="text_encoder", **common)
    with no_random_weights():  # a checkpoint that lacks weights: one line, not a model trained from noise
        vae = AutoencoderKL.from_pretrained(cfg.base_model, subfolder="vae", **common)
        unet = UNet2DConditionModel.from_pretrained(cfg.base_model, subfolder="unet", **common)
        controlnet = ControlNetModel.from_pretrained(cfg.controlnet) if cfg.controlnet else ControlNetModel.from_unet(unet)
    for model in (text_encoder, vae, unet):
        model.requires_grad_(False)
        model.eval()
    if cfg.unlock_unet_decoder:
        unet.up_blocks.requires_grad_(True)
        unet.conv_norm_out.requires_grad_(True)
        unet.conv_out.requires_grad_(True)
    controlnet.train()
    for model in (text_encoder, vae, unet, controlnet):
        model.to(device)
    return scheduler, text_encoder, vae, unet, controlnet, torch


def frozen_digest(*models) -> str:
    """sha256 of every parameter that must not change (to check that training left them alone)."""
    digest = hashlib.sha256()
    for model in models:
        for name, param in model.named_parameters():
            if not param.requires_grad:
                digest.update(name.encode())
                digest.update(param.detach().cpu().float().numpy().tobytes())
    return digest.hexdigest()


def diffusion_loss(batch: dict, scheduler, text_encoder, vae, unet, controlnet, generator, dtype=None):
    """The training objective for one batch (uint8 images in [0, 255], token ids)."""
    import torch
    import torch.nn.functional as F
    from diffusers.utils.torch_utils import randn_tensor

    device = batch["control"].device
    control = batch["control"].permute(0, 3, 1, 2).float() / 255.0  # ControlNet's conditioning in [0, 1]
    if "latent_mean" in batch:  # encoded in Ray Data (data.precompute): draw the sample as latent_dist.sample does
        mean, std = batch["latent_mean"], batch["latent_std"]
        latents = (mean + std * randn_tensor(mean.shape, generator=generator, device=device, dtype=mean.dtype))
        latents, text = latents * vae.config.scaling_factor, batch["text"]
    else:
        pixels = batch["pixels"].permute(0, 3, 1, 2).float() / 127.5 - 1.0  # the VAE's [-1, 1]
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample(generator=generator) * vae.config.scaling_factor
            text = text_encoder(batch["input_ids"], return_dict=False)[0]
    noise = torch.randn(latents.shape, generator=generator, device="cpu").to(device)
    steps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator).to(device)
    noisy = scheduler.add_noise(latents, noise, steps)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        down, mid = controlnet(noisy, steps, encoder_hidden_states=text, controlnet_cond=control, return_dict=False)
        prediction = unet(noisy, steps, encoder_hidden_states=text, down_block_additional_residuals=down,
                          mid_block_additional_residual=mid, return_dict=False)[0]
    target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, steps)
    return F.mse_loss(prediction.float(), target.float())


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train's `train_loop_per_worker`."""
    import ray.train
    import ray.train.torch
    import torch

    cfg = TrainConfig.model_validate(config["cfg"])
    steps = config.get("steps")  # the driver's console.Steps actor
    context = ray.train.get_context()
    rank = context.get_world_rank()
    device = ray.train.torch.get_device()
    shard = ray.train.get_dataset_shard("train")

    def epoch_batches() -> Iterable:
        return shard.iter_torch_batches(batch_size=cfg.batch_size, device=device, drop_last=False)

    epoch = first_batch_fetched_meanwhile(epoch_batches())
    torch.manual_seed(cfg.seed)  # the same ControlNet on every worker before DDP syncs it
    scheduler, text_encoder, vae, unet, controlnet, _ = load_models(cfg, device)
    frozen_at_start = frozen_digest(text_encoder, vae, unet)
    trainable = [p for p in controlnet.parameters()] + ([p for p in unet.parameters() if p.requires_grad]
                                                         if cfg.unlock_unet_decoder else [])
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate)
    step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:  # a re-run of the same job: continue where the last checkpoint was taken
        with checkpoint.as_directory() as directory:
            state = torch.load(os.path.join(directory, "state.pt"), map_location=device, weights_only=True)
        controlnet.load_state_dict(state["controlnet"])
        if cfg.unlock_unet_decoder:
            unet.load_state_dict(state["unet"])
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
    first_step = step
    ddp = ray.train.torch.prepare_model(controlnet)  # DDP across workers (gradients averaged)
    unet_train = ray.train.torch.prepare_model(unet) if cfg.unlock_unet_decoder else unet
    dtype = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.mixed_precision]
    scaler = torch.amp.GradScaler(enabled=cfg.mixed_precision == "fp16")
    micro = 0
    while step < cfg.steps:
        batches = 0
        for batch in epoch:
            batches += 1
            generator = torch.Generator().manual_seed(hash_seed(cfg.seed, rank, step, micro))
            loss = diffusion_loss(batch, scheduler, text_encoder, vae, unet_train, ddp, generator, dtype)
            scaler.scale(loss / cfg.gradient_accumulation).backward()
            micro += 1
            if micro % cfg.gradient_accumulation:
                continue
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            metrics = {"step": step, "loss": float(loss.detach()), "rank": rank, "resumed_from": first_step,
                       "steps_this_run": step - first_step}
            checkpoint_step = step % cfg.checkpoint_every == 0 or step == cfg.steps
            if steps is not None and rank == 0:  # the driver's progress line; a checkpoint's step is there first
                done = steps.done.remote(step, metrics["loss"])
                if checkpoint_step:
                    ray.get(done)
            # reported with the checkpoints only: a report waits for Ray Train's controller to poll the workers
            # (pipeline.train.POLL_INTERVAL), many times a step of a small model
            if checkpoint_step:
                report_checkpoint(cfg, rank, step, metrics, controlnet, unet, optimizer, text_encoder, vae,
                                  frozen_at_start)
            if step >= cfg.steps:
                break
        if not batches:
            raise RuntimeError(f"training worker {rank} got no training pairs (fewer pairs than workers?)")
        epoch = epoch_batches()


_NO_BATCH = object()  # what the fetch gives for an epoch without batches


def first_batch_fetched_meanwhile(batches: Iterable) -> Iterator:
    """`batches` with its first item fetched on a thread from now on: the first batch of an epoch starts Ray Data's
    stream (its split coordinator, the read and prepare tasks; ~7 s of a tiny run on two cores), which then runs
    while the worker loads its models instead of after. An error of the fetch is raised where the batch is used."""
    iterator = iter(batches)
    first: Future = Future()

    def fetch() -> None:  # a daemon thread, not an executor's: a worker that fails to load exits without waiting
        try:
            first.set_result(next(iterator, _NO_BATCH))
        except BaseException as e:  # noqa: BLE001 - raised in the training thread, by result()
            first.set_exception(e)

    threading.Thread(target=fetch, name="first-batch", daemon=True).start()

    def epoch() -> Iterator:
        batch = first.result()
        if batch is not _NO_BATCH:
            yield batch
            yield from iterator

    return epoch()


def hash_seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "big") >> 1


def report_checkpoint(cfg: TrainConfig, rank: int, step: int, metrics: dict, controlnet, unet, optimizer,
                      text_encoder, vae, frozen_at_start: str) -> None:
    """Rank 0 reports a checkpoint (and writes validation images); every rank reports its metrics."""
    import ray.train
    import torch

    if step == cfg.steps:  # hashing every frozen weight is slow on real models: at the end only
        metrics = {**metrics, "frozen_unchanged": frozen_digest(text_encoder, vae, unet) == frozen_at_start}
    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as directory:
        state = {"controlnet": controlnet.state_dict(), "optimizer": optimizer.state_dict(), "step": step}
        if cfg.unlock_unet_decoder:
            state["unet"] = unet.state_dict()
        torch.save(state, os.path.join(directory, "state.pt"))
        with open(os.path.join(directory, "metrics.json"), "w") as f:
            json.dump(metrics, f)
        if step == cfg.steps:  # the trained ControlNet as generation jobs load it, for OUTPUT/controlnet/
            controlnet.save_pretrained(os.path.join(directory, "controlnet"), safe_serialization=True)
        if cfg.validation.prompts:
            write_validation(cfg, step, controlnet, unet, text_encoder, vae)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


def write_validation(cfg: TrainConfig, step: int, controlnet, unet, text_encoder, vae) -> None:
    """Images generated from the validation control images with the ControlNet as it is now."""
    import torch
    from diffusers import StableDiffusionControlNetPipeline, UniPCMultistepScheduler
    from PIL import Image
    from transformers import CLIPTokenizer

    from pipeline.io.output import RunOutput

    tokenizer = CLIPTokenizer.from_pretrained(cfg.base_model, subfolder="tokenizer", revision=cfg.revision)
    scheduler = UniPCMultistepScheduler.from_pretrained(cfg.base_model, subfolder="scheduler", revision=cfg.revision)
    pipe = StableDiffusionControlNetPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                             controlnet=controlnet, scheduler=scheduler, safety_checker=None,
                                             feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    controlnet.eval()
    out = RunOutput(cfg.output.path, cfg.output.storage_options)
    folder = f"validation/step-{step:07d}"
    out.fs.makedirs(out.path(folder), exist_ok=True)
    for i, (prompt, path) in enumerate(zip(cfg.validation.prompts, cfg.validation.control_images)):
        control = Image.open(path).convert("RGB").resize((cfg.resolution, cfg.resolution))
        with torch.no_grad():
            image = pipe(prompt, control, num_inference_steps=cfg.validation.steps, height=cfg.resolution,
                         width=cfg.resolution, generator=torch.Generator().manual_seed(cfg.seed + i)).images[0]
        for name, picture in ((f"{i}-control.png", control), (f"{i}-generated.png", image)):
            with out.open_atomic(posixpath.join(folder, name)) as f:
                picture.save(f, format="PNG")
    controlnet.train()

