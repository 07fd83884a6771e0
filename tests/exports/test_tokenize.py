"""Which tokenizers an export may name and load: Hub ids, or folders inside SRFT_TOKENIZER_DIRS.

Requests are judged on the text alone, so the answer cannot depend on what exists on the
server; loading resolves symlinks and checks again, and every failure says the same thing.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from app.config import Settings
from app.exports import tokenize
from app.exports.tokenize import TokenizerUnavailableError, load_export_tokenizer
from app.recipe.tokenizer_names import (
    is_hub_id,
    revision_allowed,
    roots_as_written,
    tokenizer_allowed,
)

HUB_IDS = [
    "gpt2",
    "a",
    "Qwen/Qwen2.5-Coder-7B-Instruct",
    "meta-llama/Llama-3.1-8B",
    "_under/score_",
    "x" * 96,
    f"{'o' * 96}/{'n' * 96}",
    "x" * 97,
    "",
    "/etc",
    "/etc/passwd",
    "../x",
    "./x",
    "..",
    ".",
    "x/",
    "/x",
    "a/b/c",
    "-x",
    "x-",
    ".x",
    "x.",
    "a--b",
    "a..b",
    "model.git",
    "café",
    "a b",
    "a\nb",
    "~/x",
    "C:\\x",
    "org/../x",
]


def _hub_accepts(name: str) -> bool:
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


@pytest.mark.parametrize("name", HUB_IDS)
def test_hub_ids_follow_the_hubs_own_rule(name: str) -> None:
    assert is_hub_id(name) is _hub_accepts(name)


@pytest.mark.parametrize(
    ("revision", "allowed"),
    [
        ("main", True),
        ("v1.0.2", True),
        ("refs/pr/12", True),
        ("0123456789abcdef0123456789abcdef01234567", True),
        ("release_2024-01", True),
        ("../../etc", False),
        ("refs/../main", False),
        ("/main", False),
        ("main/", False),
        ("a//b", False),
        (".hidden", False),
        ("-x", False),
        ("a" * 129, False),
        ("a b", False),
        ("main\x00", False),
        ("", False),
    ],
)
def test_revisions_are_bounded_names_that_cannot_climb(revision: str, allowed: bool) -> None:
    assert revision_allowed(revision) is allowed


@pytest.fixture
def no_filesystem(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any look at a file fails the test."""

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"touched the filesystem: {args}")

    for name in ("stat", "lstat", "listdir", "scandir", "readlink", "access"):
        monkeypatch.setattr(os, name, forbidden)


def test_request_time_checks_read_the_text_alone(no_filesystem: None) -> None:
    roots = [Path("/srv/tokenizers"), Path("/mnt/models")]
    for name in (
        "/srv/tokenizers/qwen",
        "/srv/tokenizers",
        "/srv/tokenizers//qwen/",
        "/mnt/models/a/b/c",
        "Qwen/Qwen2.5-7B",
        "gpt2",
    ):
        assert tokenizer_allowed(name, roots), name
    for name in (
        "/etc",
        "/proc/self/environ",
        "/srv/tokenizers/../../etc",
        "/srv/tokenizers/qwen/../qwen",  # `..` is refused even where it would land inside
        "/srv/tokenizersX/qwen",  # a sibling that starts with the same letters
        "/srv",
        "srv/tokenizers/qwen/x",  # relative
        "../x",
        "./qwen",
        "/srv/tokenizers/qwen\x00",
        "/srv/tokenizers/\nqwen",
        "/srv/tokenizers/" + "q" * 5000,
        "",
    ):
        assert not tokenizer_allowed(name, roots), name
    assert not tokenizer_allowed("/srv/tokenizers/qwen", [])  # no directory allowed: no paths


def test_a_root_reached_through_a_symlink_is_accepted_as_written(tmp_path: Path) -> None:
    real = (tmp_path / "real").resolve()
    real.mkdir()
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    settings = Settings(tokenizer_dirs=f"{tmp_path / 'link'}{os.pathsep}{tmp_path / 'none'}")
    assert settings.tokenizer_roots == [real, (tmp_path / "none").resolve()]
    written = roots_as_written(settings.tokenizer_dirs)
    assert written == [tmp_path / "link", tmp_path / "none"]
    assert tokenizer_allowed(str(tmp_path / "link" / "tok"), written)
    assert not tokenizer_allowed(str(tmp_path / "link" / "tok"), settings.tokenizer_roots)


# ------------------------------------------------------------------------------ loading


@pytest.fixture
def root(tmp_path: Path, tokenizers: dict[str, Path]) -> Path:
    """An allowed directory holding a copy of the chatml test tokenizer."""
    allowed = tmp_path / "allowed"
    shutil.copytree(tokenizers["chatml"], allowed / "chatml")
    return allowed.resolve()


def _refused(name: str, roots: list[Path]) -> TokenizerUnavailableError:
    with pytest.raises(TokenizerUnavailableError) as caught:
        load_export_tokenizer(name, None, roots)
    assert caught.value.message == (
        f"the tokenizer {name!r} could not be loaded from the Hub or an allowed directory"
    )
    return caught.value


def test_a_folder_inside_an_allowed_directory_loads(root: Path) -> None:
    chat, load_as = load_export_tokenizer(str(root / "chatml"), None, [root])
    assert load_as == str(root / "chatml")
    assert chat.tokenizer.is_fast
    # Reached through a symlink that stays inside: loaded by its resolved path.
    (root / "alias").symlink_to(root / "chatml", target_is_directory=True)
    _, load_as = load_export_tokenizer(str(root / "alias"), None, [root])
    assert load_as == str(root / "chatml")


def test_a_symlink_out_of_the_allowed_directory_is_refused_alike(
    root: Path, tmp_path: Path, tokenizers: dict[str, Path]
) -> None:
    outside = shutil.copytree(tokenizers["chatml"], tmp_path / "outside")
    link = root / "escape"
    link.symlink_to(outside, target_is_directory=True)
    leads_to_a_tokenizer = _refused(str(link), [root])
    link.unlink()
    link.symlink_to(tmp_path / "missing", target_is_directory=True)
    leads_nowhere = _refused(str(link), [root])
    assert leads_to_a_tokenizer.message == leads_nowhere.message
    assert str(outside) in leads_to_a_tokenizer.reason  # the worker's log says why


def test_a_file_symlinked_out_of_the_folder_is_refused(
    root: Path, tmp_path: Path, tokenizers: dict[str, Path]
) -> None:
    folder = shutil.copytree(tokenizers["chatml"], root / "planted")
    secret = tmp_path / "secret.jinja"
    secret.write_text("{{ 'not for export' }}")
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    (folder / "chat_template.jinja").symlink_to(secret)
    _refused(str(folder), [root])


@pytest.mark.parametrize(
    "relative", ["missing", "chatml/tokenizer.json", "chatml/../chatml", "../allowed/chatml"]
)
def test_anything_but_a_tokenizer_folder_inside_is_refused_alike(root: Path, relative: str) -> None:
    _refused(f"{root}/{relative}", [root])
    _refused(str(root / "chatml"), [])  # no directory allowed


def test_a_hub_id_is_never_loaded_from_a_folder_of_that_name(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded: list[tuple[str, str | None]] = []
    monkeypatch.setattr(tokenize, "load_chat_tokenizer", lambda *args: loaded.append(args))
    workdir = tmp_path / "workdir"
    shutil.copytree(root / "chatml", workdir / "srft-test" / "chatml")
    shutil.copytree(root / "chatml", workdir / "chatml")
    monkeypatch.chdir(workdir)
    # transformers would load these from the working directory before asking the Hub.
    for name in ("srft-test/chatml", "chatml"):
        assert "working directory" in _refused(name, [root]).reason
    assert loaded == []
    # Without such a folder, the Hub id goes to the Hub (or its cache) as it is.
    load_export_tokenizer("srft-test/other", "refs/pr/1", [root])
    assert loaded == [("srft-test/other", "refs/pr/1")]


def test_a_bad_revision_is_refused_before_anything_loads(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def load(*args: Any) -> None:
        raise AssertionError(f"loaded {args}")

    monkeypatch.setattr(tokenize, "load_chat_tokenizer", load)
    with pytest.raises(TokenizerUnavailableError):
        load_export_tokenizer("srft-test/other", "../../../etc", [root])
