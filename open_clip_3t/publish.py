"""Put an export on the Hugging Face hub, with huggingface_hub's own API (OpenCLIP's `push_to_hf_hub` does not work
with huggingface_hub 2.x: it imports a function that is gone).

    python -m open_clip_3t.publish released/ ORG/NAME [--private]
    python -m open_clip_3t.export logs/RUN/checkpoints/epoch_32.pt --out released/ --push-to-hub ORG/NAME

The folder must be an export (open_clip_config.json, open_clip_model.safetensors). Its model card is rewritten for
ORG/NAME first (from its provenance record), then `HfApi.create_repo(exist_ok=True)` and `HfApi.upload_folder` upload
exactly the export's files in one commit. Log in first (`hf auth login`, or HF_TOKEN). Then anyone loads it with
`open_clip.create_model_and_transforms('hf-hub:ORG/NAME')`. docs/release.md.
"""
import argparse
import json
import re
import sys
from pathlib import Path

from .files import write_atomic
from .flags import HelpFormatter
from .release import CARD_FILE, PROVENANCE_FILE, model_card

REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")
EXPORT_FILES = ("open_clip_config.json", "open_clip_model.safetensors")


class PublishError(ValueError):
    """A one-line reason why an export cannot be published, naming the input and the fix."""


def check_repo_id(repo_id):
    if not REPO_ID.fullmatch(repo_id or "") or ".." in repo_id or repo_id.endswith((".git", ".")):
        raise PublishError(f"--push-to-hub {repo_id!r}: give the hub repository as ORG/NAME (letters, digits, '-', "
                           f"'_', '.'), e.g. my-lab/3t-vit-b16-laion400m")


def upload_plan(folder):
    """The files of `folder` that are uploaded: the export's own (never a stray file someone left there)."""
    folder = Path(folder)
    missing = [name for name in EXPORT_FILES if not (folder / name).is_file()]
    if not folder.is_dir() or missing:
        raise PublishError(f"{folder} is not an export (no {missing[0] if folder.is_dir() else 'such folder'}): "
                           f"write one with `python -m open_clip_3t.export CHECKPOINT --out {folder}`")
    from .export import _not_exported
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    return [name for name in names if name not in _not_exported(folder, names)]


def publish(folder, repo_id, private=False, api=None, revision=None):
    """Upload the export `folder` to the hub model repository `repo_id` (created if needed); returns huggingface_hub's
    CommitInfo. `api`: an `HfApi` (default: a new one, with the logged-in token)."""
    check_repo_id(repo_id)
    folder = Path(folder)
    names = upload_plan(folder)
    record = folder / PROVENANCE_FILE
    if record.is_file():  # the card names the repository it is in
        data = json.loads(record.read_text())
        data["hub_id"] = repo_id
        write_atomic(record, (json.dumps(data, indent=2) + "\n").encode())
        write_atomic(folder / CARD_FILE, model_card(data, repo_id).encode())
        names = sorted(set(names) | {CARD_FILE, PROVENANCE_FILE})
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError
    api = api or HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        return api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=str(folder), allow_patterns=names,
                                 revision=revision, commit_message=f"{repo_id.split('/')[-1]}: open_clip_3t export")
    except HfHubHTTPError as e:  # 401, 403, 404, ...
        raise PublishError(f"uploading {folder} to {repo_id} failed ({str(e).splitlines()[0][:200]}): log in with "
                           f"`hf auth login` (or set HF_TOKEN) with write access to {repo_id.split('/')[0]}") from None
    except Exception as e:  # no network, DNS, offline mode (huggingface_hub's HTTP client's errors)
        if not isinstance(e, OSError) and not type(e).__module__.startswith(("httpx", "huggingface_hub")):
            raise
        raise PublishError(f"uploading {folder} to {repo_id} failed ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:200] if str(e) else ''}): check the connection to the hub "
                           f"(and that HF_HUB_OFFLINE is not set), then run the same command again") from None


def make_parser():
    """The command line of `python -m open_clip_3t.publish`."""
    parser = argparse.ArgumentParser(prog="python -m open_clip_3t.publish", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("folder", help="an export (python -m open_clip_3t.export ... --out FOLDER)")
    parser.add_argument("repo_id", metavar="ORG/NAME", help="the hub model repository (created if it does not exist)")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.add_argument("--debug", action="store_true", help="on an error, print its traceback too")
    return parser


def main(argv=None):
    parser = make_parser()
    args = parser.parse_args(argv)
    try:
        info = publish(args.folder, args.repo_id, private=args.private)
    except PublishError as e:
        if args.debug:
            raise
        sys.exit(f"python -m open_clip_3t.publish: error: {e}")
    print(f"published {args.folder} as {getattr(info, 'commit_url', None) or args.repo_id} (load with "
          f"open_clip.create_model_and_transforms('hf-hub:{args.repo_id}'))")


if __name__ == "__main__":
    main()
