"""Publishing to the Hugging Face Hub (``lorelay push``).

``push_stage`` uploads a finished stage directory (a run directory resolves to its ``policy`` stage
through ``run.json``):

- the adapter (``adapter_model.safetensors``, ``adapter_config.json``), tokenizer files, chat
  template and ``metrics.json`` exactly as the stage wrote them; ``samples.json`` stays home (it
  quotes held-out training data);
- ``README.md``: a model card (``pipelines.model_card``) in place of PEFT's template card;
- ``lorelay_config.yaml``: the manifest's resolved config, which reproduces the stage;
- ``manifest.json``: the stage's manifest with ``files`` listing the repo's own checksums (the stage
  directory's move to ``published.stage_files``), so a downloaded repo passes ``verify_output`` and
  ``lorelay chat`` takes it like any stage directory.

``adapter_config.json`` changes in one case: when the base model has a Hub id but was loaded from a
local directory (the embedded model), ``base_model_name_or_path`` is set to that id so that
``AutoPeftModelForCausalLM.from_pretrained(repo)`` finds the base.

With ``merged=True`` the adapter is first merged into an unquantized copy of the base
(``pipelines.merge.merge_stage``, also behind ``lorelay merge``) and full safetensors shards are uploaded instead.

How it talks to the Hub:

- Token: ``HF_TOKEN`` or the login cache (``huggingface_hub.get_token``). It goes into the
  ``Authorization`` header and nowhere else: messages are built by lorelay, and any text from the
  Hub is scrubbed of it before it is shown.
- Endpoint: ``HF_ENDPOINT`` read at call time and handed to ``HfApi`` (huggingface_hub reads it
  only once, at import).
- Errors: 401 means the token is wrong, 403 that it cannot write this repo; both are
  ``LorelayError``\\ s that say so. 5xx, 408, 429, timeouts and dropped connections are retried
  ``RETRIES`` times in all with exponential backoff from ``RETRY_BASE_DELAY`` seconds. This is
  lorelay's own loop, not huggingface_hub's: its retry (``utils.http_backoff``, 2.4) wraps one raw HTTP
  request, while ``HfApi.create_repo``/``create_commit``/``upload_folder`` make several requests and do
  not route them through it; retrying the whole operation redoes a commit as a unit and lets 401, 403
  and 404 become one-line errors.
- Upload strategy. An adapter (megabytes) goes up as one commit (``create_commit``): the repo
  never shows a card without its weights, and a retry simply redoes the commit. Merged weights
  (gigabytes) go through ``upload_folder``; with ``hf_xet`` installed, huggingface_hub 2.x runs it as
  its streamed multi-commit pipeline (the successor of ``upload_large_folder``): files are
  committed in batches, and re-running the same push after an interruption skips every file
  already committed and every chunk already stored. To make that re-run possible the merged
  folder is kept in ``$LORELAY_CACHE/merged/`` until the upload succeeds.
- ``dry_run``: list the files with their sizes and print the card. No token, no network.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

from pipelines import model_card
from pipelines.merge import merge_stage, planned_merged_files
from pipelines.stage_files import (NOT_UPLOADED, Upload, human_size, merged_extras, resolve_target, run_manifests,
                                   stage_name)
from stages import __version__
from stages.core.errors import LorelayError
from stages.core.training import verify_output

RETRIES = 4                # attempts per Hub call, the first included
RETRY_BASE_DELAY = 2.0     # seconds before the first retry; doubled for each further one
HTTP_TIMEOUT = 300.0       # seconds without progress (connect, read or write) before a request is retried
RETRY_STATUS = (408, 429, 500, 502, 503, 504)


_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------

def push_command(target: str, *, repo: str, private: bool = False, revision: str | None = None,
                 merged: bool = False, dry_run: bool = False, merge_base: str = "auto") -> int:
    """``lorelay push STAGE_OR_RUN_DIR --repo OWNER/NAME``."""
    stage_dir, run_info = resolve_target(target)
    result = push_stage(stage_dir, repo=repo, private=private, revision=revision, merged=merged,
                        dry_run=dry_run, run_info=run_info, merge_base=merge_base)
    if dry_run:
        print(result)
    else:
        print(f"lorelay: pushed {stage_dir} to {repo}: {result}")
    return 0


# ----------------------------------------------------------------------------------------------
# push
# ----------------------------------------------------------------------------------------------

def push_stage(stage_dir: str | Path, *, repo: str, private: bool = False, revision: str | None = None,
               merged: bool = False, dry_run: bool = False, run_info: dict[str, Any] | None = None,
               merge_base: str = "auto") -> str:
    """Upload a finished stage to ``repo``; return the commit URL (or, dry run, the listing and card)."""
    stage_dir = Path(stage_dir)
    check_repo_id(repo)
    manifest = verify_output(stage_dir)
    if merged and model_card.is_reward_model(manifest):
        raise LorelayError("a reward model is an adapter plus a score head, not a causal LM: it cannot be merged",
                           file=stage_dir, hint="push it without --merged")
    folder = None
    if merged and not dry_run:
        # Merge first (or reuse an earlier push's merge): the card reports how faithful the merge is.
        folder = merged_cache_dir(stage_dir)
        if folder.is_dir():
            print(f"lorelay: reusing merged weights from an earlier push: {folder}", file=sys.stderr)
        else:
            merge_stage(stage_dir, folder, base=merge_base, write_card=False)
        manifest = json.loads((folder / "manifest.json").read_text())
    card = model_card.render_card(manifest, repo=repo, stage_name=stage_name(stage_dir, run_info),
                                  run_info=run_info, merged=merged, manifests=run_manifests(stage_dir, run_info))
    if merged:
        extras = merged_extras(stage_dir, card, manifest)
        files = extras + planned_merged_files(stage_dir, manifest)
    else:
        files = adapter_uploads(stage_dir, manifest, card)
    if dry_run:
        return describe(repo, files, card, revision=revision, private=private, merged=merged)

    token, source = hub_token()
    api = _hub_api(token)
    with _request_timeouts():
        user = _call("check the token", lambda: api.whoami(), repo=repo, token=token, source=source)
        _refuse_read_only(user, repo)
        # Not private: the namespace's default visibility (an organisation may default to private).
        _call(f"create {repo}", lambda: api.create_repo(repo, private=True if private else None, exist_ok=True),
              repo=repo, token=token, source=source)
        if revision and revision != "main":
            _call(f"create branch {revision}", lambda: api.create_branch(repo, branch=revision, exist_ok=True),
                  repo=repo, token=token, source=source)
        message = f"lorelay push: {manifest.get('stage')} {'merged model' if merged else 'adapter'}"
        if merged:
            url = _push_merged(api, folder, extras, repo=repo, revision=revision, message=message,
                               token=token, source=source)
        else:
            url = _call(f"upload to {repo}", lambda: _commit(api, repo, files, revision=revision, message=message),
                        repo=repo, token=token, source=source)
    return url


def check_repo_id(repo: str) -> None:
    if not _REPO_ID.fullmatch(repo or "") or "--" in repo or ".." in repo or repo.endswith((".", "-")):
        raise LorelayError(f"'{repo}' is not a Hub repo id", field="--repo",
                           hint="use OWNER/NAME: letters, digits, '-', '_' and '.', e.g. me/smollm2-support-sft")


def adapter_uploads(stage_dir: Path, manifest: dict[str, Any], card: str) -> list[Upload]:
    """The repo of an adapter push: card, config, the stage's files, and a manifest that checks them.

    Stage files go up as written, except ``adapter_config.json`` (see ``publishable_adapter_config``).
    """
    files = [Upload("README.md", card.encode()),
             Upload("lorelay_config.yaml", model_card.config_yaml(manifest).encode())]
    for name in sorted(manifest.get("files", {})):
        if name in NOT_UPLOADED:
            continue
        if name == "adapter_config.json":
            files.append(Upload(name, publishable_adapter_config(stage_dir / name, manifest)))
        else:
            files.append(Upload(name, stage_dir / name))
    files.append(Upload("manifest.json", published_manifest(stage_dir, files)))
    return files


def published_manifest(stage_dir: Path, files: list[Upload]) -> bytes:
    """The stage's manifest with ``files`` listing the repo's files, so a download verifies as a stage.

    The card replaces PEFT's README and samples.json stays home, so the stage's own checksums would not
    match the repo; they are kept under ``published.stage_files``. Everything else is unchanged.
    """
    data = json.loads((stage_dir / "manifest.json").read_text())
    data["published"] = {"by": f"lorelay {__version__}", "stage_files": data.get("files", {})}
    data["files"] = {f.path_in_repo: hashlib.sha256(f.read()).hexdigest()
                     for f in sorted(files, key=lambda f: f.path_in_repo) if f.path_in_repo != "manifest.json"}
    return (json.dumps(data, indent=2, default=str) + "\n").encode()


def publishable_adapter_config(path: Path, manifest: dict[str, Any]) -> Path | bytes:
    """adapter_config.json pointing at the base's Hub id when the stage recorded a local path for it."""
    hub_id = model_card.base_hub_id(manifest)
    config = json.loads(path.read_text())
    if hub_id is None or config.get("base_model_name_or_path") == hub_id:
        return path
    config["base_model_name_or_path"] = hub_id
    return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()


def describe(repo: str, files: list[Upload | tuple[str, int | None]], card: str, *, revision: str | None,
             private: bool, merged: bool) -> str:
    """The dry-run report: what would be uploaded where, with sizes, then the card."""
    rows = [(f.path_in_repo, f.size) if isinstance(f, Upload) else f for f in files]
    width = max(len(name) for name, _ in rows)
    total = sum(size or 0 for _, size in rows)
    lines = [f"dry run: would push {'merged weights' if merged else 'an adapter'} to "
             f"{repo}@{revision or 'main'} ({'private' if private else 'default visibility'} if created); "
             "nothing was sent", ""]
    lines += [f"  {name:<{width}}  {human_size(size) if size is not None else 'size known after merging':>10}"
              for name, size in rows]
    lines += ["", f"  {len(rows)} files, {'about ' if merged else ''}{human_size(total)}", "", "README.md:", "", card]
    return "\n".join(lines)


def _commit(api, repo: str, files: list[Upload], *, revision: str | None, message: str) -> str:
    from huggingface_hub import CommitOperationAdd

    # Fresh operations on every attempt: huggingface_hub marks them as used.
    operations = [CommitOperationAdd(path_in_repo=f.path_in_repo,
                                     path_or_fileobj=f.source if isinstance(f.source, bytes) else str(f.source))
                  for f in files]
    info = api.create_commit(repo, operations, commit_message=message, revision=revision,
                             commit_description=f"Uploaded by lorelay {__version__}.")
    return info.commit_url


def _push_merged(api, folder: Path, extras: list[Upload], *, repo: str,
                 revision: str | None, message: str, token: str, source: str) -> str:
    for extra in extras:  # the card names the repo: rewritten on every push
        (folder / extra.path_in_repo).write_bytes(extra.read())
    url = _call(f"upload to {repo}", lambda: api.upload_folder(repo_id=repo, folder_path=folder, revision=revision,
                                                               commit_message=message).commit_url,
                repo=repo, token=token, source=source)
    shutil.rmtree(folder, ignore_errors=True)
    return url


def merged_cache_dir(stage_dir: Path) -> Path:
    """Where a merged copy waits for its upload: keyed by the stage's manifest, so a re-run finds it."""
    from stages.core.default_model import cache_root

    digest = hashlib.sha256((stage_dir / "manifest.json").read_bytes()).hexdigest()[:16]
    return cache_root() / "merged" / f"{stage_dir.resolve().name}-{digest}"


# ----------------------------------------------------------------------------------------------
# talking to the Hub
# ----------------------------------------------------------------------------------------------

def hub_token() -> tuple[str, str]:
    """(token, where it came from); the token is never shown, only its source."""
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise LorelayError("no Hugging Face token found",
                           hint="set HF_TOKEN to a write token, or run `hf auth login`")
    source = "HF_TOKEN" if os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN") \
        else "the huggingface_hub login cache"
    return token, source


def _hub_api(token: str):
    from huggingface_hub import HfApi, constants

    if constants.is_offline_mode():
        raise LorelayError("huggingface_hub is in offline mode (HF_HUB_OFFLINE is set)",
                           hint="unset HF_HUB_OFFLINE to push, or use --dry-run")
    endpoint = os.environ.get("HF_ENDPOINT", "").rstrip("/") or None
    return HfApi(endpoint=endpoint, token=token, library_name="lorelay", library_version=__version__)


@contextlib.contextmanager
def _request_timeouts():
    """Bound each request (huggingface_hub's shared client waits forever), so a stall becomes a retry."""
    import httpx2
    from huggingface_hub.utils import get_session

    session = get_session()
    previous = session.timeout
    session.timeout = httpx2.Timeout(HTTP_TIMEOUT)
    try:
        yield
    finally:
        session.timeout = previous


def _status(err: BaseException) -> int | None:
    response = getattr(err, "response", None)
    return getattr(response, "status_code", None)


def _retryable(err: BaseException) -> bool:
    import httpx2

    return _status(err) in RETRY_STATUS or isinstance(err, (httpx2.TransportError, TimeoutError, ConnectionError))


def _reason(err: BaseException, token: str) -> str:
    lines = [line for line in str(err).splitlines() if line.strip()]
    text = lines[0] if lines else type(err).__name__
    if not _status(err):
        text = f"{type(err).__name__}: {text}"
    return text.replace(token, "<token>") if token else text


def _call(what: str, fn: Callable[[], Any], *, repo: str, token: str, source: str) -> Any:
    """Run one Hub operation: retry transient failures, turn the others into LorelayErrors."""
    from huggingface_hub.errors import OfflineModeIsEnabled

    for attempt in range(1, RETRIES + 1):
        try:
            return fn()
        except LorelayError:
            raise
        except OfflineModeIsEnabled:
            raise LorelayError("huggingface_hub is in offline mode (HF_HUB_OFFLINE is set)",
                               hint="unset HF_HUB_OFFLINE to push") from None
        except Exception as err:  # noqa: BLE001 - sorted into user errors below
            status, reason = _status(err), _reason(err, token)
            if status == 401:
                raise LorelayError(f"the Hub rejected the token from {source} (401 Unauthorized) while trying to "
                                   f"{what}", hint="the token is invalid or expired: set HF_TOKEN to a valid write "
                                   "token or run `hf auth login`") from None
            if status == 403:
                raise LorelayError(f"the token from {source} may not write to {repo} (403 Forbidden)",
                                   field="--repo", hint="push to a repo in your own namespace or an organisation "
                                   "you can write to, with a token that has write access") from None
            if status == 404:
                raise LorelayError(f"{repo} was not found while trying to {what} (404)", field="--repo",
                                   hint="check the repo id and that the token can see it") from None
            if not _retryable(err):
                raise LorelayError(f"could not {what}: {reason}") from None
            if attempt == RETRIES:
                raise LorelayError(f"could not {what}: the Hub kept failing after {RETRIES} tries ({reason})",
                                   hint="the Hub or the network is having trouble; run the same push again "
                                   "later") from None
            delay = RETRY_BASE_DELAY * 2 ** (attempt - 1)
            print(f"lorelay: {what} failed ({reason}); retrying in {delay:g}s ({attempt}/{RETRIES - 1})",
                  file=sys.stderr)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _refuse_read_only(user: dict[str, Any], repo: str) -> None:
    role = (((user or {}).get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise LorelayError(f"the token is read-only, so it cannot write to {repo}", field="--repo",
                           hint="create a token with write access at https://huggingface.co/settings/tokens")



