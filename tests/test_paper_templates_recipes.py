"""Issue 15, part C: plain-LM targets whose chat template renders images, and recipes that match the official
DPA scripts value for value (ms-swift/scripts/PT_DPA_4node.sh, SFT_DPA_4node.sh, SFT_DPA_4node_lora.sh).

1. Templates. The real Qwen3 and Llama 3 templates (tests/fixtures/chat_templates) render list content as `''`
   and as the list's repr: a plain LM upgraded with either must still take images through its workspace's own
   processor (`AutoProcessor.apply_chat_template`), `dpa generate`, training and `dpa export`. Each generated
   conversation must render exactly as the LM's own template renders the same conversation written as text;
   templates that already render images stay byte for byte.
2. Recipes. Every value of the bundled recipes equals the script's, each commented with its line; the schedules
   are the scripts' (WSD: warmup 440, stable 570, cosine decay 1170 of 2180 steps) step by step; a shorter run
   scales them, and the learning rates logged by real runs of each recipe follow them, per part.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from dpa_cli import loading
from dpa_cli.cli.app import app
from dpa_cli.errors import BadInputError
from dpa_cli.parts import part_of, perceiver_family
from dpa_cli.synthetic.tokenizers import TOKENIZERS, tiny_tokenizer
from dpa_cli.train.arguments import trainer_kwargs
from dpa_cli.train.freeze import check_lora_targets
from dpa_cli.train.recipe import RECIPES, load_recipe
from dpa_cli.train.schedule import build_scheduler
from dpa_cli.upgrade.chat_template import BANNER, workspace_template
from dpa_cli.upgrade.tokens import choose_placeholder
from tests.factories import copy_checkpoint
from tests.test_bad_inputs import Env, train_clean
from tests.test_gate_recipe import refused
from tests.test_train import changed_parts

runner = CliRunner()
TEMPLATES = Path(__file__).parent / "fixtures" / "chat_templates"
# kind -> (tiny plain LM, real template, what an image item renders as in the wrapped template)
REAL = {
    "qwen3": ("causal_lm_qwen3", "qwen3.jinja", "<|vision_start|><|image_pad|><|vision_end|>"),
    "llama3": ("causal_lm_llama", "llama3.jinja", "<image>"),
}
SMALL = [
    "--set",
    "global_batch_size=2",
    "--set",
    "per_device_train_batch_size=2",
    "--set",
    "logging_steps=1",
    "--set",
    "save_steps=1000",
    "--set",
    "max_length=512",
    "--set",
    "gradient_checkpointing=false",
]


# --- fixtures: plain LMs with their real templates, upgraded ----------------------------------------------
@pytest.fixture(scope="module")
def workspaces(tiny_checkpoint, tmp_path_factory):
    """`workspaces(kind)` -> a workspace upgraded from the plain LM `kind` (its real template) with a Qwen2.5-VL
    perceiver, by `dpa upgrade`; shared by the module: never modify it."""
    root = tmp_path_factory.mktemp("plain-lm")
    built: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in built:
            name, template, _ = REAL[kind]
            lm = copy_checkpoint(tiny_checkpoint(name), root / f"{kind}-lm")
            (lm / "chat_template.jinja").write_text((TEMPLATES / template).read_text())
            result = runner.invoke(
                app,
                [
                    "upgrade",
                    str(lm),
                    "--perceiver",
                    str(tiny_checkpoint("qwen2_5_vl")),
                    "-o",
                    str(root / kind),
                    "--json",
                ],
            )
            assert result.exit_code == 0, result.output[-2000:]
            built[kind] = root / kind
        return built[kind]

    return get


@pytest.fixture(scope="module")
def processors(workspaces):
    cache: dict[str, object] = {}

    def get(kind: str):
        if kind not in cache:
            cache[kind] = loading.load_processor(workspaces(kind) / "model")
        return cache[kind]

    return get


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    for name, rgb in {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (30, 60, 220)}.items():
        Image.new("RGB", (56, 56), rgb).save(root / f"{name}.png")
    return root


def real_template(kind: str) -> str:
    return (TEMPLATES / REAL[kind][1]).read_text()


# --- 1. the chat template ----------------------------------------------------------------------------------
def _text(value: str) -> dict:
    return {"type": "text", "text": value}


IMAGE = {"type": "image"}
USER_CONTENTS = {
    "image-first": [IMAGE, _text("What is it?")],
    "image-after-text": [_text("Look at this:"), IMAGE],
    "image-between": [_text("Before"), IMAGE, _text("after.")],
    "two-images": [IMAGE, IMAGE, _text("Compare them.")],
    "text-list": [_text("Hi there")],
    "string": "Hello",
}


def _turns(shape: str, content) -> list[dict]:
    user = {"role": "user", "content": content}
    return {
        "single": [user],
        "answered": [user, {"role": "assistant", "content": [_text("It is red.")]}],
        "multi-turn": [
            user,
            {"role": "assistant", "content": "A1"},
            {"role": "user", "content": [_text("Q2")]},
            {"role": "assistant", "content": [_text("A2")]},
        ],
        "multi-turn-open": [user, {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}],
        "system": [{"role": "system", "content": [_text("Be brief.")]}, user],
        "image-in-a-later-turn": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}, user],
    }[shape]


SHAPES = ("single", "answered", "multi-turn", "multi-turn-open", "system", "image-in-a-later-turn")
CONVERSATIONS = [
    (kind, content, shape, prompt)
    for kind in REAL
    for content in USER_CONTENTS
    for shape in SHAPES
    for prompt in (True, False)
]


def as_text(messages: list[dict], image: str) -> list[dict]:
    """The conversation written as text: image items as `image`, a newline between an image and its neighbours."""
    out = []
    for message in messages:
        content = message["content"]
        if not isinstance(content, str):
            pieces = [("image", image) if item["type"] == "image" else ("text", item["text"]) for item in content]
            content = ""
            for i, (kind, value) in enumerate(pieces):
                content += "\n" if i and "image" in (kind, pieces[i - 1][0]) else ""
                content += value
        out.append({**message, "content": content})
    return out


@pytest.mark.parametrize(
    ("kind", "content", "shape", "prompt"),
    CONVERSATIONS,
    ids=[f"{k}-{c}-{s}-{'prompt' if p else 'bare'}" for k, c, s, p in CONVERSATIONS],
)
def test_the_workspace_renders_images_inside_the_lm_own_template(processors, kind, content, shape, prompt):
    processor = processors(kind)
    messages = _turns(shape, USER_CONTENTS[content])
    rendered = processor.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=False)
    # The LM's own template, on the same conversation written as text: what the wrapped one must give.
    expected = processor.tokenizer.apply_chat_template(
        as_text(messages, REAL[kind][2]),
        tokenize=False,
        chat_template=real_template(kind),
        add_generation_prompt=prompt,
    )
    assert rendered == expected
    images = sum(item == IMAGE for item in USER_CONTENTS[content]) if not isinstance(USER_CONTENTS[content], str) else 0
    assert rendered.count(processor.image_token) == images


GOLDEN = [
    (
        "qwen3",
        [{"role": "user", "content": [IMAGE, _text("What is it?")]}],
        {"add_generation_prompt": True},
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>\nWhat is it?<|im_end|>\n<|im_start|>assistant\n",
    ),
    (
        "qwen3",
        [{"role": "user", "content": [_text("Q1"), IMAGE]}],
        {"add_generation_prompt": True, "enable_thinking": False},
        (
            "<|im_start|>user\nQ1\n<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n<|im_start|>assistant\n"
            "<think>\n\n</think>\n\n"
        ),
    ),
    (
        "qwen3",
        _turns("multi-turn", [IMAGE, _text("Q1")]),
        {},
        (
            "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>\nQ1<|im_end|>\n"
            "<|im_start|>assistant\nA1<|im_end|>\n<|im_start|>user\nQ2<|im_end|>\n"
            "<|im_start|>assistant\n<think>\n\n</think>\n\nA2<|im_end|>\n"
        ),
    ),
    (
        "llama3",
        [{"role": "user", "content": [IMAGE, _text("What is it?")]}],
        {"add_generation_prompt": True},
        (
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat is it?<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n"
        ),
    ),
    (
        "llama3",
        _turns("multi-turn", [_text("Q1"), IMAGE]),
        {},
        (
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nQ1\n<image><|eot_id|><|start_header_id|>assistant"
            "<|end_header_id|>\n\nA1<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nQ2<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\nA2<|eot_id|>"
        ),
    ),
]


@pytest.mark.parametrize(
    ("kind", "messages", "kwargs", "expected"), GOLDEN, ids=[f"{g[0]}-{i}" for i, g in enumerate(GOLDEN)]
)
def test_known_renderings_of_the_real_templates(processors, kind, messages, kwargs, expected):
    assert processors(kind).apply_chat_template(messages, tokenize=False, **kwargs) == expected


@pytest.mark.parametrize("kind", list(REAL))
def test_the_processor_takes_images_through_the_chat_template(processors, images, kind):
    """Tokenized, with real images: one perceiver sequence per image and one target slot per image feature."""
    processor = processors(kind)
    red, blue = Image.open(images / "red.png"), Image.open(images / "blue.png")
    messages = [
        {"role": "user", "content": [{"type": "image", "image": red}, _text("Q1")]},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": [_text("Q2"), {"type": "image", "image": blue}]},
    ]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    assert inputs["perceiver_input_ids"].shape[0] == 2
    features = int((inputs["perceiver_input_ids"] == processor.perceiver_image_token_id).sum())
    assert features > 0 and int((inputs["input_ids"] == processor.image_token_id).sum()) == features


def test_the_upgrade_says_it_wrapped_the_template_and_writes_it_once(workspaces):
    for kind in REAL:
        model = workspaces(kind) / "model"
        template = (model / "chat_template.jinja").read_text()
        assert template.startswith(BANNER) and template.endswith(real_template(kind))
        notes = yaml.safe_load((workspaces(kind) / "dpa.yaml").read_text())["plan"]["notes"]
        assert any("chat template renders only text" in note and REAL[kind][2] in note for note in notes), notes
        # A wrapped template already renders images: upgrading its model again leaves it as it is.
        tokenizer = loading.load_tokenizer(model)
        again = workspace_template(tokenizer, choose_placeholder(tokenizer).token)
        assert not again.wrapped and again.template == template


TEMPLATED = [kind for kind, spec in TOKENIZERS.items() if spec.template]


@pytest.mark.parametrize("kind", TEMPLATED)
def test_a_template_that_renders_images_is_kept_byte_for_byte(kind):
    tokenizer = tiny_tokenizer(kind)
    kept = workspace_template(tokenizer, choose_placeholder(tokenizer).token)
    assert not kept.wrapped and kept.template == tokenizer.chat_template and kept.note() is None


def test_a_vlm_targets_workspace_keeps_its_template(dpa_workspace, tiny_checkpoint):
    written = (dpa_workspace("next_qwen") / "model" / "chat_template.jinja").read_text()
    assert written == (tiny_checkpoint("llava_next") / "chat_template.jinja").read_text()


# Templates with other rules for list content: each must come out rendering images.
ODD_TEMPLATES = {
    "raises-on-lists": "{% for m in messages %}{{ '<' + m.role + '>' + m.content + '</s>' }}{% endfor %}",
    "drops-lists": "{% for m in messages %}{% if m.content is string %}{{ m.role + ': ' + m.content }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}",
    "text-items-only": "{% for m in messages %}{{ m.role }}:{% if m.content is string %}{{ m.content }}{% else %}"
    "{% for c in m.content %}{% if c.type == 'text' %}{{ c.text }}{% endif %}{% endfor %}"
    "{% endif %}\n{% endfor %}",
    "macro-reads-messages": "{% macro last() %}{{ messages[-1].content }}{% endmacro %}{{ bos_token }}{{ last() }}",
}


@pytest.mark.parametrize("name", list(ODD_TEMPLATES))
def test_templates_with_other_list_rules_are_wrapped_to_render_images(name):
    tokenizer = tiny_tokenizer("llama3")
    tokenizer.chat_template = ODD_TEMPLATES[name]
    chosen = workspace_template(tokenizer, "<image>")
    assert chosen.wrapped and chosen.template.endswith(ODD_TEMPLATES[name])
    messages = [{"role": "user", "content": [_text("Q"), IMAGE, {"type": "video"}, _text("R")]}]
    text = tokenizer.apply_chat_template(messages, chat_template=chosen.template, tokenize=False)
    assert "Q\n<image>\nR" in text


def test_a_template_that_renders_no_user_text_is_kept_and_said():
    tokenizer = tiny_tokenizer("llama3")
    tokenizer.chat_template = "{% for m in messages %}{{ m.role }}{% endfor %}"
    chosen = workspace_template(tokenizer, "<image>")
    assert not chosen.wrapped and chosen.template == tokenizer.chat_template
    assert "does not render a user turn's text and images" in chosen.note()


@pytest.mark.parametrize("kind", list(REAL))
def test_generate_on_an_image_with_a_plain_lm_target(workspaces, images, kind):
    result = runner.invoke(
        app,
        [
            "generate",
            str(workspaces(kind)),
            "--image",
            str(images / "red.png"),
            "--prompt",
            "What colour is it?",
            "--max-new-tokens",
            "3",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output[-2000:]
    assert len(json.loads(result.stdout)["token_ids"]) >= 1


# --- 2. the recipes ------------------------------------------------------------------------------------
ALL = ("vit", "phi_p", "perceiver_lm", "phi", "llm")
COMMON = {
    "weight_decay": 0.01,
    "adam_beta2": 0.98,
    "bf16": True,
    "gradient_checkpointing": True,
    "average_tokens_across_devices": True,
    "logging_steps": 10,
    "seed": 42,
}
# The scripts' values (PT_DPA_4node.sh, SFT_DPA_4node.sh, SFT_DPA_4node_lora.sh), as official-dpa.md sec. 4 reads them.
OFFICIAL = {
    "stage1": {
        **COMMON,
        "learning_rate": 1e-3,
        "global_batch_size": 512,
        "per_device_train_batch_size": 8,
        "lr_scheduler_type": "warmup_stable_decay",
        "warmup_steps": 440,
        "lr_scheduler_kwargs": {"num_decay_steps": 1170},
        "max_steps": 2180,
        "max_length": 2048,
        "save_steps": 200,
        "learning_rates": {},
        "trainable": {**dict.fromkeys(ALL, "frozen"), "phi": "full"},
    },
    "stage2-full": {
        **COMMON,
        "learning_rate": 1e-5,
        "learning_rates": {"vit": 2e-6, "phi_p": 2e-6},
        "global_batch_size": 256,
        "per_device_train_batch_size": 2,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 500,
        "max_steps": 8000,
        "max_length": 8192,
        "save_steps": 1000,
        "trainable": dict.fromkeys(ALL, "full"),
    },
    "stage2-lora": {
        **COMMON,
        "learning_rate": 2e-4,
        "learning_rates": {"vit": 4e-5, "phi_p": 4e-5},
        "global_batch_size": 256,
        "per_device_train_batch_size": 4,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 500,
        "max_steps": 8000,
        "max_length": 8192,
        "save_steps": 1000,
        "trainable": dict.fromkeys(ALL, "lora"),
        "lora_r": 32,
        "lora_alpha": 32,
        "lora_dropout": 0.0,
        "lora_targets": "all-linear",
    },
}
VALUES = [(name, key) for name, values in OFFICIAL.items() for key in values]


@pytest.mark.parametrize(("name", "key"), VALUES, ids=[f"{n}:{k}" for n, k in VALUES])
def test_each_recipe_value_is_the_official_scripts(name, key):
    recipe = load_recipe(name)  # through the recipe gate
    assert recipe.as_dict()[key] == OFFICIAL[name][key]
    assert recipe.notes == ()  # at the recipe's own length nothing is rescaled


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_each_recipe_value_names_the_script_line_it_comes_from(name):
    lines = (RECIPES / f"{name}.yaml").read_text().splitlines()
    values = [line for line in lines if re.match(r"^\s*\w+:\s*[^\s#]", line) and not line.lstrip().startswith("#")]
    uncited = [line for line in values if not re.search(r"#.*(\b(PT|SFT|LORA):\d+|ms-swift|dpa)", line)]
    assert values and not uncited, uncited


def _rates(name: str, total: int, overrides: list[str] | None = None) -> list[float]:
    """The multiplier of the learning rate at steps 0..total-1, from the scheduler the run builds."""
    from transformers import TrainingArguments

    recipe = load_recipe(name, overrides)
    kwargs = trainer_kwargs(recipe.training_args, notes=[])
    args = TrainingArguments(output_dir="unused", gradient_accumulation_steps=1, **kwargs)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = build_scheduler(args, optimizer, total)
    rates = []
    for _ in range(total):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def wsd(step: int, warmup: int, stable: int, decay: int) -> float:
    """The official stage-1 schedule (transformers 4.57 warmup_stable_decay, official-dpa.md sec. 4.1)."""
    if step < warmup:
        return step / max(1, warmup)
    if step < warmup + stable:
        return 1.0
    if step >= warmup + stable + decay:
        return 0.0
    return 0.5 * (1 + math.cos(math.pi * (step - warmup - stable) / max(1, decay)))


def cosine(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return step / max(1, warmup)
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def test_stage1_is_the_official_wsd_step_by_step():
    rates = _rates("stage1", 2180)
    assert rates == pytest.approx([wsd(s, 440, 570, 1170) for s in range(2180)], abs=1e-12)
    assert rates[220] == pytest.approx(0.5) and rates[440] == rates[1009] == 1.0 and rates[1595] == pytest.approx(0.5)


@pytest.mark.parametrize("name", ["stage2-full", "stage2-lora"])
def test_stage2_is_the_official_cosine_with_500_warmup_steps(name):
    rates = _rates(name, 8000)
    assert rates == pytest.approx([cosine(s, 500, 8000) for s in range(8000)], abs=1e-12)


SCALED = [1, 2, 3, 5, 7, 12, 20, 33, 100, 999, 2179, 4000]


@pytest.mark.parametrize("total", SCALED)
def test_a_run_of_another_length_keeps_the_schedules_shape(total):
    """The recipe's phases become fractions of its 2180 steps, rounded up (transformers' rule for a fractional
    warmup_steps), the decay cut to what the warmup leaves: every length gets warmup, stable and decay."""
    recipe = load_recipe("stage1", [f"max_steps={total}"])
    assert recipe.notes and "written for 2180 steps" in recipe.notes[0]
    warmup = math.ceil(total * 440 / 2180)
    decay = min(math.ceil(total * 1170 / 2180), total - warmup)
    expected = [wsd(s, warmup, total - warmup - decay, decay) for s in range(total)]
    assert _rates("stage1", total, [f"max_steps={total}"]) == pytest.approx(expected, abs=1e-12)
    assert _rates("stage2-full", total, [f"max_steps={total}"]) == pytest.approx(
        [cosine(s, math.ceil(total * 500 / 8000), total) for s in range(total)], abs=1e-12
    )


def test_set_values_are_taken_as_given_and_fractions_are_accepted():
    recipe = load_recipe("stage1", ["max_steps=100", "warmup_steps=10", 'lr_scheduler_kwargs={"num_decay_steps": 0.5}'])
    assert recipe.training_args["warmup_steps"] == 10
    rates = _rates("stage1", 100, ["max_steps=100", "warmup_steps=10", 'lr_scheduler_kwargs={"num_decay_steps": 0.5}'])
    assert rates == pytest.approx([wsd(s, 10, 40, 50) for s in range(100)], abs=1e-12)


# The gate: phase lengths that are not steps or fractions, WSD phases under another scheduler, phases that do
# not fit the run. Each refused naming the key, in one line.
BAD_PHASES = [
    f'lr_scheduler_kwargs={{"{key}": {value}}}'
    for key in ("num_decay_steps", "num_stable_steps")
    for value in ("-1", "-0.5", "1.5", '"abc"', "true", "NaN", "Infinity", "[1]", "null")
]
OTHER_SCHEDULERS = [
    "linear",
    "cosine",
    "constant",
    "constant_with_warmup",
    "polynomial",
    "cosine_with_min_lr",
    "inverse_sqrt",
    "cosine_with_restarts",
]
MISFITS = [
    (steps, warmup, decay)
    for steps in (10, 100, 2180)
    for warmup, decay in ((steps, 1), (steps // 2, steps // 2 + 1), (1, steps), (steps + 1, 0))
]
GATE = (
    [([item], "lr_scheduler_kwargs") for item in BAD_PHASES]
    + [([f"lr_scheduler_type={name}"], "lr_scheduler_kwargs holds num_decay_steps") for name in OTHER_SCHEDULERS]
    + [
        (
            [f"max_steps={s}", f"warmup_steps={w}", f'lr_scheduler_kwargs={{"num_decay_steps": {d}}}'],
            "the schedule does not fit the run",
        )
        for s, w, d in MISFITS
    ]
)


@pytest.mark.parametrize(("overrides", "needle"), GATE, ids=[" ".join(o) for o, _ in GATE])
def test_the_gate_refuses_a_schedule_that_cannot_run(overrides, needle):
    with pytest.raises(BadInputError) as caught:
        load_recipe("stage1", overrides)
    assert needle in caught.value.message and "\n" not in str(caught.value.message), caught.value.message


LLM_ONLY = r"model\.language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
CLI_CASES = [  # (arguments, stage, needles): one of each class through the command line
    (["--set", BAD_PHASES[0]], "1", ("lr_scheduler_kwargs", "num_decay_steps=-1")),
    (["--set", "lr_scheduler_type=cosine"], "1", ("lr_scheduler_kwargs holds num_decay_steps", "cosine")),
    (
        ["--set", "max_steps=10", "--set", "warmup_steps=8", "--set", 'lr_scheduler_kwargs={"num_decay_steps": 5}'],
        "1",
        ("the schedule does not fit the run", "13 steps"),
    ),
    (
        ["--from", "model", "--lora", "--lora-targets", LLM_ONLY],
        "2",
        ("trainable.vit=lora", "adapts none of its layers"),
    ),
]


@pytest.mark.parametrize(("extra", "stage", "needles"), CLI_CASES, ids=[c[2][0] for c in CLI_CASES])
def test_dpa_train_refuses_them_and_writes_nothing(
    dpa_workspace, tiny_checkpoint, data_files, tmp_path, extra, stage, needles
):
    workspace = Path(shutil.copytree(dpa_workspace("next_qwen"), tmp_path / "ws"))
    env = Env(tiny_checkpoint, workspace, data_files / "images", tmp_path)
    refused(env, train_clean(env, *extra, stage=stage), *needles)


# --- 3. real runs of each recipe on a plain-LM target (its template wrapped) ----------------------------------
@pytest.fixture(scope="module")
def trained(workspaces, images, tmp_path_factory) -> Path:
    """The Qwen3 workspace trained with each recipe: stage 1 (12 steps), stage 2 in full (3), then stage 2 with
    LoRA (3, --restart); the stage-2 results are kept as stage2-full/ and stage2/."""
    root = tmp_path_factory.mktemp("trained")
    workspace = Path(shutil.copytree(workspaces("qwen3"), root / "ws"))
    colours = ("red", "green", "blue")
    captions = [
        {
            "id": f"c-{name}",
            "image": f"{name}.png",
            "conversations": [
                {"from": "human", "value": "<image>\nDescribe it."},
                {"from": "gpt", "value": f"A {name} square."},
            ],
        }
        for name in colours
    ]
    instructions = [
        {
            "id": f"i-{name}",
            "image": f"{name}.png",
            "conversations": [
                {"from": "human", "value": "What colour is it?\n<image>"},
                {"from": "gpt", "value": f"It is {name}."},
                {"from": "human", "value": "Sure?"},
                {"from": "gpt", "value": "Yes."},
            ],
        }
        for name in colours
    ]
    (root / "1.json").write_text(json.dumps(captions))
    (root / "2.json").write_text(json.dumps(instructions))

    def train(stage: int, *extra: str) -> None:
        result = runner.invoke(
            app,
            [
                "train",
                "--stage",
                str(stage),
                "-w",
                str(workspace),
                "--data",
                str(root / f"{stage}.json"),
                "--image-root",
                str(images),
                *SMALL,
                *extra,
                "--json",
            ],
        )
        assert result.exit_code == 0, result.output[-3000:]

    train(1, "--max-steps", "12")
    train(2, "--max-steps", "3")
    shutil.copytree(workspace / "stage2", root / "stage2-full")
    train(2, "--lora", "--max-steps", "3", "--restart")
    return workspace


def logged(folder: Path) -> list[dict]:
    return [line for line in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines()) if "loss" in line]


def test_stage1_run_follows_the_scaled_wsd_schedule(trained):
    logs = logged(trained / "stage1")
    warmup, decay = math.ceil(12 * 440 / 2180), math.ceil(12 * 1170 / 2180)  # 3 and 7: stable 2
    # The rate logged at step k is the one step k used: the schedule at k - 1.
    expected = [1e-3 * wsd(step - 1, warmup, 12 - warmup - decay, decay) for step in range(1, 13)]
    assert [entry["learning_rate"] for entry in logs] == pytest.approx(expected, abs=1e-15)
    assert [entry["step"] for entry in logs] == list(range(1, 13))
    assert all(entry["learning_rates"] == {"phi": entry["learning_rate"]} for entry in logs)


def test_stage2_runs_give_the_vit_group_its_own_rate(trained):
    for folder, base, vit in ((trained.parent / "stage2-full", 1e-5, 2e-6), (trained / "stage2", 2e-4, 4e-5)):
        logs = logged(folder)
        assert logs[1]["learning_rate"] == pytest.approx(base)  # warmup ceil(3 * 500 / 8000) = 1 step
        for entry in logs:
            rates, factor = entry["learning_rates"], entry["learning_rate"] / base
            assert rates == pytest.approx(
                {
                    "vit": vit * factor,
                    "phi_p": vit * factor,
                    "perceiver_lm": base * factor,
                    "phi": base * factor,
                    "llm": base * factor,
                }
            ), folder


def test_stage2_lora_adapts_every_linear_of_every_part_and_trains_nothing_in_full(trained):
    adapter = load_file(trained / "stage2" / "adapter" / "adapter_model.safetensors")
    family = perceiver_family(json.loads((trained / "model" / "config.json").read_text()))
    modules = {key.split(".lora_")[0].removeprefix("base_model.model.") for key in adapter}
    assert {part_of(f"{module}.weight", family) for module in modules} == set(ALL)
    assert not any(module.endswith("lm_head") for module in modules)
    assert changed_parts(trained / "stage1" / "model", trained / "stage2" / "model") == set()


def test_the_trained_plain_lm_workspace_generates_and_exports(trained, images, tmp_path):
    """The export (LoRA merged into every part) loads with plain transformers in a fresh interpreter, its own
    processor renders the probe image through the wrapped template, and its logits match the trained model."""
    result = runner.invoke(
        app,
        [
            "generate",
            str(trained),
            "--image",
            str(images / "green.png"),
            "--prompt",
            "Colour?",
            "--max-new-tokens",
            "2",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output[-2000:]
    result = runner.invoke(app, ["export", "-w", str(trained), "-o", str(tmp_path / "export"), "--json"])
    assert result.exit_code == 0, result.output[-2000:]
    assert json.loads(result.stdout)["verified"] is True
    template = (trained / "model" / "chat_template.jinja").read_text()
    assert (tmp_path / "export" / "chat_template.jinja").read_text() == template


def test_lora_targets_must_reach_every_part_set_to_lora(workspaces):
    model = loading.load_model(workspaces("qwen3") / "model")
    recipe = load_recipe("stage2-lora")
    llm = LLM_ONLY
    perceiver_lm = r"model\.perceiver\.language_model\..*_proj"
    regexes = {
        "vit": r"model\.perceiver\.visual\.blocks\..*\.(qkv|proj|gate_proj|up_proj|down_proj)",
        "phi_p": r"model\.perceiver\.visual\.merger\.mlp\.[02]",
        "perceiver_lm": perceiver_lm,
        "phi": r"model\.multi_modal_projector\.linear_[12]",
    }
    check_lora_targets(model, "|".join([llm, *regexes.values()]), recipe.trainable)  # all parts: accepted
    for size in (0, 1, 2, 3):
        for kept in itertools.combinations(regexes, size):
            missing = [part for part in regexes if part not in kept]
            with pytest.raises(BadInputError) as caught:
                check_lora_targets(model, "|".join([llm, *(regexes[p] for p in kept)]), recipe.trainable)
            assert f"trainable.{missing[0]}=lora" in caught.value.message, caught.value.message
