"""The `fp8lm` command line.

    fp8lm train   --preset tiny --level O1 --steps 300 [--metrics-out run.json]
    fp8lm compare --preset tiny --levels O0,O1 --steps 300 [--out runs/compare]
    fp8lm train   ... --out runs/a --save-every 100      (checkpoints runs/a/step-000100, ...)
    fp8lm train   <the same arguments> --resume runs/a  (continues from the latest, up to --steps)
    fp8lm export  --checkpoint runs/a/step-000300 --out model.safetensors   (plain BF16 weights)
    fp8lm inspect --preset tiny --level O1 [--json-out inspect.json] [--png-out inspect.png]
    fp8lm train   --nproc 2 --dp ddp ...  (torchrun on this machine; batch size stays global)
    fp8lm train   --nproc 2 --dp fsdp --level O3 ...  (FSDP2, sharded FP8 training)
    fp8lm bench   [--compile both] [--out bench.json]   (FP8 vs BF16 speed; on a CPU a smoke test)

Bad arguments end with one line on stderr (`fp8lm: error: ...`) and exit code 2, with no
usage dump and no traceback. Set FP8LM_DEBUG=1 to get the traceback of a library error.
"""
import argparse
import logging
import os
import subprocess
import sys

import torch

import fp8lm
from fp8lm.data import CORPORA, TOKENIZERS
from fp8lm.distributed import launch
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


def shape_list(text: str) -> list[tuple[int, int, int]]:
    """argparse type: comma-separated GEMM shapes MxKxN (tokens, in features, out features), e.g.
    "16384x2048x11264,8192x8192x8192"."""
    shapes = []
    for item in (s.strip() for s in text.split(",")):
        dims = item.lower().split("x")
        if len(dims) != 3 or not all(d.isdigit() and int(d) > 0 for d in dims):
            raise argparse.ArgumentTypeError(f"bad GEMM shape {item!r}; give MxKxN with positive integers, "
                                             "e.g. 16384x2048x11264 (several separated by commas)")
        shapes.append(tuple(int(d) for d in dims))
    return shapes


def add_common(p: argparse.ArgumentParser) -> None:
    """Options shared by `train` and `compare`: model, data, schedule, device."""
    p.add_argument("--preset", default="tiny", choices=list(PRESETS), help="model size (default tiny)")
    p.add_argument("--recipe", default="current", choices=list(fp8lm.RECIPES), help="FP8 scaling recipe")
    p.add_argument("--fp8-activations", choices=["auto", "on", "off"], default="auto",
                   help="store the activations that SwiGLU, attention and norms save for backward in FP8 "
                        "(auto: on at O2, off at O1)")
    p.add_argument("--master-rounding", choices=["stochastic", "nearest"], default="stochastic",
                   help="rounding of the FP16 master weights at O1/O2 (default stochastic; nearest drops "
                        "updates below half an FP16 ulp)")
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
    p.add_argument("--compile", choices=["off", "on"], default="off",
                   help="torch.compile each transformer block (default off; on: the fast path on GPUs, one "
                        "process, after a compiled-gradient check)")


def build_parser() -> ArgumentParser:
    """The `fp8lm` parser and its subcommands."""
    parser = ArgumentParser(prog=PROG, description="Train LLMs in FP8 with PyTorch.")
    parser.add_argument("--version", action="version", version=f"{PROG} {fp8lm.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,compare,inspect,export,bench}")

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
    t.add_argument("--nproc", type=positive_int, default=1,
                   help="processes on this machine, started with torchrun (needs --dp; batch size stays global)")
    t.add_argument("--dp", choices=["ddp", "fsdp"],
                   help="data parallelism: ddp (O0/O1/O2; FP8 weight gradients travel in FP8); "
                        "fsdp (FSDP2: O3, 1-byte FP8 weight all-gathers; O0: the BF16 baseline)")

    c = sub.add_parser("compare", help="train at several levels and compare the losses")
    add_common(c)
    c.add_argument("--levels", type=level_list, default=["O0", "O1"], help="comma-separated (default O0,O1)")
    c.add_argument("--out", default=os.path.join("runs", "compare"), help="output folder (default runs/compare)")
    add_inspect(sub)
    add_bench(sub)
    e = sub.add_parser("export", help="write a checkpoint's weights as plain safetensors (BF16, original names)")
    e.add_argument("--checkpoint", required=True, help="a checkpoint folder, or a run folder (its latest)")
    e.add_argument("--out", required=True, help="the .safetensors file to write")
    e.add_argument("--dtype", default="bf16", choices=list(EXPORT_DTYPES), help="default bf16")
    return parser


def add_bench(sub) -> None:
    """The `bench` subcommand: FP8 vs BF16 speed, GEMM and step level, in one process (`fp8lm.bench`)."""
    b = sub.add_parser("bench", help="FP8 vs BF16 speed side by side: GEMMs and training steps (CPU: smoke test)")
    b.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    b.add_argument("--preset", choices=list(PRESETS),
                   help="step-level model (default llama-0.75b on CUDA, tiny on CPU)")
    b.add_argument("--levels", type=level_list, help="comma-separated (default O0,O1,O2; O3 needs torch.distributed)")
    b.add_argument("--recipe", default="current", choices=list(fp8lm.RECIPES), help="FP8 scaling recipe")
    b.add_argument("--batch-size", type=positive_int, help="sequences per step (default 8 on CUDA, 4 on CPU)")
    b.add_argument("--seq-len", type=positive_int,
                   help="tokens per sequence (default: the preset's on CUDA, 64 on CPU)")
    b.add_argument("--steps", type=positive_int, help="timed steps per configuration (default 10 on CUDA, 2 on CPU)")
    b.add_argument("--warmup", type=positive_int, help="untimed steps first (default 3 on CUDA, 1 on CPU)")
    b.add_argument("--gemm-shapes", type=shape_list,
                   help="GEMM-level shapes MxKxN, comma-separated (default: llama-0.75b's linears and 8192^3 on CUDA)")
    b.add_argument("--gemm-repeats", type=positive_int, help="timed calls per GEMM variant, in interleaved rounds (default 60 on CUDA)")
    b.add_argument("--compile", choices=["off", "on", "both"],
                   help="torch.compile per block (default both on CUDA, off on CPU)")
    b.add_argument("--no-torchao", action="store_true", help="skip the torchao columns even if torchao is importable")
    b.add_argument("--fast-accum", action="store_true",
                   help="FP8 forward GEMMs with Hopper's fast accumulation (fp8lm.Recipe.fast_accum)")
    b.add_argument("--fused-optimizer", action="store_true",
                   help="O1/O2 with fp8lm AdamW's fused Triton step forced (AdamW(fused=True); CUDA only; "
                        "CUDA with Triton takes it by default)")
    b.add_argument("--skip-gemm", action="store_true", help="only the step level")
    b.add_argument("--skip-step", action="store_true", help="only the GEMM level")
    b.add_argument("--skip-grad-check", action="store_true",
                   help="do not compare a compiled block's gradients with eager's before the compiled step rows")
    b.add_argument("--time-budget", type=positive_float, help="seconds; configurations not started by then are skipped")
    b.add_argument("--out", help="write the results as JSON to this path")
    b.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")


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
        fp8_activations={"auto": None, "on": True, "off": False}[args.fp8_activations],
        master_rounding=args.master_rounding,
        batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr, warmup=args.warmup,
        seed=args.seed, device=args.device, data=args.data, corpus=args.corpus,
        tokenizer=args.tokenizer, vocab_size=args.vocab_size, eval_every=args.eval_every,
        eval_batches=args.eval_batches, metrics_out=getattr(args, "metrics_out", None),
        progress=not args.no_progress, inspect_every=getattr(args, "inspect_every", None),
        out_dir=getattr(args, "out_dir", None), save_every=getattr(args, "save_every", None),
        resume=getattr(args, "resume", None), dp=getattr(args, "dp", None), compile=args.compile == "on",
    )


def run(args: argparse.Namespace) -> None:
    """Dispatch a parsed command line."""
    if args.command == "export":
        from fp8lm.checkpoint import export_weights
        info = export_weights(args.checkpoint, args.out, EXPORT_DTYPES[args.dtype])
        print(f"fp8lm export: {info['tensors']} tensors, {info['params']:,} parameters ({args.dtype}, step "
              f"{info['step']}) -> {info['path']} ({info['bytes'] / 2**20:.1f} MiB)")
        return
    if args.command == "bench":
        from fp8lm.bench import BenchConfig, run_bench
        run_bench(BenchConfig(
            device=args.device, preset=args.preset, levels=args.levels, recipe=args.recipe,
            fast_accum=args.fast_accum, fused_optimizer=args.fused_optimizer,
            batch_size=args.batch_size, seq_len=args.seq_len, steps=args.steps, warmup=args.warmup,
            gemm_repeats=args.gemm_repeats, gemm_shapes=args.gemm_shapes, compile=args.compile,
            torchao=not args.no_torchao,
            gemm=not args.skip_gemm, step=not args.skip_step, grad_check=not args.skip_grad_check,
            time_budget_s=args.time_budget, out=args.out, progress=not args.no_progress,
            command=" ".join([PROG, *args.argv])))
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
        if args.nproc > 1 or (cfg.dp is not None and not launch.under_torchrun()):
            launch_torchrun(args, cfg)
            return
        train(cfg)
    else:
        from fp8lm.compare import compare
        compare(cfg, args.levels, args.out)


def launch_torchrun(args: argparse.Namespace, cfg: TrainConfig) -> None:
    """Check the run, then start `fp8lm train` (without --nproc) in `--nproc` processes through torchrun."""
    from fp8lm.train import resolve_config
    if cfg.dp is None:
        raise ValueError(f"--nproc {args.nproc} needs --dp ddp or --dp fsdp (data parallelism)")
    if launch.under_torchrun():
        raise ValueError("--nproc starts torchrun itself; under torchrun, leave --nproc out")
    launch.local_batch_size(resolve_config(cfg).batch_size, args.nproc)  # also checks the whole config
    argv = [a for i, a in enumerate(args.argv) if not _is_nproc(args.argv, i)]
    rc = subprocess.call(launch.torchrun_command(args.nproc, argv))
    if rc:
        raise ValueError(f"torchrun exited with code {rc} (the workers' messages are above)")


def _is_nproc(argv: list[str], i: int) -> bool:
    """Whether argv[i] is --nproc, its value, or --nproc=N."""
    return argv[i] == "--nproc" or argv[i].startswith("--nproc=") or (i > 0 and argv[i - 1] == "--nproc")


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
    args.argv = list(sys.argv[1:] if argv is None else argv)  # `bench` records them; `train --nproc` passes them to torchrun
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
