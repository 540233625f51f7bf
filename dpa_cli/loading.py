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
from dpa_cli.errors import BadInputError, CheckpointError
from dpa_cli.trust import Verdict, examine

if TYPE_CHECKING:
    from dpa_cli.workspace.results import StageResult

log = logging.getLogger(__name__)
# What transformers says when a folder needs its own code and may not run it.
_NEEDS_CODE = ("trust_remote_code", "custom code", "Unrecognized model", "does not recognize this architecture")


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


def _from_pretrained(auto_class: str, folder: str | Path, allow_code: bool, kwargs: dict[str, Any]) -> Any:
    """`transformers.<auto_class>.from_pretrained(folder, trust_remote_code=<the gate's decision>, **kwargs)`."""
    import transformers

    import dpa_cli.model  # noqa: F401  registers dpa's installed classes, used when the folder's code is not run

    check_json_files(folder)  # a damaged or 100k-deep JSON file is one line naming it, not a loader's traceback
    trust, verdict = code_decision(folder, allow_code)
    try:
        loaded = getattr(transformers, auto_class).from_pretrained(folder, trust_remote_code=trust, **kwargs)
    except (ValueError, KeyError, OSError, ImportError, AttributeError, TypeError) as err:
        if not trust and verdict.foreign and any(words in str(err) for words in _NEEDS_CODE):
            raise BadInputError(
                f"{folder}: the model code named in {verdict.describe_foreign()} is not dpa's own, and transformers "
                "has no installed class to load the folder without it; not run",
                hint="pass --trust-remote-code only if you trust that code",
            ) from None
        raise
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
    try:
        return _from_pretrained("AutoProcessor", folder, allow_code, kwargs)
    except (ValueError, TypeError) as err:
        said = (str(err).strip().splitlines() or [type(err).__name__])[0]
        hint = "restore processor_config.json from dpa's output, or run `dpa upgrade` again"
        raise CheckpointError(f"{folder}: cannot load its processor ({said})", hint=hint) from None


def load_tokenizer(folder: str | Path, allow_code: bool = False, **kwargs: Any) -> Any:
    return _from_pretrained("AutoTokenizer", folder, allow_code, kwargs)


def load_image_processor(folder: str | Path, allow_code: bool = False, **kwargs: Any) -> Any:
    return _from_pretrained("AutoImageProcessor", folder, allow_code, kwargs)


def load_adapter(model: Any, folder: str | Path) -> Any:
    """A PEFT adapter applied (unmerged) to `model`; peft reads its config and safetensors, and runs no folder code."""
    from peft import PeftModel

    check_json_files(folder)  # adapter_config.json: peft's parser would crash on a damaged one
    return PeftModel.from_pretrained(model, folder)


def _first_line(err: Exception) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def load_as_trained(result: StageResult, dtype: Any = None, device: str = "cpu", allow_code: bool = False) -> Any:
    """A stage result's model in eval mode: the checkpoint, with its LoRA adapter applied unmerged, as training
    ran it. `dtype`: a torch dtype, or None for the stored one. `allow_code`: --trust-remote-code."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # our own output says what is loading
    folder = result.model_dir
    try:
        model = load_model(folder, allow_code, dtype=dtype or "auto")
    except (ValueError, KeyError, RuntimeError) as err:
        raise CheckpointError(
            f"{folder}: cannot load it ({_first_line(err)})", hint="check it with `dpa inspect`"
        ) from None
    if result.adapter_dir is not None:
        try:
            with warnings.catch_warnings():  # peft 0.21 asks transformers 5 a question it has renamed
                warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
                model = load_adapter(model, result.adapter_dir)
        except (ValueError, KeyError, RuntimeError) as err:
            hint = "the adapter must come from training this stage's model; restore it or train the stage again"
            raise CheckpointError(
                f"{result.adapter_dir}: peft cannot apply it ({_first_line(err)})", hint=hint
            ) from None
    return model.to(device).eval()
