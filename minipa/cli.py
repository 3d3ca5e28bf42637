"""`minipa …` on the command line: `minipa generate --prompt "…" [--image-prompt IMG …] --out FILE.png`."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from minipa import __version__

DTYPES = ("float32", "float16", "bfloat16")
COMBINE_MODES = ("concat", "add", "subtract", "average", "norm_average")  # minipa.image_prompt.COMBINE_MODES (not imported: torch)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minipa", description="Stable Diffusion 1.5 with IP-Adapter, from scratch.")
    parser.add_argument("--version", action="version", version=f"minipa {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser(
        "generate",
        help="generate an image from a text and/or image prompt",
        description="Generate an image. With no --model, the tiny model shipped in weights/ is used. "
        "Writes FILE.png and FILE.json (every setting, for reproducing the image).",
    )
    gen.add_argument("--prompt", default="", help="the text prompt (default: empty)")
    gen.add_argument("--negative-prompt", default="", help="what to steer away from (the unconditional branch of CFG)")
    gen.add_argument("--image-prompt", action="append", default=[], metavar="IMG",
                     help="an image prompt (IP-Adapter); repeat the flag for several images, whose tokens are concatenated")
    gen.add_argument("--model", help="a diffusers SD 1.x folder or a single .safetensors/.ckpt file (default: the tiny model)")
    gen.add_argument("--ip-adapter", metavar="FILE", help="an official IP-Adapter file (ip-adapter_sd15.bin or .safetensors)")
    gen.add_argument("--image-encoder", metavar="DIR",
                     help="a transformers CLIPVisionModelWithProjection folder (default: image_encoder/ beside the adapter or in the model)")
    gen.add_argument("--scale", type=_scale, default=0.6,
                     help='IP-Adapter strength λ: a number (default 0.6), or per block as JSON, e.g. \'{"up": {"block_1": 1.0}}\'')
    _add_image_prompt_controls(gen)
    gen.add_argument("--steps", type=int, default=30, help="sampling steps (default 30)")
    gen.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale w (default 7.5; 1 = off)")
    gen.add_argument("--seed", type=int, default=0, help="random seed (default 0); the same seed gives the same image")
    gen.add_argument("--height", type=int, default=None, help="image height in pixels, a multiple of 8 (default: the model's)")
    gen.add_argument("--width", type=int, default=None, help="image width in pixels, a multiple of 8 (default: the model's)")
    gen.add_argument("--scheduler", choices=("ddim", "ddpm", "dpm++"), default="ddim",
                     help="sampler (default ddim; dpm++ = DPM-Solver++(2M))")
    gen.add_argument("--device", default="cpu", help="torch device (default cpu)")
    gen.add_argument("--dtype", choices=("auto", *DTYPES), default="auto",
                     help="weights and compute dtype (default auto: float16 on CUDA, bfloat16 on a CPU with bf16 matrix "
                          "units for full-size models, else float32; the sidecar says which)")
    gen.add_argument("--compile", action="store_true", help="run the UNet through torch.compile (CPU: needs a C++ compiler; CUDA: CUDA graphs)")
    gen.add_argument("--out", default="out/minipa.png", help="where to write the PNG (default out/minipa.png)")
    gen.add_argument("--overwrite", action="store_true", help="replace --out if it exists (default: refuse)")
    gen.add_argument("--no-progress", action="store_true", help="no progress bar")
    gen.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    _add_encode_image(commands)
    _add_course(commands)
    _add_train_and_eval(commands)
    _add_train_adapter(commands)
    return parser


def _add_image_prompt_controls(gen) -> None:
    gen.add_argument("--negative-image-prompt", action="append", default=None, metavar="IMG",
                     help="an image to steer away from: the unconditional branch's image prompt (one, or one per --image-prompt)")
    gen.add_argument("--ip-embeds", metavar="FILE", help="image-prompt features saved by `minipa encode-image` (instead of --image-prompt)")
    gen.add_argument("--ip-combine", choices=COMBINE_MODES, default="concat",
                     help="how several image prompts become one (default concat: every image's tokens side by side)")
    gen.add_argument("--ip-weights", type=float, nargs="+", metavar="W", help="one weight per image prompt, for --ip-combine add/subtract/average/norm_average")
    gen.add_argument("--ip-steps", type=float, nargs=2, default=(0.0, 1.0), metavar=("START", "END"),
                     help="the image prompt acts only at the steps i of T with START ≤ i/T ≤ END (default 0 1: every step)")
    gen.add_argument("--ip-mask", action="append", default=None, metavar="IMG",
                     help="a region mask (white = here) per image prompt, the image's aspect ratio; repeat in the order of the prompts")


def _add_encode_image(commands) -> None:
    enc = commands.add_parser(
        "encode-image", help="encode image prompts once and save them (for generate --ip-embeds)",
        description="Run the IP-Adapter's image encoder on image prompts (and a negative image prompt) and save the "
        "features to a .safetensors file; `minipa generate --ip-embeds FILE` then needs no image encoder run.")
    enc.add_argument("images", nargs="+", metavar="IMG", help="the image prompt(s)")
    enc.add_argument("--negative-image-prompt", action="append", default=None, metavar="IMG",
                     help="the unconditional branch's image (default: no image, as in the paper)")
    enc.add_argument("--ip-adapter", metavar="FILE", help="the IP-Adapter the features are for (default: the tiny model's)")
    enc.add_argument("--model", help="the SD 1.x model the adapter is attached to (default: the tiny model)")
    enc.add_argument("--image-encoder", metavar="DIR", help="a CLIPVisionModelWithProjection folder (default: beside the adapter or in the model)")
    enc.add_argument("--out", required=True, metavar="FILE.safetensors", help="where to write the features")
    enc.add_argument("--overwrite", action="store_true", help="replace --out if it exists (default: refuse)")
    enc.add_argument("--device", default="cpu", help="torch device (default cpu)")
    enc.add_argument("--dtype", choices=("auto", *DTYPES), default="auto", help="weights and compute dtype (default auto, as for generate)")
    enc.add_argument("--debug", action="store_true", help="show the full traceback on errors")


def encode_image(args) -> int:
    from minipa.pipeline import load_pipeline

    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise ValueError(f"--out must end in .safetensors, got {args.out!r}")
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    pipe = load_pipeline(args.model, ip_adapter=args.ip_adapter, image_encoder=args.image_encoder,
                         device=args.device, dtype=args.dtype)
    prompt = pipe.encode_image_prompt(args.images, args.negative_image_prompt)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp.safetensors")
    try:
        prompt.save(tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"wrote {out}: {len(prompt.features)} image prompt(s), {prompt.kind.replace('_', ' ')} {tuple(prompt.features.shape)}")
    return 0


def _add_train_and_eval(commands) -> None:
    train = commands.add_parser(
        "train", help="retrain the tiny world (CLIP, VAE, UNet, IP-Adapter) from nothing",
        description="Train every model of the tiny world and write them, in the diffusers/transformers/IP-Adapter "
        "formats, to --out. Also runs under torchrun (DistributedDataParallel).",
    )
    train.add_argument("--out", default="weights/tiny", help="where the trained model goes (default weights/tiny)")
    train.add_argument("--work", default="runs/tiny", help="checkpoints, losses and timings (default runs/tiny)")
    train.add_argument("--stages", default="all", help="comma-separated subset of clip,clip_image,clip_shapes,clip_words,vae,vae_refine,unet,ip,classifier, or the extras ablation, ip_plus (default: all but the extras)")
    train.add_argument("--resume", action="store_true", help="skip finished stages and continue an interrupted one bit for bit")
    train.add_argument("--steps", metavar="STAGE=N[,…]", help="other step counts for some stages, e.g. unet=5000 "
                       "(weights/HISTORY.md: what more UNet training did to the held-out combinations)")
    train.add_argument("--preset", choices=("tiny", "gpu", "smoke"), default="tiny",
                       help="tiny: the tiny world's recipe (75-125 minutes on 2 CPU cores, by the machine's pace); gpu: 4× the UNet's "
                       "and the adapter's steps, for --device cuda; smoke: seconds, for tests")
    train.add_argument("--device", default="cpu", help="where the stages train: cpu (default) or cuda (under torchrun, each "
                       "process its own GPU)")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    train.add_argument("--debug", action="store_true", help="show the full traceback on errors")

    ev = commands.add_parser("eval", help="evaluate the tiny world (Table 1 in miniature)",
                             description="Generate from held-out prompts and images and judge them with an independent "
                             "classifier and the tiny CLIP. Prints a Markdown table; --json writes every number.")
    ev.add_argument("--model", default=None, help="a tiny-world model folder (default weights/tiny)")
    ev.add_argument("--work", default=None, help="a training work folder, for the extra stages' weights (the concatenation ablation, IP-Adapter Plus)")
    ev.add_argument("-n", type=int, default=64, help="prompts/images per row (default 64)")
    ev.add_argument("--guidance", type=float, default=5.0, help="CFG scale w (default 5)")
    ev.add_argument("--steps", type=int, default=25, help="DDIM steps (default 25)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--json", metavar="FILE", help="write the numbers as JSON")
    ev.add_argument("--examples", metavar="FILE.png", help="write example generations as one PNG")
    ev.add_argument("--debug", action="store_true", help="show the full traceback on errors")


def train(args) -> int:
    from minipa.train.world import STAGES, WorldConfig, train_world

    stages = STAGES if args.stages == "all" else tuple(s.strip() for s in args.stages.split(","))
    config = {"tiny": WorldConfig.tiny, "gpu": WorldConfig.gpu, "smoke": WorldConfig.smoke}[args.preset]()
    if args.steps:
        config = config.with_steps(parse_steps(args.steps))
    summary = train_world(config, args.out, args.work, stages=stages, resume=args.resume, progress=not args.no_progress,
                          device=args.device)
    if summary:
        print(json.dumps({k: v for k, v in summary.items() if k != "domain"}, indent=2))
    return 0


def parse_steps(text: str) -> dict[str, int]:
    """--steps "unet=5000,ip=1500" → {"unet": 5000, "ip": 1500}."""
    steps = {}
    for item in text.split(","):
        stage, sep, n = item.partition("=")
        if not sep or not n.strip().isdigit():
            raise ValueError(f"--steps: expected STAGE=N pairs separated by commas (e.g. unet=5000), found {item!r}")
        steps[stage.strip()] = int(n)
    return steps


def evaluate(args) -> int:
    from minipa.eval import evaluate as run_eval, format_table, save_examples
    from minipa.pipeline import TINY_MODEL, load_pipeline
    from minipa.train.world import EVAL_FILE, load_concat_projection, load_plus_adapter

    folder = Path(args.model) if args.model else TINY_MODEL
    adapter = folder / "ip-adapter.safetensors"
    pipe = load_pipeline(args.model, ip_adapter=adapter if args.model and adapter.is_file() else None)
    concat = load_concat_projection(args.work, pipe) if args.work else None
    plus = load_plus_adapter(args.work, pipe) if args.work else None
    settings = {"n": args.n, "guidance": args.guidance, "steps": args.steps, "seed": args.seed}
    started = time.perf_counter()
    rows = run_eval(pipe, folder / EVAL_FILE, n=args.n, guidance=args.guidance, steps=args.steps, seed=args.seed, concat_proj=concat,
                    plus_adapter=plus)
    settings["seconds"] = round(time.perf_counter() - started, 1)
    print(format_table(rows, settings))
    if args.examples:
        save_examples(rows, args.examples)
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": settings, **{k: v for k, v in rows.items() if not k.startswith("_")}},
                                              indent=2) + "\n")
    return 0


def _add_train_adapter(commands) -> None:
    ta = commands.add_parser(
        "train-adapter", help="train an IP-Adapter for an SD 1.x model on your own images (the paper's recipe)",
        description="Train an IP-Adapter (image_proj + Wk'/Wv', everything else frozen) on a folder of images with "
        "same-named .txt captions, or a .json/.jsonl list of {\"image_file\", \"text\"} records. Writes "
        "OUT/ip-adapter.safetensors (the official layout), checkpoints, losses.jsonl and sample grids to OUT. "
        "Runs under torchrun too (one process per GPU). minipa/README.md, 'Train your own adapter', has the details.")
    ta.add_argument("--model", required=True, help="a diffusers SD 1.x folder or a single .safetensors/.ckpt file")
    ta.add_argument("--data", required=True, help="a folder of images + .txt captions, or a .json/.jsonl list of records")
    ta.add_argument("--out", required=True, metavar="DIR", help="the output folder")
    ta.add_argument("--image-encoder", metavar="DIR", help="a CLIPVisionModelWithProjection folder (default: image_encoder/ "
                    "beside --init-adapter, then in the model folder)")
    ta.add_argument("--image-root", metavar="DIR", help="where a .json/.jsonl list's image_file paths start (default: its folder)")
    ta.add_argument("--allow-empty-captions", action="store_true", help="train images without a caption with the empty one")
    ta.add_argument("--plus", action="store_true", help="IP-Adapter Plus: a Resampler over the image encoder's patch features")
    ta.add_argument("--tokens", type=int, help="image tokens (default 4; 16 with --plus)")
    ta.add_argument("--init-adapter", metavar="FILE", help="start from this adapter file (fine-tune it) instead of Wk'/Wv' = Wk/Wv")
    ta.add_argument("--resolution", type=int, default=512, help="training images are resized and centre-cropped to this (default 512)")
    for flag, kind, default, what in (("--steps", int, 10_000, "optimizer steps"), ("--batch-size", int, 8, "the global batch, over all processes"),
                                      ("--accumulation", int, 1, "micro-batches per step (less memory, the same step)"),
                                      ("--lr", float, 1e-4, "AdamW's learning rate, constant"), ("--weight-decay", float, 0.01, "AdamW's"),
                                      ("--image-drop", float, 0.05, "how often the image alone is dropped"),
                                      ("--text-drop", float, 0.05, "how often the caption alone is dropped"),
                                      ("--both-drop", float, 0.05, "how often both are dropped"),
                                      ("--checkpoint-every", int, 1000, "steps between checkpoints and adapter files"),
                                      ("--seed", int, 0, "the random seed of the data order, noise, timesteps and drops")):
        ta.add_argument(flag, type=kind, default=default, help=f"{what} (default {default:g})")
    ta.add_argument("--cache", action="store_true", help="encode every image and caption once and keep them (small datasets)")
    ta.add_argument("--gradient-checkpointing", action="store_true", help="recompute the UNet blocks' activations in the backward pass")
    ta.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    ta.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32", help="autocast dtype and the frozen models' dtype (default fp32)")
    ta.add_argument("--sample-every", type=int, metavar="N", help="write a sample grid every N steps")
    ta.add_argument("--sample-image", action="append", default=[], metavar="IMG", help="an image prompt for the grid (default: the first 4 training images)")
    ta.add_argument("--sample-prompt", action="append", default=None, metavar="TEXT", help="a text prompt for the grid (default: none)")
    ta.add_argument("--sample-steps", type=int, default=30, help="DDIM steps of each sample (default 30)")
    ta.add_argument("--save-bin", action="store_true", help="also write each adapter as the official nested .bin")
    ta.add_argument("--resume", action="store_true", help="continue the run in --out, bit for bit")
    ta.add_argument("--no-progress", action="store_true", help="no progress bar")
    ta.add_argument("--debug", action="store_true", help="show the full traceback on errors")


def train_adapter(args) -> int:
    from minipa.train.adapter import AdapterSettings, train_adapter as run

    flags = {k: v for k, v in vars(args).items() if k not in ("command", "debug", "no_progress", "sample_image", "sample_prompt")}
    settings = AdapterSettings(**flags, progress=not args.no_progress, sample_images=tuple(args.sample_image),
                               sample_prompts=tuple(args.sample_prompt or ("",)))
    summary = run(settings)
    if summary:
        print(json.dumps(summary, indent=2))
    return 0


def _add_course(commands) -> None:
    course = commands.add_parser("course", help="course assignments: hand out a copy with solutions cut out, grade it",
                                 description="See assignments/README.md in a student copy.")
    steps = course.add_subparsers(dest="course_command", required=True)
    make = steps.add_parser("make-student", help="write a student copy: each assignment's region replaced by a NotImplementedError")
    make.add_argument("out_dir", metavar="OUT_DIR", help="a new (or empty) folder")
    make.add_argument("--challenge", action="store_true",
                      help="stubs state only the goal, the paper's equation, the shapes and the grading tests (no hints)")
    grade = steps.add_parser("grade", help="run each assignment's grading tests; print a score table (exit 0 only at full marks)")
    grade.add_argument("directory", nargs="?", default=".", metavar="DIR", help="the copy to grade (default: here)")
    grade.add_argument("--json", action="store_true", help="print the scores and every test's outcome as JSON")
    for sub in (make, grade):
        sub.add_argument("-a", "--assignment", type=int, action="append", metavar="N", help="only assignment N (repeatable)")
    course.add_argument("--debug", action="store_true", help="show the full traceback on errors")


def course(args) -> int:
    from minipa.course import grade, make_student

    if args.course_command == "make-student":
        out = make_student(args.out_dir, only=args.assignment, challenge=args.challenge)
        print(f"wrote a student copy to {out}; the course is in {out / 'assignments' / 'README.md'}")
        return 0
    summary = grade(args.directory, json=args.json, only=args.assignment)
    return 0 if summary["points"] == summary["max_points"] else 1


def _scale(text: str):
    try:
        return float(text)
    except ValueError:
        pass
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise argparse.ArgumentTypeError(f"expected a number or a JSON mapping, got {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a number or a JSON mapping, got {text!r}")
    return value


def generate(args) -> int:
    from minipa.pipeline import load_pipeline

    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise ValueError(f"--out must end in .png, got {args.out!r}")
    sidecar = out.with_suffix(".json")
    if not args.overwrite and (out.exists() or sidecar.exists()):
        raise FileExistsError(f"{out if out.exists() else sidecar} already exists; pass --overwrite to replace it")

    if args.model is None:  # the tiny model knows a few dozen words: say which ones a prompt goes beyond
        from minipa.data.shapes import unknown_words, vocabulary_line

        unknown = unknown_words(f"{args.prompt} {args.negative_prompt}")
        if unknown:
            print(f"minipa: warning: the tiny model does not know {', '.join(map(repr, unknown))}; it knows {vocabulary_line()}",
                  file=sys.stderr)
    started = time.perf_counter()
    pipe = load_pipeline(args.model, ip_adapter=args.ip_adapter, image_encoder=args.image_encoder,
                         device=args.device, dtype=args.dtype, compile=args.compile)
    settings = {
        "prompt": args.prompt, "negative_prompt": args.negative_prompt,
        "ip_image": args.image_prompt or None, "ip_scale": args.scale if args.image_prompt or args.ip_embeds else None,
        "negative_ip_image": args.negative_image_prompt, "ip_embeds": args.ip_embeds, "ip_combine": args.ip_combine,
        "ip_weights": args.ip_weights, "ip_steps": list(args.ip_steps), "ip_masks": args.ip_mask,
        "num_steps": args.steps, "guidance_scale": args.guidance, "seed": args.seed,
        "height": args.height, "width": args.width, "scheduler": args.scheduler,
    }
    image = pipe(**{**settings, "ip_scale": args.scale}, progress=not args.no_progress)[0]
    settings.update(height=image.height, width=image.width)  # the model's own size when not given

    record = {
        "minipa": __version__, **settings,
        "model": args.model or "tiny (weights/tiny)",
        "ip_adapter": args.ip_adapter or ("tiny (weights/tiny/ip-adapter.safetensors)" if pipe.ip_adapter is not None else None),
        "image_encoder": args.image_encoder,
        "device": args.device, "dtype": str(pipe.dtype).removeprefix("torch."), "dtype_asked": args.dtype,
        "compile": args.compile, "seconds": round(time.perf_counter() - started, 2),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(out, lambda f: image.save(f, format="PNG"))
    _write_atomically(sidecar, lambda f: f.write(json.dumps(record, indent=2).encode() + b"\n"))
    print(f"wrote {out} and {sidecar.name} ({record['seconds']} s)")
    return 0


def _write_atomically(path: Path, write) -> None:
    """Write to a temporary file beside `path`, then rename: a crash never leaves half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            return generate(args)
        if args.command == "encode-image":
            return encode_image(args)
        if args.command == "course":
            return course(args)
        if args.command == "train":
            return train(args)
        if args.command == "eval":
            return evaluate(args)
        if args.command == "train-adapter":
            return train_adapter(args)
    except KeyboardInterrupt:
        training = args.command in ("train", "train-adapter")  # these keep their last checkpoint: --resume continues
        print("minipa: interrupted" + ("" if training else "; nothing was written"), file=sys.stderr)
        return 130
    except Exception as err:  # one readable message, not a traceback, unless --debug
        if getattr(args, "debug", False):
            raise
        print(f"minipa: error: {err}", file=sys.stderr)
        return 1
    return 0
