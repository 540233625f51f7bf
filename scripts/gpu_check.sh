#!/usr/bin/env bash
# Device check of the vLLM plugin (docs/serving.md): on one CUDA GPU with dpa and vLLM installed, build the demo
# export, serve it with `dpa serve` (vLLM), and compare vLLM's greedy answers on held-out demo questions with
# plain transformers' `generate` on the same GPU. Prints one line per prompt and a verdict; exits 0 on PASS.
#
#   scripts/gpu_check.sh [WORKDIR]        # default WORKDIR: gpu-check (the demo is reused when present)
#   PORT=8123 PROMPTS=8 TOKENS=12 scripts/gpu_check.sh /tmp/gpu-check
set -euo pipefail

WORK=${1:-gpu-check}
PORT=${PORT:-8123}
PROMPTS=${PROMPTS:-6}
TOKENS=${TOKENS:-12}
export HF_HUB_OFFLINE=1

python -c "import vllm, torch; assert torch.cuda.is_available(), 'no CUDA GPU visible'" \
  || { echo "gpu_check: needs vLLM (pip install vllm) and a CUDA GPU" >&2; exit 2; }

if [ ! -f "$WORK/demo/dpa/export/config.json" ]; then
  dpa demo --steps-scale 0.1 -o "$WORK/demo" --force >&2
fi
EXPORT="$WORK/demo/dpa/export"

# float32 on both sides, so the comparison is about the model code, not rounding; the demo LLMs hold 1024
# positions.
dpa serve "$EXPORT" --port "$PORT" --dtype float32 --max-model-len 1024 --gpu-memory-utilization 0.5 \
  --enforce-eager >"$WORK/vllm.log" 2>&1 &
SERVER=$!
trap 'kill "$SERVER" 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do
  if curl -sf "http://127.0.0.1:$PORT/health" >/dev/null; then break; fi
  if ! kill -0 "$SERVER" 2>/dev/null; then echo "gpu_check: vLLM exited; see $WORK/vllm.log" >&2; exit 1; fi
  sleep 2
done

python - "$EXPORT" "$WORK/demo/data" "$PORT" "$PROMPTS" "$TOKENS" <<'EOF'
import base64, json, sys, urllib.request
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

export, data, port, prompts, tokens = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
model = AutoModelForImageTextToText.from_pretrained(export, trust_remote_code=True, dtype=torch.float32).cuda().eval()
processor = AutoProcessor.from_pretrained(export, trust_remote_code=True)
items = json.loads((data / "heldout.json").read_text())[:prompts]
same = 0
for item in items:
    path = data / "images" / item["image"]
    url = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    body = {"model": export, "max_tokens": tokens, "temperature": 0, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": item["question"]}]}]}
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    served = json.loads(urllib.request.urlopen(request, timeout=300).read())["choices"][0]["message"]["content"]
    from PIL import Image
    messages = [{"role": "user", "content": [{"type": "image", "image": Image.open(path).convert("RGB")},
                                             {"type": "text", "text": item["question"]}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt").to("cuda", torch.float32)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=tokens, do_sample=False)
    local = processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    same += served == local
    print(f"{'SAME' if served == local else 'DIFF'}  {item['question']!r}: vllm={served!r} transformers={local!r}")
verdict = "PASS" if same == len(items) else "FAIL"
print(f"{verdict}: {same}/{len(items)} greedy answers of vLLM equal transformers'")
sys.exit(0 if verdict == "PASS" else 1)
EOF
