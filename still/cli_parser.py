"""The argument parsers of every `still` verb. still/cli.py runs them: it passes its verb
functions in as `handlers`, so that this module imports nothing above the core."""

from __future__ import annotations

import argparse

from still import cli_args


def _add_eval_parsers(sub, handlers: dict) -> None:
    p = sub.add_parser("eval", help="score models on task YAMLs")
    p.add_argument("recipe", nargs="?", help="an eval recipe (or use --model/--task)")
    p.add_argument("--model", action="append", default=[], help="model reference (repeatable)")
    p.add_argument("--task", action="append", default=[], help="task YAML (repeatable)")
    p.add_argument("--limit", type=int, help="score only the first N rows of each task")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--out", help="results dir (default: the run dir's eval/, or runs/eval/...)")
    p.add_argument("--force", action="store_true", help="ignore cached results")
    p.add_argument(
        "--backend",
        choices=["auto", "llama.cpp", "transformers"],
        default="auto",
        help="how a .gguf file is scored: auto = through llama.cpp, as it ships; transformers = "
        "its weights dequantized in torch",
    )
    p.set_defaults(handler=handlers["eval"])

    p = sub.add_parser("compare", help="compare eval results of several runs side by side")
    p.add_argument("inputs", nargs="+", help="run dirs or eval result dirs")
    p.add_argument("--reference", help="name of the model differences are taken against")
    p.add_argument("--teacher", help="name of the teacher, for retention %%")
    p.add_argument("--out", help="where compare.md and compare.png go")
    p.add_argument(
        "--wandb", metavar="PROJECT", help="also log the table and chart to a W&B comparison run"
    )
    p.add_argument(
        "--wandb-group", metavar="GROUP", help="W&B group of that run (e.g. the pipeline's)"
    )
    p.set_defaults(handler=handlers["compare"])


def _with_recipe(sub, name: str, help_text: str):
    p = sub.add_parser(name, help=help_text, description=help_text)
    # optional for argparse, required by main: "a recipe path is required", not argparse's words
    p.add_argument("recipe", nargs="?", metavar="RECIPE.yaml", help="recipe YAML")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="dotted overrides, e.g. train.max_steps=10",
    )
    p.set_defaults(needs_recipe=True)
    return p


def _add_node_flags(p) -> None:
    """Several machines, as a scheduler names them (still/nodes.py)."""
    p.add_argument(
        "--nodes-file",
        metavar="PATH",
        help="hostfile, one `HOST [slots=N]` per line, machine 0 first: prints each machine's "
        "command; with --node-rank K also runs machine K's part",
    )
    p.add_argument(
        "--slurm", action="store_true", help="machines from SLURM's variables (inside srun)"
    )
    p.add_argument("--nnodes", type=int, metavar="N", help="machines in the job (as torchrun)")
    p.add_argument("--node-rank", type=int, metavar="K", help="this machine's rank (as torchrun)")
    p.add_argument("--rdzv-endpoint", metavar="HOST:PORT", help="machine 0's address (as torchrun)")


def _add_recipe_parsers(sub, handlers: dict) -> None:
    p = _with_recipe(sub, "run", "run a recipe (finetune, distill or eval)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    p.add_argument("--force", action="store_true", help="delete an existing run dir first")
    p.add_argument(
        "--nproc",
        type=int,
        metavar="N",
        help="processes on this machine (one per GPU), launched through accelerate",
    )
    _add_node_flags(p)
    p.add_argument(
        "--strict", action="store_true", help="exit 3 if the forgetting check flags a drop"
    )
    p.add_argument(
        "--from",
        dest="from_stage",
        metavar="STAGE",
        help="pipeline: run this stage again and every stage after it",
    )
    p.add_argument("--only", metavar="STAGE", help="pipeline: run this stage again, alone")
    p.set_defaults(handler=handlers["run"])
    _with_recipe(
        sub, "validate", "resolve a recipe (extends, overrides) and print it"
    ).set_defaults(handler=handlers["validate"])
    p = _with_recipe(sub, "check", "preflight: data, loss mask, parameters, memory and time")
    p.add_argument(
        "--probe",
        type=int,
        metavar="STEPS",
        help="distill: also train each student candidate this many steps and print its loss "
        "(a few minutes on a CPU for a small model; nothing is kept)",
    )
    p.set_defaults(handler=handlers["check"])
    p = _with_recipe(
        sub, "cascade", "measure a student-first cascade: an eval recipe with a cascade: section"
    )
    p.add_argument("--limit", type=int, help="score only the first N rows of each task")
    p.add_argument("--force", action="store_true", help="ignore cached results")
    p.set_defaults(handler=handlers["cascade"])


def _add_publish_parsers(sub, handlers: dict) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a measured cascade as an OpenAI-compatible chat endpoint on localhost",
    )
    p.add_argument("cascade", help="the cascade.json that `still cascade` wrote")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--teacher-url",
        help="defer to this OpenAI-compatible endpoint (…/v1) instead of loading the teacher",
    )
    p.add_argument("--teacher-model", help="model name the endpoint expects (default: teacher)")
    p.add_argument(
        "--on-teacher-error",
        choices=["student", "fail"],
        default="student",
        help="teacher unreachable: answer with the student and say so, or fail the request",
    )
    p.add_argument("--max-queue", type=int, default=8, help="requests waiting or running")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the teacher")
    p.set_defaults(handler=handlers["serve"])

    p = sub.add_parser("merge", help="merge a run's LoRA adapter into its base model")
    p.add_argument("run", help="run dir with an adapter/")
    p.add_argument("--out", required=True, help="output dir for the merged model")
    p.add_argument("--force", action="store_true", help="overwrite --out")
    p.set_defaults(handler=handlers["merge"])

    p = sub.add_parser(
        "publish",
        help="merge, verify, eval, model card, GGUF, hub upload",
        description="Ship a run: merged safetensors + tokenizer + model card (+ GGUF, + hub).",
    )
    p.add_argument("run", help="run dir (adapter/ or model/)")
    p.add_argument("--out", required=True, help="output dir (refused if it exists, unless --force)")
    p.add_argument(
        "--gguf",
        action="append",
        default=[],
        metavar="TYPE",
        help="also write GGUF: f16, q8_0, q4_0; q4_k_m, q5_k_m, q6_k (llama.cpp) (repeatable "
        "or comma-separated)",
    )
    p.add_argument(
        "--dtype",
        choices=("bf16", "fp16", "fp32"),
        default="bf16",
        help="of the safetensors (default bf16); the merge check and GGUF use fp32",
    )
    p.add_argument(
        "--hub", metavar="ORG/NAME", help="upload to this hub repo (token from $HF_TOKEN)"
    )
    p.add_argument(
        "--dry-run", action="store_true", help="with --hub: build locally, show what would upload"
    )
    p.add_argument("--private", action="store_true", help="with --hub: create the repo private")
    p.add_argument(
        "--task",
        action="append",
        default=[],
        metavar="T.yaml",
        help="score on this task YAML (repeatable; default: the recipe's eval_tasks)",
    )
    p.add_argument(
        "--quick", action="store_true", help="score only the first 32 rows of each eval task"
    )
    p.add_argument("--no-eval", action="store_true", help="do not re-run the recipe's eval tasks")
    p.add_argument(
        "--no-compare", action="store_true", help="do not score the base / teacher for the card"
    )
    p.add_argument(
        "--force", action="store_true", help="replace --out and upload over an existing hub repo"
    )
    p.set_defaults(handler=handlers["publish"])


def _add_teacher_parsers(sub, handlers: dict) -> None:
    _with_recipe(
        sub, "cache", "run a distill recipe's teacher once; store its top-k log-probs"
    ).set_defaults(handler=handlers["cache"])
    p = _with_recipe(
        sub,
        "generate",
        "the teacher answers the training prompts: a chat dataset (sequence-level KD)",
    )
    p.add_argument("--force", action="store_true", help="replace an existing generate.out")
    p.set_defaults(handler=handlers["generate"])


def _add_init_parser(sub, handlers: dict) -> None:
    p = sub.add_parser(
        "init",
        help="write a ready pipeline of recipes for a data file into recipes/<name>/",
        description="Detect the data's format, pick max_len from its token lengths and write "
        "commented teacher, student and eval recipes plus task YAMLs.",
    )
    p.add_argument("data", metavar="DATA", help="training data (.jsonl, .json, .csv, .parquet)")
    p.add_argument("--test", metavar="TEST", help="a test file for the tasks (default: held out)")
    p.add_argument("--base", metavar="REF", help="the base model (default: the built-in SmolLM2)")
    p.add_argument("--name", metavar="N", help="recipes/<N>/ and the run names (default: data's)")
    p.add_argument(
        "--group-by",
        metavar="FIELD",
        help="hold out whole groups of this row field (no group on both sides)",
    )
    p.add_argument("--force", action="store_true", help="replace an existing recipes/<name>/")
    p.set_defaults(handler=handlers["init"])


def _add_other_parsers(sub, handlers: dict) -> None:
    _add_init_parser(sub, handlers)
    p = sub.add_parser(
        "link",
        help="online, after `wandb sync`: mark the W&B model artifacts "
        "each run was made from as used by it (its lineage)",
    )
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="W&B-tracked still run dirs")
    p.set_defaults(handler=handlers["link"])
    sub.add_parser("schema", help="print the recipe JSON schema").set_defaults(
        handler=handlers["schema"]
    )
    sub.add_parser("models", help="list built-in models and the conversion cache").set_defaults(
        handler=handlers["models"]
    )


def build_parser(handlers: dict) -> argparse.ArgumentParser:
    """Every verb's parser; `handlers` maps a verb to the cli function that runs it."""
    parser = cli_args.Parser(
        prog="still", description="Fine-tune, distill, evaluate and publish small domain models."
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    parser.set_defaults(verbs=sub.choices)
    _add_recipe_parsers(sub, handlers)
    _add_eval_parsers(sub, handlers)
    _add_publish_parsers(sub, handlers)
    _add_teacher_parsers(sub, handlers)
    _add_other_parsers(sub, handlers)
    return parser
