"""Every model, processor, tokenizer, image processor, config and adapter dpa loads from a folder, loaded here.

One place decides `trust_remote_code` (dpa_cli.trust's verdict): True only with the user's
`--trust-remote-code` (`allow_code`) or when all the code the folder's configs name is dpa's own, byte for
byte. Otherwise transformers gets False and uses its installed classes (dpa's registered for `model_type:
dpa`), with a warning after the load; where no installed class fits (a foreign `model_type`, a tokenizer
class transformers does not know) the load is refused in one line naming the config and the flag.
`trust_remote_code` is always passed as a bool: None would make transformers ask on stdin.
"""

from __future__ import annotations

import functools
import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpa_cli.describe import check_json_files
from dpa_cli.errors import BadInputError, CheckpointError, DpaError
from dpa_cli.trust import Verdict, examine

if TYPE_CHECKING:
    from dpa_cli.workspace.results import StageResult

log = logging.getLogger(__name__)
# What transformers says when a folder needs its own code and may not run it.
_NEEDS_CODE = ("trust_remote_code", "custom code", "Unrecognized model", "does not recognize this architecture")
# What a loader of the folder's small files reads, named in the one-line refusal when those files make it fail
# (a tokenizer.json of `{}`, a tokenizer_config.json naming a class that takes other arguments, ...).
_PARTS = {
    "AutoConfig": "config",
    "AutoTokenizer": "tokenizer",
    "AutoProcessor": "processor",
    "AutoImageProcessor": "image processor",
}
_RESTORE = "restore the folder's files, or re-download / re-save the model"


def code_decision(folder: str | Path, allow_code: bool = False) -> tuple[bool, Verdict]:
    """The `trust_remote_code` to load `folder` with, and the verdict it rests on."""
    verdict = examine(folder)
    return bool(allow_code or verdict.own_code_only), verdict


def may_run_code(folder: str | Path, allow_code: bool = False) -> bool:
    """Whether loading `folder` may import the folder's own Python (for a process that loads it elsewhere)."""
    return code_decision(folder, allow_code)[0]


def refuse_carried_code(folder: str | Path, allow_code: bool, why: str) -> None:
    """Refuse a folder whose foreign code a copy would carry on (`why`), unless allowed. Altered copies of dpa's
    own files are not carried: dpa writes its installed ones in their place."""
    check_json_files(folder)  # a damaged config is named as such, not as code of unknown origin
    trust, verdict = code_decision(folder, allow_code)
    if verdict.carried and not trust:
        raise BadInputError(
            f"{folder}: the model code named in {verdict.describe_foreign(verdict.carried)} is not dpa's own; {why}",
            hint="pass --trust-remote-code only if you trust that code; else restore the folder from dpa's output",
        )


@functools.cache
def _warn_once(folder: str, foreign: str) -> None:
    log.warning(
        "%s: the model code named in %s is not dpa's own: not run; dpa's installed classes load the folder "
        "instead (pass --trust-remote-code to run it)",
        folder,
        foreign,
    )


def _from_pretrained(
    auto_class: str, folder: str | Path, allow_code: bool, kwargs: dict[str, Any], hint: str = _RESTORE
) -> Any:
    """`transformers.<auto_class>.from_pretrained(folder, trust_remote_code=<the gate's decision>, **kwargs)`.

    A config, tokenizer or processor the folder's files break is a `CheckpointError` naming the folder and what
    failed (`hint` says what to do), whatever the loader raised; a model's own failures go to the caller."""
    import transformers

    import dpa_cli.model  # noqa: F401  registers dpa's installed classes, used when the folder's code is not run

    check_json_files(folder)  # a damaged or 100k-deep JSON file is one line naming it, not a loader's traceback
    trust, verdict = code_decision(folder, allow_code)
    try:
        loaded = getattr(transformers, auto_class).from_pretrained(folder, trust_remote_code=trust, **kwargs)
    except DpaError:
        raise
    except Exception as err:
        if not trust and verdict.foreign and any(words in str(err) for words in _NEEDS_CODE):
            raise BadInputError(
                f"{folder}: the model code named in {verdict.describe_foreign()} is not dpa's own, and transformers "
                "has no installed class to load the folder without it; not run",
                hint="pass --trust-remote-code only if you trust that code",
            ) from None
        if auto_class not in _PARTS or isinstance(err, MemoryError):
            raise
        raise CheckpointError(
            f"{folder}: cannot load its {_PARTS[auto_class]} ({_first_line(err)})", hint=hint
        ) from None
    if verdict.foreign and not trust:
        _warn_once(str(folder), verdict.describe_foreign())
    return loaded


def load_config(folder: str | Path, allow_code: bool = False, **kwargs: Any) -> Any:
    return _from_pretrained("AutoConfig", folder, allow_code, kwargs)


def load_model(
    folder: str | Path, allow_code: bool = False, auto_class: str = "AutoModelForImageTextToText", **kwargs: Any
) -> Any:
    """The model through `auto_class` (AutoModelForCausalLM for a text-only LLM); kwargs go to from_pretrained."""
    return _from_pretrained(auto_class, folder, allow_code, kwargs)


def load_processor(folder: str | Path, allow_code: bool = False, **kwargs: Any) -> Any:
    """The folder's processor; settings it refuses (a DPA processor's `encoding`, `feature_span`, marker tokens
    in a hand-edited processor_config.json) are one line naming the folder, not a traceback."""
    hint = "restore the folder's processor, tokenizer and template files from dpa's output, or run `dpa upgrade` again"
    processor = _from_pretrained("AutoProcessor", folder, allow_code, kwargs, hint=hint)
    _check_chat_templates(processor, folder)
    return processor


def _check_chat_templates(processor: Any, folder: str | Path) -> None:
    """Compile the chat templates of a tokenizer, or of a processor and its tokenizers, as transformers will: one
    that is not valid Jinja is named now (`dpa upgrade` refuses such a target before writing anything), not as a
    TemplateSyntaxError traceback at the first prompt."""
    from jinja2 import TemplateError
    from transformers.utils.chat_template_utils import _compile_jinja_template

    owners = [processor, *(getattr(processor, name, None) for name in ("tokenizer", "perceiver_tokenizer"))]
    for owner in owners:
        template = getattr(owner, "chat_template", None)
        for text in template.values() if isinstance(template, dict) else [template]:
            if not isinstance(text, str):
                continue
            try:
                _compile_jinja_template(text)
            except TemplateError as err:
                where = f"line {err.lineno}: " if getattr(err, "lineno", None) else ""
                raise CheckpointError(
                    f"{folder}: its chat template is not valid Jinja ({where}{_first_line(err)})",
                    hint="fix chat_template.jinja (or the chat_template of tokenizer_config.json), or restore it",
                ) from None


def load_tokenizer(folder: str | Path, allow_code: bool = False, *, hint: str = _RESTORE, **kwargs: Any) -> Any:
    tokenizer = _from_pretrained("AutoTokenizer", folder, allow_code, kwargs, hint=hint)
    _check_chat_templates(tokenizer, folder)
    return tokenizer


def load_image_processor(folder: str | Path, allow_code: bool = False, **kwargs: Any) -> Any:
    return _from_pretrained("AutoImageProcessor", folder, allow_code, kwargs)


def load_adapter(model: Any, folder: str | Path) -> Any:
    """A PEFT adapter applied (unmerged) to `model`; peft reads its config and safetensors, and runs no folder code."""
    from peft import PeftModel

    check_json_files(folder)  # adapter_config.json: peft's parser would crash on a damaged one
    return PeftModel.from_pretrained(model, folder)


def _first_line(err: Exception) -> str:
    if isinstance(err, KeyError) and err.args:  # str(KeyError) is only the quoted key
        return f"no {err.args[0]!r} entry"
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


# What loading a model or an adapter raises when its files or config are wrong (safetensors' own error is a
# plain Exception subclass): named in one line, never a traceback.
_LOAD_ERRORS = (ValueError, KeyError, RuntimeError, TypeError, AttributeError, IndexError, OSError)


def _check_weight_files(folder: Path) -> None:
    """Every safetensors file of `folder` read as dpa reads a checkpoint (headers only, then the size on disk):
    a cut or lying file is named with what is wrong before transformers or peft opens it."""
    from dpa_cli.checkpoint import read_checkpoint_index, verify_data_size

    for shard in read_checkpoint_index(Path(folder)).shards.values():
        verify_data_size(shard)


def load_as_trained(result: StageResult, dtype: Any = None, device: str = "cpu", allow_code: bool = False) -> Any:
    """A stage result's model in eval mode: the checkpoint, with its LoRA adapter applied unmerged, as training
    ran it. `dtype`: a torch dtype, or None for the stored one. `allow_code`: --trust-remote-code."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # our own output says what is loading
    folder = result.model_dir
    for weights in (folder, result.adapter_dir):
        if weights is not None:
            _check_weight_files(weights)
    try:
        model = load_model(folder, allow_code, dtype=dtype or "auto")
    except _LOAD_ERRORS as err:
        raise CheckpointError(
            f"{folder}: cannot load it ({_first_line(err)})", hint="check it with `dpa inspect`"
        ) from None
    if result.adapter_dir is not None:
        try:
            with warnings.catch_warnings():  # peft 0.21 asks transformers 5 a question it has renamed
                warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
                model = load_adapter(model, result.adapter_dir)
        except _LOAD_ERRORS as err:
            hint = "the adapter must come from training this stage's model; restore it or train the stage again"
            raise CheckpointError(
                f"{result.adapter_dir}: peft cannot apply it ({_first_line(err)})", hint=hint
            ) from None
    return model.to(device).eval()
