"""The router's torch-free tokenizer against transformers' on tokenizer kinds other than the
default model's byte-level BPE, all built offline here: a SentencePiece-style Unigram (Metaspace
"▁" pre-tokenizer and decoder, BOS added by the post-processor: ERNIE's and Llama-2's kind) and a
word-level tokenizer whose chat template renders image content parts (the tiny vision model's).
Same ids, decoded text and rendered templates."""
from __future__ import annotations

from pathlib import Path

import pytest

from cluster.router.tokenizer import RouterTokenizer
from tests.conftest import with_vl_tokenizer

CORPUS = ["The capital of France is Paris.", "Hello world, how are you today?", "Count: one, two, three!",
          "Unicode: naïve café 東京", "tabs\tand\nnewlines", "don't stop believing"] * 20
TEXTS = ["Hello world", " leading space", "naïve café", "two  spaces", "What is the capital of France?",
         "<s> inline special", "don't"]
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>' }}{% if m['content'] is string %}"
            "{{ m['content'] }}{% else %}{% for p in m['content'] %}{% if p['type'] == 'image' %}<img>"
            "{% else %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}{{ eos_token }}{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _unigram(folder: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    specials = ["<unk>", "<s>", "</s>", "<img>", "<|user|>", "<|assistant|>", "<|system|>"]
    tok.train_from_iterator(CORPUS, trainers.UnigramTrainer(vocab_size=120, special_tokens=specials, unk_token="<unk>"))
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   additional_special_tokens=specials[3:])
    fast.chat_template = TEMPLATE
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=["unigram", "vl-wordlevel"])
def both(request, tmp_path_factory, tiny_vl_checkpoint):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp(request.param)
    folder = _unigram(root / "tok") if request.param == "unigram" else with_vl_tokenizer(tiny_vl_checkpoint, root / "vl")
    return request.param, RouterTokenizer(folder), AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("special", [True, False])
def test_encode_decode_match_transformers(both, special):
    kind, ours, ref = both
    texts = TEXTS if kind == "unigram" else ["t1 t2 t3", "user t5 <|IMAGE_START|> <|image@placeholder|> t6", "t9  t10"]
    for text in texts:
        ids = ours(text, add_special_tokens=special).input_ids
        assert ids == list(ref(text, add_special_tokens=special).input_ids), (kind, text)
        assert ours.decode(ids) == ref.decode(ids), (kind, text)
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True), (kind, text)
        assert [ours.decode([t]) for t in ids] == [ref.decode([t]) for t in ids], (kind, text)
    assert len(ours) == len(ref)


@pytest.mark.parametrize("gen", [True, False])
def test_chat_templates_with_image_parts_match_transformers(both, gen):
    kind, ours, ref = both
    chats = [
        [{"role": "user", "content": "t1 t2" if kind != "unigram" else "What is the capital of France?"}],
        [{"role": "system", "content": "t3"}, {"role": "user", "content": [
            {"type": "text", "text": "t4"}, {"type": "image"}, {"type": "text", "text": "t5 t6"}]}],
    ]
    for chat in chats:
        text = ours.apply_chat_template(chat, add_generation_prompt=gen)
        assert text == ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen), (kind, chat)
        assert ours(text, add_special_tokens=False).input_ids == list(ref(text, add_special_tokens=False).input_ids)
