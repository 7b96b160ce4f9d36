"""Wire compatibility seen from the other side: Aspose's own Python SDK against `featsync serve`.

aspose-imaging-cloud 22.4.0 (25.4.0 cannot be installed: it requires a package
"openssl==1.1.1" that PyPI does not have). It speaks the same v3.0 paths, fields and
multipart layout.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from featsync.samples import encode, textured_bytes, textured_image
from tests.conftest import CLIENT_ID, CLIENT_SECRET, Server

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the SDK's own imports warn (six, datetime)
    from asposeimagingcloud import ImagingApi
    from asposeimagingcloud.models import requests as sdk
    from asposeimagingcloud.rest import ApiException


@pytest.fixture
def api(server: Server) -> Iterator[ImagingApi]:
    client = ImagingApi(CLIENT_SECRET, CLIENT_ID, base_url=server.url)
    yield client
    close(client)


def close(client: ImagingApi) -> None:
    """The SDK starts a thread pool per client; stop it."""
    client.api_client.pool.close()
    client.api_client.pool.join()


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    original = textured_image(21, (640, 480))
    paths = {
        "first.jpg": encode(original),
        "first-small.png": encode(original.resize((320, 240)), "PNG"),
        "other.jpg": textured_bytes(22, size=(640, 480)),
        "replacement.jpg": textured_bytes(23, size=(640, 480)),
    }
    out = {}
    for name, data in paths.items():
        out[name] = tmp_path / name
        out[name].write_bytes(data)
    return out


def call(api: ImagingApi, request: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        name = type(request).__name__.removesuffix("Request")
        method = "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_")
        return getattr(api, method)(request)


def test_the_official_sdk_drives_featsync_serve(api: ImagingApi, files: dict[str, Path]) -> None:
    status = call(api, sdk.CreateImageSearchRequest())
    context_id = status.id
    assert context_id and status.search_status == "Idle"
    assert call(api, sdk.GetImageSearchStatusRequest(context_id)).search_status == "Idle"

    for name in ("first.jpg", "other.jpg"):
        call(
            api,
            sdk.CreateImageFeaturesRequest(context_id, image_data=str(files[name]), image_id=name),
        )
    got = call(api, sdk.GetImageFeaturesRequest(context_id, "first.jpg"))
    assert got.image_id == "first.jpg" and got.features_count > 20
    assert got.feature_length_in_bits == 488 and got.features

    call(
        api, sdk.UpdateImageFeaturesRequest(context_id, "first.jpg", str(files["replacement.jpg"]))
    )
    updated = call(api, sdk.GetImageFeaturesRequest(context_id, "first.jpg"))
    assert updated.features != got.features

    found = call(api, sdk.FindSimilarImagesRequest(context_id, 90, 5, image_id="other.jpg"))
    assert [(r.image_id, r.similarity) for r in found.results] == [("other.jpg", 100.0)]

    call(api, sdk.CreateImageTagRequest(str(files["other.jpg"]), context_id, "tagged"))
    tagged = call(api, sdk.FindImagesByTagsRequest(json.dumps(["tagged"]), context_id, 60, 5))
    assert [r.image_id for r in tagged.results] == ["other.jpg"]

    compared = call(api, sdk.CompareImagesRequest(context_id, "other.jpg", image_id2="first.jpg"))
    assert len(compared.results) == 1 and compared.results[0].similarity < 30

    call(api, sdk.DeleteImageFeaturesRequest(context_id, "first.jpg"))
    with pytest.raises(ApiException) as missing:
        call(api, sdk.GetImageFeaturesRequest(context_id, "first.jpg"))
    assert missing.value.code == 404

    call(api, sdk.DeleteImageSearchRequest(context_id))
    with pytest.raises(ApiException):
        call(api, sdk.GetImageSearchStatusRequest(context_id))


def test_the_sdk_without_valid_credentials_gets_an_error(server: Server) -> None:
    api = ImagingApi("wrong secret", CLIENT_ID, base_url=server.url)
    try:
        with pytest.raises(ApiException):
            call(api, sdk.CreateImageSearchRequest())
    finally:
        close(api)
