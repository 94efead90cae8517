"""MediaLoader: an image part's URL -> verified image bytes, with every fetch bounded.

Accepted URLs:
1. `data:image/...;base64,...`: decoded strictly (bad base64 is a 400), size-checked first.
2. `http(s)://...`: fetched with httpx under one deadline (connect, read, every redirect and the
   body), the body streamed and cut at `max_image_bytes`, redirects followed by hand (each hop's
   URL re-checked like the first, at most `max_media_redirects`). The host is resolved here and
   every address checked; the request then goes to the checked address itself (Host header and
   TLS SNI/verification name the host), so a second DNS answer cannot swap in a private address.
   Hosts in `allowed_media_domains` skip the address check; when that list is set, only its
   hosts are fetched. No proxy or .netrc from the environment is used.
3. `file://...` or an absolute path: only a regular file under `allowed_local_media_path`
   (symlinks resolved before the check).
Anything else is refused. The bytes then go through `decode_image` in a thread.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit, urlunsplit

from cluster.router.media.errors import (MediaError, MediaFetchError, MediaTimeoutError, MediaTooLargeError,
                                         RefusedAddressError, UnsupportedMediaError)
from cluster.router.media.image import LoadedImage, decode_image
from cluster.router.media.policy import MediaSettings

Resolver = Callable[[str, int], Awaitable[list[str]]]  # (host, port) -> addresses

_REDIRECTS = (301, 302, 303, 307, 308)
_WS = re.compile(rb"\s+")
_REFUSED = "the image URL's host is not allowed (private, loopback and reserved addresses are refused)"


async def system_resolve(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def is_public_address(address: str) -> bool:
    """True for a globally routable unicast address (IPv4-mapped IPv6 judged as its IPv4)."""
    ip = ipaddress.ip_address(address)
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast
                                 or ip.is_reserved or ip.is_unspecified)


class MediaLoader:
    """Loads images under one MediaSettings; `resolver` replaces DNS (tests)."""

    def __init__(self, settings: MediaSettings, *, resolver: Resolver | None = None) -> None:
        self.settings = settings
        self._resolve = resolver or system_resolve

    async def load_image(self, url: str) -> LoadedImage:
        data = await self.fetch_bytes(url)
        s = self.settings
        image, _ = await asyncio.to_thread(decode_image, data, max_pixels=s.max_image_pixels,
                                           max_aspect_ratio=s.max_image_aspect_ratio)
        return image

    async def fetch_bytes(self, url: str) -> bytes:
        scheme = urlsplit(url).scheme.lower() if not url.startswith("/") else ""
        if scheme == "data":
            return self._data_url(url)
        if scheme in ("http", "https"):
            return await self._http(url)
        if scheme == "file" or (scheme == "" and url.startswith("/")):
            return await asyncio.to_thread(self._local_file, url)
        raise UnsupportedMediaError(f"unsupported image URL scheme {scheme!r}: use data:, http:, https: or file: "
                                    "(file: only under the server's --allowed-local-media-path)")

    # ----- data: -----
    def _data_url(self, url: str) -> bytes:
        header, comma, payload = url[len("data:"):].partition(",")
        if not comma:
            raise MediaError("malformed data URL: no ',' before the payload")
        params = [p.strip().lower() for p in header.split(";")]
        media_type = params[0] or "text/plain"
        if not media_type.startswith("image/"):
            raise UnsupportedMediaError(f"a data URL of media type {media_type!r} is not an image")
        if "base64" not in params[1:]:
            raise UnsupportedMediaError("only base64 data URLs are supported (data:image/...;base64,...)")
        raw = _WS.sub(b"", payload.encode("ascii", "replace"))
        cap = self.settings.max_image_bytes
        if len(raw) // 4 * 3 > cap + 2:
            raise MediaTooLargeError(f"the image is over {cap} bytes (the limit per image)")
        try:
            data = base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            raise MediaError("the data URL's payload is not valid base64") from None
        if len(data) > cap:
            raise MediaTooLargeError(f"the image is {len(data)} bytes; the limit is {cap} bytes")
        return data

    # ----- local files -----
    def _local_file(self, url: str) -> bytes:
        allowed = self.settings.allowed_local_media_path
        if allowed is None:
            raise RefusedAddressError("local files are not accepted as media (the server sets no "
                                      "--allowed-local-media-path)")
        if url.startswith("/"):
            path = url
        else:
            parts = urlsplit(url)
            if parts.netloc not in ("", "localhost"):
                raise RefusedAddressError("file: URLs must name a local file (file:///path)")
            path = unquote(parts.path)
        root, target = Path(allowed).resolve(), Path(path).resolve()
        if not target.is_relative_to(root):
            raise RefusedAddressError("the file is outside the server's allowed media folder")
        if not target.is_file():
            raise MediaFetchError("no such file in the server's allowed media folder")
        cap = self.settings.max_image_bytes
        with target.open("rb") as f:
            data = f.read(cap + 1)
        if len(data) > cap:
            raise MediaTooLargeError(f"the image is over {cap} bytes (the limit per image)")
        return data

    # ----- http(s) -----
    async def _http(self, url: str) -> bytes:
        timeout = self.settings.media_fetch_timeout_s
        try:
            async with asyncio.timeout(timeout):
                return await self._follow(url)
        except TimeoutError:
            raise MediaTimeoutError(f"fetching the image URL timed out (limit {timeout:g} s)") from None

    async def _follow(self, url: str) -> bytes:
        import httpx

        t = self.settings.media_fetch_timeout_s
        async with httpx.AsyncClient(timeout=httpx.Timeout(t), follow_redirects=False, trust_env=False) as client:
            for _hop in range(self.settings.max_media_redirects + 1):
                location = await self._get(client, url)
                if isinstance(location, bytes):
                    return location
                url = urljoin(url, location)
                if urlsplit(url).scheme.lower() not in ("http", "https"):
                    raise UnsupportedMediaError("the image URL redirects to a URL that is not http(s)")
        raise MediaFetchError(f"the image URL redirects more than {self.settings.max_media_redirects} times")

    async def _get(self, client, url: str) -> bytes | str:
        """The body, or the Location of a redirect."""
        import httpx

        parts = urlsplit(url)
        try:
            host, port = (parts.hostname or "").rstrip("."), parts.port
        except ValueError:
            raise UnsupportedMediaError("the image URL has an invalid port") from None
        if not host:
            raise UnsupportedMediaError("the image URL has no host")
        if parts.username is not None or parts.password is not None:
            raise UnsupportedMediaError("credentials in image URLs are not accepted")
        port = port or (443 if parts.scheme.lower() == "https" else 80)
        addresses = await self._checked_addresses(host, port)
        headers = {"Host": parts.netloc.rsplit("@", 1)[-1], "Accept": "image/*"}
        extensions = {"sni_hostname": host} if parts.scheme.lower() == "https" else {}
        last: Exception | None = None
        for address in addresses:
            netloc = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
            target = urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
            try:
                async with client.stream("GET", target, headers=headers, extensions=extensions) as resp:
                    if resp.status_code in _REDIRECTS and "location" in resp.headers:
                        return resp.headers["location"]
                    if resp.status_code != 200:
                        raise MediaFetchError(f"fetching the image URL failed: HTTP {resp.status_code}")
                    return await self._read_capped(resp)
            except httpx.ConnectError as exc:
                last = exc
                continue
            except httpx.TimeoutException:
                raise MediaTimeoutError("fetching the image URL timed out") from None
            except httpx.HTTPError:
                raise MediaFetchError("fetching the image URL failed: the connection broke") from None
        raise MediaFetchError("could not connect to the image URL's host") from last

    async def _checked_addresses(self, host: str, port: int) -> list[str]:
        allowed = self.settings.allowed_media_domains
        trusted = host.lower() in allowed
        if allowed and not trusted:
            raise RefusedAddressError("the image URL's host is not in the server's allowed media domains")
        try:
            addresses = [str(ipaddress.ip_address(host))]
        except ValueError:
            try:
                addresses = await self._resolve(host, port)
            except OSError:
                raise MediaFetchError("could not resolve the image URL's host") from None
        if not addresses:
            raise MediaFetchError("could not resolve the image URL's host")
        if not trusted and not all(is_public_address(a.split("%", 1)[0]) for a in addresses):
            raise RefusedAddressError(_REFUSED)
        return addresses

    async def _read_capped(self, resp) -> bytes:
        cap = self.settings.max_image_bytes
        declared = resp.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > cap:
            raise MediaTooLargeError(f"the image is {declared} bytes; the limit is {cap} bytes")
        chunks, size = [], 0
        async for chunk in resp.aiter_bytes():  # decoded (gzip) bytes are what count
            size += len(chunk)
            if size > cap:
                raise MediaTooLargeError(f"the image is over {cap} bytes (the limit per image)")
            chunks.append(chunk)
        return b"".join(chunks)
