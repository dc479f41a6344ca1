"""Train a small `UNet2DModel` on a built-in set on the CPU and save it as a `DDPMPipeline`.

A trained network to compare the analytic denoisers with (`diffusers-analytic compare`), without downloading
anything. The noise schedule is `DDPMScheduler()`'s default (linear betas 1e-4 .. 0.02 over 1000 steps), the same
as every analytic denoiser's default, and the network predicts epsilon.

    python examples/train_unet.py --output-dir trained/unet-digits            # digits 8x8, ~5-10 min on 2 cores
    python examples/train_unet.py --data patches --patch-size 16 --output-dir trained/unet-patches16

Then:

    diffusers-analytic fit --method wiener --data digits --output-dir trained/wiener-digits
    diffusers-analytic compare trained/wiener-digits trained/unet-digits --output-dir outputs/compare-wiener
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import tempfile
import time

import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from tqdm.auto import tqdm

from diffusers_analytic.data import load_builtin, to_model_space


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="digits", choices=("digits", "faces", "patches"), help="built-in set")
    parser.add_argument("--patch-size", type=int, default=16, help="crop side of the `patches` set")
    parser.add_argument("--num-patches", type=int, default=5000, help="number of crops of the `patches` set")
    parser.add_argument("--channels", type=int, default=1, choices=(1, 3), help="channels of the `patches` set")
    parser.add_argument("--output-dir", required=True, help="where to save the DDPMPipeline (save_pretrained)")
    parser.add_argument("--train-steps", type=int, default=1500, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument(
        "--ema-decay", type=float, default=0.995, help="the saved weights are this EMA of the trained ones"
    )
    parser.add_argument("--block-out-channels", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--layers-per-block", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    return parser.parse_args(argv)


def build_unet(sample_size, channels: int, block_out_channels, layers_per_block: int) -> UNet2DModel:
    """A small UNet without attention: 2 resolutions are enough for 8x8 or 16x16 images."""
    levels = len(block_out_channels)
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        layers_per_block=layers_per_block,
        block_out_channels=tuple(block_out_channels),
        down_block_types=("DownBlock2D",) * levels,
        up_block_types=("UpBlock2D",) * levels,
        norm_num_groups=min(8, min(block_out_channels)),
    )


def main(argv=None) -> None:
    args = parse_args(argv)
    output_dir = os.path.abspath(args.output_dir)
    if os.path.exists(output_dir) and not args.overwrite:
        raise SystemExit(f"{output_dir} exists; pass --overwrite to replace it.")
    if args.num_threads is not None:
        torch.set_num_threads(args.num_threads)
    torch.manual_seed(args.seed)

    # 1. Data in model space [-1, 1].
    if args.data == "patches":
        data = load_builtin(
            "patches", size=args.patch_size, num_images=args.num_patches, seed=args.seed, channels=args.channels
        )
    else:
        data = load_builtin(args.data)
    images = to_model_space(data.images)  # [N, C, H, W]
    num_images, channels, height, width = images.shape
    sample_size = height if height == width else (height, width)

    # 2. Model, the DDPM training schedule (= every analytic denoiser's default), optimizer with warmup + cosine decay.
    unet = build_unet(sample_size, channels, args.block_out_channels, args.layers_per_block)
    ema_unet = copy.deepcopy(unet).requires_grad_(False)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.learning_rate, weight_decay=0.0)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: (
            min(1.0, (step + 1) / args.warmup_steps)
            * 0.5
            * (1 + torch.cos(torch.tensor(torch.pi * step / args.train_steps)).item())
        ),
    )
    num_parameters = sum(p.numel() for p in unet.parameters())
    print(
        f"Training a UNet2DModel ({num_parameters / 1e6:.2f} M parameters) on {num_images} {data.name} images "
        f"{list(images.shape[1:])} for {args.train_steps} steps of batch {args.batch_size}."
    )

    # 3. The epsilon-prediction loss || eps - eps_theta(sqrt(a) x0 + sqrt(1 - a) eps, t) ||^2 (Ho et al. 2020, eq. 14).
    generator = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    progress = tqdm(range(args.train_steps), desc="Training", unit="step")
    running = None
    unet.train()
    for step in progress:
        batch = images[torch.randint(num_images, (args.batch_size,), generator=generator)]
        noise = torch.randn(batch.shape, generator=generator)
        timesteps = torch.randint(scheduler.config.num_train_timesteps, (args.batch_size,), generator=generator)
        noisy = scheduler.add_noise(batch, noise, timesteps)
        loss = torch.nn.functional.mse_loss(unet(noisy, timesteps).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        lr_schedule.step()
        # EMA with a warm start: the decay grows to `ema_decay` over the first steps.
        decay = min(args.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for ema_param, param in zip(ema_unet.parameters(), unet.parameters()):
                ema_param.lerp_(param, 1 - decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        progress.set_postfix(loss=f"{running:.4f}")
    elapsed = time.perf_counter() - start
    print(f"Trained in {elapsed:.0f} s; final smoothed loss {running:.4f}.")

    # 4. Save a DDPMPipeline atomically (temporary folder, then rename).
    ema_unet.eval()
    pipeline = DDPMPipeline(unet=ema_unet, scheduler=scheduler)
    parent = os.path.dirname(output_dir)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    try:
        pipeline.save_pretrained(staging)
        if os.path.exists(output_dir):
            shutil.rmtree(output_dir)
        os.replace(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    print(f"Saved a DDPMPipeline to {output_dir}")


if __name__ == "__main__":
    main()
