"""``GET /images/{id}``: an indexed image, as the seed's downloader and the web page fetch it."""

import io

from fastapi import APIRouter, Depends
from fastapi.responses import FileResponse, Response

from ..core import SearchService
from ..deps import current_service
from ..requests import QueryError

router = APIRouter()


@router.get("/images/{row}")
def image(row: str, thumb: int = 0, svc: SearchService = Depends(current_service)) -> Response:
    """An indexed image by id, always as JPEG or PNG (what clients and the seed's downloader save): JPEG and PNG
    files as they are, other formats (WebP, BMP, GIF, TIFF, TSV rows) re-encoded as PNG; ``?thumb=1``: a JPEG
    at most 256 px."""
    index = svc.index
    r = svc.image_row(row)
    path = index.image_path(r)
    if not thumb and path.is_file() and path.suffix.lower() in (".jpg", ".jpeg", ".png"):
        return FileResponse(path, media_type="image/png" if path.suffix.lower() == ".png" else "image/jpeg")
    try:
        img = index.open_image(r)
    except Exception:  # noqa: BLE001 - gone or undecodable since it was indexed
        raise QueryError(404, "image cannot be decoded") from None
    buf = io.BytesIO()
    if thumb:
        img.thumbnail((256, 256))
        img.save(buf, "JPEG", quality=85)
        return Response(buf.getvalue(), media_type="image/jpeg")
    img.save(buf, "PNG")
    return Response(buf.getvalue(), media_type="image/png")
