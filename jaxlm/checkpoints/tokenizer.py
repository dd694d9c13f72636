"""One tokenizer type for every weight format: a `tokenizers.Tokenizer` plus the special ids and the
chat template, built from a HF directory (`tokenizer.json` + `tokenizer_config.json`) or from GGUF
metadata (`tokenizer.ggml.*`)."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from jaxlm.checkpoints.hf import CheckpointError, read_json_object

# llama.cpp pre-tokenizer names -> split regexes applied before byte-level BPE. "smollm" splits digits
# one by one, then the GPT-2 pattern (as SmolLM2's own tokenizer.json does).
_GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GGUF_PRE_SPLITS: dict[str, tuple[str, ...]] = {
    "default": (_GPT2_PATTERN,),
    "gpt2": (_GPT2_PATTERN,),
    "smollm": (r"\p{N}", _GPT2_PATTERN),
    "llama-bpe": (_LLAMA3_PATTERN,),
    "llama3": (_LLAMA3_PATTERN,),
}


@dataclass
class Tokenizer:
    """Text <-> ids with the model's special tokens. `encode` adds BOS only when the model wants it."""

    backend: HFTokenizer
    bos_id: int | None = None
    eos_ids: tuple[int, ...] = ()
    pad_id: int | None = None
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None
    special_tokens: dict[str, str] = field(default_factory=dict)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # The backend's post-processor (BERT's [CLS] .. [SEP]) runs with add_special_tokens; BOS/EOS
        # flags from tokenizer_config.json / GGUF are set only where no post-processor adds them.
        ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens:
            if self.add_bos and self.bos_id is not None:
                ids = [self.bos_id] + ids
            if self.add_eos and self.eos_ids:
                ids = ids + [self.eos_ids[0]]
        return ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [self.encode(t, add_special_tokens) for t in texts]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        documents: Sequence[Mapping[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        """Render the model's own chat template as transformers' `apply_chat_template(tokenize=False)`.

        The environment is transformers': sandboxed jinja2 with loop controls (`break`/`continue`),
        trim_blocks/lstrip_blocks, `raise_exception`, `strftime_now`, a `tojson` that keeps non-ASCII
        text, `{% generation %}` blocks, and the variables messages, tools, documents,
        add_generation_prompt and the special tokens (bos_token, eos_token), undefined ones falsy.

        Args:
          messages: [{"role": ..., "content": ...}, ...].
          add_generation_prompt: end with the assistant turn's opening.
          tools: JSON tool schemas, or None.
          documents: [{"title": ..., "text": ...}] for retrieval templates, or None.
          **kwargs: further template variables (e.g. enable_thinking=False, date_string=...).

        Returns:
          The rendered prompt text.

        Raises:
          ValueError: the tokenizer has no chat template.
          CheckpointError: the template fails to compile or raises (e.g. raise_exception on a role
            order it rejects), with jinja's message.
        """
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template; pass plain prompts instead")
        import jinja2

        try:
            template = _compile_chat_template(self.chat_template)
            return template.render(
                messages=[dict(m) for m in messages], tools=None if tools is None else list(tools),
                documents=None if documents is None else list(documents),
                add_generation_prompt=add_generation_prompt, **{**self.special_tokens, **kwargs},
            )
        except jinja2.TemplateError as e:
            raise CheckpointError(f"chat template: {e.message or type(e).__name__}") from None

    def save(self, directory: str | Path) -> None:
        """Write tokenizer.json and tokenizer_config.json so transformers' AutoTokenizer can load them."""
        directory = Path(directory)
        self.backend.save(str(directory / "tokenizer.json"))
        (directory / "tokenizer_config.json").write_text(json.dumps(self._hf_config(), indent=2))

    def _hf_config(self) -> dict[str, Any]:
        name = lambda i: None if i is None else self.backend.id_to_token(i)
        cfg: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": name(self.bos_id),
            "eos_token": name(self.eos_ids[0]) if self.eos_ids else None,
            "pad_token": name(self.pad_id),
            "add_bos_token": self.add_bos,
            "add_eos_token": self.add_eos,
        }
        if self.chat_template:
            cfg["chat_template"] = self.chat_template
        return cfg

    # ----------------------------------------------------------------- constructors

    @classmethod
    def from_hf_dir(cls, path: str | Path, model_config: Mapping[str, Any] | None = None) -> "Tokenizer":
        """The tokenizer of a HF directory: `tokenizer.json`, `tokenizer_config.json` (special tokens,
        BOS/EOS flags, chat template) and `chat_template.jinja`.

        Args:
          path: the directory.
          model_config: its parsed config.json (BOS/EOS/pad ids when tokenizer_config.json has none).

        Raises:
          CheckpointError: tokenizer.json missing or unreadable, tokenizer_config.json not a JSON
            object, or one of its special-token / chat_template fields of the wrong type (one line
            naming the file and field).
        """
        path = Path(path)
        file = path / "tokenizer.json"
        if not file.is_file():
            raise CheckpointError(f"{file}: missing (jaxlm reads fast tokenizers; save one with transformers)")
        try:
            spec = json.loads(file.read_text())
            backend = HFTokenizer.from_str(json.dumps(spec))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{file}: invalid JSON ({e})") from None
        except Exception as e:  # the tokenizers library rejects the structure
            raise CheckpointError(f"{file}: not a tokenizers file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        # Some tokenizer.json files (MiniLM) store fixed padding/truncation; batching is ours to do.
        backend.no_padding()
        backend.no_truncation()
        cfg_file = path / "tokenizer_config.json"
        cfg: dict[str, Any] = {}
        if cfg_file.is_file():
            cfg = read_json_object(cfg_file)
        model_config = model_config or {}

        def token_id(key: str) -> int | None:
            tok = cfg.get(key)
            tok = tok.get("content") if isinstance(tok, dict) else tok
            if tok is not None and not isinstance(tok, str):
                raise CheckpointError(f"{cfg_file}: field {key!r} = {cfg[key]!r} must be a token string")
            return backend.token_to_id(tok) if tok else None

        for key in ("add_bos_token", "add_eos_token"):
            if cfg.get(key) is not None and not isinstance(cfg[key], bool):
                raise CheckpointError(f"{cfg_file}: field {key!r} = {cfg[key]!r} must be true or false")
        bos = token_id("bos_token")
        bos = bos if bos is not None else model_config.get("bos_token_id")
        eos = token_id("eos_token")
        eos_cfg = model_config.get("eos_token_id")
        eos_ids = tuple(eos_cfg) if isinstance(eos_cfg, list) else ((eos_cfg,) if eos_cfg is not None else ())
        if eos is not None and eos not in eos_ids:
            eos_ids = (eos,) + eos_ids
        pad = token_id("pad_token")
        pad = pad if pad is not None else model_config.get("pad_token_id")
        # A post-processor in tokenizer.json (BERT's [CLS] ... [SEP], Llama's <s>) is the source of truth.
        post = spec.get("post_processor") if isinstance(spec, dict) else None
        add_bos = bool(cfg.get("add_bos_token", False))
        template = cfg.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if template is not None and not isinstance(template, str):
            raise CheckpointError(f"{cfg_file}: field 'chat_template' must be a string or a list of named templates")
        chat_file = path / "chat_template.jinja"
        if template is None and chat_file.is_file():
            template = chat_file.read_text()
        return cls(
            backend=backend,
            bos_id=bos,
            eos_ids=eos_ids,
            pad_id=pad,
            add_bos=add_bos and post is None,
            add_eos=bool(cfg.get("add_eos_token", False)) and post is None,
            chat_template=template if isinstance(template, str) else None,
            special_tokens=_special_token_strings(backend, bos, eos_ids),
        )

    @classmethod
    def from_gguf_fields(cls, fields: Mapping[str, Any], source: str) -> "Tokenizer":
        """The tokenizer of GGUF metadata (`tokenizer.ggml.*`), as llama.cpp / transformers build it:
        byte-level BPE (`tokenizer.ggml.model` 'gpt2') or SentencePiece BPE with byte fallback ('llama':
        Llama 2, Mistral; merges recovered from the scores when the file has none).

        Raises:
          CheckpointError: another tokenizer model, a missing vocabulary, an unknown pre-tokenizer, or
            `tokenizer.ggml.add_space_prefix` false (named with the file).
        """
        kind = fields.get("tokenizer.ggml.model")
        tokens = fields.get("tokenizer.ggml.tokens")
        if kind not in ("gpt2", "llama"):
            raise CheckpointError(f"{source}: tokenizer.ggml.model={kind!r} is not supported "
                                  "(only 'gpt2' byte-level BPE and 'llama' SentencePiece BPE)")
        if not tokens:
            raise CheckpointError(f"{source}: tokenizer.ggml.tokens missing")
        vocab = {t: i for i, t in enumerate(tokens)}
        if kind == "gpt2":
            backend = _gguf_byte_level(fields, vocab, source)
        else:
            backend = _gguf_sentencepiece(fields, vocab, source)
        types = fields.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        control = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3]
        backend.add_special_tokens(control)
        user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == 4]
        if user:  # USER_DEFINED tokens (e.g. <think>) stay whole, as in llama.cpp
            backend.add_tokens(user)
        eos = fields.get("tokenizer.ggml.eos_token_id")
        bos = fields.get("tokenizer.ggml.bos_token_id")
        eos_ids = (eos,) if eos is not None else ()
        for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):  # llama.cpp's end-of-generation ids
            if fields.get(key) is not None and fields[key] not in eos_ids:
                eos_ids = eos_ids + (int(fields[key]),)
        # Chat models end a turn with <|im_end|> / <|eot_id|>: stop on those too.
        for name in ("<|im_end|>", "<|eot_id|>", "<|end|>"):
            if name in vocab and vocab[name] not in eos_ids and fields.get("tokenizer.chat_template", "").find(name) >= 0:
                eos_ids = eos_ids + (vocab[name],)
        # A SentencePiece vocabulary that does not say otherwise gets BOS (llama.cpp, transformers).
        add_bos = fields.get("tokenizer.ggml.add_bos_token", kind == "llama")
        return cls(
            backend=backend,
            bos_id=bos,
            eos_ids=eos_ids,
            pad_id=fields.get("tokenizer.ggml.padding_token_id"),
            add_bos=bool(add_bos),
            add_eos=bool(fields.get("tokenizer.ggml.add_eos_token", False)),
            chat_template=fields.get("tokenizer.chat_template"),
            special_tokens=_special_token_strings(backend, bos, eos_ids),
        )


def _gguf_byte_level(fields: Mapping[str, Any], vocab: dict[str, int], source: str) -> HFTokenizer:
    merges = fields.get("tokenizer.ggml.merges")
    if merges is None:
        raise CheckpointError(f"{source}: tokenizer.ggml.merges missing (a 'gpt2' tokenizer needs its merges)")
    pre = fields.get("tokenizer.ggml.pre", "default")
    if pre not in _GGUF_PRE_SPLITS:
        raise CheckpointError(f"{source}: tokenizer.ggml.pre={pre!r} is not supported; known: {sorted(_GGUF_PRE_SPLITS)}")
    merge_pairs = [tuple(m.split(" ", 1)) for m in merges]
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=merge_pairs, fuse_unk=False, byte_fallback=False))
    splits = [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in _GGUF_PRE_SPLITS[pre]]
    backend.pre_tokenizer = pre_tokenizers.Sequence(splits + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    return backend


def _gguf_sentencepiece(fields: Mapping[str, Any], vocab: dict[str, int], source: str) -> HFTokenizer:
    """transformers' LlamaTokenizer over the file's vocabulary: BPE with byte fallback, Metaspace
    (prefix space on the first piece only), merges from the file or derived from the scores."""
    if fields.get("tokenizer.ggml.add_space_prefix", True) is False:
        raise CheckpointError(f"{source}: tokenizer.ggml.add_space_prefix=False is not supported "
                              "(SentencePiece tokenizers here always prefix a space)")
    merges = fields.get("tokenizer.ggml.merges")
    if merges is not None:
        merge_pairs = [tuple(m.split(" ", 1)) for m in merges]
    else:
        scores = fields.get("tokenizer.ggml.scores")
        if scores is None or len(scores) != len(vocab):
            raise CheckpointError(f"{source}: tokenizer.ggml.scores missing or not one per token "
                                  "(a 'llama' tokenizer without merges needs them)")
        merge_pairs = _merges_from_scores(vocab, dict(zip(vocab, scores)))
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=merge_pairs, fuse_unk=True, byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    backend.decoder = decoders.Sequence([
        decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(content=" ", left=1),
    ])
    return backend


def _merges_from_scores(vocab: Mapping[str, int], scores: Mapping[str, float]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: every split of a token into two tokens,
    best score first (transformers' `generate_merges` with scores)."""
    merges = []
    for piece, score in scores.items():
        local = [(piece[:i], piece[i:], score) for i in range(1, len(piece)) if piece[:i] in vocab and piece[i:] in vocab]
        merges.extend(sorted(local, key=lambda x: (vocab[x[0]], vocab[x[1]])))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def _special_token_strings(backend: HFTokenizer, bos: int | None, eos_ids: Sequence[int]) -> dict[str, str]:
    out = {}
    if bos is not None:
        out["bos_token"] = backend.id_to_token(bos)
    if eos_ids:
        out["eos_token"] = backend.id_to_token(eos_ids[0])
    return out


@functools.lru_cache(maxsize=16)
def _compile_chat_template(source: str) -> Any:
    """A chat template compiled in transformers' environment (see `Tokenizer.apply_chat_template`)."""
    import datetime

    import jinja2
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask marker): renders its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(source)
