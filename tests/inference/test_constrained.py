"""response_format through xgrammar in the engine: every reply parses and validates against its schema
(jsonschema, the validator), is compact, and a request without a format batched with constrained ones
decodes exactly as it does alone."""

import json

from serving import xgrammar_or_skip

from bumblecore.inference.constrained import ANY_OBJECT, format_schema
from bumblecore.inference.generate import GenerationEngine, SamplingParams
from bumblecore.inference.loading import load_for_inference

jsonschema = xgrammar_or_skip()

SCHEMA = {
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "ok": {"type": "boolean"},
        "size": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["color", "ok", "size"],
}


def test_constrained_replies_validate_and_leave_others_alone(tmp_path, tiny_checkpoint):
    path = tiny_checkpoint(tmp_path / "m")
    model, tok, eos = load_for_inference(str(path), device_map="cpu")
    engine = GenerationEngine(model, tok, max_batch_size=6, max_len=256, eos_token_ids=eos)
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in ["The bee", "蜜蜂", "A small model", "1, 2"]]
    plain = SamplingParams(max_new_tokens=12)
    alone = engine.generate(prompts[:1], plain)[0]
    schema = format_schema({"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}})
    params = [plain]
    params += [SamplingParams(max_new_tokens=64, response_format=schema)]  # greedy
    params += [SamplingParams(max_new_tokens=64, do_sample=True, seed=s, response_format=schema) for s in (1, 2)]
    results = engine.generate(prompts, params)
    assert results[0]["token_ids"] == alone["token_ids"]  # batched with constrained rows: unchanged
    for result in results[1:]:
        assert result["finish_reason"] == "stop", result
        reply = json.loads(result["text"])
        jsonschema.validate(reply, SCHEMA)
        assert result["text"] == json.dumps(reply, separators=(",", ":"), ensure_ascii=False)  # compact
    assert format_schema({"type": "json_object"}) == (ANY_OBJECT, False)
    assert format_schema({"type": "text"}) is None
