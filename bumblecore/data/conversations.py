"""Conversation fields of a record validated into the OpenAI/transformers message shape: Alpaca's
instruction/input/output, ShareGPT's turns, OpenAI-style messages and TRL's preference lists, with
their tools and tool calls. Every error names the record's place and the field (and turn or message)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

from bumblecore.data.sources import DataError

USER_SIDE = ("human", "observation")
ASSISTANT_SIDE = ("gpt", "function_call")
SHAREGPT_ROLES = ("system",) + USER_SIDE + ASSISTANT_SIDE
MESSAGE_ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Conversation:
    """Messages in the OpenAI/transformers shape: role system|user|assistant|tool, content,
    and for an assistant calling tools `tool_calls` [{"name", "arguments"}]."""

    messages: list[dict]
    tools: Optional[list] = None


def string_field(record: dict, key: str, where: str, required: bool = True) -> str:
    """Field `key` as a string (anything else is an error); missing, null or blank only when required."""
    if key not in record or record[key] is None:
        if required:
            raise DataError(f'{where}: missing field "{key}"')
        return ""
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f'{where}: field "{key}" must be a string, got {type(value).__name__}')
    if required and not value.strip():
        raise DataError(f'{where}: field "{key}" is empty')
    return value


def parse_tools(value, where: str) -> Optional[list]:
    """`tools` as a JSON string or a list; "", "[]" or [] mean none. Bare function definitions
    ({"name", "description", "parameters"}) are wrapped as {"type": "function", "function": ...}."""
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise DataError(f'{where}: field "tools" is not valid JSON ({err.msg})') from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise DataError(f'{where}: field "tools" must be a list of tool definitions (objects)')
    if not value:
        return None
    return [t if "type" in t else {"type": "function", "function": t} for t in value]


CALL_KEYS = {"name", "arguments", "id", "type"}  # an id or "type": "function" says nothing the template renders


def tool_call(call: object, place: str) -> dict:
    """One call, {"name", "arguments"} or OpenAI's {"type": "function", "function": {...}}, as
    {"name", "arguments"} with JSON-string arguments decoded (the template writes them as JSON)."""
    if isinstance(call, dict) and isinstance(call.get("function"), dict):
        call = {**call["function"], **{k: v for k, v in call.items() if k not in ("function", "type", "id")}}
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not call["name"].strip():
        raise DataError(f'{place} needs a JSON object with "name" (a non-empty string) and "arguments"')
    extra = sorted(set(call) - CALL_KEYS)
    if extra:  # refused, not dropped: text beside a call is the assistant's content, a turn of its own
        raise DataError(f"{place} has fields {extra} besides name and arguments, which a tool call cannot hold")
    arguments = call.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            pass  # keep a non-JSON string as the model should produce it
    return {"name": call["name"], "arguments": arguments}


def parse_function_call(value: str, where: str, turn: int, key: str = "conversations") -> list[dict]:
    """A function_call turn's value: one call's JSON object, or a JSON list of calls made at once."""
    place = f'{where}: field "{key}" turn {turn} (function_call)' if turn else f'{where}: field "{key}" (function_call)'
    try:
        calls = json.loads(value)
    except json.JSONDecodeError as err:
        raise DataError(f"{place} is not valid JSON ({err.msg})") from None
    if isinstance(calls, list):
        if not calls:
            raise DataError(f"{place} is an empty list of calls")
        return [tool_call(call, f"{place} call {i}") for i, call in enumerate(calls, 1)]
    return [tool_call(calls, place)]


def _system_message(text: str) -> list[dict]:
    return [{"role": "system", "content": text}] if text else []


def alpaca_conversation(record: dict, where: str, with_answer: bool = True) -> Conversation:
    instruction = string_field(record, "instruction", where)
    extra = string_field(record, "input", where, required=False)
    prompt = f"{instruction}\n{extra}" if extra else instruction
    messages = _system_message(string_field(record, "system", where, required=False)) + [
        {"role": "user", "content": prompt}
    ]
    if with_answer:
        messages.append({"role": "assistant", "content": string_field(record, "output", where)})
    return Conversation(messages, parse_tools(record.get("tools"), where))


def sharegpt_conversation(record: dict, where: str, end_on_assistant: bool = True) -> Conversation:
    """Turns alternate between the user side and the assistant side, each side one turn or a run:
    consecutive `observation`s are the results of parallel calls (tool messages, which the template
    renders in one user turn); `function_call`s after a `gpt` turn, or after each other, join it as
    one assistant message with content and tool_calls, the way the template renders an assistant
    turn (its text, then its <tool_call> blocks)."""
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise DataError(f'{where}: field "conversations" must be a non-empty list of turns')
    messages: list[dict] = []
    previous = None  # role of the previous non-system turn
    for number, turn in enumerate(turns, 1):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise DataError(f'{where}: field "conversations" turn {number} must be an object with "from" and "value"')
        role, value = turn["from"], turn["value"]
        if role not in SHAREGPT_ROLES:
            raise DataError(
                f'{where}: field "conversations" turn {number} has role "{role}"; expected {", ".join(SHAREGPT_ROLES)}'
            )
        if not isinstance(value, str):
            raise DataError(f'{where}: field "conversations" turn {number} value must be a string')
        if role == "system":
            if number != 1:
                raise DataError(f'{where}: field "conversations" turn {number}: a system turn may only come first')
            messages.append({"role": "system", "content": value})
            continue
        user_turn = role in USER_SIDE
        same_side = previous is not None and (previous in USER_SIDE) == user_turn
        if (previous is None and not user_turn) or (same_side and user_turn and not previous == role == "observation"):
            side = (
                "user side (human, observation)"
                if previous is None or not user_turn
                else "assistant side (gpt, function_call)"
            )
            raise DataError(
                f'{where}: field "conversations" turn {number} has role "{role}" out of order; expected the {side}'
            )
        if same_side and not user_turn and role == "gpt":
            what = (
                "a function_call turn: text after a call needs the call's observation first (an assistant turn "
                "renders its text before its calls)"
                if previous == "function_call"
                else "another gpt turn"
            )
            raise DataError(f'{where}: field "conversations" turn {number} (gpt) follows {what}')
        if role in ASSISTANT_SIDE and not value.strip():
            raise DataError(f'{where}: field "conversations" turn {number} ({role}) is an empty assistant turn')
        if role == "human":
            messages.append({"role": "user", "content": value})
        elif role == "observation":
            messages.append({"role": "tool", "content": value})
        elif role == "gpt":
            messages.append({"role": "assistant", "content": value})
        elif same_side:  # calls joining the assistant message before them
            messages[-1].setdefault("tool_calls", []).extend(parse_function_call(value, where, number))
        else:
            messages.append(
                {"role": "assistant", "content": "", "tool_calls": parse_function_call(value, where, number)}
            )
        previous = role
    if previous is None or (previous in ASSISTANT_SIDE) != end_on_assistant:
        wanted = (
            "an assistant turn (gpt or function_call)" if end_on_assistant else "a user turn (human or observation)"
        )
        raise DataError(f'{where}: field "conversations" must end on {wanted}')
    return Conversation(messages, parse_tools(record.get("tools"), where))


def _message_text(content, place: str) -> str:
    """A message's content: a string, or a list of text parts (OpenAI's), joined as the server joins them."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
    ):
        return "".join(p["text"] for p in content)
    raise DataError(f'{place} content must be a string or a list of text parts ({{"type": "text", "text": ...}})')


def _message(message: object, place: str) -> dict:
    """One OpenAI-style message as the template reads it: role, content, and tool_calls for an assistant."""
    if not isinstance(message, dict) or "role" not in message:
        raise DataError(f'{place} must be an object with "role" and "content"')
    role = message["role"]
    if role not in MESSAGE_ROLES:
        raise DataError(f'{place} has role "{role}"; expected {", ".join(MESSAGE_ROLES)}')
    if message.get("weight", 1) != 1:  # OpenAI's weight 0 asks for an untrained turn, which we cannot honour
        raise DataError(
            f'{place} has "weight": {message["weight"]!r}; every assistant message is trained (drop the '
            "message, or the field)"
        )
    content = _message_text(message.get("content"), place)
    parsed = {"role": role, "content": content}
    calls = message.get("tool_calls")
    if calls:
        if role != "assistant":
            raise DataError(f"{place} ({role}) has tool_calls; only an assistant message calls tools")
        if not isinstance(calls, list):
            raise DataError(f"{place} tool_calls must be a list of calls")
        parsed["tool_calls"] = [tool_call(c, f"{place} tool_calls {i}") for i, c in enumerate(calls, 1)]
    elif role == "assistant" and not content.strip():
        raise DataError(f"{place} is an empty assistant message")
    elif message.get("content") is None:
        raise DataError(f'{place} ({role}) is missing "content"')
    return parsed


def message_list(value, where: str, key: str, end: str = "assistant") -> list[dict]:
    """OpenAI-style messages of field `key`: a leading system message at most, then a user message;
    a tool message answers an assistant's tool_calls (several in a row for parallel calls); the list
    ends on an assistant message (end="assistant") or on a user or tool message (end="prompt")."""
    if not isinstance(value, list) or not value:
        raise DataError(
            f'{where}: missing field "{key}"'
            if value is None
            else f'{where}: field "{key}" must be a non-empty list of messages'
        )
    messages: list[dict] = []
    for number, raw in enumerate(value, 1):
        place = f'{where}: field "{key}" message {number}'
        message = _message(raw, place)
        role, previous = message["role"], (messages[-1] if messages else None)
        if role == "system" and previous is not None:
            raise DataError(f"{place}: a system message may only come first")
        if role == "tool" and not (previous and (previous.get("tool_calls") or previous["role"] == "tool")):
            raise DataError(f"{place} (tool) must follow an assistant message with tool_calls, or another tool message")
        if role == "assistant" and not (previous and previous["role"] in ("user", "tool")):
            raise DataError(f"{place} (assistant) must follow a user or tool message")
        if role == "user" and previous and previous["role"] == "user":
            raise DataError(f"{place} (user) follows another user message; expected an assistant message between them")
        messages.append(message)
    last = messages[-1]["role"]
    if end == "assistant" and last != "assistant":
        raise DataError(f'{where}: field "{key}" must end on an assistant message')
    if end == "prompt" and last not in ("user", "tool"):
        raise DataError(f'{where}: field "{key}" must end on a user or tool message (the prompt for the replies)')
    return messages


def messages_conversation(record: dict, where: str) -> Conversation:
    return Conversation(
        message_list(record.get("messages"), where, "messages"), parse_tools(record.get("tools"), where)
    )


def trl_preference(record: dict, where: str) -> tuple[Conversation, dict, dict]:
    """TRL's conversational preference records: `prompt` (messages) with `chosen` / `rejected`
    each one assistant message, or, without `prompt`, two whole conversations that share all but
    their last (assistant) message."""
    for key in ("prompt", "chosen", "rejected"):
        if isinstance(record.get(key), str):
            raise DataError(
                f'{where}: field "{key}" is a string; records of "prompt"/"chosen"/"rejected" take lists of '
                "messages (TRL's conversational form); for plain strings use "
                '{"instruction", "chosen", "rejected"}'
            )
    tools = parse_tools(record.get("tools"), where)
    if "prompt" in record:
        prompt = message_list(record["prompt"], where, "prompt", end="prompt")
        return (
            Conversation(prompt, tools),
            assistant_reply(record.get("chosen"), where, "chosen"),
            assistant_reply(record.get("rejected"), where, "rejected"),
        )
    chosen = message_list(record.get("chosen"), where, "chosen")
    rejected = message_list(record.get("rejected"), where, "rejected")
    if chosen[:-1] != rejected[:-1]:
        differ = next(i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b) + 1
        raise DataError(
            f'{where}: fields "chosen" and "rejected" differ at message {differ}, before their last; without '
            '"prompt" they must be one conversation up to their last (assistant) message'
        )
    return Conversation(chosen[:-1], tools), chosen[-1], rejected[-1]


def assistant_reply(value, where: str, key: str) -> dict:
    """`chosen` / `rejected` beside a `prompt`: a list of one assistant message (or that message)."""
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value:
        raise DataError(
            f'{where}: missing field "{key}"'
            if value is None
            else f'{where}: field "{key}" must be a list holding one assistant message'
        )
    if len(value) != 1:
        raise DataError(
            f'{where}: field "{key}" holds {len(value)} messages; '
            + (
                "a completion is one assistant reply"
                if key == "completion"
                else "a preference pair compares one assistant reply"
            )
        )
    message = _message(value[0], f'{where}: field "{key}" message 1')
    if message["role"] != "assistant":
        raise DataError(f'{where}: field "{key}" message 1 has role "{message["role"]}"; expected assistant')
    return message
