"""Images through the served cluster: Ray started by the test, real Redis, real NIXL and gRPC KV
transfer, the router over real HTTP driven by the official `openai` client, images as data URLs
and from a local HTTP server the test starts.

Three clusters on the tiny ERNIE-4.5-VL (float32, so greedy tokens do not depend on the batch):
one mixed worker, 1 prefill + 1 decode over NIXL, and 1 prefill + 1 decode over gRPC. Each must
give the offline engine's answer (itself held to transformers' by tests/unit) for the same
messages; the decode workers get the KV, the token ids and the images' hashes, never the images.
"""
from __future__ import annotations

import base64
import io
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from cluster.router.media.policy import MediaSettings
from tests.cluster_harness import (TEST_ENGINE, cluster_config, ray_session, running_clusters, worker_leaks,
                                   worker_stats)
from tests.conftest import VL_TOKENS, with_vl_tokenizer

pytestmark = pytest.mark.slow

MAX_TOKENS = 8
MAX_MODEL_LEN = 512  # a 640x640 image (~520 tokens) does not fit
IMAGE_LIMIT = 3
VL_IMAGE_TOKEN = VL_TOKENS["image_token_id"]


def _png(w: int, h: int, seed: int, fmt: str = "PNG") -> bytes:
    pixels = (np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def _data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


CAT, DOG, WIDE = _png(112, 168, 1), _png(84, 56, 2), _png(300, 60, 3)


class ImageServer:
    """Serves /cat.png, /slow.png (never answers until released), /redirect-private (a redirect to
    a private address) on a free loopback port."""

    def __init__(self) -> None:
        self.release = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                if self.path == "/cat.png":
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.send_header("Content-Length", str(len(CAT)))
                    self.end_headers()
                    self.wfile.write(CAT)
                elif self.path == "/slow.png":
                    outer.release.wait(30)
                    self.send_response(200)
                    self.end_headers()
                elif self.path == "/redirect-private":
                    self.send_response(302)
                    self.send_header("Location", "http://10.1.2.3/cat.png")
                    self.end_headers()
                else:
                    self.send_response(404)
                    self.end_headers()

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def image_server():
    server = ImageServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def vl_model(tiny_vl_checkpoint, tmp_path_factory):
    return with_vl_tokenizer(tiny_vl_checkpoint, tmp_path_factory.mktemp("vl-serve") / "vl")


@pytest.fixture(scope="module")
def clusters(redis_server, vl_model):
    engine = TEST_ENGINE.model_copy(update={"model": str(vl_model), "dtype": "float32", "max_model_len": MAX_MODEL_LEN})
    # The mixed cluster trusts the loopback image server and has tight caps for the refusal tests.
    media = MediaSettings(limit_mm_per_prompt={"image": IMAGE_LIMIT}, allowed_media_domains=("127.0.0.1",),
                          media_fetch_timeout_s=1.0, max_image_bytes=200_000, max_mm_body_bytes=400_000)
    mixed = cluster_config("vl-mixed", engine=engine, mixed=1, prefill=0, decode=0, kv_transport="grpc",
                           multimodal=media)
    nixl = cluster_config("vl-nixl", engine=engine, kv_transport="nixl")
    grpc_ = cluster_config("vl-grpc", engine=engine, kv_transport="grpc")
    with ray_session(num_cpus=6):
        with running_clusters([mixed, nixl, grpc_], redis_server.url) as (m, n, g):
            yield {"mixed": m, "nixl": n, "grpc": g}


def _client(session) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{session.url}/v1", api_key="none", max_retries=0, timeout=60)


def _text(t: str) -> dict:
    return {"type": "text", "text": t}


def _image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


CONVERSATIONS = {
    "one image": [{"role": "user", "content": [_text("t5"), _image(_data_url(CAT)), _text("t6 t7")]}],
    "two images of different sizes": [{"role": "user", "content": [
        _image(_data_url(CAT)), _text("t9"), _image(_data_url(WIDE)), _text("t10 t11")]}],
    "image last": [{"role": "system", "content": "t1 t2"}, {"role": "user", "content": [_text("t3"),
                                                                                        _image(_data_url(DOG))]}],
    "same image, another question": [{"role": "user", "content": [_text("t5"), _image(_data_url(CAT)),
                                                                   _text("t40 t41 t42")]}],
    "text only": [{"role": "user", "content": "t12 t13 t14"}],
}


@pytest.fixture(scope="module")
def offline(vl_model):
    """The offline engine's greedy text and prompt length for each conversation."""
    import torch

    from engine import LLM, SamplingParams

    torch.set_num_threads(1)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    with LLM(str(vl_model), dtype="float32", num_kv_blocks=128, max_model_len=MAX_MODEL_LEN) as llm:
        outs = llm.chat(list(CONVERSATIONS.values()), params)
    return {name: (o.outputs[0].text, len(o.prompt_token_ids)) for name, o in zip(CONVERSATIONS, outs)}


def _chat(session, messages, **kw):
    return _client(session).chat.completions.create(
        model=None, messages=messages, max_tokens=MAX_TOKENS, temperature=0, extra_body={"ignore_eos": True}, **kw)


@pytest.mark.parametrize("kind", ["mixed", "nixl", "grpc"])
def test_image_chats_give_the_offline_answers(clusters, offline, kind):
    session = clusters[kind]
    before = worker_stats(session)
    for name, messages in CONVERSATIONS.items():
        resp = _chat(session, messages)
        want_text, want_prompt = offline[name]
        assert resp.choices[0].message.content == want_text, name
        # Usage counts each image as the tokens it becomes, as the engine computes the prompt.
        assert resp.usage.prompt_tokens == want_prompt, name
        assert resp.usage.completion_tokens == MAX_TOKENS
    # Streaming gives the same, and its final usage chunk counts the image tokens too.
    stream = _client(session).chat.completions.create(
        model=None, messages=CONVERSATIONS["one image"], max_tokens=MAX_TOKENS, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == offline["one image"][0]
    assert chunks[-1].usage.prompt_tokens == offline["one image"][1]
    after = worker_stats(session)
    if kind != "mixed":
        # The second CAT question reused the image's blocks on the prefill worker (keyed by content),
        # and the KV of the image prompts really moved to the decode worker.
        hits = {k: after[k].prefix_cache_hits - before[k].prefix_cache_hits for k in after}
        assert any(v > 0 for k, v in hits.items() if k.startswith("prefill:")), hits
        moved = {k: after[k].kv_transfer_bytes_total - before[k].kv_transfer_bytes_total for k in after
                 if k.startswith("decode:")}
        assert all(v > 0 for v in moved.values()), moved
    assert worker_leaks(session) == []


def test_image_from_a_url_and_tokenize_count_image_tokens(clusters, offline, image_server):
    session = clusters["mixed"]
    messages = [{"role": "user", "content": [_text("t5"), _image(image_server.url("/cat.png")), _text("t6 t7")]}]
    resp = _chat(session, messages)
    assert resp.choices[0].message.content == offline["one image"][0]
    tok = httpx.post(f"{session.url}/tokenize", json={"messages": messages}, timeout=30)
    assert tok.status_code == 200 and tok.json()["count"] == offline["one image"][1]
    # Without the allow-list, the router refuses loopback URLs.
    refused = httpx.post(f"{clusters['nixl'].url}/v1/chat/completions", json={"messages": messages}, timeout=30)
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "media_address_refused"


def _error(session, content, status: int = 400, **body) -> dict:
    resp = httpx.post(f"{session.url}/v1/chat/completions", timeout=30,
                      json={"messages": [{"role": "user", "content": content}], "max_tokens": 4, **body})
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["message"] and err["type"]
    return err


def test_bad_image_input_gets_openai_errors_and_leaks_nothing(clusters, image_server):
    s = clusters["mixed"]
    cat = _image(_data_url(CAT))
    err = _error(s, [cat] * (IMAGE_LIMIT + 1))
    assert err["code"] == "too_many_media_items" and str(IMAGE_LIMIT) in err["message"]
    assert _error(s, [_image("ftp://example.com/a.png")])["code"] == "unsupported_media"
    assert _error(s, [_image("http://127.0.0.1:9/nothing.png")])["code"] == "media_fetch_failed"  # closed port
    assert _error(s, [_image(image_server.url("/slow.png"))])["code"] == "media_fetch_timeout"
    assert _error(s, [_image(image_server.url("/redirect-private"))])["code"] == "media_address_refused"
    assert _error(s, [_image(_data_url(_png(300, 300, 4, "BMP"), "image/bmp"))], 413)["code"] == "media_too_large"
    assert _error(s, [_image(_data_url(b"\x89PNG not really"))])["code"] == "invalid_image"
    assert _error(s, [_image(_data_url(CAT[: len(CAT) // 2]))])["code"] == "invalid_image"  # truncated
    assert _error(s, [_image(_data_url(_png(2010, 10, 5)))])["code"] == "invalid_image_shape"
    flat = io.BytesIO()
    Image.new("RGB", (640, 640), (9, 99, 199)).save(flat, format="PNG")  # small bytes, many tokens
    err = _error(s, [_image(_data_url(flat.getvalue())), _text("t1")])
    assert "maximum context length" in err["message"]
    err = _error(s, [{"type": "video_url", "video_url": {"url": "http://example.com/a.mp4"}}])
    assert "video" in err["message"] and err["code"] == "unsupported_media"
    # A body over the multimodal cap (the text cap stays for other endpoints).
    big = _data_url(b"x" * 420_000)
    assert httpx.post(f"{s.url}/v1/chat/completions", timeout=30, json={
        "messages": [{"role": "user", "content": [_image(big)]}]}).status_code == 413
    assert worker_leaks(s) == []
    assert httpx.get(f"{s.url}/health", timeout=10).status_code == 200


def test_prefix_index_is_keyed_by_image_content(clusters, redis_server):
    """The prefill worker publishes its image blocks under content-keyed hashes that the router
    computes the same way: the index finds the blocks of the image it saw, and not those of
    another image of the same size in the same place."""
    import asyncio

    from cluster.state.store import Store
    from pdcommon.block_hash import prefix_block_hashes
    from pdcommon.mm_hash import mm_hash

    session = clusters["grpc"]
    other = _png(112, 168, 99)  # CAT's size, other pixels
    seen = [{"role": "user", "content": [_text("t20 t21 t22 t23"), _image(_data_url(CAT)), _text("t24")]}]
    unseen = [{"role": "user", "content": [_text("t20 t21 t22 t23"), _image(_data_url(other)), _text("t24")]}]
    _chat(session, seen)
    prefill_id = next(w["worker_id"] for w in session.workers if w["role"] == "prefill")

    def chain(messages, image: bytes) -> list[int]:
        ids = httpx.post(f"{session.url}/tokenize", json={"messages": messages}, timeout=30).json()["tokens"]
        start = ids.index(VL_IMAGE_TOKEN)
        n = ids.count(VL_IMAGE_TOKEN)
        return prefix_block_hashes(ids, TEST_ENGINE.block_size, [(start, n, mm_hash(image))])

    async def overlaps() -> tuple[dict[str, int], dict[str, int]]:
        store = Store.from_url(redis_server.url, session.config.cluster)
        try:
            return await store.prefix_overlap(chain(seen, CAT)), await store.prefix_overlap(chain(unseen, other))
        finally:
            await store.close()

    hit, miss = asyncio.run(overlaps())
    blocks = len(chain(seen, CAT))
    assert hit.get(prefill_id) == blocks  # every full block of the prompt, images included
    assert miss.get(prefill_id, 0) == 0  # the image starts in the first block: nothing shared


def test_qwen2_5_vl_over_http_with_the_openai_client(tiny_qwen_vl_checkpoint, tmp_path):
    """The second vision architecture through the router (an in-process engine behind it, real
    HTTP): the image's tokens counted by the router as the Qwen processor makes them, and the
    offline answer."""
    from cluster.router.app import create_app
    from cluster.router.local import LocalBackend
    from engine import LLM, SamplingParams
    from tests.integration.test_router_http import serve

    model = with_vl_tokenizer(tiny_qwen_vl_checkpoint, tmp_path / "qwen")  # same ids: 290 image, 291/292 around it
    messages = CONVERSATIONS["two images of different sizes"]
    with LLM(str(model), dtype="float32", num_kv_blocks=64, max_model_len=MAX_MODEL_LEN) as llm:
        (want,) = llm.chat(messages, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True))
    backend = LocalBackend.from_args(str(model), dtype="float32", num_kv_blocks=64, max_model_len=MAX_MODEL_LEN)
    assert backend.model.vision is not None and backend.model.vision.architecture == "Qwen2_5_VLForConditionalGeneration"
    with serve(create_app(backend)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
        resp = client.chat.completions.create(model=None, messages=messages, max_tokens=MAX_TOKENS, temperature=0,
                                              extra_body={"ignore_eos": True})
    assert resp.choices[0].message.content == want.outputs[0].text
    assert resp.usage.prompt_tokens == len(want.prompt_token_ids)
