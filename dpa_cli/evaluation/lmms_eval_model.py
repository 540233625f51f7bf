"""lmms-eval's model `dpa`: a DPA export (or a workspace, a stage folder) under lmms-eval 0.7's simple model
interface, one request at a time, through plain transformers as `dpa generate` loads it.

lmms-eval 0.7 finds the model through the `lmms_eval.models` entry point that dpa's pyproject declares
(`manifest()` below), so once both are installed `--model dpa` works with no plugin path. The class is also
usable without lmms-eval (a harness of one's own, the tests): it then keeps the few attributes lmms-eval's
base class would give it, and reads requests the same way, each one's `.args`:

- generate_until: `(context, gen_kwargs, doc_to_visual, doc_id, task, split)`; the images are
  `doc_to_visual(self.task_dict[task][split][doc_id])`; decoding is greedy unless `temperature` > 0; the
  answer is cut at the first of `gen_kwargs["until"]`.
- loglikelihood: `(context, continuation or doc_to_target, doc_to_visual, doc_id, task, split)`; the
  answer is `(sum of the continuation tokens' log-probabilities, whether greedy decoding gives them)`.

The user message is the images then the context, rendered by the model's chat template with the generation
prompt (as `dpa generate` sends it); the continuation's tokens follow the generation prompt.
"""

from __future__ import annotations

from typing import Any

MODEL_ID = "dpa"

try:  # lmms-eval's base class when it is installed (its evaluator checks it), a stand-in otherwise
    from lmms_eval.api.model import lmms as _Base
except ImportError:

    class _Base:  # type: ignore[no-redef]
        """What lmms-eval's `lmms.__init__` sets up, for use without lmms-eval: one process, no task yet."""

        is_simple = True

        def __init__(self) -> None:
            self._rank, self._world_size, self.task_dict = 0, 1, {}

        @property
        def rank(self) -> int:
            return self._rank

        @property
        def world_size(self) -> int:
            return self._world_size


def manifest() -> Any:
    """The `lmms_eval.models` entry point: lmms-eval 0.7 calls it while it builds its model registry."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.DPA")


def _flag(value: Any) -> bool:
    """lmms-eval passes `--model_args` values parsed (`True`) or as written (`"true"`)."""
    return value if isinstance(value, bool) else str(value).strip().lower() in ("1", "true", "yes")


class DPA(_Base):
    """`--model dpa --model_args pretrained=EXPORT[,max_new_tokens=N][,trust_remote_code=true]` and lmms-eval's
    own `--device cpu|cuda` (default: cuda when present)."""

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        device: str | None = None,
        max_new_tokens: int = 1024,
        trust_remote_code: bool | str = False,
        **_harness: Any,
    ) -> None:
        super().__init__()
        from dpa_cli.generate import open_runnable

        device = None if device in (None, "", "auto") else str(device).split(":")[0]  # `cuda:0` -> `cuda`
        self.runnable = open_runnable(str(pretrained), device=device, allow_code=_flag(trust_remote_code))
        self.max_new_tokens = int(max_new_tokens)

    # --- requests ------------------------------------------------------------------------------------------
    def _images(self, doc_to_visual: Any, doc_id: Any, task: str, split: str) -> list[Any]:
        """The request's images as RGB; anything else lmms-eval hands over (video, audio) is refused by name."""
        if doc_to_visual is None:
            return []
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) or []
        flat = [v for group in visuals for v in (group if isinstance(group, (list, tuple)) else [group])]
        if any(not hasattr(v, "convert") for v in flat):
            kinds = sorted({type(v).__name__ for v in flat if not hasattr(v, "convert")})
            raise ValueError(f"dpa: task {task!r} doc {doc_id} gives {', '.join(kinds)} visuals; DPA reads images only")
        return [v.convert("RGB") for v in flat]

    def _messages(self, context: str, images: list[Any]) -> list[dict[str, Any]]:
        from dpa_cli.generate import user_turn

        return [user_turn(context, images)]

    def generate_until(self, requests: list[Any]) -> list[str]:
        from dpa_cli.generate import reply

        answers = []
        for context, gen_kwargs, doc_to_visual, doc_id, task, split in (r.args for r in requests):
            settings = dict(gen_kwargs or {})
            until = settings.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            temperature = float(settings.get("temperature") or 0.0) if settings.get("do_sample", True) else 0.0
            limit = int(settings.get("max_new_tokens") or self.max_new_tokens)
            messages = self._messages(context, self._images(doc_to_visual, doc_id, task, split))
            text = reply(self.runnable, messages, max_new_tokens=limit, temperature=temperature)["text"]
            for stop in until:
                text = text.split(stop, 1)[0] if stop else text
            answers.append(text)
        return answers

    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        import torch

        from dpa_cli.generate import build_inputs

        model, tokenizer = self.runnable.model, self.runnable.processor.tokenizer
        dtype = next(model.parameters()).dtype
        results = []
        for context, target, doc_to_visual, doc_id, task, split in (r.args for r in requests):
            continuation = target if isinstance(target, str) else target(self.task_dict[task][split][doc_id])
            messages = self._messages(context, self._images(doc_to_visual, doc_id, task, split))
            inputs = build_inputs(self.runnable.processor, messages, answer_next=True)
            prompt_length = inputs["input_ids"].shape[1]
            answer = torch.tensor([tokenizer(continuation, add_special_tokens=False)["input_ids"]], dtype=torch.long)
            inputs["input_ids"] = torch.cat([inputs["input_ids"], answer], dim=1)
            inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(answer)], dim=1)
            inputs = inputs.to(device=self.runnable.device, dtype=dtype)
            with torch.no_grad():
                logits = model(**inputs).logits[0, prompt_length - 1 : -1].float()
            logprobs = torch.log_softmax(logits, dim=-1)
            wanted = answer[0].to(logprobs.device)
            total = logprobs.gather(1, wanted[:, None]).sum().item()
            results.append((float(total), bool((logits.argmax(dim=-1) == wanted).all())))
        return results

    def generate_until_multi_round(self, requests: list[Any]) -> list[str]:
        raise NotImplementedError("dpa: multi-round generation is not implemented; run the task's single-round variant")


__all__ = ["DPA", "MODEL_ID", "manifest"]
