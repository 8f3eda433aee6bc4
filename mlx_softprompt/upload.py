"""Push a bundle to the Hugging Face Hub (what `mlx_lm.upload` / `--upload-repo` do for models).

The bundle is verified first (every part's sha256), so what is pushed is what `chat`
and `serve` would open; the upload itself is huggingface_hub's `HfApi.upload_folder`.
"""

from pathlib import Path
from typing import Optional

from .errors import UserError


def upload_bundle(path, repo_id: str, private: bool = False, revision: Optional[str] = None,
                  token: Optional[str] = None, api=None) -> str:
    """Create `repo_id` (if needed) and upload the bundle directory `path`; return the repo URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    from .bundle import inspect_bundle

    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: no such bundle directory")
    manifest = inspect_bundle(path)  # refuses a damaged or incomplete bundle before anything is sent
    if not repo_id or repo_id.count("/") != 1 or any(not part for part in repo_id.split("/")):
        raise UserError(f"--upload-repo {repo_id!r}: expected a Hub repository id, ORG/NAME")
    api = api or HfApi(token=token)
    try:
        repo = api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(folder_path=str(path), repo_id=repo_id, repo_type="model", revision=revision,
                          commit_message=f"Upload mlx-softprompt bundle {manifest.get('name', path.name)}")
    except LocalTokenNotFoundError:
        raise UserError(f"--upload-repo {repo_id}: not logged in to the Hugging Face Hub; run `hf auth login` "
                        "(or set HF_TOKEN) first")
    except HfHubHTTPError as e:
        raise UserError(f"--upload-repo {repo_id}: the Hub refused the upload ({str(e).splitlines()[0]})")
    return str(getattr(repo, "url", None) or f"https://huggingface.co/{repo_id}")
