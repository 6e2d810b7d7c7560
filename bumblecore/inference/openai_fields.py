"""The checks of a chat-completions body's parts, as pydantic validators: single values, messages and
tool definitions (inference/openai_request.py checks the body that holds them).

Each check takes the value as JSON decoded it (before pydantic converts anything: `-1`, not `-1.0`,
in the message) and raises a PydanticCustomError whose type is the OpenAI error code.
"""

import json
import math
from typing import Annotated, Optional, Union

from pydantic import BaseModel, BeforeValidator, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

ROLES = ("system", "user", "assistant", "tool")
INT64 = 2**63


# ---------------------------------------------------------------------------- checks of single values


def invalid(message: str, code: str = "invalid_value") -> PydanticCustomError:
    return PydanticCustomError(code, message)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def number(low: float, high: float, low_open: bool = False) -> BeforeValidator:
    """A number in [low, high] ((low, high] with low_open), or null."""

    def check(value) -> Optional[float]:
        if value is None:
            return None
        if not _is_number(value):
            raise invalid(f"expected a number, got {type(value).__name__}", "invalid_type")
        # Python's JSON reads NaN and Infinity, and NaN fails every comparison: test finiteness first.
        if not math.isfinite(value):
            raise invalid(f"{value} is not a finite number")
        if value < low or (low_open and value == low) or value > high:
            raise invalid(f"{value} is outside {'(' if low_open else '['}{low}, {high}]")
        return float(value)

    return BeforeValidator(check)


def check_integer(value, minimum: int, maximum: int = INT64 - 1) -> Optional[int]:
    if value is None:
        return None
    if not _is_integer(value):
        raise invalid(f"expected an integer, got {type(value).__name__}", "invalid_type")
    if not minimum <= value <= maximum:  # the engine keeps them in 64-bit tensors and generators
        raise invalid(f"{value} is outside [{minimum}, {maximum}]")
    return value


def integer(minimum: int, maximum: int = INT64 - 1) -> BeforeValidator:
    """An integer in [minimum, maximum], or null."""
    return BeforeValidator(lambda value: check_integer(value, minimum, maximum))


def of_type(kind: type, expected: str, optional: bool = False):
    """A check that refuses a value that is not a `kind` (nor null, when optional), saying `expected`."""

    def check(value):
        if not (isinstance(value, kind) or (optional and value is None)):
            raise invalid(expected, "invalid_type")
        return value

    return check


def object_check(expected: str):
    """A model's check before its fields: the value must be a JSON object (else `expected`)."""
    check = of_type(dict, expected)

    def an_object(cls, value):
        return check(value)

    return model_validator(mode="before")(classmethod(an_object))


def _flag(value) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise invalid(f"expected true or false, got {type(value).__name__}", "invalid_type")
    return value


def _name(value) -> str:
    if not isinstance(value, str) or not value:
        raise invalid("expected a non-empty string", "invalid_type")
    return value


Flag = Annotated[bool, BeforeValidator(_flag)]
FlagDefaultTrue = Annotated[bool, BeforeValidator(lambda value: True if value is None else _flag(value))]
OptionalString = Annotated[Optional[str], BeforeValidator(of_type(str, "expected a string", optional=True))]
Name = Annotated[str, BeforeValidator(_name)]
REQUIRED = Field(None, validate_default=True)  # checked when absent too: a missing one fails its own check


# ---------------------------------------------------------------------------- messages


class TextPart(BaseModel):
    """A part of a message's content (OpenAI's list form); only text parts are read."""

    text: Annotated[str, BeforeValidator(of_type(str, "expected a string"))] = REQUIRED

    @model_validator(mode="before")
    @classmethod
    def only_text(cls, part):
        if not isinstance(part, dict) or part.get("type") != "text":
            raise invalid('only text parts are supported ({"type": "text", "text": ...})')
        return part


class ToolCallFunction(BaseModel):
    name: Name = REQUIRED
    arguments: Annotated[Union[str, dict], BeforeValidator(of_type((str, dict), "expected a JSON string"))] = "{}"


class ToolCall(BaseModel):
    """A tool call in an earlier assistant message, as the chat template writes it back."""

    function: ToolCallFunction

    @model_validator(mode="before")
    @classmethod
    def function_object(cls, call):
        # A call that is not an object, or has no function object, is refused for its missing name.
        function = call.get("function") if isinstance(call, dict) else None
        return {"function": function if isinstance(function, dict) else {}}

    def template_form(self) -> dict:
        return {"type": "function", "function": {"name": self.function.name, "arguments": self.function.arguments}}


def _role(value) -> str:
    if value not in ROLES:
        raise invalid(f"unknown role {value!r}; expected one of {', '.join(ROLES)}")
    return value


class Message(BaseModel):
    """One message; fields in the order they are checked (content may depend on the two before it)."""

    role: Annotated[str, BeforeValidator(_role)] = REQUIRED
    tool_calls: Optional[list[ToolCall]] = None
    content: Optional[list[TextPart]] = REQUIRED

    an_object = object_check("expected an object with role and content")

    @field_validator("tool_calls", mode="before")
    @classmethod
    def calls_of_an_assistant(cls, calls, info: ValidationInfo):
        """Read on assistant messages only; elsewhere ignored."""
        if info.data.get("role") != "assistant" or not calls:
            return None
        if not isinstance(calls, list):
            raise invalid("expected a list", "invalid_type")
        return calls

    @field_validator("content", mode="before")
    @classmethod
    def text_or_text_parts(cls, content, info: ValidationInfo):
        """A string, or OpenAI's list of parts; required unless the message makes tool calls."""
        if content is None:
            if info.data.get("tool_calls"):
                return []
            raise invalid("missing content", "missing_field")
        if isinstance(content, str):
            return [{"type": "text", "text": content}]
        if isinstance(content, list):
            return content
        raise invalid(f"expected a string or a list of text parts, got {type(content).__name__}", "invalid_type")

    def template_form(self) -> dict:
        text = "".join(part.text for part in self.content)
        if self.tool_calls:
            return {
                "role": self.role,
                "tool_calls": [call.template_form() for call in self.tool_calls],
                "content": text,
            }
        return {"role": self.role, "content": text}


def messages_list(value) -> list:
    if not isinstance(value, list):
        raise invalid("expected a list of messages", "invalid_type" if value is not None else "missing_field")
    if not value:
        raise invalid("must contain at least one message")
    return value


# ---------------------------------------------------------------------------- tools


class ToolFunction(BaseModel):
    name: Name = REQUIRED
    description: OptionalString = None
    parameters: Annotated[Optional[dict], BeforeValidator(of_type(dict, "expected a JSON Schema object", True))] = None


def _function_type(value) -> str:
    if value != "function":
        raise invalid(f"only function tools are supported, got {value!r}")
    return value


class Tool(BaseModel):
    """OpenAI's tool definition, `{"type": "function", "function": {"name", "description"?, "parameters"?}}`,
    checked because the template writes it into the system message as it is."""

    type: Annotated[str, BeforeValidator(_function_type)] = "function"
    function: Annotated[
        ToolFunction, BeforeValidator(of_type(dict, "expected an object with name, description and parameters"))
    ] = REQUIRED

    an_object = object_check('expected {"type": "function", "function": {...}}')


# ---------------------------------------------------------------------------- response_format

FORMATS = ("text", "json_object", "json_schema")


def _format_type(value) -> str:
    if value not in FORMATS:
        raise invalid(f"expected one of {', '.join(FORMATS)}, got {value!r}")
    return value


class JsonSchemaFormat(BaseModel):
    name: OptionalString = None
    strict: Optional[Flag] = None
    schema_: Annotated[dict, BeforeValidator(of_type(dict, "expected a JSON Schema object"))] = Field(
        None, alias="schema", validate_default=True
    )

    an_object = object_check('expected {"name": ..., "schema": {...}}')

    @field_validator("schema_", mode="after")
    @classmethod
    def grammar_of(cls, schema: dict) -> dict:
        """Refused here when xgrammar cannot make a grammar of it, before any model work."""
        from bumblecore.inference.constrained import check_schema

        try:
            check_schema(json.dumps(schema), strict=True)
        except ImportError as err:
            raise invalid(str(err), "unsupported_value") from None
        except ValueError as err:
            raise invalid(f"not a schema this server can follow: {err}") from None
        return schema


class ResponseFormat(BaseModel):
    """OpenAI's `response_format`: text, json_object, or json_schema with its schema."""

    type: Annotated[str, BeforeValidator(_format_type)] = REQUIRED
    json_schema: Optional[JsonSchemaFormat] = Field(None, validate_default=True)

    an_object = object_check('expected {"type": "json_object"} or {"type": "json_schema", "json_schema": {...}}')

    @field_validator("json_schema", mode="before")
    @classmethod
    def with_json_schema_type(cls, value, info: ValidationInfo):
        if info.data.get("type") != "json_schema":
            return None
        if value is None:
            raise invalid("missing json_schema", "missing_field")
        return value

    def as_dict(self) -> dict:
        if self.type != "json_schema":
            return {"type": self.type}
        return {"type": self.type, "json_schema": {"name": self.json_schema.name, "schema": self.json_schema.schema_}}
