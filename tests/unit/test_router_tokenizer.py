"""The router's torch-free tokenizer (cluster/router/tokenizer.py) against transformers' own, on
the default model's folder: the same ids, texts and rendered chat templates; and the router's
import path, which must load neither torch nor the engine."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.router.tokenizer import RouterTokenizer

REPO = Path(__file__).resolve().parents[2]

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "Count to 3"}],
    [{"role": "user", "content": "Say ünïcödé and emoji 🎉, tabs\tand\nnewlines"}],
]


@pytest.fixture(scope="module")
def folder() -> Path:
    from engine.loader import resolve_model_path

    try:
        return resolve_model_path(None)
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def both(folder):
    from transformers import AutoTokenizer

    return RouterTokenizer(folder), AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("chat", CHATS)
@pytest.mark.parametrize("gen", [True, False])
def test_chat_template_matches_transformers(both, chat, gen):
    ours, ref = both
    assert ours.apply_chat_template(chat, add_generation_prompt=gen) == \
        ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)


def test_continue_final_message_matches_transformers(both):
    ours, ref = both
    chat = [{"role": "user", "content": "Name a colour"}, {"role": "assistant", "content": "The colour is"}]
    assert ours.apply_chat_template(chat, continue_final_message=True) == \
        ref.apply_chat_template(chat, tokenize=False, continue_final_message=True)
    with pytest.raises(ValueError):
        ours.apply_chat_template(chat, continue_final_message=True, add_generation_prompt=True)


@pytest.mark.parametrize("text", ["Hello world", " leading space", "<|im_start|>user\nhi<|im_end|>", "ünï 🎉 x\ty",
                                  "don't stop . ,"])
@pytest.mark.parametrize("special", [True, False])
def test_encode_decode_match_transformers(both, text, special):
    ours, ref = both
    ids = ours(text, add_special_tokens=special).input_ids
    assert ids == list(ref(text, add_special_tokens=special).input_ids)
    assert ours.decode(ids) == ref.decode(ids)
    assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
    assert [ours.decode([t]) for t in ids] == [ref.decode([t]) for t in ids]
    assert len(ours) == len(ref)


def test_template_errors_are_value_errors(tmp_path, folder):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    (tmp_path / "chat_template.jinja").write_text("{{ raise_exception('no system role') }}")
    tok = RouterTokenizer(tmp_path)
    with pytest.raises(ValueError, match="no system role"):
        tok.apply_chat_template(CHATS[0])
    (tmp_path / "chat_template.jinja").unlink()
    assert RouterTokenizer(tmp_path).chat_template is None
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg["chat_template"] = [{"name": "default", "template": "{{ messages[0]['content'] | tojson }}"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert RouterTokenizer(tmp_path).apply_chat_template(CHATS[2][:1]).startswith('"Say ü')


def test_router_import_path_loads_neither_torch_nor_engine(folder):
    """What `pdserve router` imports and builds (app, backend, model info from the folder,
    planner, rate limiter), checked in a fresh interpreter."""
    code = (
        "import sys\n"
        "from cluster.cli import build_parser\n"
        "from cluster.router.standalone import build_standalone_app\n"
        "from cluster.config import ClusterConfig\n"
        f"cfg = ClusterConfig(engine={{'model': {str(folder)!r}}}, redis_url='redis://127.0.0.1:1/0',\n"
        "                    rate_limit_per_minute=10, planner=True, admin_api_keys=('a',))\n"
        "build_parser().parse_args(['router', '--redis-url', 'redis://x'])\n"
        "app = build_standalone_app(cfg)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'engine', 'transformers'))\n"
        "print('BAD', bad)\n"
    )
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{REPO}:{REPO / 'proto'}", "HOME": str(Path.home())}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "BAD []" in out.stdout, out.stdout
