"""Peak memory and time of naive vs chunked logit distillation, forward + backward.

    python benchmarks/kd_memory.py                   # CPU, SmolLM2-135M-like sizes
    python benchmarks/kd_memory.py --device cuda     # same on a GPU

Both variants compute the same loss from the same inputs: 0.5·KD + 0.5·CE, summed over
batch × seq tokens, then backward into the student's hidden states and head weight.
  naive    full logits: student [tokens × vocab] with autograd, teacher [tokens × vocab] under
           no_grad, then `kd_loss(..., reduction="sum")` + cross entropy.
  chunked  `fused_kd_loss` from hidden states, `--chunk-size` tokens at a time.

Cross-tokenizer rows (`--divergences xtok-gold,xtok-uld`): the teacher has its own vocabulary
of `--teacher-vocab` entries (default 262,144, Gemma-3's; the student's `--vocab` is 49,152,
SmolLM2's), `--matched-share` of the student's entries map one-to-one to teacher entries, and
every position is aligned (the most work). naive: both full logits, then
`xtok_kd_loss_from_logits`; chunked: `xtok_kd_loss`.

How peak memory is measured:
  CPU   each (divergence, variant) runs in a fresh subprocess. The child allocates its inputs,
        reads `resource.getrusage(RUSAGE_SELF).ru_maxrss` as a baseline, runs, and reads it
        again; the rise is the extra resident memory the loss needed at its peak. ru_maxrss is
        a high-water mark that never falls, so sharing a process would let the first variant's
        peak hide the second's; hence one process per variant. PyTorch's CPU allocator hands
        large blocks back to the OS, so a rise in RSS is real use, not a cache.
  CUDA  `torch.cuda.max_memory_allocated()` after `reset_peak_memory_stats()`, minus the memory
        allocated once inputs exist (also one subprocess per variant, for symmetry).
The time is the fastest of `--repeats` forward + backward passes.
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

# Runs as a plain script from a checkout: make `distill` importable without an install.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from distill.align import VocabMap
from distill.losses import fused_kd_loss, kd_loss
from distill.xtok_losses import xtok_kd_loss, xtok_kd_loss_from_logits

KD_WEIGHT = CE_WEIGHT = 0.5


def make_inputs(args) -> dict:
    generator = torch.Generator().manual_seed(0)
    tokens, dtype = args.batch * args.seq, getattr(torch, args.dtype)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(args.device, dtype)

    # Heads scaled by 1/sqrt(hidden) give logits of unit spread, like a trained model's.
    student_head = randn(args.vocab, args.hidden, scale=args.hidden**-0.5)
    teacher_vocab = args.teacher_vocab if is_cross(args.divergence) else args.vocab
    teacher_head = randn(teacher_vocab, args.teacher_hidden, scale=args.teacher_hidden**-0.5)
    return {
        "student_hidden": randn(tokens, args.hidden).requires_grad_(),
        "student_head_weight": student_head.requires_grad_(),
        "teacher_hidden": randn(tokens, args.teacher_hidden),
        "teacher_head_weight": teacher_head,
        "labels": torch.randint(0, args.vocab, (tokens,), generator=generator).to(args.device),
    }


def is_cross(divergence: str | None) -> bool:
    return bool(divergence) and divergence.startswith("xtok-")


def vocab_pairs(args) -> VocabMap:
    """`--matched-share` of the student's ids paired with distinct random teacher ids."""
    generator = torch.Generator().manual_seed(1)
    count = int(args.matched_share * args.vocab)
    student_ids = torch.randperm(args.vocab, generator=generator)[:count].sort().values
    teacher_ids = torch.randperm(args.teacher_vocab, generator=generator)[:count]
    return VocabMap(student_ids, teacher_ids, args.vocab, args.teacher_vocab)


def cross_step(inputs: dict, args, chunked: bool) -> None:
    tokens = inputs["labels"].shape[0]
    settings = dict(
        mode=args.divergence.removeprefix("xtok-"),
        mapping=vocab_pairs(args),
        kd_weight=KD_WEIGHT,
        ce_weight=CE_WEIGHT,
    )
    if chunked:
        index = torch.arange(tokens, device=inputs["labels"].device)
        result = xtok_kd_loss(**inputs, teacher_index=index, chunk_size=args.chunk_size, **settings)
    else:
        student_logits = inputs["student_hidden"] @ inputs["student_head_weight"].T
        with torch.no_grad():
            teacher_logits = inputs["teacher_hidden"] @ inputs["teacher_head_weight"].T
        aligned = torch.ones(tokens, dtype=torch.bool, device=student_logits.device)
        result = xtok_kd_loss_from_logits(
            student_logits, teacher_logits, inputs["labels"], aligned, **settings
        )
    result.loss.backward()


def naive_step(inputs: dict, divergence: str) -> None:
    student_logits = inputs["student_hidden"] @ inputs["student_head_weight"].T
    with torch.no_grad():
        teacher_logits = inputs["teacher_hidden"] @ inputs["teacher_head_weight"].T
    mask = inputs["labels"] != -100
    kd_sum = kd_loss(student_logits, teacher_logits, mask, divergence=divergence, reduction="sum")
    ce_sum = F.cross_entropy(student_logits.float(), inputs["labels"], reduction="sum")
    (KD_WEIGHT * kd_sum + CE_WEIGHT * ce_sum).backward()


def chunked_step(inputs: dict, divergence: str, chunk_size: int) -> None:
    result = fused_kd_loss(
        **inputs,
        divergence=divergence,
        kd_weight=KD_WEIGHT,
        ce_weight=CE_WEIGHT,
        chunk_size=chunk_size,
    )
    result.loss.backward()


def measure_one(args) -> dict:
    """Child process: one variant, one divergence; returns its peak rise (MiB) and best time."""
    inputs = make_inputs(args)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline_bytes = torch.cuda.memory_allocated()
    else:
        baseline_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    times = []
    for _ in range(args.repeats):
        for tensor in inputs.values():
            tensor.grad = None
        start = time.perf_counter()
        if is_cross(args.divergence):
            cross_step(inputs, args, chunked=args.variant == "chunked")
        elif args.variant == "naive":
            naive_step(inputs, args.divergence)
        else:
            chunked_step(inputs, args.divergence, args.chunk_size)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if cuda:
        peak_mib = (torch.cuda.max_memory_allocated() - baseline_bytes) / 2**20
    else:
        peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline_kib) / 2**10
    return {"peak_mib": peak_mib, "seconds": min(times)}


def run_in_subprocess(variant: str, divergence: str) -> dict:
    """Re-run this script with the same flags as a child that measures one variant."""
    command = [
        sys.executable,
        __file__,
        *sys.argv[1:],
        "--variant",
        variant,
        "--divergence",
        divergence,
    ]
    finished = subprocess.run(command, capture_output=True, text=True)
    if finished.returncode != 0:
        sys.exit(f"{variant}/{divergence} failed:\n{finished.stderr}")
    return json.loads(finished.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--hidden", type=int, default=576, help="student hidden size")
    parser.add_argument("--teacher-hidden", type=int, default=576)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--divergences", default="forward_kl,jsd", help="also xtok-gold, xtok-uld")
    parser.add_argument("--teacher-vocab", type=int, default=262144, help="xtok rows only")
    parser.add_argument("--matched-share", type=float, default=0.6, help="xtok-gold only")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--variant", choices=["naive", "chunked"], help=argparse.SUPPRESS)
    parser.add_argument("--divergence", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(measure_one(args)))
        return

    versions = f"torch {torch.__version__}, python {sys.version.split()[0]}"
    print(
        f"KD forward+backward: batch {args.batch} × seq {args.seq} = {args.batch * args.seq} "
        f"tokens, vocab {args.vocab} (xtok teacher {args.teacher_vocab}), "
        f"hidden {args.hidden}/{args.teacher_hidden} "
        f"(student/teacher), chunk {args.chunk_size}, {args.device} {args.dtype}, {versions}"
    )
    print(f"{'divergence':<12}{'variant':<10}{'peak MiB':>10}{'time s':>9}")
    ratios = []
    for divergence in args.divergences.split(","):
        results = {v: run_in_subprocess(v, divergence) for v in ("naive", "chunked")}
        for variant, result in results.items():
            peak, seconds = result["peak_mib"], result["seconds"]
            print(f"{divergence:<12}{variant:<10}{peak:>10.0f}{seconds:>9.2f}")
        memory_ratio = results["chunked"]["peak_mib"] / results["naive"]["peak_mib"]
        time_ratio = results["chunked"]["seconds"] / results["naive"]["seconds"]
        ratios.append(
            f"{divergence}: chunked/naive peak memory = {memory_ratio:.1%}, "
            f"time = {time_ratio:.2f}x"
        )
    print("\n".join(ratios))


if __name__ == "__main__":
    main()
