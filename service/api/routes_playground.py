"""The playground: a page at `/` to try the model and see how each token was chosen.

Static files shipped inside the package (`service/api/playground/`): HTML, CSS and JavaScript
modules, no build step, nothing fetched from another host. The page talks to the public API
(`/v1/config`, `/stream`) like any other client; it is open when API keys are set, and asks for
a key when the API answers 401. Its Content-Security-Policy lets it reach this origin only.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from service.api.errors import APIError

router = APIRouter(include_in_schema=False)

PLAYGROUND_DIR = Path(__file__).parent / "playground"
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",  # module scripts need a JavaScript type
    ".svg": "image/svg+xml",
    ".txt": "text/plain; charset=utf-8",
}
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'self'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Revalidated on each load, so an upgraded server never runs an old script.
    "Cache-Control": "no-cache",
}


def _file_response(path: Path) -> FileResponse:
    return FileResponse(path, media_type=MEDIA_TYPES[path.suffix], headers=PAGE_HEADERS)


@router.get("/")
async def playground() -> FileResponse:
    """The playground page."""
    return _file_response(PLAYGROUND_DIR / "index.html")


@router.get("/playground/{name:path}")
async def playground_file(name: str) -> FileResponse:
    """A file of the page (script, style sheet, icon, licence); nothing outside its folder."""
    root = PLAYGROUND_DIR.resolve()
    path = (root / name).resolve()
    if not path.is_relative_to(root) or not path.is_file() or path.suffix not in MEDIA_TYPES:
        raise APIError(404, f"the playground has no file {name!r}", code="not_found")
    return _file_response(path)
