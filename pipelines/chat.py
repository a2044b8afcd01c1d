"""``lorelay chat STAGE_OR_RUN_DIR``: talk to a trained policy with its saved chat template.

A run directory resolves to its final policy (``run.json``'s ``policy``). The base comes from the
stage's manifest; the tokenizer (and so the chat template) from the stage directory itself. A full
model directory (``lorelay merge`` output, or any safetensors checkpoint) is loaded as it is.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from stages.core.errors import LorelayError


def resolve_policy_dir(target: str | Path) -> Path:
    """A stage directory, or the policy stage of a run directory."""
    target = Path(target)
    if (target / "run.json").exists():
        run = json.loads((target / "run.json").read_text())
        if not run.get("policy"):
            raise LorelayError("this run has no finished policy stage yet", file=target / "run.json")
        return target / run["policy"]
    if (target / "adapter_config.json").exists() or is_full_model(target):
        return target
    if not target.exists():
        raise LorelayError("no such directory", file=target)
    raise LorelayError("expected a stage directory (adapter_config.json), a run directory (run.json) or a "
                       "model directory (config.json and *.safetensors)", file=target)


def is_full_model(directory: Path) -> bool:
    """A whole checkpoint (merged weights), not an adapter."""
    return (directory / "config.json").is_file() and any(directory.glob("*.safetensors")) \
        and not (directory / "adapter_config.json").exists()


def load_policy(stage_dir: Path):
    """(model with the adapter attached, tokenizer) for a finished stage."""
    from transformers import AutoTokenizer

    from stages.core.config import from_dict
    from stages.core.lifecycle import use_adapter_vocabulary
    from stages.core.modeling import LoraSettings, ModelConfig, attach_adapter, load_base
    from stages.core.training import verify_output

    if is_full_model(stage_dir):
        base = load_base(ModelConfig(name=str(stage_dir)))
        base.model.eval()
        return base.model, base.tokenizer
    manifest = verify_output(stage_dir)
    model_config = from_dict(ModelConfig, manifest["config"]["model"])
    base = load_base(model_config)
    use_adapter_vocabulary(base, stage_dir)  # an adapter trained with new tokens needs their embedding rows
    base.tokenizer = AutoTokenizer.from_pretrained(stage_dir)  # the template the stage trained with
    model = attach_adapter(base.model, LoraSettings(), init_from=stage_dir)
    model.eval()
    return model, base.tokenizer


def chat_command(target: str, *, prompt: str | None = None, system: str | None = None,
                 max_new_tokens: int = 128) -> int:
    from stages.core.evaluation import generate

    stage_dir = resolve_policy_dir(target)
    model, tokenizer = load_policy(stage_dir)
    history = [{"role": "system", "content": system}] if system else []
    if prompt is not None:
        reply = generate(model, tokenizer, [history + [{"role": "user", "content": prompt}]],
                         max_new_tokens=max_new_tokens)[0][0]
        print(reply)
        return 0
    print(f"chatting with {stage_dir} (empty line or Ctrl-D to quit, /reset to clear the history)")
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print()
            return 0
        if not line:
            return 0
        if line == "/reset":
            history = history[:1] if system else []
            continue
        history.append({"role": "user", "content": line})
        reply = generate(model, tokenizer, [history], max_new_tokens=max_new_tokens)[0][0]
        history.append({"role": "assistant", "content": reply})
        print(f"bot> {reply}")
        sys.stdout.flush()
