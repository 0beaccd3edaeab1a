"""The Hugging Face Hub side of `still publish --hub ORG/NAME`.

The token comes from the environment only, the target repo is checked before any work (so a
refusal costs seconds, not a merge and an eval), and the upload happens only after the local
dir is complete. `--dry-run` prints the plan and never builds an API client.
"""

from __future__ import annotations

import os
from pathlib import Path

from still.errors import StillError


def hub_token() -> str | None:
    """The token comes from the environment only (HF_TOKEN), never from a flag or a file."""
    return os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")


def hub_api():
    """An `HfApi` with the environment's token; refuses offline or without a token."""
    # imported here, not at the top: publishing without --hub never needs the client
    from huggingface_hub import HfApi

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        raise StillError(
            "--hub needs the network but HF_HUB_OFFLINE is set", hint="unset it, or use --dry-run"
        )
    token = hub_token()
    if not token:
        raise StillError(
            "--hub needs a token in the environment", hint="export HF_TOKEN=hf_... (write access)"
        )
    return HfApi(token=token)


def refuse_existing_repo(api, repo_id: str, force: bool) -> None:
    """A repo that already holds files is refused unless `force` (a new revision over it)."""
    # Any failure here (network, auth, an unknown id) is the user's to fix and the hub's own
    # first line says which; its exception types vary with the HTTP backend underneath.
    try:
        exists = api.repo_exists(repo_id)
        files = [f for f in api.list_repo_files(repo_id) if f != ".gitattributes"] if exists else []
    except Exception as exc:  # noqa: BLE001
        raise StillError(f"cannot reach hub repo {repo_id}: {str(exc).splitlines()[0]}") from None
    if files and not force:
        raise StillError(
            f"hub repo {repo_id} already has files ({len(files)}, e.g. {files[0]})",
            hint="add --force to upload a new revision over them",
        )


def upload_plan(folder: Path) -> list[tuple[str, int]]:
    """(relative path, bytes) of every file `upload` would send, in sorted order."""
    return [
        (str(path.relative_to(folder)), path.stat().st_size)
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    ]


def upload(api, repo_id: str, folder: Path, *, dry_run: bool, private: bool) -> None:
    """Create the repo (if needed) and upload `folder`; with `dry_run`, only print the plan."""
    plan = upload_plan(folder)
    total = sum(size for _, size in plan)
    if dry_run:
        print(
            f"still: dry run: would create {'private ' if private else ''}repo {repo_id} and "
            f"upload {len(plan)} files ({total / 1e6:.1f} MB) from {folder}:"
        )
        for name, size in plan:
            print(f"  {name:48} {size / 1e6:10.3f} MB")
        token = (
            "HF_TOKEN is set"
            if hub_token()
            else "no HF_TOKEN in the environment (needed for the real upload)"
        )
        print(f"  token: {token}")
        return
    try:
        api.create_repo(repo_id, repo_type="model", exist_ok=True, private=private)
        commit = api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            repo_type="model",
            commit_message=f"still publish {folder.name}",
        )
    except Exception as exc:  # noqa: BLE001 -- network, auth, quota: as for the check above
        raise StillError(
            f"upload to {repo_id} failed: {str(exc).splitlines()[0]}",
            hint=f"the local copy in {folder} is complete; rerun with --force",
        ) from None
    print(f"still: uploaded {len(plan)} files to {getattr(commit, 'commit_url', None) or repo_id}")
