"""The ``lorelay`` command line.

Each subcommand parses its arguments here and hands off to the module that does the work; heavy
imports (torch, transformers) happen only inside those, so ``lorelay --help`` and
``lorelay data check`` stay fast. A ``LorelayError`` (bad input) prints one clear line and exits 2;
an interrupted stage (``stages.core.training.Interrupted``) says how to resume and exits 130.
"""

from __future__ import annotations

import argparse
import os
import sys


class _AnyOrderParser(argparse.ArgumentParser):
    """A subcommand parser that takes options and ``key=value`` overrides in any order
    (``lorelay run P key=v --force sft``, ``lorelay sft k=v --config f``): argparse's intermixed
    parsing, for the subcommands that have a list of positionals."""

    _intermixing = False

    def parse_known_args(self, args=None, namespace=None):
        takes_a_list = any(action.nargs == argparse.ZERO_OR_MORE for action in self._get_positional_actions())
        if self._intermixing or not takes_a_list:
            return super().parse_known_args(args, namespace)
        self._intermixing = True  # parse_known_intermixed_args calls back into parse_known_args
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


def _stage_parser(sub, stage) -> None:
    """``lorelay NAME``: one registered stage (``stages.registry``) on its own."""
    parser = sub.add_parser(stage.name, help=stage.description,
                            description=f"{stage.description} Overrides are dotted keys, e.g. "
                                        "training.learning_rate=1e-4; adapter=PATH starts from a saved adapter.")
    parser.add_argument("--config", required=False, help=f"YAML recipe (e.g. configs/{stage.name}.yaml)")
    parser.add_argument("overrides", nargs="*", default=[], metavar="key=value")
    restart = parser.add_mutually_exclusive_group()
    restart.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")
    restart.add_argument("--restart", action="store_true", help="discard an interrupted run's checkpoints and start over")
    parser.add_argument("--help-config", action="store_true", help="list every config key with its default and help")


def build_parser() -> argparse.ArgumentParser:
    from stages import registry

    stages = registry.stages()
    parser = argparse.ArgumentParser(prog="lorelay", description="Fine-tune LLMs: a pipeline of stages ("
                                     + ", ".join(s.name for s in stages) + ") over one shared QLoRA base.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_AnyOrderParser)
    for stage in stages:
        _stage_parser(sub, stage)

    run = sub.add_parser("run", help="Run a pipeline of stages from a YAML file.")
    run.add_argument("pipeline", help="configs/pipelines/NAME.yaml")
    # default=[]: argparse would otherwise list the overrides as required when the pipeline is missing
    run.add_argument("overrides", nargs="*", default=[], metavar="stage.key=value")
    run.add_argument("--run-dir", help="where the run lives (default: from the pipeline file)")
    run.add_argument("--force", action="append", default=[], metavar="STAGE", help="re-run this stage (repeatable)")
    run.add_argument("--restart", action="store_true",
                     help="stages that re-run discard an interrupted run's checkpoints instead of resuming from them")
    run.add_argument("--dry-run", action="store_true",
                     help="check every stage, print what would run and why, and exit (loads no model)")

    status = sub.add_parser("status", help="Show the stages, cache keys and metrics of a run.")
    status.add_argument("run_dir")

    chat = sub.add_parser("chat", help="Talk to a trained policy or a merged model.")
    chat.add_argument("target", help="stage output directory, run directory or merged model directory")
    chat.add_argument("--prompt", help="one-shot: print the reply to this prompt and exit")
    chat.add_argument("--system", help="system prompt")
    chat.add_argument("--max-new-tokens", type=int, default=128)

    data = sub.add_parser("data", help="Check a data file without training.")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    check = data_sub.add_parser("check", help="Validate a data file without training.")
    check.add_argument("file", help="a data file, a directory of text files (CPT) or a saved dataset")
    check.add_argument("--format", default="auto")
    check.add_argument("--kind", default="auto", choices=["auto", "sft", "preference", "kto", "cpt", "text"],
                       help="which checks, when the format does not say (text: the older name of cpt)")
    check.add_argument("--model", default=None, help="tokenizer for length statistics (default: embedded model)")
    check.add_argument("--sample", type=int, default=1000,
                       help="rows whose chat-template token statistics are computed (0: every row)")
    check.add_argument("--separator", default=None, help="CPT: split text files into documents at this string")

    push = sub.add_parser("push", help="Upload a policy and its model card to the Hub.")
    push.add_argument("target", help="stage output directory or run directory")
    push.add_argument("--repo", required=True, help="OWNER/NAME")
    push.add_argument("--private", action="store_true")
    push.add_argument("--revision", default=None)
    push.add_argument("--merged", action="store_true", help="merge the adapter into the base and upload full weights")
    push.add_argument("--dry-run", action="store_true", help="print files and model card; no network")
    push.add_argument("--merge-base", default="auto", choices=["auto", "dequantized", "original"],
                      help="with --merged: as for `lorelay merge --base`")

    merge = sub.add_parser("merge", help="Merge an adapter into full weights of its base.")
    merge.add_argument("target", help="stage output directory")
    merge.add_argument("--out", required=True)
    merge.add_argument("--base", default="auto", choices=["auto", "dequantized", "original"],
                       help="dequantized: the 4-bit weights a QLoRA adapter trained on (its default); "
                            "original: the full-precision checkpoint (the default for unquantized training)")
    return parser


def dispatch(args: argparse.Namespace) -> int:
    from stages import registry

    if args.command in registry.names():
        from pipelines.single import run_stage_command

        return run_stage_command(args.command, args.config, args.overrides, resume=args.resume,
                                 restart=args.restart, help_config=args.help_config)
    if args.command == "run":
        from pipelines.runner import run_command

        return run_command(args.pipeline, args.overrides, run_dir=args.run_dir, force=args.force,
                           restart=args.restart, dry_run=args.dry_run)
    if args.command == "status":
        from pipelines.runner import status_command

        return status_command(args.run_dir)
    if args.command == "chat":
        from pipelines.chat import chat_command

        return chat_command(args.target, prompt=args.prompt, system=args.system,
                            max_new_tokens=args.max_new_tokens)
    if args.command == "data":
        from pipelines.data_check import check_command

        return check_command(args.file, data_format=args.format, kind=args.kind, model=args.model,
                             sample=args.sample, separator=args.separator)
    if args.command == "push":
        from pipelines.hub import push_command

        return push_command(args.target, repo=args.repo, private=args.private, revision=args.revision,
                            merged=args.merged, dry_run=args.dry_run, merge_base=args.merge_base)
    if args.command == "merge":
        from pipelines.merge import merge_command

        return merge_command(args.target, out=args.out, base=args.base)
    raise AssertionError(args.command)


def quiet_library_noise(command: str | None = None) -> None:
    """Silence messages that ask the user to act on nothing lorelay lets them change."""
    import logging
    import warnings

    # bitsandbytes on an AVX512-bf16 CPU: an optional Hub kernel package is missing (4-bit works without it).
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # TRL and PEFT still read transformers' old `is_gradient_checkpointing` name.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*deprecated", category=FutureWarning)
    # per-map and weight-loading bars would break up lorelay's own progress lines
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "datasets" in sys.modules:  # read the variable at its import: too late for a process that has it already
        sys.modules["datasets"].disable_progress_bars()
    if command == "data":
        return  # loads no model: importing transformers here only to silence it would cost data check a second
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()


PEER_LOSS = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "NCCL communicator was aborted")


def lost_peer(err: BaseException) -> str | None:
    """The symptom, when ``err`` is a collective failing because another process of the group died."""
    text = str(err)
    return next((symptom for symptom in PEER_LOSS if symptom in text), None)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    args = build_parser().parse_args(argv)
    quiet_library_noise(args.command)
    from stages.core.errors import LorelayError

    # Under `accelerate launch` every process prints; say which one (issue 7).
    where = f" [rank {os.environ.get('RANK', '0')}]" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    try:
        return dispatch(args)
    except LorelayError as err:
        code = getattr(err, "exit_code", 2)  # 130 for an interrupted stage, which is not an error
        print(f"lorelay{where}: {'error: ' if code == 2 else ''}{err}", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        print(f"lorelay{where}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if where and lost_peer(err):
            # Not this process's fault: the other rank's own error (with its rank) says what happened.
            print(f"lorelay{where}: error: another process of this run stopped mid-stage ({lost_peer(err)}); "
                  "this one stops too. The stage's finished checkpoints are kept: fix the other process's "
                  "error and re-run with --resume.", file=sys.stderr)
            return 1
        if where:  # the traceback follows; accelerate then stops the other processes
            print(f"lorelay{where}: failed: {type(err).__name__}: {err}", file=sys.stderr)
        raise


if __name__ == "__main__":
    sys.exit(main())
