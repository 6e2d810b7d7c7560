"""`bumblecore score` and the reward scorer: scores equal transformers' AutoModelForSequenceClassification
on the conversations rendered whole by the reward model's own template; bad records are errors naming
file, line and field; the output file appears whole or not at all."""

import json

import pytest
from tiny import transformers_rewards, write_tiny_reward_model

from bumblecore.cli import main
from bumblecore.inference.scoring import RewardScorer, score

CHATS = [
    [{"role": "user", "content": "How many animals are in: cat swan key"}, {"role": "assistant", "content": "two"}],
    [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "Is there one of the colours in: river leaf meadow"},
        {"role": "assistant", "content": "no, there is none of them at all"},
    ],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"}],
    [{"role": "user", "content": "a <|im_end|> typed in a message stays text"}, {"role": "assistant", "content": "ok"}],
]


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory):
    return write_tiny_reward_model(tmp_path_factory.mktemp("rm") / "rm")


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_scores_equal_transformers_on_the_whole_rendered_conversations(reward_model):
    expected = transformers_rewards(reward_model, CHATS[:3])
    for batch_size in (1, 3):  # padded batches (right padding, sorted by length) change nothing
        got = RewardScorer(str(reward_model), dtype="float32", device="cpu", batch_size=batch_size)(CHATS[:3])
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert len(set(round(s, 4) for s in expected)) == 3  # different conversations, different scores


def test_a_special_token_typed_in_a_message_is_scored_as_text(reward_model, demo_tok):
    scorer = RewardScorer(str(reward_model), dtype="float32", device="cpu")
    ids = scorer.encode(CHATS[3])
    assert ids.count(demo_tok.convert_tokens_to_ids("<|im_end|>")) == 3  # system, user, assistant turns only
    assert ids[-1] == demo_tok.encode("\n")[0]  # the render's trailing newline is read


def test_score_command_writes_each_record_with_its_score(reward_model, tmp_path):
    records = [
        {"messages": CHATS[0], "id": 1},
        {"prompt": "How many animals are in: cat swan key", "completion": "two", "id": 2},
        {"prompt": CHATS[1][:2], "completion": [CHATS[1][2]], "id": 3},
        {"messages": CHATS[2]},
    ]
    source = write_jsonl(tmp_path / "in.jsonl", records)
    main(["score", "--model_path", str(reward_model), "--input_file", str(source),
          "--output_file", str(tmp_path / "out.jsonl"), "--batch_size", "2", "--dtype", "float32", "--device", "cpu"])  # fmt: skip
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in line.items() if k != "score"} for line in lines] == records
    expected = transformers_rewards(reward_model, [CHATS[0], CHATS[0], CHATS[1], CHATS[2]])
    assert [line["score"] for line in lines] == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert lines[0]["score"] == lines[1]["score"]  # prompt + completion is the user turn + the assistant turn


@pytest.mark.parametrize(
    "bad, message",
    [
        ("not json", "line 2: not valid JSON"),
        (json.dumps({"prompt": "q"}), 'line 2: missing field "completion"'),
        (
            json.dumps({"messages": [{"content": "x"}]}),
            'line 2: field "messages" message 0 must be an object with a "role"',
        ),
        (json.dumps({"prompt": "q", "completion": 3}), 'line 2: field "completion" must be a text'),
    ],
)
def test_a_bad_record_names_file_line_and_field_and_leaves_the_output_alone(reward_model, tmp_path, bad, message):
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"messages": CHATS[0]}) + "\n" + bad + "\n")
    (tmp_path / "out.jsonl").write_text("earlier results\n")
    with pytest.raises(ValueError) as raised:
        score(str(reward_model), str(source), str(tmp_path / "out.jsonl"))
    assert str(raised.value).startswith(f"{source} {message}")
    assert (tmp_path / "out.jsonl").read_text() == "earlier results\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]  # no temporary file left
