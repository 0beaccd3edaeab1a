"""The distillation teacher: loading it frozen, checking it can teach this student (one
vocabulary, logits straight from the head), and where it lives once several processes run.

Placement: under DDP / ZeRO-2 every process holds a copy; under ZeRO-3 or FSDP a teacher that
takes more than a quarter of one device is sharded like the student (its own ZeRO-3 engine, or
FSDP2 over its decoder layers), so a teacher larger than one device still fits.
"""

from __future__ import annotations

import os

from still import models
from still.errors import StillError
from still.launch import is_main_process
from still.preflight import refuse_beyond_model
from still.recipe import DistillRecipe

# A teacher copy per process is fine while it takes at most this share of one device's memory.
REPLICATE_TEACHER_MAX_SHARE = 0.25


# --------------------------------------------------------------------------- load + check
def load_teacher(recipe: DistillRecipe):
    """Frozen, eval mode, adapter merged (fp32 merge is exact enough and makes it faster)."""
    teacher, tokenizer = models.load_from_section(recipe.teacher, key="teacher")
    refuse_beyond_model(recipe, teacher.config, role="teacher")
    if hasattr(teacher, "merge_and_unload"):
        teacher = teacher.merge_and_unload()
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher, tokenizer


def shared_vocab_size(teacher_tokenizer, student_tokenizer, teacher, student) -> int:
    """Logit KD needs one vocabulary. Embedding rows past the tokenizer (padding) are ignored."""
    if teacher_tokenizer.get_vocab() != student_tokenizer.get_vocab():
        raise StillError(
            f"teacher and student tokenizers differ ({len(teacher_tokenizer)} vs "
            f"{len(student_tokenizer)} tokens): logit KD needs one vocabulary",
            hint="set distill.cross_tokenizer: auto to distil across tokenizers, or use "
            "sequence-level KD (teacher-written data + finetune)",
        )
    vocab = len(teacher_tokenizer)
    # from a teacher cache, the teacher's head is the tokenizer's vocabulary as cached
    teacher_rows = vocab if teacher is None else teacher.get_output_embeddings().weight.shape[0]
    student_rows = student.get_output_embeddings().weight.shape[0]
    if min(teacher_rows, student_rows) < vocab:
        raise StillError(
            f"an output layer has fewer rows ({min(teacher_rows, student_rows)}) "
            f"than the tokenizer ({vocab})"
        )
    if teacher_rows != student_rows and is_main_process():
        print(
            f"still: vocab padding differs (teacher {teacher_rows}, student {student_rows} "
            f"rows); KD uses the {vocab} real tokens"
        )
    return vocab


def refuse_transformed_logits(**roles) -> None:
    """The fused KD loss builds logits as head(hidden); a model that soft-caps or scales them
    after its head would be distilled against the wrong distribution. (A teacher cache stores
    the teacher's real logits, so then only the student is checked.)"""
    for role, model in roles.items():
        if model is None:
            continue
        head = model.get_output_embeddings()
        if head is not None and head.weight.numel() == 0:
            continue  # partitioned by ZeRO-3 at load: the unfused path calls the head itself
        if not models.logits_are_head_output(model):
            raise StillError(
                f"the {role}'s logits are not its output head alone (e.g. Gemma-2's soft-capping "
                f"or Cohere's scaling); the fused KD loss would distil the wrong distribution",
                hint="distil between models whose logits come straight from the head "
                "(not supported yet)",
            )


# --------------------------------------------------------------------------- placement
def place_teacher(
    teacher,
    choice: str,
    *,
    strategy: str,
    device,
    num_processes: int,
    deepspeed_plugin=None,
    fsdp_plugin=None,
):
    """A copy per process, or sharded like the student under ZeRO-3 / FSDP."""
    teacher_bytes = sum(p.numel() * p.element_size() for p in teacher.parameters())
    device_bytes = device_memory_bytes(device)
    placement = teacher_placement(choice, strategy, teacher_bytes, device_bytes)
    if strategy in ("zero3", "fsdp") and is_main_process():
        done = {"replicate": "replicated", "shard": "sharded"}[placement]
        print(
            f"still: teacher ({describe_bytes(teacher_bytes)} of weights) {done} "
            f"across {num_processes} process(es) "
            f"[{describe_bytes(device_bytes)} per device; distributed.teacher: {choice}]"
        )
    if placement == "replicate":
        return teacher.to(device)
    if strategy == "zero3":
        return shard_teacher_deepspeed(teacher, deepspeed_plugin)
    return shard_teacher_fsdp(teacher, device, fsdp_plugin)


def device_memory_bytes(device) -> int:
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    # CPU: the machine's memory, shared by the processes on it
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // max(local, 1)


def teacher_placement(choice: str, strategy: str, teacher_bytes: int, device_bytes: int) -> str:
    """replicate | shard. Only ZeRO-3 and FSDP can shard; a copy per process costs no traffic."""
    if strategy not in ("zero3", "fsdp"):
        if choice == "shard":
            raise StillError(
                f"distributed.teacher: shard needs a zero3 or fsdp launch; this one is {strategy}",
                hint="set distributed.strategy: zero3 (or fsdp), or teacher: replicate",
            )
        return "replicate"
    if choice != "auto":
        return choice
    return "replicate" if teacher_bytes <= REPLICATE_TEACHER_MAX_SHARE * device_bytes else "shard"


def shard_teacher_deepspeed(teacher, deepspeed_plugin):
    """The frozen teacher in its own ZeRO-3 engine: parameters partitioned, gathered per layer."""
    import copy

    import deepspeed

    config = copy.deepcopy(deepspeed_plugin.deepspeed_config)
    for key in ("optimizer", "scheduler"):
        config.pop(key, None)
    zero = config.setdefault("zero_optimization", {})
    zero.pop("offload_optimizer", None)
    zero["stage"] = 3
    config = _drop_auto(config)
    config.setdefault("train_micro_batch_size_per_gpu", 1)
    engine, *_ = deepspeed.initialize(model=teacher, config=config)
    engine.eval()
    return engine


def _drop_auto(value):
    """DeepSpeed's own defaults for what Trainer would only fill for the model it trains."""
    if isinstance(value, dict):
        return {key: _drop_auto(item) for key, item in value.items() if item != "auto"}
    return value


def shard_teacher_fsdp(teacher, device, fsdp_plugin):
    """FSDP2 over the teacher's decoder layers, offloaded when the student is; embeddings and
    head stay whole after the first forward (the root unit is not resharded), which the chunked
    KD loss reads directly."""
    import torch.distributed as torch_dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    mesh = init_device_mesh(device.type, (torch_dist.get_world_size(),))
    offload = isinstance(fsdp_plugin.cpu_offload, CPUOffloadPolicy)
    policy = CPUOffloadPolicy() if offload else OffloadPolicy()
    layer_classes = set(getattr(teacher, "_no_split_modules", None) or ())
    if not layer_classes:
        raise StillError(
            f"cannot shard teacher {type(teacher).__name__}: it names no decoder layer class",
            hint="set distributed.teacher: replicate",
        )
    for module in teacher.modules():
        if type(module).__name__ in layer_classes:
            fully_shard(module, mesh=mesh, reshard_after_forward=True, offload_policy=policy)
    fully_shard(teacher, mesh=mesh, reshard_after_forward=False, offload_policy=policy)
    return teacher


def describe_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if count < 1024 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TB"
