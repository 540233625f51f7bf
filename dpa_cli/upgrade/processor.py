"""The processor of an upgraded checkpoint: the perceiver's image processor and tokenizer, the target's tokenizer,
and the chat template the plan chose (the target's, wrapped when it renders no images: upgrade/chat_template.py)."""

from __future__ import annotations

from pathlib import Path

from dpa_cli import loading
from dpa_cli.errors import CheckpointError
from dpa_cli.jsonio import read_json
from dpa_cli.upgrade.plan import UpgradePlan


def write_processor(plan: UpgradePlan, folder: Path) -> None:
    """Save a DPAProcessor whose token strings come from the plan's config, so model and processor agree."""
    from dpa_cli.model.processing_dpa import DPAProcessor

    images_from = plan.sources.perceiver or plan.sources.vit
    try:
        image_processor = loading.load_image_processor(images_from.files_path)
    except (OSError, ValueError) as err:
        raise CheckpointError(
            f"{images_from.files_path}: cannot load its image processor ({str(err).splitlines()[0]})",
            hint="the folder needs the preprocessor_config.json its model was released with",
        ) from None
    settings_file = images_from.files_path / "processor_config.json"
    settings = read_json(settings_file, error=CheckpointError) if settings_file.is_file() else None
    tokenizers = plan.tokenizers
    processor = DPAProcessor.from_parts(
        image_processor, tokenizers["perceiver"], tokenizers["target"], plan.config, settings
    )
    if plan.chat_template is not None and plan.chat_template.wrapped:
        processor.chat_template = plan.chat_template.template  # saved as chat_template.jinja: the tokenizer's too
    processor.save_pretrained(folder)
