"""The router's media input layer (cluster/router/media/): image URLs fetched from a real local
HTTP server the test starts, data URLs, local files, decoding and its caps, the per-prompt limits
and the seam `load_chat_media`. Every refusal is checked for its class, HTTP status and message.

The test server listens on 127.0.0.1, which the loader refuses like any loopback address: the
positive cases trust it through `allowed_media_domains`, and the refusals run without it.
"""
from __future__ import annotations

import asyncio
import base64
import io
import struct
import subprocess
import sys
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from cluster.router.media.content import collect_media_parts, has_media, load_chat_media, template_messages
from cluster.router.media.errors import (ImageDecodeError, ImageShapeError, MediaDisabledError, MediaError,
                                         MediaFetchError, MediaTimeoutError, MediaTooLargeError, RefusedAddressError,
                                         TooManyMediaError, UnsupportedMediaError)
from cluster.router.media.fetch import MediaLoader, is_public_address
from cluster.router.media.image import decode_image
from pdcommon.mm_hash import mm_hash
from cluster.router.media.policy import MediaSettings
from cluster.router.openai import ChatMessage

REPO = Path(__file__).resolve().parents[2]


def png(width: int = 32, height: int = 24, mode: str = "RGB", color=(200, 30, 60)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (width, height), color).save(buf, "PNG")
    return buf.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height, with one tiny IDAT: only the header is real."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


IMAGE = png()
BIG_BODY = b"\0" * 5000


class MediaServer:
    """A threading HTTP server on a free loopback port; `/slow` blocks until `release` is set."""

    def __init__(self) -> None:
        self.release = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                try:
                    server.route(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the loader gave up first (timeouts, size caps)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="media-server", daemon=True)
        self.thread.start()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def route(self, h: BaseHTTPRequestHandler) -> None:
        path = h.path
        if path == "/img.png":
            self.send(h, 200, IMAGE)
        elif path == "/truncated.png":
            self.send(h, 200, IMAGE[: len(IMAGE) // 2])
        elif path == "/big":
            self.send(h, 200, BIG_BODY)
        elif path == "/big-undeclared":  # no Content-Length: the cap must count the streamed bytes
            h.send_response(200)
            h.send_header("Connection", "close")
            h.end_headers()
            h.wfile.write(BIG_BODY)
        elif path == "/slow":
            self.release.wait()
            self.send(h, 200, IMAGE)
        elif path.startswith("/redirect?to="):
            target = path.removeprefix("/redirect?to=").replace("{port}", str(self.port))
            h.send_response(302)
            h.send_header("Location", target)
            h.send_header("Content-Length", "0")
            h.end_headers()
        elif path == "/loop":
            h.send_response(301)
            h.send_header("Location", "/loop")
            h.send_header("Content-Length", "0")
            h.end_headers()
        else:
            self.send(h, 404, b"not here: secret internal detail")

    @staticmethod
    def send(h: BaseHTTPRequestHandler, status: int, body: bytes) -> None:
        h.send_response(status)
        h.send_header("Content-Type", "image/png")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def close(self) -> None:
        self.release.set()  # unblock /slow handlers before shutting down
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)


@pytest.fixture(scope="module")
def server():
    s = MediaServer()
    yield s
    s.close()


def settings(**fields) -> MediaSettings:
    base = dict(enable_mm=True, allowed_media_domains=["127.0.0.1"], media_fetch_timeout_s=5.0)
    return MediaSettings(**{**base, **fields})


def load(url: str, s: MediaSettings | None = None, **kw):
    return asyncio.run(MediaLoader(s or settings(), **kw).load_image(url))


def refused(url: str, cls: type[MediaError], s: MediaSettings | None = None, match: str | None = None,
            status: int | None = None, **kw) -> MediaError:
    with pytest.raises(cls, match=match) as info:
        load(url, s, **kw)
    err = info.value
    assert err.type == "invalid_request_error" and err.param == "messages"
    assert err.status == (status or (413 if cls is MediaTooLargeError else 400))
    return err


# ----- http(s) -----
def test_http_image_from_a_trusted_host(server):
    image = load(server.url("/img.png"))
    assert (image.format, image.width, image.height, image.data) == ("PNG", 32, 24, IMAGE)


def test_loopback_is_refused_without_trust_and_the_message_leaks_nothing(server):
    err = refused(server.url("/img.png"), RefusedAddressError, MediaSettings(enable_mm=True))
    assert str(server.port) not in err.message and "127.0.0.1" not in err.message
    refused(server.url("/img.png", host="localhost"), RefusedAddressError, MediaSettings(enable_mm=True))


def test_allowed_domains_restrict_fetching_to_their_hosts(server):
    refused(server.url("/img.png", host="localhost"), RefusedAddressError, settings(), match="allowed media domains")


@pytest.mark.parametrize("target", ["http://localhost:{port}/img.png", "http://10.0.0.1/img.png",
                                    "http://169.254.169.254/latest/meta-data/", "http://[::1]:{port}/img.png",
                                    "http://[::ffff:127.0.0.1]:{port}/img.png", "http://0.0.0.0:{port}/img.png"])
def test_a_redirect_to_a_refused_address_is_refused(server, target):
    refused(server.url(f"/redirect?to={target}"), RefusedAddressError)


def test_a_relative_redirect_to_the_same_trusted_host_is_followed(server):
    assert load(server.url("/redirect?to=/img.png")).data == IMAGE


def test_redirects_are_capped_and_only_http(server):
    refused(server.url("/loop"), MediaFetchError, match="more than 3 times")
    refused(server.url("/redirect?to=/img.png"), MediaFetchError, settings(max_media_redirects=0),
            match="more than 0 times")
    refused(server.url("/redirect?to=file:///etc/passwd"), UnsupportedMediaError, match="not http")


def test_a_slow_url_times_out(server):
    refused(server.url("/slow"), MediaTimeoutError, settings(media_fetch_timeout_s=0.3), match="timed out")


def test_bodies_over_the_byte_cap_are_413(server):
    small = settings(max_image_bytes=len(BIG_BODY) - 1)
    refused(server.url("/big"), MediaTooLargeError, small, match=f"limit is {len(BIG_BODY) - 1}")
    refused(server.url("/big-undeclared"), MediaTooLargeError, small, match="over")


def test_http_errors_and_unreachable_hosts(server):
    err = refused(server.url("/missing"), MediaFetchError, match="HTTP 404")
    assert "secret" not in err.message
    # Nothing listens on port 1: a 400 naming the failure, not a hang or a 500.
    refused("http://127.0.0.1:1/img.png", MediaFetchError, match="could not connect")

    async def no_such_host(host, port):
        raise OSError("Name or service not known")

    refused("http://nowhere.example/a.png", MediaFetchError, MediaSettings(enable_mm=True), match="resolve",
            resolver=no_such_host)


def test_a_name_that_resolves_to_any_private_address_is_refused():
    async def rebinding(host, port):
        return ["93.184.216.34", "10.1.2.3"]

    refused("http://images.example/cat.png", RefusedAddressError, MediaSettings(enable_mm=True), resolver=rebinding)


def test_a_truncated_http_image_is_400(server):
    refused(server.url("/truncated.png"), ImageDecodeError, match="truncated")


@pytest.mark.parametrize("address,public", [
    ("8.8.8.8", True), ("2606:4700:4700::1111", True), ("127.0.0.1", False), ("10.1.2.3", False),
    ("172.16.0.1", False), ("192.168.1.1", False), ("169.254.169.254", False), ("100.64.0.1", False),
    ("224.0.0.1", False), ("0.0.0.0", False), ("240.0.0.1", False), ("255.255.255.255", False), ("::1", False),
    ("fe80::1", False), ("fc00::1", False), ("ff02::1", False), ("::ffff:127.0.0.1", False), ("::", False)])
def test_public_addresses(address, public):
    assert is_public_address(address) is public


@pytest.mark.parametrize("url,cls", [("ftp://example.com/a.png", UnsupportedMediaError),
                                     ("gopher://x/", UnsupportedMediaError), ("javascript:alert(1)", UnsupportedMediaError),
                                     ("http://user:pw@127.0.0.1/img.png", UnsupportedMediaError),
                                     ("http:///img.png", UnsupportedMediaError)])
def test_bad_schemes_and_urls(url, cls):
    refused(url, cls)


# ----- data: URLs -----
def test_data_url_good():
    image = load(data_url(IMAGE))
    assert (image.width, image.height, image.data) == (32, 24, IMAGE)
    jpeg = io.BytesIO()
    Image.new("RGB", (16, 16), (1, 2, 3)).save(jpeg, "JPEG")
    assert load(data_url(jpeg.getvalue(), "image/jpeg")).format == "JPEG"


@pytest.mark.parametrize("url,cls,match", [
    ("data:image/png;base64,@@not-base64@@", MediaError, "not valid base64"),
    ("data:image/png;base64,iVBORw0KGgo", MediaError, "not valid base64"),
    ("data:image/png," + "x" * 10, UnsupportedMediaError, "only base64"),
    ("data:text/plain;base64,aGVsbG8=", UnsupportedMediaError, "not an image"),
    ("data:image/png;base64", MediaError, "malformed"),
    ("data:image/png;base64,aGVsbG8gd29ybGQ=", ImageDecodeError, "cannot decode"),
])
def test_data_url_bad(url, cls, match):
    refused(url, cls, match=match)


def test_data_url_over_the_byte_cap():
    refused(data_url(IMAGE), MediaTooLargeError, settings(max_image_bytes=len(IMAGE) - 1))


# ----- local files -----
def test_local_files_only_under_the_allowed_folder(tmp_path):
    allowed, outside = tmp_path / "allowed", tmp_path / "outside.png"
    allowed.mkdir()
    (allowed / "cat.png").write_bytes(IMAGE)
    outside.write_bytes(IMAGE)
    (allowed / "link.png").symlink_to(outside)
    s = settings(allowed_local_media_path=str(allowed))
    assert load(f"file://{allowed}/cat.png", s).data == IMAGE
    assert load(str(allowed / "cat.png"), s).data == IMAGE
    refused(f"file://{outside}", RefusedAddressError, s, match="outside")
    refused(f"file://{allowed}/../outside.png", RefusedAddressError, s, match="outside")
    refused(f"file://{allowed}/link.png", RefusedAddressError, s, match="outside")
    refused(f"file://otherhost{allowed}/cat.png", RefusedAddressError, s)
    refused(f"file://{allowed}/missing.png", MediaFetchError, s, match="no such file")
    refused(f"file://{allowed}/cat.png", RefusedAddressError, settings(), match="allowed-local-media-path")
    refused(f"file://{allowed}/cat.png", MediaTooLargeError, settings(allowed_local_media_path=str(allowed),
                                                                      max_image_bytes=len(IMAGE) - 1))


# ----- decoding -----
def test_decode_caps_pixels_from_the_header_before_decoding():
    with pytest.raises(MediaTooLargeError, match="limit is 100 pixels") as info:
        decode_image(IMAGE, max_pixels=100, max_aspect_ratio=200)
    assert info.value.status == 413
    # 10^10 pixels claimed: refused from the header (PIL's bomb check, or ours), never allocated.
    with pytest.raises(MediaTooLargeError):
        decode_image(png_header(100_000, 100_000), max_pixels=1 << 25, max_aspect_ratio=200)
    with pytest.raises(MediaTooLargeError, match="8000x8000"):
        decode_image(png_header(8000, 8000), max_pixels=1 << 25, max_aspect_ratio=200)


def test_decode_refuses_extreme_aspect_ratios_by_parameter():
    thin = png(1000, 2)
    with pytest.raises(ImageShapeError, match="aspect ratio 500.0 is over the limit of 200") as info:
        decode_image(thin, max_pixels=1 << 25, max_aspect_ratio=200)
    assert info.value.status == 400
    image, _ = decode_image(thin, max_pixels=1 << 25, max_aspect_ratio=600)
    assert (image.width, image.height) == (1000, 2)
    refused(data_url(thin), ImageShapeError)


@pytest.mark.parametrize("data", [IMAGE[: len(IMAGE) // 2], IMAGE[:-20], b"GIF89a" + b"\0" * 20, b"not an image", b""])
def test_decode_refuses_truncated_and_undecodable_bytes(data):
    with pytest.raises(ImageDecodeError):
        decode_image(data, max_pixels=1 << 25, max_aspect_ratio=200)


def test_decode_refuses_formats_outside_the_list():
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "TIFF")
    with pytest.raises(ImageDecodeError, match="not a supported format"):
        decode_image(buf.getvalue(), max_pixels=1 << 25, max_aspect_ratio=200)


def test_decode_converts_to_rgb_over_white():
    _, rgb = decode_image(png(4, 4, "RGBA", (0, 0, 0, 0)), max_pixels=1 << 25, max_aspect_ratio=200)
    assert rgb.mode == "RGB" and rgb.getpixel((0, 0)) == (255, 255, 255)
    _, grey = decode_image(png(4, 4, "L", 7), max_pixels=1 << 25, max_aspect_ratio=200)
    assert grey.mode == "RGB" and grey.getpixel((1, 1)) == (7, 7, 7)


def test_mm_hash_is_stable_across_processes_and_mixes_processor_options():
    h = mm_hash(IMAGE, {"max_pixels": 1000, "min_pixels": 10})
    assert 0 <= h < 1 << 63
    assert h == mm_hash(IMAGE, {"min_pixels": 10, "max_pixels": 1000})  # key order does not matter
    assert h != mm_hash(IMAGE, {"max_pixels": 2000, "min_pixels": 10})
    assert mm_hash(IMAGE) == mm_hash(IMAGE, {}) != mm_hash(png(24, 32))
    code = ("import sys; sys.path[:0] = ['.', 'proto']; from pdcommon.mm_hash import mm_hash; "
            f"print(mm_hash(bytes.fromhex('{IMAGE.hex()}'), {{'max_pixels': 1000, 'min_pixels': 10}}))")
    other = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": "12345", "PATH": ""})
    assert int(other.stdout) == h


# ----- a request's parts, the seam -----
def msg(*parts, role: str = "user") -> ChatMessage:
    return ChatMessage(role=role, content=list(parts))


def text(t: str) -> dict:
    return {"type": "text", "text": t}


def image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def test_collect_parts_in_order_and_enforce_the_limit():
    msgs = [msg(text("a"), image("data:1")), ChatMessage(role="assistant", content="ok"), msg(image("data:2"))]
    parts = collect_media_parts(msgs, settings())
    assert [(p.url, p.message_index, p.part_index) for p in parts] == [("data:1", 0, 1), ("data:2", 2, 0)]
    with pytest.raises(TooManyMediaError, match="has 2 images; the limit is 1 per prompt") as info:
        collect_media_parts(msgs, settings(limit_mm_per_prompt={"image": 1}))
    assert info.value.status == 400
    with pytest.raises(TooManyMediaError, match="limit is 0"):
        collect_media_parts(msgs, settings(limit_mm_per_prompt={"video": 1}))


def test_collect_refuses_before_fetching():
    with pytest.raises(MediaDisabledError, match="--enable-mm"):
        collect_media_parts([msg(image("http://example.com/a.png"))], MediaSettings())
    with pytest.raises(UnsupportedMediaError, match="video input is not supported"):
        collect_media_parts([msg({"type": "video_url", "video_url": {"url": "http://x/v.mp4"}})],
                            settings(limit_mm_per_prompt={"image": 1, "video": 3}))
    with pytest.raises(UnsupportedMediaError, match="input_audio"):
        collect_media_parts([msg({"type": "input_audio", "input_audio": {}})], settings())
    with pytest.raises(MediaError, match="image_url.url"):
        collect_media_parts([msg({"type": "image_url", "image_url": {}})], settings())


def test_text_only_requests_are_untouched():
    msgs = [ChatMessage(role="system", content="Be brief."), msg(text("a"), text("b"))]
    assert not has_media(msgs)
    assert collect_media_parts(msgs, MediaSettings()) == []
    from cluster.router.serving import chat_messages

    assert template_messages(msgs) == chat_messages(msgs)


def test_load_chat_media_gives_template_messages_images_and_hashes(server):
    wide = png(40, 20)
    s = settings()
    msgs = [ChatMessage(role="system", content="Look."),
            msg(text("first"), image(server.url("/img.png")), text("then"), image(data_url(wide)))]
    media = asyncio.run(load_chat_media(msgs, s, processor_kwargs={"max_pixels": 4096}))
    assert media.messages == [{"role": "system", "content": "Look."},
                              {"role": "user", "content": [text("first"), {"type": "image"}, text("then"),
                                                           {"type": "image"}]}]
    assert [(i.width, i.height) for i in media.images] == [(32, 24), (40, 20)]
    assert media.hashes == (mm_hash(IMAGE, {"max_pixels": 4096}), mm_hash(wide, {"max_pixels": 4096}))


def test_load_chat_media_raises_the_refusal(server):
    msgs = [msg(image(server.url("/img.png")), image("data:image/png;base64,@@"))]
    with pytest.raises(MediaError, match="base64"):
        asyncio.run(load_chat_media(msgs, settings()))
    with pytest.raises(TooManyMediaError):
        asyncio.run(load_chat_media(msgs * 6, settings()))


# ----- settings -----
@pytest.mark.parametrize("fields,match", [
    ({"limit_mm_per_prompt": {"audio": 1}}, "unknown modality 'audio'"),
    ({"limit_mm_per_prompt": {"image": -1}}, "non-negative"),
    ({"allowed_media_domains": ["http://example.com"]}, "bare host names"),
    ({"allowed_media_domains": ["example.com/x"]}, "bare host names"),
    ({"allowed_local_media_path": "relative/dir"}, "absolute"),
    ({"max_image_pixels": 0}, "greater than 0"),
    ({"max_image_aspect_ratio": 0.5}, "greater than or equal to 1"),
    ({"enable_mm": True, "unknown": 1}, "Extra inputs"),
])
def test_settings_reject_bad_values(fields, match):
    with pytest.raises(ValueError, match=match):
        MediaSettings(**fields)


def test_settings_normalise_domains():
    s = MediaSettings(allowed_media_domains=["Images.Example.COM.", "[::1]", "127.0.0.1"])
    assert s.allowed_media_domains == ("images.example.com", "::1", "127.0.0.1")
    assert MediaSettings(allowed_media_domains="a.com,b.com").allowed_media_domains == ("a.com", "b.com")
