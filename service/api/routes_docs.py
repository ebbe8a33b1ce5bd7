"""GET /docs: the OpenAPI documentation page, with Swagger UI served from the package.

FastAPI's own /docs loads Swagger UI from a CDN, so on a machine with no network it is a blank
page. Here the same page takes its script and style sheet from `docs_assets/` (Swagger UI,
vendored with its licence), so it works wherever the server runs.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse

from service.api.errors import APIError

router = APIRouter(include_in_schema=False)

ASSETS_DIR = Path(__file__).parent / "docs_assets"
ASSETS = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
}


@router.get("/docs")
async def docs(request: Request) -> HTMLResponse:
    """The interactive OpenAPI documentation."""
    return get_swagger_ui_html(
        openapi_url=str(request.app.openapi_url),
        title=f"{request.app.title} - API documentation",
        swagger_js_url="/docs-assets/swagger-ui-bundle.js",
        swagger_css_url="/docs-assets/swagger-ui.css",
        swagger_favicon_url="/playground/favicon.svg",
    )


@router.get("/docs-assets/{name}")
async def docs_asset(name: str) -> FileResponse:
    """Swagger UI's script and style sheet."""
    if name not in ASSETS:
        raise APIError(404, f"no documentation asset {name!r}", code="not_found")
    return FileResponse(
        ASSETS_DIR / name, media_type=ASSETS[name], headers={"Cache-Control": "max-age=86400"}
    )
