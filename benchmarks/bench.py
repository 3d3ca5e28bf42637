"""minipa vs diffusers, side by side in one run, on the same files, dtype and threads.

    python benchmarks/bench.py                 # full-size SD 1.5 + ViT-H/14 + ip-adapter_sd15 shapes, CPU
    python benchmarks/bench.py --smoke         # tiny weights, seconds: the check that keeps this script alive
    MINIPA_WEIGHTS=/data python benchmarks/bench.py   # real weights instead of random ones (layout below)

Without real weights it creates random ones of the real shapes, once, in the real formats (diffusers
folder, transformers image encoder, official IP-Adapter safetensors), cached in ~/.cache/minipa-bench.
With MINIPA_WEIGHTS it expects `stable-diffusion-v1-5/` (diffusers folder) and `IP-Adapter/models/`
(`ip-adapter_sd15.safetensors` + `image_encoder/`) under that folder.

Each row is the median of --repeats runs after one warm-up; the two libraries alternate run by run,
so background load hits both alike. Load time and peak memory are measured in fresh processes.
Writes benchmarks/results/<device>.md and .json. diffusers is imported here, never in minipa/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch
from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
PROMPT = "a photo of a corgi wearing sunglasses on the beach, highly detailed"

FULL = dict(
    unet=dict(cross_attention_dim=768, sample_size=64),  # diffusers' defaults are SD 1.5's UNet otherwise
    vae=dict(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
             block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512),
    text=dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu"),
    vision=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16, image_size=224,
                patch_size=14, projection_dim=1024, hidden_act="gelu"),
)
TINY = dict(
    unet=dict(block_out_channels=(32, 64, 64, 64), norm_num_groups=8, cross_attention_dim=32, attention_head_dim=8, sample_size=8),
    vae=dict(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
             block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8, sample_size=64),
    text=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=77, projection_dim=32, hidden_act="quick_gelu"),
    vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=224,
                patch_size=32, projection_dim=48, hidden_act="gelu"),
)


# ─── weights ────────────────────────────────────────────────────────────────────────────────────


def make_weights(folder: Path, sizes: dict, dtype: torch.dtype) -> dict:
    """Random SD-shaped weights in the real formats (skipped when already there)."""
    paths = {"model": folder / "sd", "ip_adapter": folder / "ip" / "ip-adapter.safetensors", "image_encoder": folder / "ip" / "image_encoder"}
    if (folder / "done").exists():
        return paths
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPImageProcessor, CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from minipa.loading import load_tokenizer
    from minipa.train.export import save_tokenizer

    print(f"creating random weights in {folder} (once)…", flush=True)
    torch.manual_seed(0)
    vocab = folder / "vocab"
    save_tokenizer(load_tokenizer(HERE.parent / "weights" / "bpe_simple_vocab_16e6.txt.gz"), vocab)
    (vocab / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77, "pad_token": "<|endoftext|>"}))
    unet = UNet2DConditionModel(**sizes["unet"])
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**sizes["vae"]), text_encoder=CLIPTextModel(CLIPTextConfig(**sizes["text"])),
        tokenizer=CLIPTokenizer.from_pretrained(vocab), unet=unet,
        scheduler=DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                                clip_sample=False, set_alpha_to_one=False),
        safety_checker=None, feature_extractor=CLIPImageProcessor(), image_encoder=None, requires_safety_checker=False,
    ).to(dtype)
    pipe.save_pretrained(paths["model"])
    CLIPVisionModelWithProjection(CLIPVisionConfig(**sizes["vision"])).to(dtype).save_pretrained(paths["image_encoder"])
    D, E = sizes["unet"]["cross_attention_dim"], sizes["vision"]["projection_dim"]
    state = {"image_proj.proj.weight": torch.randn(4 * D, E) * 0.02, "image_proj.proj.bias": torch.zeros(4 * D),
             "image_proj.norm.weight": torch.ones(D), "image_proj.norm.bias": torch.zeros(D)}
    modules = dict(unet.named_modules())
    for i, name in enumerate(unet.attn_processors):  # the official numbering
        if name.endswith("attn2.processor"):
            width = modules[name.removesuffix(".processor")].to_k.out_features
            state[f"ip_adapter.{i}.to_k_ip.weight"] = torch.randn(width, D) * 0.02
            state[f"ip_adapter.{i}.to_v_ip.weight"] = torch.randn(width, D) * 0.02
    save_file({k: v.to(dtype) for k, v in state.items()}, paths["ip_adapter"])
    (folder / "done").write_text("ok")
    return paths


def real_weights(root: Path) -> dict:
    return {"model": root / "stable-diffusion-v1-5", "ip_adapter": root / "IP-Adapter" / "models" / "ip-adapter_sd15.safetensors",
            "image_encoder": root / "IP-Adapter" / "models" / "image_encoder"}


# ─── the two libraries, behind one small interface ──────────────────────────────────────────────


def load(lib: str, paths: dict, device: str, dtype: torch.dtype, compile: bool = False):
    """A pipeline of `lib` with the IP-Adapter; `compile`: the UNet through torch.compile (CUDA graphs on a GPU) in both."""
    if lib == "minipa":
        import minipa

        return minipa.load_pipeline(paths["model"], ip_adapter=paths["ip_adapter"], image_encoder=paths["image_encoder"],
                                    device=device, dtype=dtype, compile=compile)
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    pipe = StableDiffusionPipeline.from_pretrained(paths["model"], safety_checker=None, requires_safety_checker=False, torch_dtype=dtype)
    ip = Path(paths["ip_adapter"])
    pipe.load_ip_adapter(str(ip.parent), subfolder="", weight_name=ip.name, image_encoder_folder=None)
    pipe.register_modules(image_encoder=CLIPVisionModelWithProjection.from_pretrained(paths["image_encoder"], torch_dtype=dtype),
                          feature_extractor=CLIPImageProcessor())
    pipe.set_ip_adapter_scale(0.6)
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(device)
    if compile:
        pipe.unet.compile(mode="reduce-overhead" if device.startswith("cuda") else None, dynamic=False)
    return pipe


def prompt_image() -> Image.Image:
    image = Image.new("RGB", (320, 240), (30, 60, 160))
    ImageDraw.Draw(image).ellipse((90, 50, 230, 190), fill=(230, 180, 40))
    return image


def tasks(lib: str, pipe, device: str, dtype: torch.dtype, size: int, steps: int) -> dict:
    """name → zero-argument callable, for the in-process rows."""
    latent = size // 8
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, latent, latent, generator=g).to(device, dtype)
    z = torch.randn(1, 4, latent, latent, generator=g).to(device, dtype)
    image = prompt_image()
    D = pipe.unet.config.cross_attention_dim
    text = torch.randn(2, 77, D, generator=g).to(device, dtype)
    E = pipe.image_encoder.config.projection_dim
    embeds = torch.randn(2, 1, E, generator=g).to(device, dtype)
    scale = pipe.vae.config.scaling_factor

    if lib == "minipa":
        def unet(x=x):
            return pipe.unet(x, 981, text, image_tokens=pipe.ip_adapter.image_tokens(embeds))
        rows = {
            "unet_step": unet,
            "vae_decode": lambda: pipe.vae.decode(z / scale),
            "text_encode": lambda: pipe.encode_prompt(["", PROMPT]),
            "image_encode": lambda: pipe.encode_image([image]),
            "end_to_end": lambda: pipe(PROMPT, ip_image=image, num_steps=steps, height=size, width=size, seed=0, progress=False),
        }
    else:
        def unet(x=x):
            return pipe.unet(x, 981, encoder_hidden_states=text, added_cond_kwargs={"image_embeds": [embeds]}).sample
        rows = {
            "unet_step": unet,
            "vae_decode": lambda: pipe.vae.decode(z / scale).sample,
            "text_encode": lambda: pipe.encode_prompt(PROMPT, device, 1, True, ""),
            "image_encode": lambda: pipe.encode_image(image, device, 1),
            "end_to_end": lambda: pipe(PROMPT, ip_adapter_image=image, num_inference_steps=steps, height=size, width=size,
                                       generator=torch.Generator().manual_seed(0)),
        }
    for side, batch in SCALING:
        xs = torch.randn(batch, 4, side // 8, side // 8, generator=g).to(device, dtype)
        if lib == "minipa":
            rows[f"unet_{side}px_b{batch}"] = lambda xs=xs, b=batch: pipe.unet(xs, 981, text[:1].expand(b, -1, -1),
                                                                           image_tokens=pipe.ip_adapter.image_tokens(embeds[:1].expand(b, -1, -1)))
        else:
            rows[f"unet_{side}px_b{batch}"] = lambda xs=xs, b=batch: pipe.unet(xs, 981, encoder_hidden_states=text[:1].expand(b, -1, -1),
                                                                           added_cond_kwargs={"image_embeds": [embeds[:1].expand(b, -1, -1)]}).sample
    return rows


SCALING: list[tuple[int, int]] = []  # (side in pixels, batch); set in main


def timed(fn, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.inference_mode():
        fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


# ─── child process: load time and peak memory of one library ────────────────────────────────────


def child(args) -> None:
    torch.set_num_threads(args.threads)
    paths = json.loads(args.paths)
    dtype = getattr(torch, args.dtype)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    pipe = load(args.child, paths, args.device, dtype, args.compile)
    loaded = time.perf_counter() - start
    rows = tasks(args.child, pipe, args.device, dtype, args.size, args.steps)
    timed(rows["end_to_end"], args.device)
    peak = torch.cuda.max_memory_allocated() if args.device.startswith("cuda") else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"load_s": loaded, "peak_bytes": peak}))


def in_fresh_process(lib: str, args, paths: dict) -> dict:
    cmd = [sys.executable, __file__, "--child", lib, "--paths", json.dumps({k: str(v) for k, v in paths.items()}),
           "--device", args.device, "--dtype", args.dtype, "--threads", str(args.threads), "--size", str(args.size),
           "--steps", str(args.steps)] + (["--compile"] if args.compile else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# ─── main ───────────────────────────────────────────────────────────────────────────────────────


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny random weights, one repeat: a quick check that the script runs")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or float16 (CUDA default)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--steps", type=int, default=None, help="end-to-end DDIM steps (CPU 2, CUDA 50)")
    parser.add_argument("--size", type=int, default=None, help="image side in pixels (default 512; smoke 64)")
    parser.add_argument("--cache", default=os.path.expanduser("~/.cache/minipa-bench"))
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--compile", action="store_true", help="both UNets through torch.compile (CUDA: CUDA graphs)")
    parser.add_argument("--rows", help="comma-separated rows to time (default all), e.g. unet_step,end_to_end")
    parser.add_argument("--no-fresh", action="store_true", help="skip the fresh-process rows (load time, peak memory)")
    parser.add_argument("--precision", action="store_true",
                        help="instead of timing: how far bfloat16 and float16 images are from float32, for both libraries")
    parser.add_argument("--versus-float32", action="store_true",
                        help="also time each library's end to end in float32 (once, no warm-up: the baseline of a fast dtype)")
    parser.add_argument("--child", choices=("minipa", "diffusers"), help=argparse.SUPPRESS)
    parser.add_argument("--paths", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.dtype = args.dtype or ("float16" if args.device.startswith("cuda") else "float32")
    args.steps = args.steps or (50 if args.device.startswith("cuda") else 2)
    args.size = args.size or (64 if args.smoke else 512)
    if args.child:
        return child(args)

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    if os.environ.get("MINIPA_WEIGHTS") and not args.smoke:
        paths, source = real_weights(Path(os.environ["MINIPA_WEIGHTS"])), "real weights (MINIPA_WEIGHTS)"
    else:
        sizes, name = (TINY, "tiny") if args.smoke else (FULL, "sd15")
        paths, source = make_weights(Path(args.cache) / f"{name}-{args.dtype}", sizes, dtype), f"random {name}-shaped weights"
    if args.precision:
        return precision_report(args, paths, source)
    repeats = 1 if args.smoke else args.repeats
    SCALING[:] = [(64, 1), (64, 2)] if args.smoke else [(256, 1), (512, 1), (768, 1), (512, 2), (512, 4)]

    results = {lib: {} if args.no_fresh else {"load_s": [], "peak_memory_mb": []} for lib in ("minipa", "diffusers")}
    for _ in range(0 if args.no_fresh else repeats):  # fresh processes, alternating: load time and peak memory (end to end included)
        for lib in results:
            child_result = in_fresh_process(lib, args, paths)
            results[lib]["load_s"].append(child_result["load_s"])
            results[lib]["peak_memory_mb"].append(child_result["peak_bytes"] / 2**20)
    pipes = {lib: load(lib, paths, args.device, dtype, args.compile) for lib in results}
    rows = {lib: tasks(lib, pipes[lib], args.device, dtype, args.size, args.steps) for lib in results}
    float32 = []  # --versus-float32: minipa's float32 end to end, timed in turn with the two libraries' runs
    if args.versus_float32:  # the same files, cast up on loading
        baseline = tasks("minipa", load("minipa", paths, args.device, torch.float32), args.device, torch.float32, args.size, args.steps)
    for name in args.rows.split(",") if args.rows else rows["minipa"]:
        for lib in results:
            timed(rows[lib][name], args.device)  # warm-up
        for _ in range(repeats):
            for lib in results:  # alternate, so background load hits both alike
                results[lib].setdefault(name, []).append(timed(rows[lib][name], args.device))
            if name == "end_to_end" and args.versus_float32:
                float32.append(timed(baseline["end_to_end"], args.device))
        print(f"{name}: minipa {statistics.median(results['minipa'][name]):.3f}  diffusers {statistics.median(results['diffusers'][name]):.3f}"
              + (f"  minipa float32 {statistics.median(float32):.3f}" if float32 and name == "end_to_end" else ""), flush=True)
    report = {
        "date": date.today().isoformat(), "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "cpu": platform.processor() or platform.machine(), "threads": args.threads, "dtype": args.dtype + (" + compile" if args.compile else ""),
        "source": source,
        "size": args.size, "steps": args.steps, "repeats": repeats,
        "versions": {"torch": torch.__version__, "diffusers": _version("diffusers"), "minipa": _version("minipa")},
        "rows": {name: {"minipa": statistics.median(results["minipa"][name]), "diffusers": statistics.median(results["diffusers"][name]),
                        "ratio": statistics.median(results["minipa"][name]) / statistics.median(results["diffusers"][name])}
                 for name in results["minipa"]},
        "runs": {**results, **({"minipa_float32": {"end_to_end": float32}} if float32 else {})},  # every measurement, in order
    }
    if float32:
        report["rows"]["end_to_end_minipa_float32"] = {"minipa": statistics.median(float32), "diffusers": None, "ratio": None}
    default = "float16" if args.device.startswith("cuda") else "float32"
    name = "smoke" if args.smoke else args.device.split(":")[0] + ("" if args.dtype == default else f"-{args.dtype}")
    write_report(report, Path(args.out), name + ("-compile" if args.compile else ""))
    return report


def precision_report(args, paths: dict, source: str) -> dict:
    """Each library's images in bfloat16 and float16 against its own float32 images: the same weights (stored
    in the run's dtype, cast on loading), latents, prompts and image prompt; max and mean absolute difference in [0, 1]."""
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, args.size // 8, args.size // 8, generator=g)
    image, rows = prompt_image(), {}
    for lib in ("minipa", "diffusers"):
        images = {}
        for name in ("float32", "bfloat16", "float16"):
            pipe = load(lib, paths, args.device, getattr(torch, name))
            x = latents.to(args.device, getattr(torch, name))
            with torch.inference_mode():
                if lib == "minipa":
                    out = pipe(PROMPT, ip_image=image, num_steps=args.steps, height=args.size, width=args.size, latents=x,
                               output="np", progress=False)
                else:
                    out = pipe(PROMPT, ip_adapter_image=image, num_inference_steps=args.steps, height=args.size, width=args.size,
                               latents=x, output_type="np").images
            images[name] = torch.as_tensor(out).float()
            del pipe
        for name in ("bfloat16", "float16"):
            diff = (images[name] - images["float32"]).abs()
            rows.setdefault(f"{name}_vs_float32_max", {})[lib] = diff.max().item()
            rows.setdefault(f"{name}_vs_float32_mean", {})[lib] = diff.mean().item()
        print(lib, {k: v[lib] for k, v in rows.items()}, flush=True)
    report = {"date": date.today().isoformat(), "device": args.device, "source": source, "size": args.size, "steps": args.steps,
              "rows": rows, "versions": {"torch": torch.__version__, "diffusers": _version("diffusers")}}
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    name = f"precision-{'smoke' if args.smoke else args.device.split(':')[0]}"
    (folder / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# Image differences from float32 — {args.device}, {source}, {args.size}×{args.size}, {args.steps} DDIM steps ({report['date']})",
             "", "| images in | minipa | diffusers |", "|---|---:|---:|"]
    lines += [f"| {row} | {r['minipa']:.4f} | {r['diffusers']:.4f} |" for row, r in rows.items()]
    (folder / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return report


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:  # e.g. minipa run from a checkout on PYTHONPATH, not pip-installed
        return "not installed (source checkout)"


def write_report(report: dict, folder: Path, name: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    units = {"load_s": "s", "peak_memory_mb": "MiB"}
    lines = [
        f"# minipa vs diffusers — {report['device']}, {report['dtype']}, {report['threads']} threads ({report['date']})",
        "",
        f"{report['source']}; images {report['size']}×{report['size']}, end-to-end {report['steps']} DDIM steps with CFG and one image prompt; "
        f"median of {report['repeats']} after a warm-up; torch {report['versions']['torch']}, diffusers {report['versions']['diffusers']}.",
        "",
        "| row | minipa | diffusers | minipa / diffusers |",
        "|---|---:|---:|---:|",
    ]
    for row, r in report["rows"].items():
        unit = units.get(row, "s")
        if r["diffusers"] is None:  # minipa's float32 baseline
            lines.append(f"| {row} | {r['minipa']:.3f} {unit} | – | – |")
            continue
        lines.append(f"| {row} | {r['minipa']:.3f} {unit} | {r['diffusers']:.3f} {unit} | {r['ratio']:.2f} |")
    if "end_to_end_minipa_float32" in report["rows"]:
        rows = report["rows"]
        lines += ["", f"minipa end to end, {report['dtype']} / float32: "
                      f"{rows['end_to_end']['minipa'] / rows['end_to_end_minipa_float32']['minipa']:.2f}"]
    (folder / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
