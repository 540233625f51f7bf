"""MODEL resolution: folders, repo ids through a real-layout hub cache, offline, no network."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import huggingface_hub
import pytest
from huggingface_hub import constants
from huggingface_hub.errors import LocalEntryNotFoundError

import dpa_cli.hub as hub
from dpa_cli.errors import BadInputError, ModelNotFoundError
from dpa_cli.hub import ResolvedModel, resolve_model

REPO = "acme/tiny-vlm"
MAIN = "a" * 8 + "0123456789abcdef0123456789abcdef"  # 40-hex commit hashes
OLD = "b" * 8 + "0123456789abcdef0123456789abcdef"


def add_snapshot(cache: Path, repo_id: str, commit: str, files: dict[str, str], refs: tuple[str, ...]) -> Path:
    """Lay out one snapshot exactly as huggingface_hub does: blobs, refs, symlinked snapshot files."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    for name, text in files.items():
        data = text.encode()
        # Non-LFS files are stored under their git blob sha1, as the hub names them.
        blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        (repo / "blobs").mkdir(parents=True, exist_ok=True)
        (repo / "blobs" / blob).write_bytes(data)
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).symlink_to(Path("../../blobs") / blob)
    for ref in refs:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)  # the hub writes the hash with no newline
    return snapshot


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An offline hub cache holding REPO at two commits: MAIN (refs/main) and OLD (tag v1.0)."""
    cache = tmp_path / "hub"
    add_snapshot(cache, REPO, MAIN, {"config.json": json.dumps({"model_type": "llava"})}, ("main",))
    add_snapshot(cache, REPO, OLD, {"config.json": "{}"}, ("v1.0",))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub read the environment at import; make its own HTTP guard agree.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture
def online(cache: Path, monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Offline mode off, with every snapshot_download call recorded (local ones still run for real)."""
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    calls: list[dict[str, Any]] = []
    real = huggingface_hub.snapshot_download

    def recording(repo_id: str, **kwargs: Any) -> str:
        calls.append(kwargs)
        if not kwargs.get("local_files_only"):
            pytest.fail("a download was attempted")
        return real(repo_id, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", recording)
    return calls


def snapshot_dir(cache: Path, commit: str) -> Path:
    return (cache / "models--acme--tiny-vlm" / "snapshots" / commit).resolve()


def test_repo_id_resolves_offline_to_the_main_snapshot(cache: Path) -> None:
    model = resolve_model(REPO)
    assert model == ResolvedModel(snapshot_dir(cache, MAIN), "hub-cache", REPO, MAIN, REPO)
    assert json.loads((model.path / "config.json").read_text()) == {"model_type": "llava"}


@pytest.mark.parametrize("revision", [OLD, "v1.0"])
def test_a_given_revision_resolves_to_its_commit(cache: Path, revision: str) -> None:
    model = resolve_model(REPO, revision=revision)
    assert (model.path, model.revision) == (snapshot_dir(cache, OLD), OLD)


def test_missing_repo_offline_says_what_to_download(cache: Path) -> None:
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model("acme/absent", allow_download=True)
    assert "acme/absent" in err.value.message and str(cache) in err.value.message
    assert "HF_HUB_OFFLINE is set" in err.value.message
    assert "`hf download acme/absent`" in err.value.hint and "HF_HUB_OFFLINE" in err.value.hint
    assert err.value.exit_code == 2


def test_missing_revision_says_which_revision_to_download(cache: Path) -> None:
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model(REPO, revision="v2.0")
    assert "at revision v2.0" in err.value.message
    assert f"`hf download {REPO} --revision v2.0`" in err.value.hint


def test_offline_flag_is_read_at_call_time(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # as if imported before the env was set
    assert hub.hub_offline()
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert not hub.hub_offline()


def test_online_uses_the_cache_first(cache: Path, online: list[dict[str, Any]]) -> None:
    assert resolve_model(REPO).path == snapshot_dir(cache, MAIN)
    assert [call["local_files_only"] for call in online] == [True]


def test_online_without_permission_never_downloads(cache: Path, online: list[dict[str, Any]]) -> None:
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model("acme/absent")
    assert "downloads are off" in err.value.message and "hf download acme/absent" in err.value.hint


def test_online_with_permission_downloads_what_is_missing(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    fetched = add_snapshot(cache, "acme/new", MAIN, {"config.json": "{}"}, ())

    def fake_download(repo_id: str, *, local_files_only: bool = False, **kwargs: Any) -> str:
        # Stands in for the network: nothing cached locally, the "download" yields the snapshot.
        if local_files_only:
            raise LocalEntryNotFoundError("not cached")
        assert (repo_id, kwargs["cache_dir"]) == ("acme/new", cache)
        return str(fetched)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    model = resolve_model("acme/new", allow_download=True)
    assert (model.path, model.revision, model.source) == (fetched, MAIN, "hub-cache")


def test_folder_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "acme" / "tiny-vlm").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    # A folder wins over a repo id of the same spelling.
    model = resolve_model("acme/tiny-vlm")
    assert model == ResolvedModel(tmp_path / "acme" / "tiny-vlm", "folder", None, None, "acme/tiny-vlm")
    assert resolve_model("./acme").path == tmp_path / "acme"


def test_folder_spec_with_a_revision_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="applies only to repo ids"):
        resolve_model(str(tmp_path), revision="main")


@pytest.mark.parametrize("spec", ["./nowhere", "/no/such/model", "~/no-such-model-dir", "a/b/c"])
def test_path_like_spec_that_is_not_a_folder(cache: Path, spec: str) -> None:
    with pytest.raises(ModelNotFoundError, match=f"no such folder: {spec}"):
        resolve_model(spec)


def test_existing_file_is_not_a_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "weights").write_text("")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFoundError, match="not a folder: weights"):
        resolve_model("weights")


@pytest.mark.parametrize(
    ("spec", "words"), [("tiny-vlm", "neither a folder nor a repo id"), ("acme/tiny vlm", "nor a valid repo id")]
)
def test_spec_that_is_neither_folder_nor_repo_id(cache: Path, spec: str, words: str) -> None:
    with pytest.raises(ModelNotFoundError, match=words) as err:
        resolve_model(spec)
    assert spec in err.value.message and "Qwen/Qwen3-0.6B" in err.value.hint


def test_alias_is_resolved_first(cache: Path) -> None:
    model = resolve_model("tiny", aliases={"tiny": REPO})
    assert (model.spec, model.repo_id, model.path) == ("tiny", REPO, snapshot_dir(cache, MAIN))
