"""`dpa eval`: the metrics on known answers and edge cases, the item formats, and end to end on a tiny export:
batched left-padded answers equal one-at-a-time answers, and the reported score is the metric recomputed
from the predictions file."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dpa_cli.cli.app import app
from dpa_cli.errors import BadInputError
from dpa_cli.evaluation import anls, exact_match, load_items, normalize_answer, parse_choice
from dpa_cli.evaluation.metrics import levenshtein
from dpa_cli.evaluation.run import summarise
from tests.tiny_processors import example_image
from tests.trained_workspace import add_stage1, upgraded

runner = CliRunner()
OPTIONS = ["red", "green", "dark green", "blue"]


# --- metrics ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "normal"),
    [
        ("The Cat.", "cat"),
        ("  Two  dogs! ", "2 dogs"),
        ("3.5 kg", "3.5 kg"),
        ("1,000", "1000"),
        ("an apple, a pear", "apple pear"),
        ("", ""),
    ],
)
def test_normalize_answer(text, normal):
    assert normalize_answer(text) == normal


def test_exact_match_takes_the_best_gold_after_normalising():
    assert exact_match("The answer: Two", ["2"]) == 0.0  # "answer" is extra text, not normalised away
    assert exact_match("two.", ["3", "2"]) == 1.0
    assert exact_match("Yes", ["yes"]) == 1.0 and exact_match("yes sir", ["yes"]) == 0.0
    assert exact_match("", [""]) == 1.0 and exact_match("", ["a cat"]) == 0.0


def test_levenshtein():
    assert levenshtein("kitten", "sitting") == 3 and levenshtein("", "abc") == 3 and levenshtein("ab", "ab") == 0


@pytest.mark.parametrize(
    ("prediction", "golds", "score"),
    [
        ("", [""], 1.0),  # both empty: identical
        ("", ["abc"], 0.0),  # an empty answer to a non-empty gold
        ("abc", [""], 0.0),
        ("Hello  World", ["hello world"], 1.0),  # case and spacing do not count
        ("  hello world ", ["HELLO WORLD"], 1.0),
        ("hellO world!", ["hello world"], 1 - 1 / 12),  # punctuation counts: one edit in 12 characters
        ("abcdef", ["abcxyz"], 0.0),  # NL = 3/6 = 0.5: at the threshold, cut to 0
        ("abcdefg", ["abcdxyz"], 1 - 3 / 7),  # NL = 3/7 < 0.5: kept
        ("invoice 42", ["total", "invoice 4"], 0.9),  # max over golds
    ],
)
def test_anls(prediction, golds, score):
    assert math.isclose(anls(prediction, golds), score, abs_tol=1e-12)


@pytest.mark.parametrize(
    ("reply", "letter"),
    [
        ("B", "B"),
        ("(B)", "B"),
        ("B.", "B"),
        ("B) green", "B"),
        (" C: dark green", "C"),
        ("(D) blue", "D"),
        ("The answer is B.", "B"),
        ("answer: (C)", "C"),
        ("I think the answer is D", "D"),
        ("It must be (A), the red one", "A"),
        ("green", "B"),
        ("It is dark green.", "C"),  # the longer option wins
        ("A red square", "A"),
        ("Blue!", "D"),
        ("B is correct", "B"),
        ("E", None),
        ("green or blue", None),
        ("", None),
        ("no idea", None),
    ],
)
def test_parse_choice(reply, letter):
    assert parse_choice(reply, OPTIONS) == letter


def test_summarise_gives_percent_overall_and_per_category():
    rows = [{"score": 1.0, "category": "math"}, {"score": 0.0, "category": "math"}, {"score": 1.0, "category": None}]
    assert summarise(rows) == {"score": 66.67, "items": 3, "categories": {"math": 50.0}}


# --- item files ---------------------------------------------------------------------------------------
def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def test_option_forms_and_gold_forms(tmp_path):
    records = [
        {"id": "list", "question": "Q?", "options": OPTIONS, "answer": "(B)"},
        {"id": "dict", "question": "Q?", "choices": {"A": "x", "B": "y"}, "answer": "y"},
        {"id": "index", "question": "Q?", "choices": ["x", "y", "z"], "answer": 2, "subject": "logic"},
        {"id": "columns", "question": "Q?", "A": "x", "B": "y", "C": "z", "answer": "C"},
        {"id": "inline", "question": "Which?\nA. cat\nB. dog", "answer": "dog"},
        {"id": "vqa", "question": "Q?", "answers": ["a", "b"], "image": "x.png"},
    ]
    items = {item.id: item for item in load_items(write_jsonl(tmp_path / "items.jsonl", records))}
    assert [items[k].answers for k in ("list", "dict", "index", "columns", "inline")] == [
        ["B"],
        ["B"],
        ["C"],
        ["C"],
        ["B"],
    ]
    assert items["inline"].options == ["cat", "dog"] and items["inline"].question == "Which?"
    assert items["index"].category == "logic" and items["vqa"].answers == ["a", "b"]
    assert items["vqa"].image.path == "x.png" and items["vqa"].image.root == tmp_path


def test_mmlu_csv_with_and_without_header(tmp_path):
    (tmp_path / "plain.csv").write_text('What is 2+2?,3,4,5,6,B\n"Capital, of France?",Paris,Rome,Berlin,Madrid,A\n')
    (tmp_path / "header.csv").write_text("question,A,B,C,D,answer\nWhat is 2+2?,3,4,5,6,B\n")
    plain = load_items(tmp_path / "plain.csv")
    assert [(i.question, i.options, i.answers) for i in plain][1] == (
        "Capital, of France?",
        ["Paris", "Rome", "Berlin", "Madrid"],
        ["A"],
    )
    assert load_items(tmp_path / "header.csv")[0].answers == ["B"]


def test_a_datasets_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = {"question": ["Q1?", "Q2?"], "choices": [["x", "y"], ["u", "v"]], "answer": [1, 0]}
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(rows)}).save_to_disk(str(tmp_path / "mmlu"))
    assert [item.answers for item in load_items(tmp_path / "mmlu")] == [["B"], ["A"]]


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"id": "x", "question": "Q?"}, "item x has no `answer`"),
        ({"id": "y", "answer": "a"}, "item y has no `question`"),
        ({"id": "z", "question": "Q?", "options": ["a", "b"], "answer": "E"}, "item z: answer 'E' is neither"),
    ],
)
def test_bad_items_are_named(tmp_path, record, message):
    with pytest.raises(BadInputError, match=message):
        load_items(write_jsonl(tmp_path / "bad.jsonl", [record]))


# --- end to end on a tiny export ----------------------------------------------------------------------
def _perturb(folder: Path, scale: float = 0.3) -> None:
    """Random weights of a tiny LLM answer with one repeated token; noise makes every prompt answer differently."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "language_model" in name and "norm" not in name:
                param.add_(torch.randn(param.shape, generator=generator) * scale)
    model.save_pretrained(folder)


@pytest.fixture(scope="module")
def bench(tiny_checkpoint, tmp_path_factory) -> dict:
    """An export of a tiny DPA workspace (stage 1 with noisy LLM weights), images and the one-at-a-time answers."""
    from dpa_cli.generate import open_runnable, reply, user_turn

    root = tmp_path_factory.mktemp("eval")
    ws = upgraded(tiny_checkpoint, "llava_next", root / "ws")
    _perturb(add_stage1(ws))
    result = runner.invoke(app, ["export", "-w", str(ws), "--no-verify"])
    assert result.exit_code == 0, result.stderr
    (root / "images").mkdir()
    questions = ["What colour is it?", "How many shapes?", "Name it.", "Describe it."]
    for i in range(len(questions)):
        example_image(30 + 11 * i, 40 - 3 * i).save(root / "images" / f"{i}.png")
    runnable = open_runnable(str(ws / "export"), device="cpu")
    alone = [
        reply(
            runnable,
            [
                user_turn(
                    f"{q}\nAnswer the question using a single word or phrase.", [example_image(30 + 11 * i, 40 - 3 * i)]
                )
            ],
            max_new_tokens=5,
        )["text"].strip()
        for i, q in enumerate(questions)
    ]
    return {
        "root": root,
        "export": ws / "export",
        "target": tiny_checkpoint("llava_next"),
        "questions": questions,
        "alone": alone,
    }


def run_eval(*args: str) -> dict:
    result = runner.invoke(app, ["eval", *args, "--json"])
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def read_predictions(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_batched_answers_equal_one_at_a_time_answers_and_known_golds_score_exactly(bench):
    root, alone = bench["root"], bench["alone"]
    assert len(set(alone)) > 1, "the noisy model must answer prompts differently"
    # Items 0 and 2 have the model's own one-at-a-time answer as gold; 1 and 3 a gold it never says.
    records = [
        {"id": f"q{i}", "image": f"{i}.png", "question": q, "answer": alone[i] if i % 2 == 0 else "zebra"}
        for i, q in enumerate(bench["questions"])
    ]
    data = write_jsonl(root / "images" / "vqa.jsonl", records)
    out = root / "vqa.pred.jsonl"
    result = run_eval(
        str(bench["export"]), "--data", str(data), "--batch-size", "3", "--max-new-tokens", "5", "-o", str(out)
    )
    rows = read_predictions(out)
    assert [row["prediction"] for row in rows] == alone  # left padding changed nothing
    assert result["metric"] == "exact" and result["models"][0]["score"] == 50.0
    assert [row["score"] for row in rows] == [1.0, 0.0, 1.0, 0.0]
    # ANLS over the same items: the score is the metric recomputed from the predictions file.
    anls_out = root / "vqa.anls.jsonl"
    result = run_eval(
        str(bench["export"]),
        "--data",
        str(data),
        "--metric",
        "anls",
        "--batch-size",
        "2",
        "--max-new-tokens",
        "5",
        "--limit",
        "3",
        "-o",
        str(anls_out),
    )
    rows = read_predictions(anls_out)
    recomputed = [anls(row["prediction"], row["answers"]) for row in rows]
    assert [row["score"] for row in rows] == recomputed
    assert result["models"][0]["score"] == round(100 * sum(recomputed) / len(recomputed), 2)


def test_choice_by_letter_likelihood_in_batches_and_alone(bench):
    root = bench["root"]
    records = [
        {
            "id": f"c{i}",
            "image": f"{i}.png",
            "question": "Which colour?",
            "options": OPTIONS,
            "answer": "A",
            "category": "colour" if i < 2 else "shade",
        }
        for i in range(4)
    ]
    data = write_jsonl(root / "images" / "choice.jsonl", records)
    one = read_predictions(
        Path(
            run_eval(str(bench["export"]), "--data", str(data), "--batch-size", "1", "-o", str(root / "one.jsonl"))[
                "predictions"
            ]
        )
    )
    # Golds: the model's own choice for c0, c1, c3; another letter for c2: 75% exactly.
    for i, row in enumerate(one):
        records[i]["answer"] = row["choice"] if i in (0, 1, 3) else "ABCD"[("ABCD".index(row["choice"]) + 1) % 4]
    write_jsonl(data, records)
    result = run_eval(str(bench["export"]), "--data", str(data), "--batch-size", "4", "-o", str(root / "four.jsonl"))
    four = read_predictions(root / "four.jsonl")
    for alone, batched in zip(one, four):
        assert set(batched["logprobs"]) == set("ABCD") and batched["choice"] == max(
            batched["logprobs"], key=batched["logprobs"].get
        )
        assert all(math.isclose(alone["logprobs"][k], batched["logprobs"][k], abs_tol=1e-4) for k in "ABCD")
    model = result["models"][0]
    assert result["metric"] == "choice" and result["scoring"] == "loglik"
    assert model["score"] == 75.0 and model["categories"] == {"colour": 100.0, "shade": 50.0}


def test_generated_choices_are_parsed_and_scored(bench):
    root = bench["root"]
    records = [
        {"id": f"g{i}", "image": f"{i}.png", "question": "Which colour?", "options": OPTIONS, "answer": "B"}
        for i in range(2)
    ]
    data = write_jsonl(root / "images" / "gen.jsonl", records)
    result = run_eval(
        str(bench["export"]),
        "--data",
        str(data),
        "--scoring",
        "generate",
        "--max-new-tokens",
        "4",
        "-o",
        str(root / "gen.jsonl"),
    )
    rows = read_predictions(root / "gen.jsonl")
    assert result["scoring"] == "generate"
    assert [row["choice"] for row in rows] == [parse_choice(row["prediction"], OPTIONS) for row in rows]
    assert [row["score"] for row in rows] == [float(row["choice"] == "B") for row in rows]


def test_text_only_mmlu_side_by_side_with_the_original(bench):
    root = bench["root"]
    (root / "mmlu.csv").write_text(
        "What is 2+2?,3,4,5,6,B\nCapital of France?,Paris,Rome,Berlin,Madrid,A\nSky colour?,green,blue,red,black,B\n"
    )
    out = root / "mmlu.pred.jsonl"
    result = run_eval(
        str(bench["export"]), "--data", str(root / "mmlu.csv"), "--baseline", str(bench["target"]), "-o", str(out)
    )
    rows = read_predictions(out)
    assert [m["role"] for m in result["models"]] == ["model", "baseline"]
    assert [row["model"] for row in rows] == ["model"] * 3 + ["baseline"] * 3
    for model in result["models"]:
        mine = [row for row in rows if row["model"] == model["role"]]
        assert model["score"] == round(100 * sum(row["choice"] == row["answers"][0] for row in mine) / 3, 2)
    table = runner.invoke(
        app,
        [
            "eval",
            str(bench["export"]),
            "--data",
            str(root / "mmlu.csv"),
            "--baseline",
            str(bench["target"]),
            "-o",
            str(out),
            "--force",
        ],
    )
    assert table.exit_code == 0 and "difference" in table.stdout and "baseline" in table.stdout


def test_refusals_name_the_problem(bench):
    root = bench["root"]
    existing = root / "exists.jsonl"
    existing.write_text("{}\n")
    data = root / "mmlu.csv"
    data.write_text("What is 2+2?,3,4,5,6,B\n")
    result = runner.invoke(app, ["eval", str(bench["export"]), "--data", str(data), "-o", str(existing)])
    assert result.exit_code == 2 and "exists" in result.stderr and "--force" in result.stderr
    vqa = write_jsonl(root / "missing.jsonl", [{"id": "m1", "image": "nowhere.png", "question": "Q?", "answer": "a"}])
    result = runner.invoke(app, ["eval", str(bench["export"]), "--data", str(vqa), "-o", str(root / "m.jsonl")])
    assert result.exit_code == 2 and "item m1" in result.stderr and "nowhere.png" in result.stderr
    result = runner.invoke(app, ["eval", str(bench["export"]), "--data", str(data), "--metric", "bleu"])
    assert result.exit_code == 2 and "--metric 'bleu'" in result.stderr


def test_help_has_examples():
    result = runner.invoke(app, ["eval", "--help"], env={"COLUMNS": "120"})
    assert result.exit_code == 0 and "Examples" in result.stdout
