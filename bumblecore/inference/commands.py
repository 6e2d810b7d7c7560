"""`bumblecore generate` and `bumblecore chat`."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

from bumblecore.inference.generate import GenerationEngine, SamplingParams
from bumblecore.inference.loading import load_for_inference
from bumblecore.inference.sampling import SamplingArgs
from bumblecore.inference.serve_settings import DEFAULT_PREFIX_CACHE_MB


def continues_raw_text(training_stage: str) -> bool:
    """A pretrained model continues raw text; the other stages' models chat through the template (the
    one place inference tells stages apart)."""
    return training_stage in ("pretrain", "continue_pretrain")


def build_prompt_ids(
    tokenizer,
    prompt_or_messages,
    training_stage: str = "sft",
    system_prompt: Optional[str] = None,
    tools: Optional[list] = None,
    add_generation_prompt: bool = True,
) -> list[int]:
    """Raw text for pretrain models; the chat template (docs/DATA_FORMAT.md) for sft/dpo models, with tool
    definitions when given (and the reply's opening, unless add_generation_prompt is false)."""
    from bumblecore.chat.format import encode_raw_prompt, render_prompt

    if continues_raw_text(training_stage):
        # Text after the tokenizer's own BOS, as the model read its documents; "<|endoftext|>" typed
        # in it stays text, as in a chat template's content.
        return encode_raw_prompt(tokenizer, prompt_or_messages)
    messages = (
        prompt_or_messages
        if isinstance(prompt_or_messages, list)
        else [{"role": "user", "content": prompt_or_messages}]
    )
    if system_prompt is not None and not (messages and messages[0]["role"] == "system"):
        # "" asks for no system text: ChatML always has a system turn (its default when a conversation
        # has none), so there it is an empty one; other templates get no system message at all.
        from bumblecore.chat.format import chat_format

        if system_prompt or chat_format(tokenizer).is_chatml:
            messages = [{"role": "system", "content": system_prompt}] + messages
    return render_prompt(tokenizer, messages, tools, add_generation_prompt)


# Each command's sampling defaults (the flags override them one by one). Python callers pass a whole
# group: dataclasses.replace(CHAT_SAMPLING, temperature=0.7) keeps the others.
GENERATE_SAMPLING = SamplingArgs(max_new_tokens=256, do_sample=False)
CHAT_SAMPLING = SamplingArgs(max_new_tokens=512, do_sample=False)


def _read_prompts(path: str) -> list[str]:
    prompts = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path} line {number}: not valid JSON ({err.msg})") from None
            if "prompt" not in record:
                raise ValueError(f'{path} line {number}: missing field "prompt"')
            prompts.append(record["prompt"])
        else:
            prompts.append(line)
    return prompts


def generate(
    model_path: str,
    prompt: Optional[str] = None,
    prompts_file: Optional[str] = None,
    output_file: Optional[str] = None,
    training_stage: str = "sft",
    system_prompt: Optional[str] = None,
    sampling: SamplingArgs = GENERATE_SAMPLING,
    stop: Optional[list[str]] = None,
    ignore_eos: bool = False,
    seed: Optional[int] = None,
    batch_size: int = 16,
    dtype: str = "auto",
    device_map: str = "auto",
    trust_remote_code: bool = False,
    chat_template: Optional[str] = None,
    base_model_path: Optional[str] = None,
    ignore_base_mismatch: bool = False,
    static_cache: bool = False,
) -> None:
    """Generate text: only the generated text goes to stdout, the timing to stderr.

    Args:
        model_path: a model directory (HF layout) or a LoRA adapter directory.
        prompt: one prompt.
        prompts_file: many prompts, one a line (or JSONL with a "prompt" field); results as JSONL.
        output_file: where prompts_file results go (default: stdout).
        training_stage: pretrain prompts with raw text; sft/dpo through the chat template.
        system_prompt: system message for sft/dpo prompts (default: whatever the template adds itself; "": none).
        sampling: how each reply is generated.
        stop: stop strings (not included in the output).
        ignore_eos: keep generating past end-of-sequence tokens.
        seed: makes sampling reproducible.
        batch_size: prompts decoded together.
        dtype: auto (the checkpoint's), float32, float16 or bfloat16.
        device_map: auto, cpu or cuda:N.
        trust_remote_code: allow a model or tokenizer that ships its own Python code (only for directories you trust).
        chat_template: a built-in template (chatml, qwen2.5, llama3, mistral, gemma, phi3) or a .jinja file; default: the model's own (the one it was trained with).
        base_model_path: for a LoRA adapter: the base to apply it to (default: the one the adapter names); it must be the base the adapter was trained on.
        ignore_base_mismatch: apply a LoRA adapter to a base other than the one it was trained on (its base_fingerprint.json says which) instead of refusing.
        static_cache: decode with one fixed-shape step compiled for the batch (inductor on CPU, CUDA graphs on CUDA): compiles for a minute or so first, then faster steps; not for an unmerged LoRA adapter.
    """
    if (prompt is None) == (prompts_file is None):
        raise ValueError("give exactly one of --prompt or --prompts_file")
    model, tokenizer, eos = load_for_inference(
        model_path,
        dtype,
        device_map,
        trust_remote_code=trust_remote_code,
        chat_template=chat_template,
        base_model_path=base_model_path,
        ignore_base_mismatch=ignore_base_mismatch,
    )
    params = SamplingParams.from_group(sampling, stop=stop or [], ignore_eos=ignore_eos, seed=seed)
    prompts = [prompt] if prompt is not None else _read_prompts(prompts_file)
    ids = [build_prompt_ids(tokenizer, p, training_stage, system_prompt) for p in prompts]
    # max_new_tokens None: the model's context, as the engine takes no max_len
    max_len = None if sampling.max_new_tokens is None else max(len(i) for i in ids) + sampling.max_new_tokens
    engine = GenerationEngine(
        model,
        tokenizer,
        max_batch_size=min(batch_size, len(ids)),
        max_len=max_len,
        eos_token_ids=eos,
        static_cache=static_cache,
    )
    started = time.perf_counter()
    results = engine.generate(ids, params)
    seconds = time.perf_counter() - started
    count = sum(len(r["token_ids"]) for r in results)
    if prompt is not None:
        sys.stdout.write(results[0]["text"] + "\n")
    else:
        out = open(output_file, "w", encoding="utf-8") if output_file else sys.stdout
        for p, r in zip(prompts, results):
            out.write(
                json.dumps(
                    {
                        "prompt": p,
                        "output": r["text"],
                        "finish_reason": r["finish_reason"],
                        "num_tokens": len(r["token_ids"]),
                    },
                    ensure_ascii=False,
                )
                + "\n"
            )
        if output_file:
            out.close()
    sys.stdout.flush()
    print(f"generated {count} tokens in {seconds:.2f} s ({count / max(seconds, 1e-9):.1f} tokens/s)", file=sys.stderr)


def chat(
    model_path: str,
    system_prompt: Optional[str] = None,
    enable_history: bool = False,
    training_stage: str = "sft",
    sampling: SamplingArgs = CHAT_SAMPLING,
    seed: Optional[int] = None,
    dtype: str = "auto",
    device_map: str = "auto",
    trust_remote_code: bool = False,
    prefix_cache_mb: float = DEFAULT_PREFIX_CACHE_MB,
    chat_template: Optional[str] = None,
    base_model_path: Optional[str] = None,
    ignore_base_mismatch: bool = False,
    static_cache: bool = False,
) -> None:
    """Terminal chat that streams each reply; /clear resets the history, /exit or end of input quits.

    Args:
        model_path: a model directory (HF layout) or a LoRA adapter directory.
        system_prompt: system message (default: whatever the template adds itself; "": none).
        enable_history: keep the conversation across turns.
        training_stage: pretrain continues raw text; sft/dpo chat through the template.
        sampling: how each reply is generated.
        seed: makes sampling reproducible.
        dtype: auto (the checkpoint's), float32, float16 or bfloat16.
        device_map: auto, cpu or cuda:N.
        trust_remote_code: allow a model or tokenizer that ships its own Python code (only for directories you trust).
        prefix_cache_mb: MiB of KV cache kept from each reply, so the next turn prefills only its new tokens; 0 disables.
        chat_template: a built-in template (chatml, qwen2.5, llama3, mistral, gemma, phi3) or a .jinja file; default: the model's own (the one it was trained with).
        base_model_path: for a LoRA adapter: the base to apply it to (default: the one the adapter names); it must be the base the adapter was trained on.
        ignore_base_mismatch: apply a LoRA adapter to a base other than the one it was trained on (its base_fingerprint.json says which) instead of refusing.
        static_cache: decode with one fixed-shape step compiled for the batch (inductor on CPU, CUDA graphs on CUDA): compiles for a minute or so first, then faster steps; not for an unmerged LoRA adapter.
    """
    model, tokenizer, eos = load_for_inference(
        model_path,
        dtype,
        device_map,
        trust_remote_code=trust_remote_code,
        chat_template=chat_template,
        base_model_path=base_model_path,
        ignore_base_mismatch=ignore_base_mismatch,
    )
    engine = GenerationEngine(
        model,
        tokenizer,
        max_batch_size=1,
        eos_token_ids=eos,
        prefix_cache_mb=prefix_cache_mb,
        static_cache=static_cache,
    )
    params = SamplingParams.from_group(sampling, seed=seed)
    interactive = sys.stdin.isatty()
    history: list[dict] = []
    if interactive:
        print("BumbleCore chat: /clear resets the history, /exit quits.")
    while True:
        if interactive:
            print("\nuser> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        text = line.rstrip("\n")
        if text.strip() == "/exit":
            break
        if text.strip() == "/clear":
            history = []
            print("(history cleared)", flush=True)
            continue
        if not text.strip():
            continue
        messages = history + [{"role": "user", "content": text}]
        ids = build_prompt_ids(
            tokenizer,
            text if continues_raw_text(training_stage) else messages,
            training_stage,
            system_prompt,
        )
        print("assistant> " if interactive else "", end="", flush=True)
        reply = ""
        for delta in engine.stream(ids[-(engine.max_len - 1) :], params):
            reply += delta
            print(delta, end="", flush=True)
        print(flush=True)
        if enable_history:
            history = messages + [{"role": "assistant", "content": reply}]
