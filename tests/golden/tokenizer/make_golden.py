#!/usr/bin/env python3
"""Regenerate the CLIP tokenizer goldens used by tests/it/tokenizer_parity.rs.

Run from the repository root with the project's Python environment:

    /work/pyenv/bin/python tests/golden/tokenizer/make_golden.py

What it does:
  1. Builds the CLIP BPE merge list from open_clip's bpe_simple_vocab_16e6.txt.gz
     (the file OpenAI's CLIP ships; first line is a header, the vocabulary uses the
     first 49152-256-2 merges) and writes / verifies
       - tests/data/clip-merges.txt.gz        (HF merges.txt format, all 48894 merges)
       - assets/tokenizer/clip-merges-2000.txt (HF merges.txt format, first 2000 merges)
  2. Builds vocab.json exactly like CLIP does (256 byte chars in bytes_to_unicode order,
     the same with "</w>", one entry per merge, then <|startoftext|>, <|endoftext|>) and
     checks a few ids against the published HF vocabulary layout.
  3. Tokenizes the prompts below with transformers' CLIPTokenizer (what diffusers'
     pipelines load) under several configurations and writes ids.json.

The prompts are tokenized exactly like diffusers does:
    tok(prompt, padding="max_length", max_length=77, truncation=True)
"""

import gzip
import json
import os
import random
import shutil
import sys
import tempfile

import tokenizers
import transformers
from transformers import CLIPTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", "..", ".."))
OPEN_CLIP_BPE = os.path.join(
    sys.prefix, "lib", "python3.11", "site-packages", "open_clip", "bpe_simple_vocab_16e6.txt.gz"
)
FULL_MERGES_GZ = os.path.join(ROOT, "tests", "data", "clip-merges.txt.gz")
TINY_MERGES = os.path.join(ROOT, "assets", "tokenizer", "clip-merges-2000.txt")
CONFIGS = os.path.join(HERE, "configs")
OUT = os.path.join(HERE, "ids.json")

N_MERGES = 49152 - 256 - 2
N_TINY = 2000
MAX_LEN = 77


def bytes_to_unicode():
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def build_vocab(merges):
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    for m in merges:
        vocab.append("".join(m))
    vocab.extend(["<|startoftext|>", "<|endoftext|>"])
    return {v: i for i, v in enumerate(vocab)}


def merges_txt(merges):
    return "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)


def write_or_verify(path, data: bytes, what):
    if os.path.exists(path):
        with open(path, "rb") as f:
            old = f.read()
        if path.endswith(".gz"):
            old, data = gzip.decompress(old), gzip.decompress(data)
        if old != data:
            sys.exit(f"{path} differs from {what}; delete it to regenerate")
    else:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
        print(f"wrote {path}")


def load_merges():
    with gzip.open(OPEN_CLIP_BPE) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]
    assert len(merges) == N_MERGES and all(len(m) == 2 for m in merges)
    full = merges_txt(merges).encode("utf-8")
    write_or_verify(FULL_MERGES_GZ, gzip.compress(full, compresslevel=9, mtime=0), OPEN_CLIP_BPE)
    write_or_verify(TINY_MERGES, merges_txt(merges[:N_TINY]).encode("utf-8"), OPEN_CLIP_BPE)
    return merges


def bare_tokenizer_json(vocab, merges):
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [],
        "normalizer": None,
        "pre_tokenizer": None,
        "post_processor": None,
        "decoder": None,
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [list(m) for m in merges],
        },
    }


PROMPTS = [
    "a photo of a cat",
    "A Photo Of A CAT",
    "a red car, parked on the street; high quality!!! 8k, (masterpiece:1.2)",
    "it's don't O'Neil we're they've I'm you'll he'd",
    "IT'S DON'T WE'LL",
    "''s 's's 'S x'y",
    "don\u2019t \u2018curly\u2019 \u201cquotes\u201d 'quoted' \"double\" ``back``",
    "caf\u00e9 na\u00efve r\u00e9sum\u00e9 Cr\u00e8me Br\u00fbl\u00e9e",
    "cafe\u0301 e\u0301 x\u0301\u0302 n\u0303o",
    "\u6771\u4eac\u30bf\u30ef\u30fc at night, \u5bcc\u58eb\u5c71",
    "\U0001F697\U0001F697 emoji car \U0001F44D\U0001F3FD \U0001F468\u200d\U0001F469\u200d\U0001F467 \U0001F1EF\U0001F1F5",
    "\u041f\u0440\u0438\u0432\u0435\u0442 \u043c\u0438\u0440, \u041c\u043e\u0441\u043a\u0432\u0430",
    "\u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645",
    "\uff26\uff35\uff2c\uff2c\uff37\uff29\uff24\uff34\uff28\u3000\uff54\uff45\uff58\uff54\uff11\uff12\uff13\uff01",
    "zero\u200bwidth\u200d joiner\ufeff bom\u00ad soft",
    "ctrl\x00\x01\x07\x1b chars\x7f \x85nel",
    "tabs\tand\nnewlines\r\n  and   spaces\x0b\x0c",
    "\u00a0nbsp\u2003em\u3000ideo\u2028line\u2029par\u180emongol\u202fnarrow",
    "   leading and trailing   ",
    "",
    "     ",
    "numbers 12345 3.14 1,000,000 2nd 1920x1080",
    "<|endoftext|>",
    "a <|endoftext|> b <|startoftext|> c",
    "A <|ENDOFTEXT|> <|StartOfText|> <|startoftext|>",
    "no space<|endoftext|>here<|endoftext|><|endoftext|>",
    "<|endoftext|x <endoftext> |endoftext|",
    "hello! wow!! what?! ... !",
    "!!!",
    "a!b!c",
    "hyphen-ated under_score snake_case CamelCase",
    "email@example.com https://example.com/path?q=1&x=2",
    "#hashtag @mention $100 50% a+b=c ~tilde~ [brackets] {braces}",
    "\u039f\u0394\u039f\u03a3 \u03a3\u03af\u03c3\u03c5\u03c6\u03bf\u03c2",
    "\u0130stanbul \u01c5 \u00df \u1e9e \ufb01 \u212a",
    "\u210c\U0001d522\U0001d529\U0001d529\U0001d52c \U0001d41b\U0001d428\U0001d425\U0001d41d \u2460\u2461\u2462 \u00bd x\u00b2",
    "\ud55c\uad6d\uc5b4 \ud14d\uc2a4\ud2b8 and \u0e44\u0e17\u0e22 \u0939\u093f\u0928\u094d\u0926\u0940",
    "\ufffdreplacement \U0010ffff private\ue000",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "masterpiece, best quality, ultra-detailed, 1girl, solo, looking at viewer, "
    "(((detailed eyes))), [lowres], <lora:foo:0.8>",
    "a photo of a cat " * 30,
    "a " * 75,
    "a " * 76,
    "a " * 74 + "<|endoftext|>",
    "\u6771\u4eac " * 40,
    "\U0001f600" * 100,
]


def fuzz_prompts(n=150, seed=1234):
    rng = random.Random(seed)
    pool = (
        list("abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789")
        + list("     .,;:!?'\"-_()[]{}<>|/\\@#$%^&*+=~`")
        + ["'s", "'t", "'re", "'ll", "<|endoftext|>", "<|startoftext|>", "<|ENDOFTEXT|>", "\t", "\n"]
        + list("\u00e9\u00e8\u00ef\u00df\u0130\u03a3\u03c3\u0301\u0308\u200b\u200d\ufeff\x00\x07\x85\u00a0\u3000")
        + list("\u6771\u4eac\u30bf\u30ef\u30fc\uac00\u0416\u0436\u0645\uff21\uff41\uff11\u2460\u00bd")
        + ["\U0001f697", "\U0001f44d", "\U0001f3fd", "\U0001d41b", "\u2019", "\u201c", "\ufb01"]
    )
    out = []
    for _ in range(n):
        k = rng.randint(1, 40)
        out.append("".join(rng.choice(pool) for _ in range(k)))
    return out


def main():
    merges = load_merges()
    full_vocab = build_vocab(merges)
    tiny_vocab = build_vocab(merges[:N_TINY])
    # The published HF vocab layout (openai/clip-vit-large-patch14, SD's tokenizer).
    for tok, i in [("!", 0), ("a</w>", 320), ("photo</w>", 1125), ("cat</w>", 2368),
                   ("<|startoftext|>", 49406), ("<|endoftext|>", 49407)]:
        assert full_vocab[tok] == i, (tok, full_vocab[tok], i)
    assert len(full_vocab) == 49408 and len(tiny_vocab) == 256 * 2 + N_TINY + 2

    tmp = tempfile.mkdtemp()
    try:
        def make_dir(name, vocab, merge_list, config):
            d = os.path.join(tmp, name)
            os.makedirs(d)
            with open(os.path.join(d, "vocab.json"), "w", encoding="utf-8") as f:
                json.dump(vocab, f, ensure_ascii=False)
            with open(os.path.join(d, "merges.txt"), "w", encoding="utf-8") as f:
                f.write(merges_txt(merge_list))
            if config:
                for fn in os.listdir(os.path.join(CONFIGS, config)):
                    shutil.copy(os.path.join(CONFIGS, config, fn), d)
            return d

        # name -> (description for the Rust side, tokenizer)
        configs = {}
        for name, config in [("full", None), ("sd15", "sd15"), ("sdxl2", "sdxl2"), ("sdxl2_legacy", "sdxl2_legacy")]:
            d = make_dir(name, full_vocab, merges, config)
            configs[name] = ({"kind": "dir", "vocab": "full", "config": config}, CLIPTokenizer.from_pretrained(d))
        for name, pad in [("tiny", "<|endoftext|>"), ("tiny_bang", "!")]:
            configs[name] = (
                {"kind": "strings", "vocab": "tiny", "pad_token": pad},
                CLIPTokenizer(vocab=dict(tiny_vocab), merges=list(merges[:N_TINY]), pad_token=pad),
            )

        # transformers 5 rebuilds CLIP's pipeline from tokenizer.json's vocab and merges
        # and ignores the rest of the file: a bare BPE tokenizer.json (no normalizer,
        # pre-tokenizer or "</w>" suffix) must tokenize exactly like vocab.json + merges.txt.
        # tests/it/tokenizer_parity.rs writes the same file and checks the same thing.
        d = os.path.join(tmp, "sd15_tokenizer_json")
        os.makedirs(d)
        with open(os.path.join(d, "tokenizer.json"), "w", encoding="utf-8") as f:
            json.dump(bare_tokenizer_json(full_vocab, merges), f, ensure_ascii=False)
        for fn in os.listdir(os.path.join(CONFIGS, "sd15")):
            shutil.copy(os.path.join(CONFIGS, "sd15", fn), d)
        from_json = CLIPTokenizer.from_pretrained(d)
        for p in PROMPTS:
            a = from_json(p, padding="max_length", max_length=MAX_LEN, truncation=True)["input_ids"]
            b = configs["sd15"][1](p, padding="max_length", max_length=MAX_LEN, truncation=True)["input_ids"]
            assert a == b, (p, a, b)

        fuzz = fuzz_prompts()
        result = {
            "generator": "tests/golden/tokenizer/make_golden.py",
            "transformers_version": transformers.__version__,
            "tokenizers_version": tokenizers.__version__,
            "tokenizer_class": f"{CLIPTokenizer.__module__}.{CLIPTokenizer.__name__}",
            "max_length": MAX_LEN,
            "prompts": PROMPTS,
            "fuzz_prompts": fuzz,
            "configs": {},
        }
        for name, (desc, tok) in configs.items():
            added = sorted(
                [i, t.content, bool(t.normalized)]
                for i, t in tok.backend_tokenizer.get_added_tokens_decoder().items()
            )
            entry = dict(desc)
            entry.update(
                {
                    "bos_id": tok.bos_token_id,
                    "eos_id": tok.eos_token_id,
                    "pad_id": tok.pad_token_id,
                    "pad_token": str(tok.pad_token),
                    "vocab_size": tok.vocab_size,
                    "added_tokens": added,
                    "ids": [],
                    "n_tokens": [],
                    "decoded": [],
                    "fuzz_tokens": [],
                }
            )
            for p in PROMPTS:
                ids = tok(p, padding="max_length", max_length=MAX_LEN, truncation=True)["input_ids"]
                assert len(ids) == MAX_LEN
                full = tok(p, add_special_tokens=False)["input_ids"]
                entry["ids"].append(ids)
                entry["n_tokens"].append(len(full))
                entry["decoded"].append(tok.decode(full))
            for p in fuzz:
                entry["fuzz_tokens"].append(tok(p, add_special_tokens=False)["input_ids"])
            result["configs"][name] = entry
    finally:
        shutil.rmtree(tmp)

    with open(OUT, "w", encoding="ascii") as f:
        json.dump(result, f, ensure_ascii=True, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {OUT}: {len(PROMPTS)} prompts + {len(fuzz)} fuzz prompts x {len(configs)} configs")


if __name__ == "__main__":
    main()
