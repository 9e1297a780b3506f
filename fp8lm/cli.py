"""The `fp8lm` command line.

    fp8lm train   --preset tiny --level O1 --steps 300 [--metrics-out run.json]
    fp8lm compare --preset tiny --levels O0,O1 --steps 300 [--out runs/compare]
    fp8lm train   ... --out runs/a --save-every 100      (checkpoints runs/a/step-000100, ...)
    fp8lm train   <the same arguments> --resume runs/a  (continues from the latest, up to --steps)
    fp8lm export  --checkpoint runs/a/step-000300 --out model.safetensors   (plain BF16 weights)
    fp8lm inspect --preset tiny --level O1 [--json-out inspect.json] [--png-out inspect.png]

Bad arguments end with one line on stderr (`fp8lm: error: ...`) and exit code 2, with no
usage dump and no traceback. Set FP8LM_DEBUG=1 to get the traceback of a library error.
"""
import argparse
import logging
import os
import sys

import torch

import fp8lm
from fp8lm.data import CORPORA, TOKENIZERS
from fp8lm.models import PRESETS
from fp8lm.train import TrainConfig

PROG = "fp8lm"
EXPORT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class ArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are a single line, without the usage text."""

    def error(self, message):
        """Print `fp8lm: error: message` on stderr and exit with code 2."""
        fail(message)


def fail(message: str):
    """Print one error line on stderr and exit with code 2."""
    one_line = " ".join(str(message).split())
    sys.stderr.write(f"{PROG}: error: {one_line}\n")
    sys.exit(2)


def positive_int(text: str) -> int:
    """argparse type: an integer > 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def level_list(text: str) -> list[str]:
    """argparse type: comma-separated precision levels, e.g. "O0,O1"."""
    levels = [s.strip() for s in text.split(",") if s.strip()]
    if not levels:
        raise argparse.ArgumentTypeError(f"give levels separated by commas, e.g. {','.join(fp8lm.LEVELS)}")
    for level in levels:
        if level not in fp8lm.LEVELS:
            raise argparse.ArgumentTypeError(f"unknown level {level!r}; allowed: {', '.join(fp8lm.LEVELS)}")
    return levels


def add_common(p: argparse.ArgumentParser) -> None:
    """Options shared by `train` and `compare`: model, data, schedule, device."""
    p.add_argument("--preset", default="tiny", choices=list(PRESETS), help="model size (default tiny)")
    p.add_argument("--recipe", default="current", choices=list(fp8lm.RECIPES), help="FP8 scaling recipe")
    p.add_argument("--steps", type=positive_int, default=300, help="optimizer steps (default 300)")
    p.add_argument("--data", help="a text file, a folder of text files, or a folder with train.bin/val.bin")
    p.add_argument("--corpus", default="python-stdlib", choices=list(CORPORA),
                   help="built-in corpus when --data is not given (default python-stdlib)")
    p.add_argument("--tokenizer", default="byte", choices=list(TOKENIZERS), help="default byte")
    p.add_argument("--vocab-size", type=positive_int, help="tokenizer vocabulary (bpe default 4096)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--seed", type=int, default=1337, help="default 1337")
    p.add_argument("--batch-size", type=positive_int, help="sequences per step (default: the preset's)")
    p.add_argument("--seq-len", type=positive_int, help="tokens per sequence (default: the preset's)")
    p.add_argument("--lr", type=positive_float, help="peak learning rate (default: the preset's)")
    p.add_argument("--warmup", type=int, help="warmup steps (default: the preset's, at most steps/10)")
    p.add_argument("--eval-every", type=positive_int, help="validate every N steps (default: the preset's)")
    p.add_argument("--eval-batches", type=positive_int, help="validation batches (default: the preset's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> ArgumentParser:
    """The `fp8lm` parser and its subcommands."""
    parser = ArgumentParser(prog=PROG, description="Train LLMs in FP8 with PyTorch.")
    parser.add_argument("--version", action="version", version=f"{PROG} {fp8lm.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,compare,inspect,export}")

    t = sub.add_parser("train", help="train one model at one precision level")
    add_common(t)
    t.add_argument("--level", default="O1", choices=list(fp8lm.LEVELS), help="precision level (default O1)")
    t.add_argument("--metrics-out", help="write the metrics as JSON to this path")
    t.add_argument("--out", dest="out_dir", help="write checkpoints to DIR/step-<k> (at least after the last step)")
    t.add_argument("--save-every", type=positive_int, help="also write a checkpoint every K steps (needs --out)")
    t.add_argument("--resume", help="continue from a checkpoint (or a --out folder: its latest) up to --steps; "
                   "give the same arguments as the interrupted run")
    t.add_argument("--inspect-every", type=positive_int,
                   help="log per-layer FP8 figures (fp8lm inspect) to the metrics every N steps")

    c = sub.add_parser("compare", help="train at several levels and compare the losses")
    add_common(c)
    c.add_argument("--levels", type=level_list, default=["O0", "O1"], help="comma-separated (default O0,O1)")
    c.add_argument("--out", default=os.path.join("runs", "compare"), help="output folder (default runs/compare)")
    add_inspect(sub)
    e = sub.add_parser("export", help="write a checkpoint's weights as plain safetensors (BF16, original names)")
    e.add_argument("--checkpoint", required=True, help="a checkpoint folder, or a run folder (its latest)")
    e.add_argument("--out", required=True, help="the .safetensors file to write")
    e.add_argument("--dtype", default="bf16", choices=list(EXPORT_DTYPES), help="default bf16")
    return parser


def add_inspect(sub) -> None:
    """The `inspect` subcommand: one forward + backward of a preset, per-layer FP8 figures."""
    i = sub.add_parser("inspect", help="per-layer RMS, amax and FP8 saturation/flush of one training step")
    i.add_argument("--preset", default="tiny", choices=list(PRESETS), help="model size (default tiny)")
    i.add_argument("--level", default="O1", choices=list(fp8lm.LEVELS), help="precision level (default O1)")
    i.add_argument("--recipe", default="current", choices=list(fp8lm.RECIPES), help="FP8 scaling recipe")
    i.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    i.add_argument("--seed", type=int, default=1337, help="model init and batch seed (default 1337)")
    i.add_argument("--batch-size", type=positive_int, help="sequences in the batch (default: the preset's)")
    i.add_argument("--seq-len", type=positive_int, help="tokens per sequence (default: the preset's)")
    i.add_argument("--data", help="a text file, a folder of text files, or a folder with train.bin/val.bin")
    i.add_argument("--corpus", default="python-stdlib", choices=list(CORPORA),
                   help="built-in corpus when --data is not given (default python-stdlib)")
    i.add_argument("--json-out", help="write the full report as JSON to this path")
    i.add_argument("--png-out", help="write the RMS-per-layer plot (PNG) to this path")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig that the parsed arguments describe."""
    return TrainConfig(
        preset=args.preset, level=getattr(args, "level", "O1"), recipe=args.recipe, steps=args.steps,
        batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr, warmup=args.warmup,
        seed=args.seed, device=args.device, data=args.data, corpus=args.corpus,
        tokenizer=args.tokenizer, vocab_size=args.vocab_size, eval_every=args.eval_every,
        eval_batches=args.eval_batches, metrics_out=getattr(args, "metrics_out", None),
        progress=not args.no_progress, inspect_every=getattr(args, "inspect_every", None),
        out_dir=getattr(args, "out_dir", None), save_every=getattr(args, "save_every", None),
        resume=getattr(args, "resume", None),
    )


def run(args: argparse.Namespace) -> None:
    """Dispatch a parsed command line."""
    if args.command == "export":
        from fp8lm.checkpoint import export_weights
        info = export_weights(args.checkpoint, args.out, EXPORT_DTYPES[args.dtype])
        print(f"fp8lm export: {info['tensors']} tensors, {info['params']:,} parameters ({args.dtype}, step "
              f"{info['step']}) -> {info['path']} ({info['bytes'] / 2**20:.1f} MiB)")
        return
    if args.command == "inspect":
        from fp8lm.inspection import inspect_preset
        cfg = TrainConfig(preset=args.preset, level=args.level, recipe=args.recipe, device=args.device,
                          seed=args.seed, batch_size=args.batch_size, seq_len=args.seq_len, data=args.data,
                          corpus=args.corpus, progress=False)
        inspect_preset(cfg, args.json_out, args.png_out)
        return
    cfg = config_from_args(args)
    if args.command == "train":
        from fp8lm.train import train
        train(cfg)
    else:
        from fp8lm.compare import compare
        compare(cfg, args.levels, args.out)


class StderrHandler(logging.StreamHandler):
    """A log handler writing to whatever `sys.stderr` is at the time of each message."""

    @property
    def stream(self):
        """The current sys.stderr (pytest and others swap it)."""
        return sys.stderr

    @stream.setter
    def stream(self, value):
        """Ignored: the stream is always the current sys.stderr."""


def setup_logging() -> None:
    """Show the library's INFO messages (e.g. which layers run in FP8) on stderr, once."""
    log = logging.getLogger("fp8lm")
    if not any(isinstance(h, StderrHandler) for h in log.handlers):
        handler = StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `fp8lm` command; returns the exit code."""
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        run(args)
    except (ValueError, FileNotFoundError) as err:
        if os.environ.get("FP8LM_DEBUG") == "1":
            raise
        fail(err)
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted\n")
        return 130
    return 0
