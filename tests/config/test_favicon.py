"""``/favicon.ico``: every host answers it (browsers ask on every page), signed in or not."""

from __future__ import annotations

import pytest
from django.contrib.staticfiles import finders

from tests.conftest import HOST_A, World, host_client


@pytest.mark.parametrize("host", ["localhost", HOST_A])
def test_the_favicon_is_served_on_every_host_without_signing_in(world: World, host: str) -> None:
    response = host_client(host).get("/favicon.ico")
    assert response.status_code == 301
    assert response["Location"].endswith("/favicon.ico") and "/static/" in response["Location"]
    icon = finders.find("favicon.ico")
    assert icon is not None
    with open(icon, "rb") as file:
        assert file.read(4) == b"\x00\x00\x01\x00"  # an ICO file's header


def test_console_pages_name_the_icon(world: World) -> None:
    html = host_client(HOST_A, world.user("viewer")).get("/").content.decode()
    assert 'rel="icon"' in html
