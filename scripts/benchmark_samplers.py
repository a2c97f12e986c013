r"""Sampler accuracy per UNet call: each sampler at 10-50 steps against a many-step DDIM (eta 0) reference.

The denoiser is built as the pipeline builds it (leftrefill/inpaint.py): a random reference/target canvas
with a masked rectangle, concat conditioning through the VAE, prompt-token and empty text contexts,
classifier-free guidance (both branches in one UNet call), on a model with seeded non-zero random weights.
Every run starts from the same x_T. Error = RMS(latent - reference) / RMS(reference), in latent space.

Two reference end points come from one run of DDIM (eta 0) over ``--reference_steps`` timesteps from 999
down to 0 (all 1000 with the default, i.e. 999 DDIM steps plus the call at t = 0):
* DDIM ends at the noise level of alphas_cumprod[0] (sigma 0.029): it is compared with the reference's latent;
* DDPM and DPM-Solver++ end at sigma 0 with x0_hat: they are compared with the reference's x0_hat at t = 0.
DDPM and SDE-DPM-Solver++ are stochastic: their error against the ODE solution does not vanish with steps.

    python scripts/benchmark_samplers.py --threads 1 --repeats 3 --native_conv   # tiny config, 1000-timestep reference
    python scripts/benchmark_samplers.py --config checkpoints/ref_guided_inpainting/model_config.yaml \
        --reference_steps 250 --native_conv                       # full SD2 UNet (random weights), about 10 min
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from ldm.guidance import ClassifierFreeGuidance
from ldm.latent_diffusion import model_builder
from ldm.sampling import SAMPLERS, default_timesteps, linspace_timesteps, sample_ddim
from leftrefill.canvas import canvas_mask, stitch
from leftrefill.cli import HelpFormatter
from leftrefill.model_dir import build_random

# Rows: (label, sampler name, spacing). "default" = the spacing diffusers gives that sampler for SD2
# (ldm.sampling.default_timesteps); DDIM also runs on DPM-Solver's linspace grid, to tell the solver's
# error from that of "leading" spacing, which starts at t = 901 (10 steps) to 981 (50 steps), not 999.
ROWS = [("ddim", "ddim", "default"), ("ddim_linspace", "ddim", "linspace"), ("ddpm", "ddpm", "default"),
        ("dpmpp_2m", "dpmpp_2m", "default"), ("dpmpp_2m_sde", "dpmpp_2m_sde", "default")]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--config", default="checkpoints/tiny_random/model_config.yaml",
                        help="model config; the model gets seeded non-zero random weights")
    parser.add_argument("--latent", type=int, nargs=2, default=[8, 16], metavar=("H", "W"),
                        help="latent height and width of the canvas (reference + target; the image is 8x larger)")
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 15, 20, 25, 50], help="step counts to test")
    parser.add_argument("--samplers", nargs="+", default=[label for label, _, _ in ROWS],
                        choices=[label for label, _, _ in ROWS], metavar="ROW",
                        help=f"rows to run, from: {', '.join(repr(label) for label, _, _ in ROWS)}")
    parser.add_argument("--reference_steps", type=int, default=1000,
                        help="timesteps of the DDIM (eta 0) reference, spread over 0..999 including both ends "
                             "(1000 = every timestep: 999 DDIM steps plus the call at t = 0)")
    parser.add_argument("--cfg", type=float, default=2.5, help="classifier-free guidance scale")
    parser.add_argument("--seed", type=int, default=0, help="seed of the inputs, x_T and the samplers' noise")
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda, ...")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs per sampler and step count; the wall time is their median")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads, None = torch's choice; 1 keeps the tiny model's many small ops "
                             "from stalling when other processes share the cores")
    parser.add_argument("--native_conv", action="store_true",
                        help="convolutions without oneDNN (CPU): at small latents oneDNN's per-call weight reorder "
                             "dominates, and the native path is about 2x faster there")
    return parser


def build_denoiser(config: str, latent: tuple[int, int], cfg: float, seed: int, device: torch.device):
    """The pipeline's guided denoiser on a random canvas; returns (denoise, x_T (1, 4, h, w), alphas_cumprod)."""
    model = build_random(model_builder(config)).eval().to(device)
    generator = torch.Generator().manual_seed(seed)
    h, w = latent
    reference, target = (torch.rand(1, 3, 8 * h, 4 * w, generator=generator) * 2 - 1 for _ in range(2))
    mask = torch.zeros(1, 1, 8 * h, 4 * w)
    mask[..., 2 * h:6 * h, w:3 * w] = 1  # the middle half of the target
    canvas, fill = stitch(reference, target).to(device), canvas_mask(mask).to(device)
    with torch.no_grad():
        c_concat = model.concat_conditioning(canvas, fill, generator)  # (1, 5, h, w)
        embedder = model.cond_stage_model  # prompt-token context and empty-string context, (1, 77, width)
        prompt, empty = embedder.encode([embedder.prompt]), embedder.encode([""])
    denoise = ClassifierFreeGuidance(model.apply_model, {"c_concat": c_concat, "c_crossattn": prompt},
                                     {"c_concat": c_concat, "c_crossattn": empty}, scale=cfg)
    x_T = torch.randn(1, 4, h, w, generator=generator).to(device)
    return denoise, x_T, model.sampling_schedule()


def reference_timesteps(count: int) -> torch.Tensor:
    """``count`` ascending timesteps from 0 to 999, both included (1000 -> every timestep)."""
    return torch.linspace(0, 999, count, dtype=torch.float64).round().long().unique()


def timed(fn, device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - start


def relative_error(x: torch.Tensor, reference: torch.Tensor) -> float:
    return ((x - reference).pow(2).mean().sqrt() / reference.pow(2).mean().sqrt()).item()


def main() -> None:
    args = build_parser().parse_args()
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    with torch.backends.mkldnn.flags(enabled=False) if args.native_conv else contextlib.nullcontext():
        run(args, device)


def run(args: argparse.Namespace, device: torch.device) -> None:
    denoise, x_T, alphas_cumprod = build_denoiser(args.config, tuple(args.latent), args.cfg, args.seed, device)

    # 1. The reference: DDIM eta 0 over (nearly) every timestep, keeping its last x0_hat (t = 0) too.
    last = {}
    ref_timesteps = reference_timesteps(args.reference_steps)
    ref_latent, ref_time = timed(lambda: sample_ddim(
        denoise, x_T.clone(), alphas_cumprod, ref_timesteps, callback=lambda i, t, x, x0: last.update(x0=x0),
        progress=True), device)
    references = {"ddim": ref_latent, "sigma 0": last["x0"]}
    print(f"reference: DDIM eta 0 over {len(ref_timesteps)} timesteps {ref_timesteps[0].item()}..."
          f"{ref_timesteps[-1].item()}, {ref_time:.1f} s ({ref_time / len(ref_timesteps):.3f} s per UNet call); "
          f"RMS latent {ref_latent.pow(2).mean().sqrt():.3f}, RMS x0_hat(t=0) {last['x0'].pow(2).mean().sqrt():.3f}, "
          f"RMS x_T {x_T.pow(2).mean().sqrt():.3f}", flush=True)

    # 2. Every row at every step count, from the same x_T and the same sampler noise seed.
    errors, seconds = {}, {}
    for label, name, spacing in ROWS:
        if label not in args.samplers:
            continue
        for n in args.steps:
            timesteps = linspace_timesteps(n) if spacing == "linspace" else default_timesteps(name, n)
            times = []
            for _ in range(args.repeats):  # the same seed every time: the same output
                generator = torch.Generator().manual_seed(args.seed + 1)
                out, elapsed = timed(lambda: SAMPLERS[name](
                    denoise, x_T.clone(), alphas_cumprod, timesteps, generator=generator), device)
                times.append(elapsed)
            seconds[label, n] = statistics.median(times)
            errors[label, n] = relative_error(out, references["ddim" if name == "ddim" else "sigma 0"])
            print(f"  {label:>15} {n:>3} steps: error {errors[label, n]:.3e}, {seconds[label, n]:.2f} s", flush=True)

    # 3. The table: error (and wall time per image), then the target.
    labels = [label for label, _, _ in ROWS if label in args.samplers]
    print(f"\nrelative RMS error vs the {len(ref_timesteps)}-timestep DDIM reference (wall time per image, s); "
          f"latent {args.latent[0]}x{args.latent[1]}, CFG {args.cfg}, {device} ({torch.get_num_threads()} threads)")
    print("| sampler | " + " | ".join(f"{n} steps" for n in args.steps) + " |")
    print("|---|" + "---|" * len(args.steps))
    for label in labels:
        cells = [f"{errors[label, n]:.2e} ({seconds[label, n]:.2f})" for n in args.steps]
        print(f"| {label} | " + " | ".join(cells) + " |")
    if ("dpmpp_2m", 20) in errors and ("ddim", 50) in errors:
        ratio = errors["dpmpp_2m", 20] / errors["ddim", 50]
        print(f"\ntarget: error(dpmpp_2m, 20 steps) / error(ddim, 50 steps) = {ratio:.3f} "
              f"({'met' if ratio <= 1 else 'missed'}: <= 1)")
        for n in args.steps:
            if ("ddim", n) in errors and ("dpmpp_2m", n) in errors:
                print(f"  {n:>3} steps: error ddim / dpmpp_2m = {errors['ddim', n] / errors['dpmpp_2m', n]:.2f}")


if __name__ == "__main__":
    main()
