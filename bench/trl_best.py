"""SFT set-up (t): TRL's best configuration on CPU for lorelay's objective (loss on assistant replies only).

- ``padding_free=True``: no padding, position ids restart per sample (TRL's fastest batching);
- ``gradient_checkpointing=False``: no recomputation (TRL's default turns it on; on CPU it only costs time);
- ``max_length=None``: nothing truncated, as in lorelay's run of the same samples;
- ``assistant_only_loss=True``: TRL needs ``{% generation %}`` markers in the chat template for this, which
  SmolLM2's template lacks, so the set-up uses a copy of the model's template with the assistant turns
  wrapped in them; ``generation_template`` checks that the copy renders every sample identically;
- fp32 (``bf16=False``), as every set-up.
"""

from __future__ import annotations

from pathlib import Path

# SmolLM2's per-message output, and the same with the assistant's content and end marker inside
# {% generation %}: the tokens lorelay's assistant mask covers.
MESSAGE = "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
MARKED = ("{{'<|im_start|>' + message['role'] + '\n'}}{% if message['role'] == 'assistant' %}"
          "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
          "{% else %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endif %}")


def generation_template(tokenizer, conversations: list[list[dict]]) -> str:
    """The tokenizer's chat template with ``{% generation %}`` around assistant replies, checked to render
    every conversation exactly as the original does."""
    original = tokenizer.chat_template
    if MESSAGE not in original:
        raise SystemExit("bench (t): this model's chat template is not the SmolLM2 template bench/trl_best.py "
                         "knows how to mark; add its per-message expression to MESSAGE/MARKED")
    marked = original.replace(MESSAGE, MARKED)
    for messages in conversations:
        plain = tokenizer.apply_chat_template(messages, tokenize=False, chat_template=original)
        with_markers = tokenizer.apply_chat_template(messages, tokenize=False, chat_template=marked)
        if plain != with_markers:
            raise SystemExit(f"bench (t): the marked template renders differently:\n{plain!r}\n{with_markers!r}")
    return marked


def run_trl_best(options, records: list[dict], work: Path, meter, load_plain, lora, learning_rate, seed) -> dict:
    """(t) SFTTrainer, padding-free, assistant-only loss, no activation checkpointing, no truncation."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model, tokenizer = load_plain(options.model)
    conversations = [r["messages"] for r in records]
    tokenizer.chat_template = generation_template(tokenizer, conversations)
    dataset = Dataset.from_list([{"messages": messages} for messages in conversations])
    args = SFTConfig(output_dir=str(work / "t"), max_steps=options.steps,
                     per_device_train_batch_size=options.batch_size, learning_rate=learning_rate,
                     seed=seed, data_seed=seed, report_to=[], save_strategy="no", use_cpu=True,
                     disable_tqdm=True, dataloader_num_workers=0, bf16=False,
                     padding_free=True, gradient_checkpointing=False, max_length=None, assistant_only_loss=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=lora(), callbacks=[meter])
    trainer.train()
    return {"gradient_checkpointing": bool(args.gradient_checkpointing), "padding_free": bool(args.padding_free),
            "assistant_only_loss": bool(args.assistant_only_loss), "max_length": args.max_length,
            "template": "model's template + {% generation %} markers (renders identically)",
            "attn_implementation": model.config._attn_implementation,
            "trainable_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)}
